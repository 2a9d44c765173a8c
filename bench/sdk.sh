#!/usr/bin/env bash
# The OpenAI API contract through the official Python SDK (bench/sdk.py), against the sidecar
# in both modes with SmolLM2 and the default pack: `local`, and `proxy` in front of an upstream
# that is another sidecar in `local` mode with the policy `off` (a plain OpenAI-compatible
# server). Each call, harmless and harmful, must work or fail with a 400 naming the field.
#
#   make smollm2 && bash bench/sdk.sh          # ~3 min on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-models/smollm2-135m-instruct}
[ -f "$MODEL/manifest.json" ] || make smollm2
[ -x bench/.venv/bin/python ] || python3 -m venv bench/.venv
bench/.venv/bin/python -c "import openai" 2>/dev/null || bench/.venv/bin/pip install -q openai
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$PWD/.venv/ort/libonnxruntime.so}
cargo build --release --quiet -p inferaligner

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
start() { # name port admin-port [flags…]
    local name=$1 port=$2 admin=$3
    shift 3
    target/release/inferaligner serve --model "$MODEL" --listen "127.0.0.1:$port" \
        --admin-listen "127.0.0.1:$admin" "$@" 2>"bench/.sdk-$name.log" &
    pids+=($!)
}
INFERALIGNER_POLICIES__DEFAULT__MODE=off start upstream 18100 19100
start local 18101 19101
start proxy 18102 19102 --mode proxy --upstream http://127.0.0.1:18100
for admin in 19100 19101 19102; do
    for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$admin/ready" >/dev/null && break; sleep 0.5; done
    curl -sf "http://127.0.0.1:$admin/ready" >/dev/null || { echo "not ready: $admin (bench/.sdk-*.log)"; exit 1; }
done
status=0
bench/.venv/bin/python bench/sdk.py --base-url http://127.0.0.1:18101/v1 --label "local mode" || status=1
bench/.venv/bin/python bench/sdk.py --base-url http://127.0.0.1:18102/v1 --label "proxy mode" || status=1
exit $status
