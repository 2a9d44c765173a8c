#!/usr/bin/env bash
# Gate overhead of the sidecar in `proxy` mode: requests straight to an instant stub upstream
# versus the same requests through the sidecar in front of it. Every request is gated by an
# early-exit prefill of SmolLM2-135M-Instruct under the `monitor` policy, so every one is
# forwarded whatever the gate says: the figure is the gate's cost, not local generation's.
# Concurrency 1 and 16, chat prompts of ~50 and ~500 tokens; then the domain-bot workload (the
# same ~450-token system prompt before short questions that differ every time) against the bare
# questions, through the sidecar with its prefix cache and through a second one without it.
# Prints tables and writes bench/sidecar-results.jsonl.
#
#   make smollm2 && bash bench/sidecar.sh          # ~5 min on 2 cores
#
# Peers for the same job on CPU, by their published figures (their models cannot be fetched
# here): Llama Guard 3 1B ≈ 300 ms per check (seconds with its full prompt), LLM Guard's
# prompt-injection scanner 104 ms.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-models/smollm2-135m-instruct}
PACK=${PACK:-}
REQUESTS=${REQUESTS:-60}
RESULTS=bench/sidecar-results.jsonl
STUB=127.0.0.1:18000
API=127.0.0.1:18080
ADMIN=127.0.0.1:19090
API_NOCACHE=127.0.0.1:18081
ADMIN_NOCACHE=127.0.0.1:19091

[ -f "$MODEL/manifest.json" ] || make smollm2
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$PWD/.venv/ort/libonnxruntime.so}
cargo build --release --quiet -p inferaligner -p inferaligner-bench

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
target/release/inferaligner-load stub --listen "$STUB" 2>/dev/null &
pids+=($!)
pack_args=()
[ -n "$PACK" ] && pack_args=(--pack "$PACK")
sidecar() { # listen admin log [env...]
    local listen=$1 admin=$2 log=$3
    shift 3
    env INFERALIGNER_DEFAULT_POLICY=monitor "$@" target/release/inferaligner serve --mode proxy \
        --upstream "http://$STUB" --model "$MODEL" "${pack_args[@]}" --listen "$listen" \
        --admin-listen "$admin" 2>"$log" &
    pids+=($!)
}
sidecar "$API" "$ADMIN" bench/.sidecar.log
sidecar "$API_NOCACHE" "$ADMIN_NOCACHE" bench/.sidecar-nocache.log INFERALIGNER_MODEL__ENGINE__PREFIX_CACHE_TOKENS=0
for admin in "$ADMIN" "$ADMIN_NOCACHE"; do
    for _ in $(seq 1 120); do curl -sf "http://$admin/ready" >/dev/null && break; sleep 0.5; done
    curl -sf "http://$admin/ready" >/dev/null || { echo "sidecar not ready; see bench/.sidecar*.log"; exit 1; }
done

: > "$RESULTS"
for tokens in 50 500; do
    for c in 1 16; do
        for target in direct sidecar; do
            url=http://$STUB
            [ "$target" = sidecar ] && url=http://$API
            target/release/inferaligner-load run --url "$url" --model "$MODEL" --concurrency "$c" \
                --requests "$REQUESTS" --prompt-tokens "$tokens" --label "$target" >> "$RESULTS"
        done
    done
done
# The domain bot: bare questions and the same questions behind the bot's system prompt.
for c in 1 16; do
    for run in direct:$STUB:questions sidecar:$API:questions sidecar:$API:domain-bot \
        no-prefix-cache:$API_NOCACHE:questions no-prefix-cache:$API_NOCACHE:domain-bot; do
        IFS=: read -r label host port mix <<<"$run"
        target/release/inferaligner-load run --url "http://$host:$port" --model "$MODEL" \
            --concurrency "$c" --requests "$((REQUESTS * 2))" --mix "$mix" --label "$label" >> "$RESULTS"
    done
done
curl -s "http://$ADMIN/metrics" | grep -E '^inferaligner_(requests_total|overloaded|upstream_errors|prefix_cache)' || true

.venv/bin/python - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
bot = [r for r in rows if r["mix"] in ("questions", "domainbot")]
rows = [r for r in rows if r not in bot]
peers = {"Llama Guard 3 1B (published)": 300.0, "LLM Guard prompt injection (published)": 104.0}
print(f"{'prompt':>7} {'conc':>4} {'direct p50':>11} {'sidecar p50':>12} {'p99':>8} {'added p50':>10} {'added p99':>10} {'rps':>6} {'errors':>6}")
for i in range(0, len(rows), 2):
    d, s = rows[i], rows[i + 1]
    added50 = s["latency_ms"]["p50"] - d["latency_ms"]["p50"]
    added99 = s["latency_ms"]["p99"] - d["latency_ms"]["p99"]
    errors = s["requests"]["sent"] - s["requests"]["answered"]
    print(f"{s['prompt_tokens']:>7} {s['concurrency']:>4} {d['latency_ms']['p50']:>9.2f}ms {s['latency_ms']['p50']:>10.1f}ms "
          f"{s['latency_ms']['p99']:>6.1f}ms {added50:>8.1f}ms {added99:>8.1f}ms {s['throughput_rps']:>6.1f} {errors:>6}")
    if s["concurrency"] == 1:
        for name, ms in peers.items():
            print(f"{'':>13} vs {name}: {ms / added50:.1f}x less added latency")

print()
print("domain bot (gate p50 = sidecar p50 - direct p50 of the bare questions)")
print(f"{'through':>16} {'mix':>10} {'conc':>4} {'prompt':>6} {'p50':>9} {'p99':>9} {'rps':>6} {'errors':>6}")
cell = {}
for r in bot:
    cell[(r["label"], r["mix"], r["concurrency"])] = r
    errors = r["requests"]["sent"] - r["requests"]["answered"]
    print(f"{r['label']:>16} {r['mix']:>10} {r['concurrency']:>4} {r['prompt_tokens']:>6} {r['latency_ms']['p50']:>7.1f}ms "
          f"{r['latency_ms']['p99']:>7.1f}ms {r['throughput_rps']:>6.1f} {errors:>6}")
def gate(label, mix, c):
    return cell[(label, mix, c)]["latency_ms"]["p50"] - cell[("direct", "questions", c)]["latency_ms"]["p50"]
bare = gate("sidecar", "questions", 1)
print(f"gate p50, domain bot with the prefix cache / bare question: {gate('sidecar', 'domainbot', 1) / bare:.2f}x (target <= 1.5)")
print(f"gate p50, domain bot without the prefix cache / bare question: {gate('no-prefix-cache', 'domainbot', 1) / bare:.2f}x")
for label in ("sidecar", "no-prefix-cache"):
    ratio = cell[(label, "domainbot", 16)]["throughput_rps"] / cell[(label, "domainbot", 1)]["throughput_rps"]
    print(f"domain bot through {label}: requests/s at c=16 / c=1 = {ratio:.2f}x (target >= 3)")
PY
