"""What a loader hands the exporter: config, lazily read weights, tokenizer and chat template."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import ExportError, ModelConfig


class Weights:
    """Lazily materialised float32 weights under Hugging Face names (`model.layers.0...`).

    Loaders register one thunk per tensor so that a big model is read one layer at a time.
    Linear weights keep the HF `[out_features, in_features]` layout.
    """

    def __init__(self) -> None:
        self._thunks: dict[str, Callable[[], np.ndarray]] = {}

    def register(self, name: str, thunk: Callable[[], np.ndarray]) -> None:
        self._thunks[name] = thunk

    def has(self, name: str) -> bool:
        return name in self._thunks

    def names(self) -> Iterable[str]:
        return self._thunks.keys()

    def get(self, name: str) -> np.ndarray:
        try:
            thunk = self._thunks[name]
        except KeyError:
            raise ExportError(f"the model has no tensor {name!r}") from None
        return np.ascontiguousarray(thunk(), dtype=np.float32)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Weights:
        w = cls()
        for name, arr in arrays.items():
            w.register(name, lambda a=arr: a)
        return w


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def lm_head_weight(cfg: ModelConfig, weights: Weights) -> np.ndarray:
    """The output projection; tied models reuse the embedding matrix."""
    if weights.has("lm_head.weight") and not cfg.tie_word_embeddings:
        return weights.get("lm_head.weight")
    return weights.get("model.embed_tokens.weight")


@dataclass
class SpecialTokens:
    bos_token_id: int | None
    eos_token_ids: list[int]
    pad_token_id: int | None
    add_bos_token: bool
    bos_token: str | None = None
    eos_token: str | None = None


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: Weights
    tokenizer_json: str
    chat_template: str | None
    special: SpecialTokens
    source: dict = field(default_factory=dict)


def sha256_files(paths: Iterable[Path]) -> str:
    """One digest over several files, in the order given (names are not hashed)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()
