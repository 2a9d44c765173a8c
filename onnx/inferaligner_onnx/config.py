"""Model hyperparameters shared by the loaders, the numpy reference and the graph builder."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

# Architectures whose decoder block is the Llama block (RMSNorm, RoPE, GQA attention, SwiGLU MLP).
# Qwen2 adds q/k/v biases; Mistral adds an optional sliding window; SmolLM2 is plain Llama with
# tied embeddings.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class ExportError(Exception):
    """A clear, user-facing export failure (bad input, unsupported model, existing output)."""


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a Llama-family decoder, in Hugging Face terms."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    # Per-frequency divisors stored in GGUF files (`rope_freqs.weight`, Llama 3 scaling).
    rope_freq_factors: tuple[float, ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ExportError(
                f"unsupported architecture {self.model_type!r}: inferaligner exports the Llama "
                f"family only ({', '.join(SUPPORTED_MODEL_TYPES)}; SmolLM2 is 'llama')"
            )
        if self.num_heads % self.num_kv_heads:
            raise ExportError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ExportError(f"head_dim must be even for RoPE, got {self.head_dim}")
        self.inv_freq()  # refuses unsupported RoPE scaling at load time, not mid-export

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    @property
    def context_length(self) -> int:
        """Longest sequence the exported graphs compute exactly.

        The graphs use full causal attention, which equals Mistral's sliding-window attention
        only up to the window, so the window caps the usable context.
        """
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies (float64, length head_dim/2) with any scaling applied."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        if self.rope_freq_factors is not None:
            return inv / np.asarray(self.rope_freq_factors, dtype=np.float64)
        scaling = self.rope_scaling
        if not scaling:
            return inv
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind in (None, "default"):
            return inv
        if kind == "linear":
            return inv / float(scaling["factor"])
        if kind == "llama3":
            return _llama3_inv_freq(inv, scaling)
        raise ExportError(f"unsupported rope scaling {kind!r} (supported: default, linear, llama3)")

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("rope_freq_factors")
        return d


def _llama3_inv_freq(inv: np.ndarray, scaling: dict) -> np.ndarray:
    """Llama 3.1 frequency-dependent RoPE scaling (transformers' `_compute_llama3_parameters`)."""
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling["original_max_position_embeddings"])
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def config_from_hf(cfg: dict) -> ModelConfig:
    """Build a ModelConfig from a Hugging Face `config.json` dict."""
    model_type = cfg.get("model_type", "")
    archs = cfg.get("architectures") or []
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ExportError(
            f"unsupported architecture {model_type!r} ({', '.join(archs) or 'no architectures'}): "
            f"inferaligner exports the Llama family only ({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    return ModelConfig(
        model_type=model_type,
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        vocab_size=int(cfg["vocab_size"]),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rope_scaling=cfg.get("rope_scaling"),
        attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=int(sliding) if sliding else None,
    )
