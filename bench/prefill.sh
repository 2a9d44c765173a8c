#!/usr/bin/env bash
# Long prompts: prefill throughput and peak memory of this runtime beside onnxruntime-genai
# (fp32, its own model builder) on the same SmolLM2-135M-Instruct weights and the same token
# ids, in one run: prompts of 128, 512, 1k, 2k and 4k tokens (this repository's docs pasted
# before a question), 2 threads, batch 1, each engine and length in its own process (peak RSS),
# the median of RUNS runs after a warm-up.
#
#   make smollm2 && bash bench/prefill.sh     # ~10 min; needs bench/.venv (see bench/run.sh)
#   OURS=models/smollm2-135m-instruct-fused-segs bash bench/prefill.sh   # another of our exports
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
PEERS=bench/.venv/bin/python
OURS=${OURS:-models/smollm2-135m-instruct}
GENAI=models/smollm2-genai-fp32
THREADS=2
RUNS=${RUNS:-2}
LENGTHS=${LENGTHS:-"128 512 1024 2048 4000"}
RESULTS=bench/prefill-results.jsonl
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

[ -f "$OURS/manifest.json" ] || make smollm2
if [ ! -f "$GENAI/genai_config.json" ]; then
    echo "prefill.sh: $GENAI is missing; bash bench/run.sh builds it (and bench/.venv)" >&2
    exit 1
fi
cargo build --release --quiet -p inferaligner-bench

: > "$RESULTS"
for n in $LENGTHS; do
    target/release/inferaligner-bench --model "$OURS" --threads "$THREADS" --prompt-tokens "$n" \
        --tokens 8 --runs "$RUNS" --dump-prompt "$WORK/ids.json" >> "$RESULTS"
    $PEERS bench/peers.py genai "$GENAI" --prompt-ids "$WORK/ids.json" --tokens 8 \
        --runs "$RUNS" --label "onnxruntime-genai fp32" >> "$RESULTS"
done

$PY - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ours = [r for r in rows if r["engine"].startswith("inferaligner")]
peer = {r["prompt_tokens"]: r for r in rows if not r["engine"].startswith("inferaligner")}
base = ours[0]["prefill_tok_s"] if ours else float("nan")
print(f"{'prompt':>6} {'ours tok/s':>10} {'genai tok/s':>11} {'ratio':>6} {'ours peak MiB':>13} "
      f"{'genai peak MiB':>14} {'ratio':>6} {'ours vs shortest':>16}")
for r in ours:
    n = r["prompt_tokens"]
    p = peer.get(n, {})
    pt, pm = p.get("prefill_tok_s", float("nan")), p.get("peak_rss_mib", float("nan"))
    print(f"{n:>6} {r['prefill_tok_s']:>10.0f} {pt:>11.0f} {r['prefill_tok_s'] / pt:>5.2f}x "
          f"{r['peak_rss_mib']:>13.0f} {pm:>14.0f} {r['peak_rss_mib'] / pm:>5.2f}x "
          f"{r['prefill_tok_s'] / base:>15.2f}x")
PY
