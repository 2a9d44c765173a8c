"""Write a tiny HF model as a GGUF file the way llama.cpp's converter does (for tests)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from inferaligner_onnx.hf import load_hf_dir

QTYPES = {
    "F32": gguf.GGMLQuantizationType.F32,
    "F16": gguf.GGMLQuantizationType.F16,
    "Q8_0": gguf.GGMLQuantizationType.Q8_0,
    "Q4_1": gguf.GGMLQuantizationType.Q4_1,
    "Q4_K": gguf.GGMLQuantizationType.Q4_K,
}

_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's `permute` for Llama Q/K rows."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """A simple (not optimal) Q4_K encoder: 256-value super-blocks of 8 sub-blocks of 32."""
    rows, cols = x.shape
    assert cols % 256 == 0
    b = x.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(b.min(-1), 0.0)  # y = d*sc*q - dmin*m, so the offset is -min >= 0
    step = (b.max(-1) - lo) / 15.0
    d = np.maximum(step.max(-1), 1e-12) / 63.0
    dmin = np.maximum((-lo).max(-1), 1e-12) / 63.0
    sc = np.clip(np.round(step / d[:, None]), 1, 63).astype(np.uint8)
    m = np.clip(np.round(-lo / dmin[:, None]), 0, 63).astype(np.uint8)
    d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
    scale = d16.astype(np.float32)[:, None] * sc
    offset = dmin16.astype(np.float32)[:, None] * m
    q = np.clip(np.round((b + offset[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    scales = np.zeros((b.shape[0], 12), dtype=np.uint8)
    for j in range(4):
        scales[:, j] = (sc[:, j] & 63) | ((sc[:, j + 4] >> 4) << 6)
        scales[:, j + 4] = (m[:, j] & 63) | ((m[:, j + 4] >> 4) << 6)
        scales[:, j + 8] = (sc[:, j + 4] & 0xF) | ((m[:, j + 4] & 0xF) << 4)
    qs = np.zeros((b.shape[0], 128), dtype=np.uint8)
    for j in range(4):  # sub-block 2j in the low nibbles, 2j+1 in the high nibbles
        qs[:, 32 * j : 32 * j + 32] = q[:, 2 * j] | (q[:, 2 * j + 1] << 4)
    block = np.concatenate(
        [d16.view(np.uint8).reshape(-1, 2), dmin16.view(np.uint8).reshape(-1, 2), scales, qs],
        axis=1,
    )
    return block.reshape(rows, -1)


def _quantize(arr: np.ndarray, qtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Quantize 2-D weights whose rows fit the block size; keep the rest in F32."""
    t = QTYPES[qtype]
    block = gguf.GGML_QUANT_SIZES[t][0]
    if arr.ndim != 2 or arr.shape[1] % block or qtype == "F32":
        return arr.astype(np.float32), QTYPES["F32"]
    if qtype == "F16":
        return arr.astype(np.float16), t
    if qtype == "Q4_K":
        return quantize_q4_k(arr), t
    return gguf.quants.quantize(arr.astype(np.float32), t), t


def write_gguf(hf_dir: Path, out: Path, qtype: str = "F32", pre: str = "gpt-2") -> Path:
    model = load_hf_dir(hf_dir)
    cfg = model.config
    arch = "qwen2" if cfg.model_type == "qwen2" else "llama"
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name("tiny-test")
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)

    tok = json.loads(model.tokenizer_json)
    vocab = dict(tok["model"]["vocab"])
    specials = {a["content"] for a in tok["added_tokens"] if a["special"]}
    for a in tok["added_tokens"]:
        vocab[a["content"]] = a["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_token_merges(merges)
    w.add_bos_token_id(model.special.bos_token_id)
    w.add_eos_token_id(model.special.eos_token_ids[0])
    w.add_pad_token_id(model.special.pad_token_id)
    w.add_add_bos_token(False)
    if model.chat_template:
        w.add_chat_template(model.chat_template)

    for name in sorted(model.weights.names()):
        arr = model.weights.get(name)
        if name in _GLOBAL:
            gname = _GLOBAL[name]
        else:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{i}.{_LAYER[rest]}"
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_q.bias")):
            arr = permute_rope(arr, cfg.num_heads)
        elif arch == "llama" and gname.endswith(("attn_k.weight", "attn_k.bias")):
            arr = permute_rope(arr, cfg.num_kv_heads)
        data, t = _quantize(arr, qtype)
        w.add_tensor(gname, data, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
