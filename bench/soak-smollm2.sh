#!/usr/bin/env bash
# Memory under real traffic on the real model: the sidecar on the SmolLM2 export with the
# default pack, on loopback, bounded in time.
#
#   make smollm2 && bash bench/soak-smollm2.sh                 # ~15 min
#   SOAK_SECONDS=120 PROXY_SECONDS=60 bash bench/soak-smollm2.sh   # a shorter look
#
# 1. Long prompts in both modes: 3,900-token prompts (a pasted document and a question,
#    harmless and harmful), one at a time, in `local` mode and in `proxy` mode in front of an
#    instant stub upstream.
# 2. The soak: `local` mode, 16 closed-loop clients for SOAK_SECONDS with the realistic mix
#    (20 % pasted documents of 1–4k tokens, 30 % multi-turn chats behind a system prompt, the
#    rest short questions; 30 % harmful; half streamed, 10 % of streams hung up on; a fifth of
#    the chats sent to `/v1/responses` as the Responses requests they amount to), then
#    COMPLETIONS_SECONDS of `/v1/completions` as harnesses and batch clients use it (texts of
#    1–4k tokens scored with `echo`, prompt lists, `best_of`), then the realistic mix in `proxy`
#    mode for PROXY_SECONDS. The sidecar's RSS is read every 250 ms.
# Every run writes one JSON line to bench/soak-results.jsonl; a table follows. Lost requests
# (sent − answered − clearly errored − hung up on purpose) must be 0.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-models/smollm2-135m-instruct}   # MODEL=models/smollm2-135m-instruct-fused-segs: the export to serve
SOAK_SECONDS=${SOAK_SECONDS:-600}
PROXY_SECONDS=${PROXY_SECONDS:-120}
COMPLETIONS_SECONDS=${COMPLETIONS_SECONDS:-150}
RESULTS=bench/soak-results.jsonl
WORK=$(mktemp -d)
STUB=127.0.0.1:18101
API=127.0.0.1:18181
ADMIN=127.0.0.1:19191
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$PWD/.venv/ort/libonnxruntime.so}

[ -f "$MODEL/manifest.json" ] || make smollm2
cargo build --release --quiet -p inferaligner -p inferaligner-bench

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
target/release/inferaligner-load stub --listen "$STUB" 2>/dev/null &
pids+=($!)

sidecar_pid=
start_sidecar() {  # mode
    target/release/inferaligner serve --mode "$1" --upstream "http://$STUB" --model "$MODEL" \
        --listen "$API" --admin-listen "$ADMIN" 2>>"$WORK/sidecar.log" &
    sidecar_pid=$!
    pids+=("$sidecar_pid")
    for _ in $(seq 1 600); do curl -sf "http://$ADMIN/ready" >/dev/null && return; sleep 0.2; done
    echo "sidecar ($1) not ready:"; tail -20 "$WORK/sidecar.log"; exit 1
}
stop_sidecar() { kill -TERM "$sidecar_pid"; wait "$sidecar_pid" || true; }
load() {  # label concurrency [extra args]
    local label=$1 c=$2; shift 2
    target/release/inferaligner-load run --url "http://$API" --model "$MODEL" --concurrency "$c" \
        --watch-pid "$sidecar_pid" --label "$label" "$@"
}

: > "$RESULTS"
for mode in local proxy; do
    start_sidecar "$mode"
    load "long-$mode" 1 --mix long --prompt-tokens 3900 --requests 4 --warmup 0 \
        --harmful-share 0.5 --max-tokens 16 >> "$RESULTS"
    if [ "$mode" = local ]; then
        load "soak-local" 16 --mix realistic --seconds "$SOAK_SECONDS" --max-tokens 96 \
            --harmful-share 0.3 --stream-share 0.5 --disconnect-share 0.1 \
            --responses-share 0.2 >> "$RESULTS"
        load "completions" 16 --mix completions --seconds "$COMPLETIONS_SECONDS" \
            --max-tokens 32 --prompt-tokens 60 --harmful-share 0.3 --stream-share 0.5 \
            --disconnect-share 0.1 >> "$RESULTS"
    else
        load "soak-proxy" 16 --mix realistic --seconds "$PROXY_SECONDS" --max-tokens 96 \
            --harmful-share 0.3 --stream-share 0.5 --disconnect-share 0.1 \
            --responses-share 0.2 >> "$RESULTS"
    fi
    curl -sf "http://$ADMIN/metrics" | grep -E "^inferaligner_(process_resident|kv_cache)" \
        > "$WORK/metrics-$mode.txt" || true
    echo "--- /metrics after the $mode runs"; cat "$WORK/metrics-$mode.txt"
    stop_sidecar
done

.venv/bin/python - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'run':>11} {'conc':>4} {'secs':>5} {'prompt':>6} {'sent':>5} {'answered':>8} {'errored':>7} "
      f"{'hung up':>7} {'lost':>4} {'p50 s':>6} {'p99 s':>6} {'RSS MiB start/peak/end':>23}  statuses, routes")
bad = 0
for r in rows:
    q, m = r["requests"], r["rss_mib"]
    rss = f"{m['start'] or 0:.0f}/{m['peak'] or 0:.0f}/{m['end'] or 0:.0f}"
    print(f"{r['label']:>11} {r['concurrency']:>4} {r['seconds']:>5.0f} {r['prompt_tokens']:>6} "
          f"{q['sent']:>5} {q['answered']:>8} {q['errored']:>7} {q['disconnected']:>7} {q['lost']:>4} "
          f"{r['latency_ms']['p50'] / 1e3:>6.1f} {r['latency_ms']['p99'] / 1e3:>6.1f} {rss:>23}  {r['status']} {r.get('routes', {})}")
    bad += q["lost"]
print("lost requests:", bad)
sys.exit(1 if bad else 0)
PY
