"""Chained ONNX segments (onnxruntime) against the numpy reference forward pass."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURE, Exported, left_padded_batch

from inferaligner_onnx.cli import build_parser
from inferaligner_onnx.config import ExportError
from inferaligner_onnx.fixture import TWINS, make_fixture
from inferaligner_onnx.runner import SegmentChain

TOL = 1e-4
PROMPTS = [[5, 17, 42, 99, 7, 3, 250, 11, 64], [8, 120, 33, 2]]


def assert_close(got: np.ndarray, want: np.ndarray, mask: np.ndarray, tol: float = TOL) -> float:
    """Max abs diff over real (non-pad) positions; asserts it is within `tol`."""
    valid = mask.astype(bool)
    diff = float(np.abs(got.astype(np.float64) - want)[valid].max())
    assert diff <= tol, f"max abs diff {diff} > {tol}"
    return diff


def run_prefill_and_decode(ex: Exported, steps: int = 3, tol: float = TOL) -> None:
    """Batch 2 with left padding: prefill, then KV-cached decode steps, checked at each step."""
    ids, mask = left_padded_batch(PROMPTS)
    got = ex.chain.step(ids, mask)
    want = ex.ref.forward(ids, mask)
    assert_close(got.logits, want.logits, mask, tol)
    for g, depth in zip(got.hidden_states, got.depths, strict=True):
        assert_close(g, want.hidden_states[depth], mask, tol)
    past_got, past_want = got.present, want.present
    for _ in range(steps):
        nxt = want.logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
        got = ex.chain.step(nxt, mask, past_got)
        want = ex.ref.forward(nxt, mask, past=past_want)
        step_mask = np.ones((2, 1), dtype=np.int64)
        assert_close(got.logits, want.logits, step_mask, tol)
        for g, depth in zip(got.hidden_states, got.depths, strict=True):
            assert_close(g, want.hidden_states[depth], step_mask, tol)
        for (gk, gv), (wk, wv) in zip(got.present, want.present, strict=True):
            assert (
                gk.shape
                == wk.shape
                == (2, ex.model.config.num_kv_heads, mask.shape[1], ex.model.config.head_dim)
            )
            assert_close(gv, wv, np.ones(gv.shape, dtype=bool) & mask[:, None, :, None], tol)
        past_got, past_want = got.present, want.present


def test_llama_prefill_and_decode_match_reference(tiny: Exported) -> None:
    run_prefill_and_decode(tiny)
    assert tiny.chain.step(*left_padded_batch(PROMPTS)).depths == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(
            {"model_type": "qwen2", "attention_bias": True, "tie_word_embeddings": True},
            id="qwen2-bias-tied",
        ),
        pytest.param(
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                },
                "rope_theta": 500000.0,
            },
            id="llama3-rope-scaling",
        ),
        pytest.param(
            {"model_type": "mistral", "sliding_window": 128, "num_key_value_heads": 1},
            id="mistral-mqa",
        ),
    ],
)
def test_architectures_match_reference(tmp_path: Path, overrides: dict) -> None:
    run_prefill_and_decode(Exported(tmp_path, **overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="llama"),
        pytest.param({"model_type": "qwen2", "attention_bias": True}, id="qwen2-bias"),
        pytest.param({"num_key_value_heads": 1}, id="mqa"),
    ],
)
def test_fused_variant_matches_reference(tmp_path: Path, overrides: dict) -> None:
    """GroupQueryAttention export: equal-length rows (it takes no padding), prefill and
    KV-cached decode steps against the numpy reference."""
    ex = Exported(
        tmp_path, export_kwargs={"variant": "fused", "layers_per_segment": 2}, **overrides
    )
    assert {s.get("variant") for s in ex.manifest["segments"][1:-1]} == {"fused"}
    ids = np.asarray([[5, 17, 42, 99, 7, 3], [8, 120, 33, 2, 64, 11]], dtype=np.int64)
    mask = np.ones_like(ids)
    got, want = ex.chain.step(ids, mask), ex.ref.forward(ids, mask)
    assert_close(got.logits, want.logits, mask)
    for g, depth in zip(got.hidden_states, got.depths, strict=True):
        assert_close(g, want.hidden_states[depth], mask)
    for _ in range(3):
        nxt = want.logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.ones((2, mask.shape[1] + 1), dtype=np.int64)
        got = ex.chain.step(nxt, mask, got.present)
        want = ex.ref.forward(nxt, mask, past=want.present)
        assert_close(got.logits, want.logits, np.ones((2, 1)))


def test_grouped_layers_match_reference(tmp_path: Path) -> None:
    ex = Exported(tmp_path, export_kwargs={"layers_per_segment": 3})
    kinds = [(s["kind"], s.get("layers")) for s in ex.manifest["segments"]]
    assert kinds == [("embed", None), ("layers", [0, 2]), ("layers", [3, 3]), ("head", None)]
    run_prefill_and_decode(ex)
    assert ex.chain.step(*left_padded_batch(PROMPTS)).depths == [0, 3, 4]


def test_segment_ends_choose_where_graphs_end(tmp_path: Path) -> None:
    ex = Exported(tmp_path, export_kwargs={"segment_ends": [1, 0]})
    kinds = [(s["kind"], s.get("layers")) for s in ex.manifest["segments"]]
    assert kinds == [("embed", None), ("layers", [0, 0]), ("layers", [1, 1]),
                     ("layers", [2, 3]), ("head", None)]  # fmt: skip
    run_prefill_and_decode(ex)


def test_segment_ends_take_layers_and_ranges() -> None:
    args = build_parser().parse_args(["export", "src", "out", "--segment-ends", "12-15,20, 28"])
    assert args.segment_ends == [12, 13, 14, 15, 20, 28]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "src", "out", "--segment-ends", "12-x"])


def test_bad_segment_ends_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not layers of this model"):
        Exported(tmp_path, export_kwargs={"segment_ends": [4]})
    with pytest.raises(ExportError, match="not both"):
        Exported(tmp_path / "b", export_kwargs={"segment_ends": [1], "layers_per_segment": 2})


@pytest.mark.parametrize("variant", ["plain", "fused"])
def test_addends_steer_inside_a_segment_as_a_boundary_does(tmp_path: Path, variant: str) -> None:
    """One graph for all four layers with addend inputs after the inner ones steers a row exactly
    as four graphs with the vectors added between them, bit for bit (each inner layer then ends
    as a graph does); with no vectors it is the model."""
    split = Exported(tmp_path / "split", export_kwargs={"variant": variant})
    one = Exported(
        tmp_path / "one",
        export_kwargs={"variant": variant, "segment_ends": [3], "addend_layers": [0, 1, 2, 3]},
    )
    (seg,) = [s for s in one.manifest["segments"] if s["kind"] == "layers"]
    assert seg["inputs"]["addends"] == {"0": "addend.0", "1": "addend.1", "2": "addend.2"}, (
        "3 ends the segment"
    )
    rng = np.random.default_rng(3)
    hidden = one.model.config.hidden_size
    add = {layer: rng.normal(0, 0.5, (2, hidden)).astype(np.float32) for layer in (1, 2, 3)}
    add[2][1] = 0  # a row the vector leaves alone
    ids = np.asarray([[5, 17, 42, 99, 7, 3], [8, 120, 33, 2, 64, 11]], dtype=np.int64)
    mask = np.ones_like(ids)
    got, want = one.chain.step(ids, mask, add=add), split.chain.step(ids, mask, add=add)
    plain = one.chain.step(ids, mask)
    assert np.abs(got.logits - plain.logits).max() > 1e-2, "the vectors change the logits"
    assert_close(plain.logits, one.ref.forward(ids, mask).logits, mask)
    for _ in range(2):
        np.testing.assert_array_equal(got.logits, want.logits)
        nxt = got.logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.ones((2, mask.shape[1] + 1), dtype=np.int64)
        got = one.chain.step(nxt, mask, got.present, add=add)
        want = split.chain.step(nxt, mask, want.present, add=add)
    other = Exported(tmp_path / "other", export_kwargs={"variant": variant, "segment_ends": [3]})
    with pytest.raises(ValueError, match=r"layers \[1, 2\] end no segment"):
        other.chain.step(ids, np.ones_like(ids), add=add)


def test_bad_addend_layers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"addend layers \[4\] are not layers"):
        Exported(tmp_path, export_kwargs={"addend_layers": [1, 4]})


def test_float16_export_is_close(tmp_path: Path) -> None:
    ex = Exported(tmp_path, export_kwargs={"dtype": "float16"})
    assert ex.manifest["dtype"] == "float16"
    ids, mask = left_padded_batch(PROMPTS)
    got = ex.chain.step(ids, mask)
    want = ex.ref.forward(ids, mask)
    scale = float(np.abs(want.logits).max())
    assert_close(got.logits, want.logits, mask, tol=0.02 * scale)
    assert (got.logits[:, -1].argmax(-1) == want.logits[:, -1].argmax(-1)).all()


def test_padding_does_not_change_a_row(tiny: Exported) -> None:
    """A left-padded row gives the same last-token logits as the same prompt alone."""
    ids, mask = left_padded_batch(PROMPTS)
    batched = tiny.chain.step(ids, mask).logits[1, -1]
    alone = np.asarray([PROMPTS[1]], dtype=np.int64)
    single = tiny.chain.step(alone, np.ones_like(alone)).logits[0, -1]
    np.testing.assert_allclose(batched, single, atol=TOL)


def test_committed_fixture_matches_its_golden_values() -> None:
    chain = SegmentChain(FIXTURE)
    golden = json.loads((FIXTURE / "golden.json").read_text())
    for case in golden["cases"]:
        ids = np.asarray([case["input_ids"]], dtype=np.int64)
        r = chain.step(ids, np.ones_like(ids))
        np.testing.assert_allclose(r.logits[0, -1], case["last_logits"], atol=TOL)
        for h, want in zip(r.hidden_states, case["last_residuals"], strict=True):
            np.testing.assert_allclose(h[0, -1], want, atol=TOL)
        steps = len(case["greedy_ids"])
        assert chain.greedy(case["input_ids"], steps, stop_ids=set()) == case["greedy_ids"]


def test_fixture_regenerates_bit_for_bit(tmp_path: Path) -> None:
    golden = json.loads((FIXTURE / "golden.json").read_text())
    twins = {FIXTURE.parent / f"tiny-llama-{name}": tmp_path / name for name in TWINS}
    make_fixture(
        tmp_path / "again", golden["seed"], {again: TWINS[again.name] for again in twins.values()}
    )
    for committed, again in ((FIXTURE, tmp_path / "again"), *twins.items()):
        names = sorted(p.name for p in committed.iterdir())
        assert names == sorted(p.name for p in again.iterdir())
        _, mismatch, errors = filecmp.cmpfiles(committed, again, names, shallow=False)
        assert not mismatch and not errors, f"differs from the committed fixture: {mismatch}"


def test_manifest_describes_segments(tiny: Exported) -> None:
    m = tiny.manifest
    assert m["format"] == "inferaligner.export/v1"
    assert [s["kind"] for s in m["segments"]] == ["embed"] + ["layers"] * 4 + ["head"]
    assert [s["layers"] for s in m["segments"][1:-1]] == [[i, i] for i in range(4)]
    for seg in m["segments"]:
        assert (tiny.out / seg["file"]).is_file()
        assert len(seg["sha256"]) == 64
    assert m["tokenizer"]["eos_token_ids"] == [2]
    assert (tiny.out / m["chat_template"]).read_text().startswith("{% for message")
    assert len(m["source"]["sha256"]) == 64


def test_int4_export_stays_close_to_float32(tmp_path: Path) -> None:
    full = Exported(tmp_path / "f32")
    q = Exported(tmp_path / "int4", export_kwargs={"int4": True})
    assert q.manifest["weights"] == "int4-block32"
    layer_bytes = lambda ex: sum(  # noqa: E731
        (ex.out / f).stat().st_size for f in ("layer_0.onnx", "layer_0.onnx.data")
    )
    assert layer_bytes(q) < layer_bytes(full) / 3
    ids, mask = left_padded_batch(PROMPTS)
    a = full.chain.step(ids, mask).logits[mask.astype(bool)]
    b = q.chain.step(ids, mask).logits[mask.astype(bool)]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95
