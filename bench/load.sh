#!/usr/bin/env bash
# Load, soak and SIGTERM-under-load harness for the sidecar, on loopback, bounded in time.
#
#   bash bench/load.sh                        # short run, about a minute and a half
#   CELL_SECONDS=20 SOAK_SECONDS=300 bash bench/load.sh    # the full run
#
# The sidecar runs on the tiny fixture model (tests/fixtures/tiny-llama) with a pack
# calibrated for it from the built-in prompts, in `local` mode and in `proxy` mode in front of
# an instant stub upstream. A second process (`inferaligner-load`) drives it with a mix of
# harmful and harmless prompts (30 %), streaming and not (50 %), and clients that hang up
# after the first chunk (10 % of the streams), at concurrency 1, 16 and 64; then a soak at 64
# in `local` mode with the sidecar's RSS at the start and the end; then SIGTERM in the middle
# of a load at 16. Every run writes one JSON line to bench/load-results.jsonl; a table follows.
# Lost requests (sent − answered − clearly errored − hung up on purpose) must be 0.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=tests/fixtures/tiny-llama
CELL_SECONDS=${CELL_SECONDS:-5}
SOAK_SECONDS=${SOAK_SECONDS:-30}
RESULTS=bench/load-results.jsonl
WORK=$(mktemp -d)
STUB=127.0.0.1:18100
API=127.0.0.1:18180
ADMIN=127.0.0.1:19190
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$PWD/.venv/ort/libonnxruntime.so}

cargo build --release --quiet -p inferaligner -p inferaligner-bench
target/release/inferaligner calibrate --target "$MODEL" --out "$WORK/pack.safetensors" >/dev/null 2>&1

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
target/release/inferaligner-load stub --listen "$STUB" 2>/dev/null &
pids+=($!)

sidecar_pid=
start_sidecar() {  # mode
    target/release/inferaligner serve --mode "$1" --upstream "http://$STUB" --model "$MODEL" \
        --pack "$WORK/pack.safetensors" --listen "$API" --admin-listen "$ADMIN" \
        2>>"$WORK/sidecar.log" &
    sidecar_pid=$!
    pids+=("$sidecar_pid")
    for _ in $(seq 1 200); do curl -sf "http://$ADMIN/ready" >/dev/null && return; sleep 0.1; done
    echo "sidecar ($1) not ready:"; tail -20 "$WORK/sidecar.log"; exit 1
}
stop_sidecar() { kill -TERM "$sidecar_pid"; wait "$sidecar_pid" || true; }
load() {  # label concurrency seconds [extra args]
    local label=$1 c=$2 secs=$3; shift 3
    target/release/inferaligner-load run --url "http://$API" --model "$MODEL" --concurrency "$c" \
        --seconds "$secs" --harmful-share 0.3 --stream-share 0.5 --disconnect-share 0.1 \
        --max-tokens 24 --watch-pid "$sidecar_pid" --label "$label" "$@"
}

: > "$RESULTS"
for mode in local proxy; do
    start_sidecar "$mode"
    for c in 1 16 64; do load "$mode" "$c" "$CELL_SECONDS" >> "$RESULTS"; done
    if [ "$mode" = local ]; then load "soak-local" 64 "$SOAK_SECONDS" >> "$RESULTS"; fi
    stop_sidecar
done

# SIGTERM with 16 clients in flight: requests finish or are refused; none is lost.
start_sidecar local
load "sigterm-local" 16 6 > "$WORK/sigterm.json" &
loader=$!
sleep 2
kill -TERM "$sidecar_pid"
term_status=0
wait "$sidecar_pid" || term_status=$?
wait "$loader"
.venv/bin/python - "$WORK/sigterm.json" "$term_status" >> "$RESULTS" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
r["sidecar_exit_status"] = int(sys.argv[2])
print(json.dumps(r))
PY

.venv/bin/python - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'run':>14} {'conc':>4} {'secs':>5} {'sent':>6} {'answered':>8} {'errored':>7} {'refused':>7} {'hung up':>7} {'lost':>4} {'p50 ms':>8} {'p99 ms':>8} {'RSS MiB start→end':>18}  statuses")
bad = 0
for r in rows:
    q = r["requests"]
    rss = r["rss_mib"]
    rss_s = f"{rss['start'] or 0:.0f}→{rss['end'] or 0:.0f}"
    print(f"{r['label']:>14} {r['concurrency']:>4} {r['seconds']:>5.0f} {q['sent']:>6} {q['answered']:>8} {q['errored']:>7} {q['refused']:>7} {q['disconnected']:>7} {q['lost']:>4} "
          f"{r['latency_ms']['p50']:>8.1f} {r['latency_ms']['p99']:>8.1f} {rss_s:>18}  {r['status']}")
    bad += q["lost"]
    if "sidecar_exit_status" in r and r["sidecar_exit_status"] != 0:
        print(f"sidecar exited with {r['sidecar_exit_status']} after SIGTERM"); bad += 1
print("lost requests:", bad)
sys.exit(1 if bad else 0)
PY
