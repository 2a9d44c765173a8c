#!/usr/bin/env bash
# Create the project venv (.venv) with the pinned Python packages and link the ONNX Runtime
# shared library from the onnxruntime wheel to .venv/ort/libonnxruntime.so, where
# .cargo/config.toml points ORT_DYLIB_PATH. Idempotent; needs only the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($python --version)"
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
# The exporter package itself, importable from its source tree (no build backend needed).
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD/onnx" > "$site/inferaligner_onnx.pth"

lib=$(.venv/bin/python - <<'PY'
import pathlib, onnxruntime
capi = pathlib.Path(onnxruntime.__file__).parent / "capi"
libs = sorted(capi.glob("libonnxruntime.so.*"))
if not libs:
    raise SystemExit(f"setup: no libonnxruntime.so.* in the onnxruntime wheel ({capi})")
print(libs[-1])
PY
)
mkdir -p .venv/ort
ln -sfn "$lib" .venv/ort/libonnxruntime.so
echo "setup: ONNX Runtime $(.venv/bin/python -c 'import onnxruntime; print(onnxruntime.__version__)') linked at .venv/ort/libonnxruntime.so"
