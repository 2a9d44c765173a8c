"""Model-level checks on the embedded default model (opt-in: `make check-smollm2`).

They need the SmolLM2 GGUF and its export, which `make smollm2` produces; they fail (not skip)
when run without them, because running them is a request to check the real model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from inferaligner_onnx.export import load_source
from inferaligner_onnx.reference import ReferenceModel
from inferaligner_onnx.runner import SegmentChain, chat_once, render_chat

pytestmark = pytest.mark.smollm2


def _path(var: str) -> Path:
    value = os.environ.get(var)
    assert value, f"set {var} (make check-smollm2 does)"
    path = Path(value)
    assert path.exists(), f"{path} is missing: run `make smollm2`"
    return path


def test_greedy_answer_names_paris() -> None:
    answer = chat_once(_path("INFERALIGNER_SMOLLM2_EXPORT"), "What is the capital of France?")
    print(f"answer: {answer!r}")
    assert "Paris" in answer


def test_export_has_one_graph_per_layer() -> None:
    chain = SegmentChain(_path("INFERALIGNER_SMOLLM2_EXPORT"))
    kinds = [s["kind"] for s in chain.manifest["segments"]]
    assert kinds == ["embed"] + ["layers"] * 30 + ["head"]


def test_logits_match_numpy_reference() -> None:
    export_dir = _path("INFERALIGNER_SMOLLM2_EXPORT")
    chain = SegmentChain(export_dir)
    model = load_source(_path("INFERALIGNER_SMOLLM2_GGUF"))
    ref = ReferenceModel(model.config, model.weights)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(export_dir / "tokenizer.json"))
    template = (export_dir / chain.manifest["chat_template"]).read_text()
    prompts = [
        render_chat(template, [{"role": "user", "content": q}], chain.manifest)
        for q in ("What is the capital of France?", "Write a haiku about autumn leaves.")
    ]
    rows = [tok.encode(p, add_special_tokens=False).ids for p in prompts]
    width = max(map(len, rows))
    ids = np.zeros((2, width), dtype=np.int64)
    mask = np.zeros((2, width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    got = chain.step(ids, mask)
    want = ref.forward(ids, mask)
    valid = mask.astype(bool)
    diff = float(np.abs(got.logits - want.logits)[valid].max())
    print(f"prefill max abs logit diff: {diff:.3g}")
    assert diff <= 1e-3
    past_got, past_want = got.present, want.present
    for step in range(3):
        nxt = want.logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
        got = chain.step(nxt, mask, past_got)
        want = ref.forward(nxt, mask, past=past_want)
        diff = float(np.abs(got.logits - want.logits).max())
        print(f"decode step {step + 1} max abs logit diff: {diff:.3g}")
        assert diff <= 1e-3
        past_got, past_want = got.present, want.present
