"""Numpy reference forward pass of a Llama-family decoder: the oracle for parity tests.

Written from the Hugging Face modelling code's semantics (not from the ONNX graphs), in float64,
so that the exported graphs are checked against an independent implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .source import Weights, layer_prefix, lm_head_weight

# Score given to masked attention entries: finite, so that a fully masked row (a left-pad query)
# softmaxes to a uniform distribution instead of NaN — the same rule as the graphs.
MASKED_SCORE = -1e30


def position_ids_from_mask(attention_mask: np.ndarray, past_len: int, seq_len: int) -> np.ndarray:
    """Positions of the last `seq_len` tokens: count of real tokens before them (pads → 0)."""
    pos = np.cumsum(attention_mask, axis=1) - 1
    pos = np.where(attention_mask == 0, 0, pos)
    return pos[:, past_len : past_len + seq_len].astype(np.int64)


@dataclass
class ForwardResult:
    logits: np.ndarray  # [B, S, V]
    hidden_states: list[np.ndarray]  # L + 1 entries of [B, S, H]: embeddings, then each block
    present: list[tuple[np.ndarray, np.ndarray]]  # per layer (key, value) [B, kvh, T, hd]


class ReferenceModel:
    """A float64 numpy implementation of the decoder, reading weights once."""

    def __init__(self, cfg: ModelConfig, weights: Weights) -> None:
        self.cfg = cfg
        f64 = lambda name: weights.get(name).astype(np.float64)  # noqa: E731
        self.embed = f64("model.embed_tokens.weight")
        self.layers = []
        for i in range(cfg.num_layers):
            p = layer_prefix(i)
            layer = {
                k: f64(p + k)
                for k in (
                    "input_layernorm.weight",
                    "self_attn.q_proj.weight",
                    "self_attn.k_proj.weight",
                    "self_attn.v_proj.weight",
                    "self_attn.o_proj.weight",
                    "post_attention_layernorm.weight",
                    "mlp.gate_proj.weight",
                    "mlp.up_proj.weight",
                    "mlp.down_proj.weight",
                )
            }
            if cfg.attention_bias:
                for k in ("q", "k", "v"):
                    layer[f"self_attn.{k}_proj.bias"] = f64(p + f"self_attn.{k}_proj.bias")
            self.layers.append(layer)
        self.norm = f64("model.norm.weight")
        self.lm_head = lm_head_weight(cfg, weights).astype(np.float64)
        self.inv_freq = cfg.inv_freq()

    def _rms(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        var = np.mean(x * x, axis=-1, keepdims=True)
        return x / np.sqrt(var + self.cfg.rms_norm_eps) * w

    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        # x [B, heads, S, hd]; pos [B, S]
        freqs = pos[:, :, None].astype(np.float64) * self.inv_freq[None, None, :]
        emb = np.concatenate([freqs, freqs], axis=-1)[:, None]
        half = x.shape[-1] // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * np.cos(emb) + rotated * np.sin(emb)

    def _attention(self, layer, h, pos, mask, past):
        cfg = self.cfg
        b, s, _ = h.shape

        def proj(name, heads):
            y = h @ layer[f"self_attn.{name}_proj.weight"].T
            if cfg.attention_bias:
                y = y + layer[f"self_attn.{name}_proj.bias"]
            return y.reshape(b, s, heads, cfg.head_dim).transpose(0, 2, 1, 3)

        q = self._rope(proj("q", cfg.num_heads), pos)
        k = self._rope(proj("k", cfg.num_kv_heads), pos)
        v = proj("v", cfg.num_kv_heads)
        if past is not None:
            k = np.concatenate([past[0], k], axis=2)
            v = np.concatenate([past[1], v], axis=2)
        t = k.shape[2]
        kr = np.repeat(k, cfg.kv_groups, axis=1)
        vr = np.repeat(v, cfg.kv_groups, axis=1)
        scores = q @ kr.transpose(0, 1, 3, 2) / np.sqrt(cfg.head_dim)
        q_pos = np.arange(t - s, t)[:, None]
        causal = np.arange(t)[None, :] <= q_pos  # [S, T]
        allowed = causal[None, None] & (mask[:, None, None, :] != 0)
        scores = np.where(allowed, scores, MASKED_SCORE)
        scores = scores - scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        ctx = (probs @ vr).transpose(0, 2, 1, 3).reshape(b, s, cfg.num_heads * cfg.head_dim)
        return ctx @ layer["self_attn.o_proj.weight"].T, (k, v)

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
        past: list[tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> ForwardResult:
        """One forward step. `attention_mask` covers past + new tokens ([B, T])."""
        b, s = input_ids.shape
        past_len = past[0][0].shape[2] if past else 0
        if attention_mask is None:
            attention_mask = np.ones((b, past_len + s), dtype=np.int64)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, past_len, s)
        x = self.embed[input_ids]
        hidden = [x]
        present = []
        for i, layer in enumerate(self.layers):
            h = self._rms(x, layer["input_layernorm.weight"])
            attn, kv = self._attention(
                layer, h, position_ids, attention_mask, past[i] if past else None
            )
            x = x + attn
            h = self._rms(x, layer["post_attention_layernorm.weight"])
            gate = h @ layer["mlp.gate_proj.weight"].T
            up = h @ layer["mlp.up_proj.weight"].T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ layer["mlp.down_proj.weight"].T
            hidden.append(x)
            present.append(kv)
        logits = self._rms(x, self.norm) @ self.lm_head.T
        return ForwardResult(logits, hidden, present)
