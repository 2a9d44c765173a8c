"""Node-by-node decode profile: a one-segment fused export of ours against onnxruntime-genai's
graph, in the same Python loop, on the same onnxruntime, with one shared thread pool (as the Rust
runtime has: per-session pools fight for the cores and distort the picture), KV buffers bound
as both past input and present output. Prints ms per step and ONNX Runtime's kernel time per
step by operator.

    .venv/bin/python -m inferaligner_onnx export downloads/SmolLM2-135M-Instruct.Q4_1.gguf \\
        models/smollm2-fused-int4-1seg --variant fused --int4 --layers-per-segment 30
    .venv/bin/python bench/profile_decode.py models/smollm2-fused-int4-1seg \\
        models/smollm2-genai-int4 --batch 8
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as pybind

CACHED, STEPS, SLOTS = 64, 40, 128  # tokens in the cache at the start, steps timed, buffer slots


def options(profile: str | None = None) -> ort.SessionOptions:
    o = ort.SessionOptions()
    o.use_per_session_threads = False
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile:
        o.enable_profiling = True
        o.profile_file_prefix = profile
    return o


def buffers(batch: int, manifest: dict) -> list[ort.OrtValue]:
    shape = (batch, manifest["num_key_value_heads"], SLOTS, manifest["head_dim"])
    rng = np.random.default_rng(0)
    return [
        ort.OrtValue.ortvalue_from_numpy(rng.random(shape, dtype=np.float32) * 0.1)
        for _ in range(2 * manifest["num_layers"])
    ]


def ours(export: Path, batch: int, profile: str | None):
    m = json.loads((export / "manifest.json").read_text())
    embed_seg, layers_seg, head_seg = m["segments"]
    if layers_seg["layers"] != [0, m["num_layers"] - 1] or layers_seg["variant"] != "fused":
        raise SystemExit(f"{export}: needs a fused export with all layers in one segment")
    embed = ort.InferenceSession(str(export / embed_seg["file"]), options())
    layers = ort.InferenceSession(
        str(export / layers_seg["file"]), options(profile and profile + "-layers")
    )
    head = ort.InferenceSession(
        str(export / head_seg["file"]), options(profile and profile + "-head")
    )
    angle = np.arange(SLOTS)[:, None] * np.asarray(m["rope_inv_freq"], dtype=np.float64)[None]
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
    kv = buffers(batch, m)
    names_in, names_out = layers_seg["inputs"], layers_seg["outputs"]

    def step(t: int) -> np.ndarray:
        hidden = embed.run(None, {"input_ids": np.full((batch, 1), 100 + t, dtype=np.int64)})[0]
        b = layers.io_binding()
        b.bind_cpu_input(names_in["hidden_states"], hidden)
        b.bind_cpu_input(names_in["seqlens_k"], np.full((batch,), CACHED + t, dtype=np.int32))
        b.bind_cpu_input(names_in["total_sequence_length"], np.array(CACHED + t + 1, np.int32))
        b.bind_cpu_input(names_in["cos_cache"], cos)
        b.bind_cpu_input(names_in["sin_cache"], sin)
        for j in range(m["num_layers"]):
            for n, kind in enumerate(("key", "value")):
                b.bind_ortvalue_input(names_in[f"past_{kind}"][j], kv[2 * j + n])
                b.bind_ortvalue_output(names_out[f"present_{kind}"][j], kv[2 * j + n])
        b.bind_output(names_out["hidden_states"])
        layers.run_with_iobinding(b)
        return head.run(None, {"hidden_states": b.get_outputs()[-1].numpy()})[0]

    return step, [layers, head]


def genai(model: Path, batch: int, profile: str | None):
    cfg = json.loads((model / "genai_config.json").read_text())["model"]["decoder"]
    session = ort.InferenceSession(
        str(model / cfg["filename"]), options(profile and profile + "-genai")
    )
    shape = {"num_key_value_heads": cfg["num_key_value_heads"], "head_dim": cfg["head_size"]}
    kv = buffers(batch, {**shape, "num_layers": cfg["num_hidden_layers"]})

    def step(t: int) -> np.ndarray:
        b = session.io_binding()
        b.bind_cpu_input("input_ids", np.full((batch, 1), 100 + t, dtype=np.int64))
        b.bind_cpu_input("attention_mask", np.ones((batch, CACHED + t + 1), dtype=np.int64))
        for j in range(cfg["num_hidden_layers"]):
            for n, kind in enumerate(("key", "value")):
                b.bind_ortvalue_input(f"past_key_values.{j}.{kind}", kv[2 * j + n])
                b.bind_ortvalue_output(f"present.{j}.{kind}", kv[2 * j + n])
        b.bind_output("logits")
        session.run_with_iobinding(b)
        return b.get_outputs()[-1].numpy()

    return step, [session]


def kernel_ms(path: str, head: bool) -> collections.Counter:
    """Kernel time per step by operator; the LM head's apart (`head`: the whole graph is it)."""
    by_op: collections.Counter = collections.Counter()
    for e in json.loads(Path(path).read_text()):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            in_head = head or "lm_head" in e["name"] or "final_norm" in e["name"]
            by_op[e["args"]["op_name"] + (" (head)" if in_head else "")] += e["dur"] / 1000 / STEPS
    return by_op


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ours", type=Path, help="fused export, all layers in one segment")
    p.add_argument("genai", type=Path, help="onnxruntime-genai model directory")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    pybind.set_global_thread_pool_sizes(args.threads, 1)
    makers = {"ours": lambda prof: ours(args.ours, args.batch, prof),
              "genai": lambda prof: genai(args.genai, args.batch, prof)}  # fmt: skip
    for name in ["ours", "genai", "ours", "genai"]:  # alternated: the machine drifts
        step, _ = makers[name](None)
        for t in range(5):
            step(t)
        start = time.perf_counter()
        for t in range(STEPS):
            step(t)
        ms = (time.perf_counter() - start) / STEPS * 1000
        print(
            f"{name:5} batch {args.batch}: {ms:6.2f} ms/step  {args.batch * 1000 / ms:6.0f} tok/s"
        )
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["ours", "genai"]:
            step, sessions = makers[name](f"{tmp}/{name}")
            for t in range(STEPS):
                step(t)
            total: collections.Counter = collections.Counter()
            for i, s in enumerate(sessions):
                total.update(kernel_ms(s.end_profiling(), head=name == "ours" and i == 1))
            top = ", ".join(f"{op} {ms:.2f}" for op, ms in total.most_common(9))
            print(f"{name:5} kernels {sum(total.values()):.2f} ms/step: {top}")


if __name__ == "__main__":
    main()
