#!/usr/bin/env bash
# Throughput benchmark: this runtime against onnxruntime-genai 0.18 (fp32 and int4, its own model
# builder) and Hugging Face transformers (fp32), all on the same SmolLM2-135M-Instruct weights,
# in one run: 46-token chat prompt, 64 greedy tokens, 2 threads, batch 1 and 8, each figure the
# median of 3 runs after a warm-up, every configuration in its own process (peak RSS).
#
#   make smollm2 && bash bench/run.sh        # ~10 min; writes bench/results.jsonl, prints a table
#
# The peers need torch (about 3 GB with its CUDA wheels), so they live in their own venv,
# bench/.venv, never in the project's.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
PEERS=bench/.venv/bin/python
GGUF=downloads/SmolLM2-135M-Instruct.Q4_1.gguf
OURS=models/smollm2-135m-instruct
OURS_INT4=models/smollm2-135m-instruct-int4
HF=models/smollm2-hf
THREADS=2
RESULTS=bench/results.jsonl

[ -f "$OURS/manifest.json" ] || make smollm2
if [ ! -x "$PEERS" ]; then
    python3 -m venv bench/.venv
    bench/.venv/bin/pip install --quiet --disable-pip-version-check \
        "onnxruntime-genai==0.18.0" torch transformers onnx-ir onnx tokenizers jinja2 numpy
fi
[ -f "$OURS_INT4/manifest.json" ] || $PY -m inferaligner_onnx export "$GGUF" "$OURS_INT4" --int4 --force
[ -f "$HF/model.safetensors" ] || $PY bench/gguf_to_hf.py "$GGUF" "$HF"
for precision in fp32 int4; do
    out=models/smollm2-genai-$precision
    if [ ! -f "$out/genai_config.json" ]; then
        extra=()
        [ "$precision" = int4 ] && extra=(--extra_options int4_block_size=32 int4_accuracy_level=4)
        $PEERS -m onnxruntime_genai.models.builder -i "$HF" -o "$out" -p "$precision" -e cpu \
            -c bench/.genai-cache "${extra[@]}" > "bench/.genai-$precision.log" 2>&1
    fi
    # Same thread count as ours (genai otherwise lets ONNX Runtime pick).
    $PY - "$out/genai_config.json" "$THREADS" <<'PY'
import json, sys
path, threads = sys.argv[1], int(sys.argv[2])
cfg = json.load(open(path))
cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
json.dump(cfg, open(path, "w"), indent=4)
PY
done
cargo build --release --quiet -p inferaligner-bench

: > "$RESULTS"
ours() { target/release/inferaligner-bench --threads "$THREADS" "$@" >> "$RESULTS"; }
peer() { $PEERS bench/peers.py "$@" >> "$RESULTS"; }
for batch in 1 8; do
    ours --model "$OURS" --batch "$batch"
    peer genai models/smollm2-genai-fp32 --batch "$batch" --label "onnxruntime-genai fp32"
    ours --model "$OURS_INT4" --batch "$batch"
    peer genai models/smollm2-genai-int4 --batch "$batch" --label "onnxruntime-genai int4"
    PYTHONPATH=onnx peer transformers "$HF" --batch "$batch" --label "transformers fp32"
done
ours --model "$OURS" --batch 1 --noop-hook
ours --model "$OURS" --batch 1
ours --model "$OURS" --batch 1 --noop-hook
$PY bench/report.py "$RESULTS"
