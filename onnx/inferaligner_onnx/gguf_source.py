"""Load a GGUF file: metadata → ModelConfig, dequantised weights under HF names, tokenizer.json.

GGUF (llama.cpp) stores Llama-arch Q/K projections with rows permuted for its interleaved RoPE;
we undo that permutation so every weight is in Hugging Face layout and the graphs use HF's
rotate-half RoPE. Qwen2 GGUFs are not permuted.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .config import ExportError, ModelConfig
from .source import LoadedModel, SpecialTokens, Weights, sha256_files

# gguf `general.architecture` → HF model_type. Mistral GGUFs say "llama".
_ARCHS = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral"}

# GGUF tensor name suffix (inside blk.N.) → HF name suffix (inside model.layers.N.)
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# GGUF token types (llama.cpp `llama_token_type`).
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 3, 4

# Pre-tokenizers llama.cpp names in `tokenizer.ggml.pre`, as HF `tokenizers` components.
_GPT2_SPLIT = {
    "type": "ByteLevel",
    "add_prefix_space": False,
    "trim_offsets": True,
    "use_regex": True,
}


def _regex_split(pattern: str) -> list[dict]:
    return [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ]


_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS: dict[str, tuple[dict | None, list[dict]]] = {
    # name: (normalizer, pre-tokenizer sequence)
    "default": (None, [_GPT2_SPLIT]),
    "gpt-2": (None, [_GPT2_SPLIT]),
    "smollm": (None, [{"type": "Digits", "individual_digits": True}, _GPT2_SPLIT]),
    "llama-bpe": (None, _regex_split(_LLAMA3_REGEX)),
    "llama3": (None, _regex_split(_LLAMA3_REGEX)),
    "qwen2": ({"type": "NFC"}, _regex_split(_QWEN2_REGEX)),
}


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _f32(value) -> float:
    """A float GGUF stored as float32, read back as the decimal it was written from (1e-05)."""
    return float(str(np.float32(value)))


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute(w, n_head)` applied to Q/K rows (and biases)."""
    rest = w.shape[1:]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _open_reader(path: Path):
    from gguf import GGUFReader  # local import: only GGUF input needs it

    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on bad files
        raise ExportError(f"{path}: not a readable GGUF file (truncated or corrupt?): {e}") from e
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ExportError(f"{path}: truncated GGUF (tensor {t.name} runs past the end)")
    return reader


def _config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise ExportError(
            f"unsupported GGUF architecture {arch!r}: inferaligner exports the Llama family only "
            f"({', '.join(sorted(_ARCHS))})"
        )

    def key(k, default=None):
        return _field(reader, f"{arch}.{k}", default)

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    scaling = None
    if key("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    elif key("rope.scaling.type") not in (None, "none"):
        raise ExportError(f"unsupported GGUF rope scaling {key('rope.scaling.type')!r}")
    freq_factors = None
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # Llama 3 scaling, as per-frequency divisors
            freq_factors = tuple(float(x) for x in np.asarray(t.data, dtype=np.float32).ravel())
    token_embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return ModelConfig(
        model_type=_ARCHS[arch],
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=int(key("attention.key_length") or key("rope.dimension_count") or hidden // heads),
        vocab_size=int(key("vocab_size") or len(tokens) or token_embd.shape[-1]),
        max_position_embeddings=int(key("context_length", 2048)),
        rms_norm_eps=_f32(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(key("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        attention_bias=any(t.name == "blk.0.attn_q.bias" for t in reader.tensors),
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        rope_freq_factors=freq_factors,
    )


def _weights(reader, cfg: ModelConfig, arch: str) -> Weights:
    from gguf import dequantize

    weights = Weights()
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        if t.name in _GLOBAL_TENSORS:
            hf_name = _GLOBAL_TENSORS[t.name]
        else:
            parts = t.name.split(".", 2)
            if parts[0] != "blk" or parts[2] not in _LAYER_TENSORS:
                raise ExportError(f"unexpected GGUF tensor {t.name!r} for a Llama-family model")
            hf_name = f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
        permute_heads = None
        if arch == "llama":
            if t.name.endswith(("attn_q.weight", "attn_q.bias")):
                permute_heads = cfg.num_heads
            elif t.name.endswith(("attn_k.weight", "attn_k.bias")):
                permute_heads = cfg.num_kv_heads
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first

        def thunk(t=t, shape=shape, heads=permute_heads):
            arr = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
            return _unpermute_rope(arr, heads) if heads else arr

        weights.register(hf_name, thunk)
    return weights


def tokenizer_json_from_gguf(reader) -> str:
    """Rebuild a HF `tokenizer.json` from GGUF vocabulary, merges and pre-tokenizer type."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ExportError(
            f"GGUF tokenizer model {model!r} cannot be rebuilt yet (only byte-level BPE, 'gpt2'); "
            "pass the original tokenizer.json with --tokenizer"
        )
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ExportError(
            f"GGUF pre-tokenizer {pre!r} is not known to the exporter "
            f"(known: {', '.join(sorted(_PRE_TOKENIZERS))}); pass tokenizer.json with --tokenizer"
        )
    normalizer, pre_tokenizers = _PRE_TOKENIZERS[pre]
    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    types = list(_field(reader, "tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens))
    merges = [str(m) for m in _field(reader, "tokenizer.ggml.merges") or []]
    added = [
        {
            "id": i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": ty != _TOKEN_CONTROL,
            "special": ty == _TOKEN_CONTROL,
        }
        for i, (tok, ty) in enumerate(zip(tokens, types, strict=True))
        if ty in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
    ]
    bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
    post = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[bos_id]
        post = {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
        }
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre_tokenizers},
        "post_processor": post,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": pre in ("llama-bpe", "llama3"),
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": [m.split(" ", 1) for m in merges],
        },
    }
    return json.dumps(tok, ensure_ascii=False)


def load_gguf(path: Path, tokenizer_path: Path | None = None) -> LoadedModel:
    path = Path(path)
    reader = _open_reader(path)
    cfg = _config(reader)
    arch = _field(reader, "general.architecture")
    weights = _weights(reader, cfg, arch)
    if tokenizer_path:
        tokenizer_json = Path(tokenizer_path).read_text(encoding="utf-8")
    else:
        tokenizer_json = tokenizer_json_from_gguf(reader)
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
    eos_ids = []
    for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        v = _field(reader, k)
        if v is not None and int(v) not in eos_ids:
            eos_ids.append(int(v))
    eos_id = eos_ids[0] if eos_ids else None
    special = SpecialTokens(
        bos_token_id=int(bos_id) if bos_id is not None else None,
        eos_token_ids=eos_ids,
        pad_token_id=int(_field(reader, "tokenizer.ggml.padding_token_id", eos_id or 0)),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        bos_token=str(tokens[bos_id]) if bos_id is not None and tokens else None,
        eos_token=str(tokens[eos_id]) if eos_id is not None and tokens else None,
    )
    source = {
        "format": "gguf",
        "name": _field(reader, "general.name") or path.stem,
        "file": path.name,
        "sha256": sha256_files([path]),
    }
    return LoadedModel(
        cfg, weights, tokenizer_json, _field(reader, "tokenizer.chat_template"), special, source
    )
