#!/usr/bin/env bash
# The gate on real traffic, per framing: bare requests, behind an operator's system prompt, as the
# last turn of a chat, after or before a pasted document, after a conversational jailbreak set-up,
# and as raw /v1/completions text. The measurement set is composed from bench/gate-set/pieces
# (written for measuring only: never calibrate or tune on it) by `inferaligner compose`; the
# shared val sets are measured beside it when they are there (they share sources with the
# train sets, so their figures flatter).
#
#   bash bench/gate.sh                       # the default pack
#   PACK=path/to/pack.safetensors bash bench/gate.sh
#
# Writes target/gate-bench/{measure,val}.{json,md} and one JSON line per prompt
# (measure-samples.jsonl: framing, score, decision). Gate only: no answers are generated (use
# `inferaligner eval` without --gate-only for those). About 7 minutes on 2 cores (3.5 for the
# measurement set, 3.5 for val with the five jailbreak templates).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/smollm2-135m-instruct}
PACK=${PACK:-config/packs/smollm2-135m-instruct-refusal-answers.safetensors}
OUT=${OUT:-target/gate-bench}
DATA=${DATA:-../shared/data}
bin=target/release/inferaligner
[ -x "$bin" ] || cargo build --release -p inferaligner
[ -d "$MODEL" ] || make smollm2
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$PWD/.venv/ort/libonnxruntime.so}
mkdir -p "$OUT"
"$bin" compose --pieces bench/gate-set/pieces --out "$OUT/set"
"$bin" eval --model "$MODEL" --pack "$PACK" --gate-only \
    --harmful "$OUT/set/harmful.jsonl" --harmless "$OUT/set/harmless.jsonl" \
    --json "$OUT/measure.json" --markdown "$OUT/measure.md" --samples "$OUT/measure-samples.jsonl"
cat "$OUT/measure.md"
if [ -f "$DATA/harmful_val.jsonl" ]; then
    "$bin" eval --model "$MODEL" --pack "$PACK" --gate-only \
        --harmful "$DATA/harmful_val.jsonl" --harmless "$DATA/harmless_val.jsonl" \
        --jailbreaks config/jailbreaks.txt \
        --json "$OUT/val.json" --markdown "$OUT/val.md"
    cat "$OUT/val.md"
fi
