#!/usr/bin/env bash
# The aligned sibling end to end, on CPU: torch venv (recipe only), SmolLM2 GGUF -> HF weights,
# disjointness check, fine-tune, export, a check of the sibling on the validation sets (when the
# shared sets are beside the checkout), and the aligned steering pack.
#
#   bash recipes/aligned-sibling/run.sh          # or: make aligned-sibling
#
# About 45 minutes of training on a 2-core machine; see README.md beside this file.
# THREADS=1 when other CPU jobs share the machine (see README.md, "Threads").
# PACK=config/packs/smollm2-135m-instruct-aligned.safetensors to replace the committed pack.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=.venv/bin/python
VENV=${TORCH_VENV:-recipes/aligned-sibling/.venv}
TORCH=$VENV/bin/python
GGUF=downloads/SmolLM2-135M-Instruct.Q4_1.gguf
TARGET=models/smollm2-135m-instruct
BASE=models/smollm2-hf
SIBLING_HF=models/smollm2-aligned-hf
SIBLING=models/smollm2-135m-instruct-aligned
PACK=${PACK:-models/smollm2-135m-instruct-aligned.safetensors}
THREADS=${THREADS:-0}
VAL=../shared/data

[ -f "$TARGET/manifest.json" ] || make smollm2
if [ ! -x "$TORCH" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r recipes/aligned-sibling/requirements.txt
fi
[ -f "$BASE/model.safetensors" ] || $PY bench/gguf_to_hf.py "$GGUF" "$BASE"
$PY recipes/aligned-sibling/check_disjoint.py
$TORCH recipes/aligned-sibling/train.py --base "$BASE" --out "$SIBLING_HF" --threads "$THREADS"
$PY -m inferaligner_onnx export "$SIBLING_HF" "$SIBLING" --force
if [ -f "$VAL/harmful_val.jsonl" ]; then
    $TORCH recipes/aligned-sibling/check_sibling.py "$SIBLING_HF" --threads "$THREADS" \
        --harmful "$VAL/harmful_val.jsonl" --harmless "$VAL/harmless_val.jsonl" \
        --json models/aligned-sibling-check.json
fi
cargo build --release --quiet -p inferaligner
target/release/inferaligner calibrate --target "$TARGET" --aligned "$SIBLING" --out "$PACK"
echo "aligned sibling: $SIBLING; pack: $PACK"
