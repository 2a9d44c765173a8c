from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inferaligner_onnx.export import export
from inferaligner_onnx.fixture import write_hf_model
from inferaligner_onnx.hf import load_hf_dir
from inferaligner_onnx.reference import ReferenceModel
from inferaligner_onnx.runner import SegmentChain

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "tiny-llama"


class Exported:
    """A tiny HF model, its export, the reference model and an ONNX chain over the export."""

    def __init__(
        self, root: Path, seed: int = 7, export_kwargs: dict | None = None, **config_overrides
    ) -> None:
        self.hf_dir = write_hf_model(root / "hf", seed, **config_overrides)
        self.model = load_hf_dir(self.hf_dir)
        self.out = root / "export"
        self.manifest = export(self.model, self.out, **(export_kwargs or {}))
        self.ref = ReferenceModel(self.model.config, self.model.weights)
        self.chain = SegmentChain(self.out)


@pytest.fixture
def tiny(tmp_path: Path) -> Exported:
    return Exported(tmp_path)


def left_padded_batch(rows: list[list[int]], pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask
