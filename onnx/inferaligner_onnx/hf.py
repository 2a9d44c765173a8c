"""Load a Hugging Face model directory: config.json, *.safetensors, tokenizer files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .config import ExportError, config_from_hf
from .source import LoadedModel, SpecialTokens, Weights, sha256_files

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def _read_safetensors_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ExportError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        header = f.read(n)
    if len(header) != n:
        raise ExportError(f"{path}: truncated safetensors header")
    try:
        return json.loads(header), 8 + n
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: corrupt safetensors header ({e})") from None


def _safetensors_weights(files: list[Path]) -> Weights:
    """Memory-map each tensor; bf16 is widened to float32 (numpy has no bfloat16)."""
    weights = Weights()
    for path in files:
        header, data_start = _read_safetensors_header(path)
        size = path.stat().st_size
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _ST_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ExportError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            if data_start + end > size:
                raise ExportError(f"{path}: truncated (tensor {name} runs past the end)")
            shape = tuple(info["shape"])
            bf16 = info["dtype"] == "BF16"

            def thunk(p=path, off=data_start + begin, dt=dtype, sh=shape, bf=bf16):
                count = int(np.prod(sh)) if sh else 1
                arr = np.fromfile(p, dtype=dt, count=count, offset=off).reshape(sh)
                if bf:
                    arr = (arr.astype(np.uint32) << 16).view(np.float32)
                return arr.astype(np.float32)

            weights.register(name, thunk)
    return weights


def _chat_template(model_dir: Path, tok_cfg: dict) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tmpl = tok_cfg.get("chat_template")
    if isinstance(tmpl, list):  # named templates: take "default"
        named = {t["name"]: t["template"] for t in tmpl}
        tmpl = named.get("default") or next(iter(named.values()), None)
    return tmpl


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as a dict
        return value.get("content")
    return value


def load_hf_dir(model_dir: Path, tokenizer_path: Path | None = None) -> LoadedModel:
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ExportError(f"{model_dir}: no config.json (is this a Hugging Face model directory?)")
    raw_cfg = json.loads(cfg_path.read_text())
    config = config_from_hf(raw_cfg)

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir}: no *.safetensors weights (.bin checkpoints need torch)")
    weights = _safetensors_weights(files)

    tok_file = Path(tokenizer_path) if tokenizer_path else model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise ExportError(f"{tok_file}: missing tokenizer.json (pass --tokenizer)")
    tokenizer_json = tok_file.read_text(encoding="utf-8")
    tok_cfg_path = model_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.is_file() else {}

    vocab = _vocab_lookup(tokenizer_json)
    bos = _token_text(tok_cfg.get("bos_token"))
    eos = _token_text(tok_cfg.get("eos_token"))
    eos_ids = _eos_ids(model_dir, raw_cfg, vocab.get(eos) if eos else None)
    bos_id = raw_cfg.get("bos_token_id", vocab.get(bos) if bos else None)
    pad = _token_text(tok_cfg.get("pad_token"))
    special = SpecialTokens(
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        pad_token_id=vocab.get(pad) if pad else (eos_ids[0] if eos_ids else None),
        add_bos_token=bool(tok_cfg.get("add_bos_token", False)),
        bos_token=bos,
        eos_token=eos,
    )
    source = {
        "format": "hf",
        "name": raw_cfg.get("_name_or_path") or model_dir.name,
        "sha256": sha256_files([cfg_path, *files]),
    }
    return LoadedModel(
        config, weights, tokenizer_json, _chat_template(model_dir, tok_cfg), special, source
    )


def _vocab_lookup(tokenizer_json: str) -> dict[str, int]:
    tok = json.loads(tokenizer_json)
    vocab = dict(tok.get("model", {}).get("vocab", {}))
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    return vocab


def _eos_ids(model_dir: Path, raw_cfg: dict, tokenizer_eos: int | None) -> list[int]:
    """EOS ids from generation_config.json, config.json and the tokenizer, deduplicated."""
    ids: list[int] = []
    gen = model_dir / "generation_config.json"
    sources = [json.loads(gen.read_text()).get("eos_token_id")] if gen.is_file() else []
    sources += [raw_cfg.get("eos_token_id"), tokenizer_eos]
    for value in sources:
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    return ids
