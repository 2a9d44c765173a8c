#!/usr/bin/env bash
# Throughput benchmark: this runtime (plain and fused layer graphs) against onnxruntime-genai 0.18
# (fp32 and int4, its own model builder) and Hugging Face transformers (fp32), all on the same
# SmolLM2-135M-Instruct weights,
# in one run: 46-token chat prompt, 64 greedy tokens, 2 threads, batch 1 and 8, each figure the
# median of 3 runs after a warm-up, every configuration in its own process (peak RSS).
#
#   make smollm2 && bash bench/run.sh        # ~12 min; writes bench/results.jsonl, prints a table
#   QUICK=1 ROUNDS=3 bash bench/run.sh       # the serving export against onnxruntime-genai only
#   ROUNDS=3 bash bench/run.sh               # every configuration 3 times, interleaved; the
#                                            # ratios are medians of per-round ratios (this
#                                            # shared machine drifts by ±20 % within minutes)
#   SAMPLED=1 QUICK=1 bash bench/run.sh      # also sampled decoding (temperature 0.7, top-p
#                                            # 0.9), the serving export against onnxruntime-
#                                            # genai, each engine with its own sampler
#
# "fused-segs" is the fused export as the default pack needs it: graph boundaries after its gate
# layer and its first steered layer only (--segment-ends), its other steered layers inside the
# graphs taking addends (--addend-layers): the export to serve with it.
#
# The peers need torch (about 3 GB with its CUDA wheels), so they live in their own venv,
# bench/.venv, never in the project's. With LLAMACPP=1, llama.cpp (llama-cpp-python, compiled
# from source on first use: ~15 min on 2 cores, in bench/.venv-llamacpp) runs the shipped Q4_1
# GGUF beside them. The machine's memory bandwidth (a one-thread 512 MiB copy) is measured too,
# and the report gives each batch-1 decode as a fraction of the ceiling it sets.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
PEERS=bench/.venv/bin/python
GGUF=downloads/SmolLM2-135M-Instruct.Q4_1.gguf
OURS=models/smollm2-135m-instruct
OURS_INT4=models/smollm2-135m-instruct-int4
OURS_FUSED=models/smollm2-135m-instruct-fused
OURS_FUSED_INT4=models/smollm2-135m-instruct-fused-int4
OURS_SEGS=models/smollm2-135m-instruct-fused-segs
OURS_SEGS_INT4=models/smollm2-135m-instruct-fused-segs-int4
# the default pack's steered layers and gate layer (`inferaligner inspect` prints them)
SEGMENT_ENDS=12,18
ADDEND_LAYERS=12-20
ROUNDS=${ROUNDS:-1}
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
[ -f "$OURS_FUSED/manifest.json" ] || $PY -m inferaligner_onnx export "$GGUF" "$OURS_FUSED" --variant fused --force
[ -f "$OURS_FUSED_INT4/manifest.json" ] ||
    $PY -m inferaligner_onnx export "$GGUF" "$OURS_FUSED_INT4" --variant fused --int4 --force
# (re-exported when an older one, with a boundary after every steered layer, is there)
grep -qs addends "$OURS_SEGS/manifest.json" ||
    $PY -m inferaligner_onnx export "$GGUF" "$OURS_SEGS" --variant fused --segment-ends "$SEGMENT_ENDS" \
        --addend-layers "$ADDEND_LAYERS" --force
grep -qs addends "$OURS_SEGS_INT4/manifest.json" ||
    $PY -m inferaligner_onnx export "$GGUF" "$OURS_SEGS_INT4" --variant fused --int4 \
        --segment-ends "$SEGMENT_ENDS" --addend-layers "$ADDEND_LAYERS" --force
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
if [ "${LLAMACPP:-0}" = 1 ] && [ ! -x bench/.venv-llamacpp/bin/python ]; then
    python3 -m venv bench/.venv-llamacpp
    CMAKE_BUILD_PARALLEL_LEVEL=2 bench/.venv-llamacpp/bin/pip install --quiet \
        --disable-pip-version-check llama-cpp-python numpy jinja2 tokenizers
fi
cargo build --release --quiet -p inferaligner-bench

: > "$RESULTS"
# every result line carries its round, so the report can pair each figure with its peer's
tag() { $PY -c "import json, sys; r = json.loads(sys.stdin.read()); r['round'] = $round; print(json.dumps(r))"; }
ours() { target/release/inferaligner-bench --threads "$THREADS" "$@" | tag >> "$RESULTS"; }
peer() { $PEERS bench/peers.py "$@" | tag >> "$RESULTS"; }
llamacpp() {
    [ "${LLAMACPP:-0}" = 1 ] || return 0
    bench/.venv-llamacpp/bin/python bench/peers.py llamacpp "$GGUF" --tokenizer "$HF" \
        --label "llama.cpp Q4_1" "$@" | tag >> "$RESULTS"
}
# Bytes a decode step streams (the weights it multiplies by: every graph but the embedding
# lookup), and the machine's copy bandwidth.
$PY - "$OURS" "$OURS_INT4" "$OURS_FUSED" "$OURS_FUSED_INT4" "$OURS_SEGS" "$OURS_SEGS_INT4" \
    models/smollm2-genai-fp32 models/smollm2-genai-int4 "$GGUF" >> "$RESULTS" <<'PY'
import json, sys, time
from pathlib import Path
import numpy as np
def weights(path):
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if (p / "manifest.json").is_file():
        m = json.loads((p / "manifest.json").read_text())
        files = [f for s in m["segments"] if s["kind"] != "embed" for f in [s["file"], s["file"] + ".data"]]
        return sum((p / f).stat().st_size for f in files if (p / f).is_file())
    return sum(f.stat().st_size for f in p.glob("*.onnx*"))
names = ["inferaligner fp32", "inferaligner int4", "inferaligner fused fp32", "inferaligner fused int4",
         "inferaligner fused-segs fp32", "inferaligner fused-segs int4",
         "onnxruntime-genai fp32", "onnxruntime-genai int4", "llama.cpp Q4_1"]
for name, path in zip(names, sys.argv[1:]):
    print(json.dumps({"kind": "weights", "engine": name, "bytes": weights(path)}))
a = np.ones(64 * 1024 * 1024)
b = np.empty_like(a)
best = 0.0
for _ in range(5):
    t = time.perf_counter()
    np.copyto(b, a)
    best = max(best, 2 * a.nbytes / (time.perf_counter() - t))
print(json.dumps({"kind": "bandwidth", "engine": "memory copy", "bytes_per_s": best}))
PY
# QUICK=1 runs only the serving export (fused-segs) and onnxruntime-genai: a third of the time
full() { [ "${QUICK:-0}" = 1 ] || "$@"; }
sampled() { [ "${SAMPLED:-0}" = 1 ] || return 0; "$@" --temperature 0.7 --top-p 0.9; }
for round in $(seq "$ROUNDS"); do
    for batch in 1 8; do
        full ours --model "$OURS" --batch "$batch"
        full ours --model "$OURS_FUSED" --batch "$batch"
        ours --model "$OURS_SEGS" --batch "$batch"
        peer genai models/smollm2-genai-fp32 --batch "$batch" --label "onnxruntime-genai fp32"
        full ours --model "$OURS_INT4" --batch "$batch"
        full ours --model "$OURS_FUSED_INT4" --batch "$batch"
        ours --model "$OURS_SEGS_INT4" --batch "$batch"
        peer genai models/smollm2-genai-int4 --batch "$batch" --label "onnxruntime-genai int4"
        sampled ours --model "$OURS_SEGS" --batch "$batch"
        sampled peer genai models/smollm2-genai-fp32 --batch "$batch" \
            --label "onnxruntime-genai fp32 sampled"
        sampled ours --model "$OURS_SEGS_INT4" --batch "$batch"
        sampled peer genai models/smollm2-genai-int4 --batch "$batch" \
            --label "onnxruntime-genai int4 sampled"
        PYTHONPATH=onnx full peer transformers "$HF" --batch "$batch" --label "transformers fp32"
        full llamacpp --batch "$batch"
    done
    full ours --model "$OURS" --batch 1 --noop-hook
    full ours --model "$OURS" --batch 1
done
$PY bench/report.py "$RESULTS"
