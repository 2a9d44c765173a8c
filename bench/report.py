"""Print bench/run.sh results as a table, with the ratios the targets are stated in."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def get_all(rows: list[dict], engine: str, batch: int, key: str) -> float:
    """The median of every row of `engine` at `batch`, all rounds together."""
    return statistics.median(r[key] for r in rows if r["engine"] == engine and r["batch"] == batch)


def main(path: str) -> None:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    weights = {r["engine"]: r["bytes"] for r in rows if r.get("kind") == "weights"}
    bandwidth = next((r["bytes_per_s"] for r in rows if r.get("kind") == "bandwidth"), None)
    rows = [r for r in rows if "kind" not in r]
    for r in rows:
        if r["engine"].startswith("inferaligner"):
            int4 = "int4" in r.get("model", "") or r.get("weights", "").startswith("int4")
            model = r.get("model", "")
            variant = (
                "fused-segs " if "fused-segs" in model else "fused " if "fused" in model else ""
            )
            r["engine"] = "inferaligner " + variant + ("int4" if int4 else "fp32")
            if r.get("noop_hook"):
                r["engine"] += " + no-op hook"
            if r.get("temperature", 0) > 0:
                r["engine"] += " sampled"
    rounds = max((r.get("round", 1) for r in rows), default=1)
    print(
        f"{'engine':34} {'batch':>5} {'decode tok/s':>13} {'prefill tok/s':>14} {'peak RSS MiB':>13}"
        + ("   (medians of the rounds)" if rounds > 1 else "")
    )
    seen = []
    for r in rows:
        if (r["engine"], r["batch"]) in seen:
            continue
        seen.append((r["engine"], r["batch"]))
        print(
            f"{r['engine']:34} {r['batch']:>5} {get_all(rows, r['engine'], r['batch'], 'decode_tok_s'):>13.1f} "
            f"{get_all(rows, r['engine'], r['batch'], 'prefill_tok_s'):>14.0f} "
            f"{get_all(rows, r['engine'], r['batch'], 'peak_rss_mib'):>13.0f}"
        )

    def get(engine: str, batch: int, key: str) -> float | None:
        vals = [r[key] for r in rows if r["engine"] == engine and r["batch"] == batch]
        return statistics.median(vals) if vals else None

    def ratio(ours_engine: str, peer_engine: str, batch: int, key: str) -> str | None:
        """The median over rounds of ours / peer within the round, and their range."""
        per_round = []
        for n in range(1, rounds + 1):
            ours, peer = (
                [
                    r[key]
                    for r in rows
                    if r["engine"] == e and r["batch"] == batch and r.get("round", 1) == n
                ]
                for e in (ours_engine, peer_engine)
            )
            if ours and peer:
                per_round.append(statistics.median(ours) / statistics.median(peer))
        if not per_round:
            return None
        spread = f" ({min(per_round):.2f}-{max(per_round):.2f})" if len(per_round) > 1 else ""
        return f"{statistics.median(per_round):.2f}x{spread}"

    print(
        "\nratios (ours / peer, same run"
        + (f"; median of {rounds} rounds, range)" if rounds > 1 else ")")
        + ":"
    )
    variants = ("", "fused ", "fused-segs ")
    for variant in variants:
        for precision in ("fp32", "int4"):
            for batch in (1, 8):
                for key in ("decode_tok_s", "prefill_tok_s"):
                    r = ratio(
                        f"inferaligner {variant}{precision}",
                        f"onnxruntime-genai {precision}",
                        batch,
                        key,
                    )
                    if r:
                        print(
                            f"  {variant}{precision} batch {batch} {key:14} vs onnxruntime-genai: {r}"
                        )
    for precision in ("fp32", "int4"):
        for batch in (1, 8):
            ours, peer = f"inferaligner fused-segs {precision}", f"onnxruntime-genai {precision}"
            r = ratio(f"{ours} sampled", f"{peer} sampled", batch, "decode_tok_s")
            if r:
                name = f"fused-segs {precision} batch {batch} sampled decode"
                print(f"  {name} vs onnxruntime-genai: {r}")
    for batch in (1, 8):
        r = ratio("inferaligner fp32", "transformers fp32", batch, "decode_tok_s")
        if r:
            print(f"  fp32 batch {batch} decode_tok_s   vs transformers:       {r}")
    for variant in variants:
        for batch in (1, 8):
            r = ratio(f"inferaligner {variant}int4", "llama.cpp Q4_1", batch, "decode_tok_s")
            if r:
                print(f"  {variant}int4 batch {batch} decode_tok_s vs llama.cpp Q4_1: {r}")
    if bandwidth:
        print(
            f"\nmemory bandwidth (one-thread copy): {bandwidth / 1e9:.1f} GB/s; batch-1 decode as "
            "a share of the ceiling (weights streamed per token x tok/s / bandwidth):"
        )
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
