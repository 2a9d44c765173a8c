"""GGUF input: dequantisation, Q/K un-permutation, tokenizer rebuild, end-to-end parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import left_padded_batch
from gguf_writer import write_gguf
from tokenizers import Tokenizer

from inferaligner_onnx.config import ExportError
from inferaligner_onnx.export import export, load_source
from inferaligner_onnx.fixture import write_hf_model
from inferaligner_onnx.gguf_source import load_gguf
from inferaligner_onnx.hf import load_hf_dir
from inferaligner_onnx.reference import ReferenceModel
from inferaligner_onnx.runner import SegmentChain

TEXTS = [
    "What is the capital of France?",
    "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n",
    "Numbers 1234567 and 3.14159, prices like $42.50!",
    "  leading spaces,\ttabs\nnew lines\n\n and   runs   of spaces  ",
    "Unicode: café naïve Zürich 東京 🙂 — dashes…",
    "don't can't I'm we'll they've she'd it's",
    "def add(a, b):\n    return a + b  # code",
    "<|im_end|><|endoftext|> special tokens typed back to back<|im_start|>",
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return write_hf_model(tmp_path_factory.mktemp("hf"), seed=11)


@pytest.fixture(scope="module")
def hf_dir_256(tmp_path_factory) -> Path:
    """Rows of 256 values, so that K-quants (256-value super-blocks) apply."""
    return write_hf_model(
        tmp_path_factory.mktemp("hf256"),
        seed=12,
        hidden_size=256,
        intermediate_size=512,
        head_dim=64,
    )


def test_f32_gguf_gives_the_hf_weights_back(hf_dir: Path, tmp_path: Path) -> None:
    """Q/K rows come back un-permuted: every tensor equals the HF original exactly."""
    hf = load_hf_dir(hf_dir)
    gg = load_gguf(write_gguf(hf_dir, tmp_path / "m.gguf", "F32"))
    assert gg.config.to_json() == hf.config.to_json()
    assert sorted(gg.weights.names()) == sorted(hf.weights.names())
    for name in hf.weights.names():
        np.testing.assert_array_equal(gg.weights.get(name), hf.weights.get(name), err_msg=name)
    assert gg.special.eos_token_ids == hf.special.eos_token_ids
    assert gg.chat_template == hf.chat_template


@pytest.mark.parametrize(
    ("qtype", "max_rel_err", "fixture_name"),
    [
        ("F16", 1e-3, "hf_dir"),
        ("Q8_0", 0.02, "hf_dir"),
        ("Q4_1", 0.15, "hf_dir"),
        ("Q4_K", 0.15, "hf_dir_256"),
    ],
)
def test_quantized_weights_dequantize_close_to_the_originals(
    qtype: str, max_rel_err: float, fixture_name: str, tmp_path: Path, request
) -> None:
    src = request.getfixturevalue(fixture_name)
    hf = load_hf_dir(src)
    path = write_gguf(src, tmp_path / f"m-{qtype}.gguf", qtype)
    gg = load_gguf(path)
    from gguf import GGUFReader

    types = {t.tensor_type.name for t in GGUFReader(path).tensors}
    assert qtype in types, f"no {qtype} tensor was written ({types})"
    for name in hf.weights.names():
        want, got = hf.weights.get(name), gg.weights.get(name)
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel <= max_rel_err, f"{name}: relative error {rel:.3g}"


def test_quantized_gguf_export_matches_reference_on_dequantized_weights(
    hf_dir_256: Path, tmp_path: Path
) -> None:
    path = write_gguf(hf_dir_256, tmp_path / "m.gguf", "Q4_K")
    model = load_source(path)
    export(model, tmp_path / "out")
    chain = SegmentChain(tmp_path / "out")
    ref = ReferenceModel(model.config, model.weights)
    ids, mask = left_padded_batch([[5, 6, 7, 8, 9, 10], [11, 12, 13]])
    got, want = chain.step(ids, mask), ref.forward(ids, mask)
    valid = mask.astype(bool)
    assert float(np.abs(got.logits - want.logits)[valid].max()) <= 1e-4
    # and the quantized model still behaves like the original
    orig = ReferenceModel(load_hf_dir(hf_dir_256).config, load_hf_dir(hf_dir_256).weights)
    o = orig.forward(ids, mask).logits[valid]
    assert np.corrcoef(o.ravel(), got.logits[valid].ravel())[0, 1] > 0.95


SMOLLM_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


@pytest.mark.parametrize("pre", ["gpt-2", "smollm"])
def test_rebuilt_tokenizer_tokenizes_like_the_original(tmp_path: Path, pre: str) -> None:
    src = write_hf_model(tmp_path / "hf", seed=11)
    if pre == "smollm":  # SmolLM's tokenizer splits digits one by one before byte-level BPE
        tok_json = json.loads((src / "tokenizer.json").read_text())
        tok_json["pre_tokenizer"] = SMOLLM_PRE_TOKENIZER
        (src / "tokenizer.json").write_text(json.dumps(tok_json))
    original = Tokenizer.from_file(str(src / "tokenizer.json"))
    rebuilt = Tokenizer.from_str(
        load_gguf(write_gguf(src, tmp_path / "t.gguf", pre=pre)).tokenizer_json
    )
    assert rebuilt.get_vocab_size() == original.get_vocab_size()
    for text in TEXTS:
        want = original.encode(text, add_special_tokens=False)
        got = rebuilt.encode(text, add_special_tokens=False)
        assert got.ids == want.ids, text
        assert rebuilt.decode(got.ids, skip_special_tokens=False) == original.decode(
            want.ids, skip_special_tokens=False
        )
    if pre == "smollm":
        assert rebuilt.encode("2024", add_special_tokens=False).tokens == ["2", "0", "2", "4"]


def test_special_tokens_are_control_tokens_in_the_rebuilt_tokenizer(
    hf_dir: Path, tmp_path: Path
) -> None:
    tok = json.loads(load_gguf(write_gguf(hf_dir, tmp_path / "t.gguf")).tokenizer_json)
    special = {a["content"] for a in tok["added_tokens"] if a["special"]}
    assert special == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}


def test_truncated_gguf_is_a_clear_error(hf_dir: Path, tmp_path: Path) -> None:
    path = write_gguf(hf_dir, tmp_path / "m.gguf", "Q8_0")
    data = path.read_bytes()
    for cut in (len(data) - 1000, 2000, 10):
        short = tmp_path / f"short-{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(ExportError, match=r"truncated|corrupt"):
            load_source(short)


def test_unknown_pre_tokenizer_points_to_tokenizer_flag(hf_dir: Path, tmp_path: Path) -> None:
    path = write_gguf(hf_dir, tmp_path / "m.gguf", pre="some-new-model")
    with pytest.raises(ExportError, match="--tokenizer"):
        load_source(path)
    # with the original tokenizer supplied, the export works
    model = load_source(path, tokenizer=hf_dir / "tokenizer.json")
    assert model.tokenizer_json == (hf_dir / "tokenizer.json").read_text()
