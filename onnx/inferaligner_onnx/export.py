"""Write a layer-split export: ONNX segments, tokenizer.json, chat template and manifest.json."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from . import __version__
from .config import ExportError
from .graphs import DTYPES, build_embed, build_head, build_layers, layer_io_names
from .source import LoadedModel

MANIFEST_FORMAT = "inferaligner.export/v1"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def load_source(path: Path, tokenizer: Path | None = None) -> LoadedModel:
    """Load a HF model directory or a GGUF file."""
    from .gguf_source import load_gguf
    from .hf import load_hf_dir

    path = Path(path)
    if path.is_dir():
        return load_hf_dir(path, tokenizer)
    if path.suffix == ".gguf" or (path.is_file() and path.read_bytes()[:4] == b"GGUF"):
        return load_gguf(path, tokenizer)
    if not path.exists():
        raise ExportError(f"{path}: no such file or directory")
    raise ExportError(f"{path}: neither a Hugging Face model directory nor a GGUF file")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _save(model: onnx.ModelProto, out_dir: Path, file: str) -> list[str]:
    """Save one segment: the graph, and its weights (tensors of 1 KiB or more) beside it as
    ONNX external data, which ONNX Runtime maps rather than copies: the embedding table stays
    in the page cache, only the rows read are resident (108 MiB less RSS for SmolLM2 in
    float32), and sessions load in about half the time (no protobuf parse of the weights).
    Returns the files written (the graph, then the weights' when there are any)."""
    data = file + ".data"
    onnx.save_model(
        model,
        out_dir / file,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data,
        size_threshold=1024,
    )
    return [file, data] if (out_dir / data).is_file() else [file]


# Block size and accuracy level of the int4 option (what onnxruntime-genai uses on CPU: int8
# activations in the MatMulNBits kernel).
INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4


def quantize_int4(graph: onnx.ModelProto) -> onnx.ModelProto:
    """Replace MatMuls with constant weights by MatMulNBits (4-bit, symmetric, blocks of 32)."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(
        graph,
        bits=4,
        block_size=INT4_BLOCK_SIZE,
        is_symmetric=True,
        accuracy_level=INT4_ACCURACY_LEVEL,
    )
    quantizer.process()
    return quantizer.model.model


def layer_groups(
    num_layers: int, layers_per_segment: int, segment_ends: list[int] | None
) -> list[range]:
    """The layer ranges of the segments: every `layers_per_segment` layers, or ending after
    each layer of `segment_ends` (and after the last layer)."""
    if segment_ends is None:
        return [
            range(start, min(start + layers_per_segment, num_layers))
            for start in range(0, num_layers, layers_per_segment)
        ]
    if layers_per_segment != 1:
        raise ExportError("give --segment-ends or --layers-per-segment, not both")
    bad = [e for e in segment_ends if not 0 <= e < num_layers]
    if bad:
        raise ExportError(f"segment ends {bad} are not layers of this model (0-{num_layers - 1})")
    ends = sorted({*segment_ends, num_layers - 1})
    starts = [0] + [e + 1 for e in ends[:-1]]
    return [range(start, end + 1) for start, end in zip(starts, ends, strict=True)]


def export(
    model: LoadedModel,
    out_dir: Path,
    *,
    dtype: str = "float32",
    layers_per_segment: int = 1,
    segment_ends: list[int] | None = None,
    addend_layers: list[int] | None = None,
    variant: str = "plain",
    int4: bool = False,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Export `model` into `out_dir` and return the manifest written there.

    With `int4`, the layer and head graphs' weight MatMuls become ONNX Runtime MatMulNBits
    (contrib operator; 4-bit weights, float32 activations at the graph boundaries).
    `segment_ends` (instead of `layers_per_segment`) lists the layers whose output ends a
    segment: the residual stream after them is graph I/O, where the runtime gates and steers.
    `addend_layers` lists layers after which the runtime may add a vector per row (steer) where
    no segment ends: those inside a segment become graph inputs of its graph.
    """
    if int4 and dtype != "float32":
        raise ExportError("the int4 option quantizes a float32 export; use --dtype float32")
    if dtype not in DTYPES:
        raise ExportError(f"unsupported dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if layers_per_segment < 1:
        raise ExportError("layers per segment must be at least 1")
    groups = layer_groups(model.config.num_layers, layers_per_segment, segment_ends)
    addend_layers = sorted(set(addend_layers or []))
    bad = [i for i in addend_layers if not 0 <= i < model.config.num_layers]
    if bad:
        raise ExportError(
            f"addend layers {bad} are not layers of this model (0-{model.config.num_layers - 1})"
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise ExportError(f"{out_dir} exists and is not empty (use --force to overwrite)")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    say = progress or (lambda _msg: None)

    segments = []

    def add(kind: str, file: str, graph: onnx.ModelProto, extra: dict) -> None:
        if int4 and kind != "embed":
            graph = quantize_int4(graph)
        files = _save(graph, out_dir, file)
        entry = {"kind": kind, "file": file, **extra, "sha256": _sha256(out_dir / file)}
        if len(files) > 1:
            entry["external_data"] = files[1]
            entry["external_data_sha256"] = _sha256(out_dir / files[1])
        segments.append(entry)

    say("embed")
    add(
        "embed",
        "embed.onnx",
        build_embed(cfg, model.weights, dtype),
        {
            "inputs": {"input_ids": "input_ids"},
            "outputs": {"hidden_states": "hidden_states"},
        },
    )
    width = len(str(cfg.num_layers - 1))
    for group in groups:
        first, last = group.start, group.stop - 1
        name = (
            f"layer_{first:0{width}d}.onnx"
            if first == last
            else f"layers_{first:0{width}d}_{last:0{width}d}.onnx"
        )
        say(f"layers {first}-{last}")
        # a layer that ends the segment needs no input: the runtime steers at the boundary
        inner = [i for i in addend_layers if first <= i < last]
        add(
            "layers",
            name,
            build_layers(cfg, model.weights, group, dtype, variant, inner),
            {
                "layers": [first, last],
                "variant": variant,
                **layer_io_names(group, variant, inner),
            },
        )
    say("head")
    add(
        "head",
        "head.onnx",
        build_head(cfg, model.weights, dtype),
        {
            "inputs": {"hidden_states": "hidden_states"},
            "outputs": {"logits": "logits"},
        },
    )

    tok_path = out_dir / "tokenizer.json"
    tok_path.write_text(model.tokenizer_json, encoding="utf-8")
    chat = None
    if model.chat_template:
        (out_dir / CHAT_TEMPLATE_FILE).write_text(model.chat_template, encoding="utf-8")
        chat = CHAT_TEMPLATE_FILE

    sp = model.special
    manifest = {
        "format": MANIFEST_FORMAT,
        "exporter": {"name": "inferaligner-onnx", "version": __version__},
        "architecture": cfg.model_type,
        "dtype": dtype,
        "weights": f"int4-block{INT4_BLOCK_SIZE}" if int4 else dtype,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "context_length": cfg.context_length,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        # RoPE inverse frequencies with any scaling applied: what runtimes build cos/sin from.
        "rope_inv_freq": [float(np.float32(f)) for f in cfg.inv_freq()],
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "segments": segments,
        "tokenizer": {
            "file": "tokenizer.json",
            "sha256": _sha256(tok_path),
            "bos_token_id": sp.bos_token_id,
            "eos_token_ids": sp.eos_token_ids,
            "pad_token_id": sp.pad_token_id,
            "add_bos_token": sp.add_bos_token,
            "bos_token": sp.bos_token,
            "eos_token": sp.eos_token,
        },
        "chat_template": chat,
        "source": model.source,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest
