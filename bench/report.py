"""Print bench/run.sh results as a table, with the ratios the targets are stated in."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(path: str) -> None:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    weights = {r["engine"]: r["bytes"] for r in rows if r.get("kind") == "weights"}
    bandwidth = next((r["bytes_per_s"] for r in rows if r.get("kind") == "bandwidth"), None)
    rows = [r for r in rows if "kind" not in r]
    for r in rows:
        if r["engine"].startswith("inferaligner"):
            int4 = "int4" in r.get("model", "") or r.get("weights", "").startswith("int4")
            fused = "fused" in r.get("model", "")
            r["engine"] = "inferaligner " + ("fused " if fused else "") + ("int4" if int4 else "fp32")
            if r.get("noop_hook"):
                r["engine"] += " + no-op hook"
    print(f"{'engine':34} {'batch':>5} {'decode tok/s':>13} {'prefill tok/s':>14} {'peak RSS MiB':>13}")
    for r in rows:
        print(f"{r['engine']:34} {r['batch']:>5} {r['decode_tok_s']:>13.1f} "
              f"{r['prefill_tok_s']:>14.0f} {r['peak_rss_mib']:>13.0f}")

    def get(engine: str, batch: int, key: str) -> float | None:
        vals = [r[key] for r in rows if r["engine"] == engine and r["batch"] == batch]
        return statistics.median(vals) if vals else None

    print("\nratios (ours / peer, same run):")
    for variant in ("", "fused "):
        for precision in ("fp32", "int4"):
            for batch in (1, 8):
                for key in ("decode_tok_s", "prefill_tok_s"):
                    ours = get(f"inferaligner {variant}{precision}", batch, key)
                    peer = get(f"onnxruntime-genai {precision}", batch, key)
                    if ours and peer:
                        print(f"  {variant}{precision} batch {batch} {key:14} vs "
                              f"onnxruntime-genai: {ours / peer:.2f}x")
    for batch in (1, 8):
        ours = get("inferaligner fp32", batch, "decode_tok_s")
        peer = get("transformers fp32", batch, "decode_tok_s")
        if ours and peer:
            print(f"  fp32 batch {batch} decode_tok_s   vs transformers:       {ours / peer:.2f}x")
    for variant in ("", "fused "):
        for batch in (1, 8):
            ours = get(f"inferaligner {variant}int4", batch, "decode_tok_s")
            peer = get("llama.cpp Q4_1", batch, "decode_tok_s")
            if ours and peer:
                print(f"  {variant}int4 batch {batch} decode_tok_s vs llama.cpp Q4_1: {ours / peer:.2f}x")
    if bandwidth:
        print(f"\nmemory bandwidth (one-thread copy): {bandwidth / 1e9:.1f} GB/s; batch-1 decode as "
              "a share of the ceiling (weights streamed per token x tok/s / bandwidth):")
        for engine, size in weights.items():
            tok_s = get(engine, 1, "decode_tok_s")
            if tok_s:
                print(f"  {engine:24} {size / 1e6:7.0f} MB/token  {tok_s * size / bandwidth:6.1%}")
    plain = get("inferaligner fp32", 1, "decode_tok_s")
    hooked = get("inferaligner fp32 + no-op hook", 1, "decode_tok_s")
    if plain and hooked:
        print(f"  no-op hook on every layer: decode {100 * (1 - hooked / plain):+.1f}% time")


if __name__ == "__main__":
    main(sys.argv[1])
