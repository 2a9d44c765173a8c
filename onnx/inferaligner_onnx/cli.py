"""Command line: `python -m inferaligner_onnx {export,check,chat,fixture}`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import ExportError


def _cmd_export(args) -> int:
    from .export import export, load_source

    t0 = time.perf_counter()
    model = load_source(args.source, args.tokenizer)
    cfg = model.config
    print(
        f"loaded {model.source.get('name')}: {cfg.model_type}, {cfg.num_layers} layers, "
        f"hidden {cfg.hidden_size}, vocab {cfg.vocab_size}",
        file=sys.stderr,
    )
    manifest = export(
        model,
        args.out,
        dtype=args.dtype,
        layers_per_segment=args.layers_per_segment,
        segment_ends=args.segment_ends,
        addend_layers=args.addend_layers,
        int4=args.int4,
        variant=args.variant,
        force=args.force,
        progress=lambda m: print(f"  writing {m}", file=sys.stderr),
    )
    size = sum(p.stat().st_size for p in Path(args.out).iterdir())
    print(
        f"exported {len(manifest['segments'])} segments to {args.out} "
        f"({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    return 0


def _cmd_check(args) -> int:
    """Compare the chained ONNX segments with the numpy reference on a prompt."""
    import numpy as np

    from .export import load_source
    from .reference import ReferenceModel
    from .runner import SegmentChain

    chain = SegmentChain(args.export)
    model = load_source(args.source, args.tokenizer)
    ref = ReferenceModel(model.config, model.weights)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(args.export) / "tokenizer.json"))
    ids = np.asarray([tok.encode(args.prompt, add_special_tokens=False).ids], dtype=np.int64)
    mask = np.ones_like(ids)
    got = chain.step(ids, mask)
    want = ref.forward(ids, mask)
    logit_diff = float(np.abs(got.logits - want.logits).max())
    hidden_diff = max(
        float(np.abs(a - b).max())
        for a, b in zip(got.hidden_states, want.hidden_states, strict=True)
    )
    report = {
        "tokens": int(ids.shape[1]),
        "max_abs_logit_diff": logit_diff,
        "max_abs_hidden_diff": hidden_diff,
        "same_argmax": bool((got.logits.argmax(-1) == want.logits.argmax(-1)).all()),
    }
    print(json.dumps(report, indent=2))
    return 0 if logit_diff <= args.tolerance else 1


def _cmd_chat(args) -> int:
    from .runner import chat_once

    print(chat_once(args.export, args.question, args.max_new_tokens))
    return 0


def _cmd_greedy_reference(args) -> int:
    """Greedy token ids for chat prompts, from the numpy reference and the ONNX chain."""
    from importlib import resources

    from tokenizers import Tokenizer

    from .export import load_source
    from .fixture import greedy_reference
    from .reference import ReferenceModel
    from .runner import SegmentChain, render_chat

    chain = SegmentChain(args.export)
    manifest = chain.manifest
    tok = Tokenizer.from_file(str(Path(args.export) / manifest["tokenizer"]["file"]))
    template = (Path(args.export) / manifest["chat_template"]).read_text()
    if args.prompts:
        questions = Path(args.prompts).read_text().splitlines()
    else:
        data = resources.files("inferaligner_onnx").joinpath("data/check_prompts.txt")
        questions = data.read_text().splitlines()
    ref = ReferenceModel(*(lambda m: (m.config, m.weights))(load_source(args.source)))
    cases = []
    for i, q in enumerate(q for q in questions if q.strip()):
        text = render_chat(template, [{"role": "user", "content": q}], manifest)
        ids = tok.encode(text, add_special_tokens=False).ids
        numpy_ids = greedy_reference(ref, ids, args.tokens)
        onnx_ids = chain.greedy(ids, args.tokens, stop_ids=set())
        print(f"{i + 1:2d}/{len(questions)} identical={numpy_ids == onnx_ids} {q}", file=sys.stderr)
        cases.append(
            {
                "question": q,
                "input_ids": ids,
                "numpy_greedy_ids": numpy_ids,
                "onnx_greedy_ids": onnx_ids,
            }
        )
    Path(args.out).write_text(json.dumps({"tokens": args.tokens, "cases": cases}) + "\n")
    return 0


def _cmd_fixture(args) -> int:
    from .fixture import TWINS, make_fixture

    fixture_twins = {
        args.fused_out: TWINS["fused"],
        args.addends_out: TWINS["addends"],
        args.fused_addends_out: TWINS["fused-addends"],
    }
    for out, seed, twins in (
        (args.out, args.seed, fixture_twins),
        (args.aligned_out, args.seed + 1, {}),
    ):
        manifest = make_fixture(out, seed, twins)
        print(
            f"fixture seed {seed} → {out} ({len(manifest['segments'])} segments)", file=sys.stderr
        )
    return 0


def _layer_list(text: str) -> list[int]:
    """`12,13,20` or ranges `12-20,28`."""
    layers: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            layers.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a layer or range: {part!r}") from None
    return layers


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inferaligner-onnx", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    e = sub.add_parser("export", help="export a HF directory or GGUF file as layer-split ONNX")
    e.add_argument("source", type=Path, help="Hugging Face model directory or .gguf file")
    e.add_argument("out", type=Path, help="output directory")
    e.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    e.add_argument(
        "--layers-per-segment",
        type=int,
        default=1,
        help="decoder layers per ONNX graph (default 1: one graph per layer)",
    )
    e.add_argument(
        "--segment-ends",
        type=_layer_list,
        help="comma-separated layers after which a graph ends (the last layer always does): "
        "the gate reads the residual stream only there, so list the packs' gate layer (and "
        "their first steered layer, where a retry at another strength resumes; "
        "`inferaligner inspect PACK`); fewer graphs mean fewer ONNX Runtime runs a token",
    )
    e.add_argument(
        "--addend-layers",
        type=_layer_list,
        help="layers after which the runtime may add a vector per row (the packs' steered "
        "layers) where no graph ends: inside a graph they become its inputs `addend.<layer>`, "
        "so steering needs no boundary (SmolLM2 and the default pack: `--segment-ends 12,18 "
        "--addend-layers 12-20`, 5 ONNX Runtime runs a token instead of 12)",
    )
    e.add_argument(
        "--variant",
        default="plain",
        choices=["plain", "fused"],
        help="layer graphs: plain ONNX operators (any provider), or fused with ONNX Runtime "
        "contrib operators (fewer nodes, faster on small models)",
    )
    e.add_argument(
        "--int4",
        action="store_true",
        help="4-bit weights (ONNX Runtime MatMulNBits, blocks of 32) in layers and head",
    )
    e.add_argument("--tokenizer", type=Path, help="tokenizer.json to use instead of the source's")
    e.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    e.set_defaults(func=_cmd_export)

    c = sub.add_parser("check", help="compare an export with the numpy reference")
    c.add_argument("export", type=Path)
    c.add_argument("source", type=Path)
    c.add_argument("--tokenizer", type=Path)
    c.add_argument("--prompt", default="What is the capital of France?")
    c.add_argument("--tolerance", type=float, default=1e-3)
    c.set_defaults(func=_cmd_check)

    g = sub.add_parser("chat", help="answer one question greedily with onnxruntime")
    g.add_argument("export", type=Path)
    g.add_argument("question")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.set_defaults(func=_cmd_chat)

    r = sub.add_parser("greedy-reference", help="greedy ids from the numpy reference and ONNX")
    r.add_argument("export", type=Path)
    r.add_argument("source", type=Path)
    r.add_argument("out", type=Path, help="JSON file to write")
    r.add_argument("--prompts", type=Path, help="one question per line (default: built in)")
    r.add_argument("--tokens", type=int, default=32)
    r.set_defaults(func=_cmd_greedy_reference)

    f = sub.add_parser("fixture", help="regenerate the tiny seeded test models")
    f.add_argument("--out", type=Path, default=Path("tests/fixtures/tiny-llama"))
    f.add_argument("--aligned-out", type=Path, default=Path("tests/fixtures/tiny-llama-aligned"))
    f.add_argument(
        "--fused-out",
        type=Path,
        default=Path("tests/fixtures/tiny-llama-fused"),
        help="the first fixture's weights again, as the fused variant",
    )
    f.add_argument(
        "--addends-out",
        type=Path,
        default=Path("tests/fixtures/tiny-llama-addends"),
        help="the first fixture's weights again, as two graphs whose inner layers take addends",
    )
    f.add_argument(
        "--fused-addends-out",
        type=Path,
        default=Path("tests/fixtures/tiny-llama-fused-addends"),
        help="the same, fused",
    )
    f.add_argument("--seed", type=int, default=1)
    f.set_defaults(func=_cmd_fixture)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
