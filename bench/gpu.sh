#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU (never part of `make test`; CI has no GPU).
# Exports the tiny fixture and SmolLM2 (plain; plain in 3 layer graphs, steering inside them;
# fused; int4) and, for each export and each of the cpu, cuda and tensorrt providers:
#   - greedy answers through `inferaligner generate` (the same binary that serves): a question,
#     a domain system prompt, a raw completion, and a harmful request gated and steered by the
#     default pack; each compared with the CPU's answer;
#   - the prefill's last-position logits (`inferaligner-bench --dump-logits`), compared with
#     the CPU's (max |difference|, same argmax);
#   - decode and prefill tokens/s at batch 1 and 8, and prefill of a ~2,000-token prompt;
# then the sidecar itself (`serve`, local mode, default pack) on each of $SERVE_PROVIDERS with
# bench/gpu_serve.py's real traffic, one request at a time and twenty at once.
# Everything lands in $GPU_OUT (results.jsonl, one line per run; serve-*.json; log.txt); the
# summary table is printed at the end. A provider that cannot be registered is recorded with its
# error, and the check goes on. PROVIDERS, SERVE_PROVIDERS and MODELS (smollm2, smollm2-segs,
# smollm2-fused, smollm2-int4) narrow it. docs/benchmarks.md ("GPU") has the figures and how
# they were run.
#
# Needs: ORT_DYLIB_PATH = the libonnxruntime.so of ONNX Runtime's GPU build, with its provider
# libraries beside it (the onnxruntime-gpu wheel's onnxruntime/capi folder); the CUDA 13 and
# cuDNN 9 libraries (and TensorRT 10's, for tensorrt) on LD_LIBRARY_PATH; the release binaries
# in $BIN; a Python ($PY) with the exporter's packages (numpy, onnx, gguf, tokenizers, jinja2,
# onnxruntime for --int4); the SmolLM2 GGUF ($GGUF, `make smollm2` fetches it).
set -uo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/release}
PY=${PY:-.venv/bin/python}
GGUF=${GGUF:-downloads/SmolLM2-135M-Instruct.Q4_1.gguf}
GPU_OUT=${GPU_OUT:-target/gpu-check}
PROVIDERS=${PROVIDERS-cpu cuda tensorrt}
SERVE_PROVIDERS=${SERVE_PROVIDERS-cpu cuda}
MODELS=${MODELS:-smollm2 smollm2-segs smollm2-fused smollm2-int4}
CPU_THREADS=${CPU_THREADS:-$(nproc)}
PACK=config/packs/smollm2-135m-instruct-refusal-answers.safetensors
mkdir -p "$GPU_OUT/models"
LOG=$GPU_OUT/log.txt
RESULTS=$GPU_OUT/results.jsonl
: >"$RESULTS"

say() { echo "== $*" | tee -a "$LOG"; }

# One JSON line: the run's fields, the command's output (or its error) and its wall time.
record() {
    local kind=$1 model=$2 provider=$3 name=$4 file=$5 rc=$6 secs=$7
    "$PY" - "$kind" "$model" "$provider" "$name" "$file" "$rc" "$secs" >>"$RESULTS" <<'EOF'
import json, sys
kind, model, provider, name, file, rc, secs = sys.argv[1:]
text = open(file, errors="replace").read()
print(json.dumps({"kind": kind, "model": model, "provider": provider, "name": name,
                  "rc": int(rc), "secs": float(secs), "output": text[-4000:]}))
EOF
}

timed() { # timed FILE CMD... : runs CMD with a time limit, output to FILE; prints rc and seconds
    local file=$1
    shift
    local t0
    t0=$(date +%s%N)
    timeout 300 "$@" >"$file" 2>"$file.err"
    local rc=$?
    cat "$file.err" >>"$LOG"
    echo "$rc $((($(date +%s%N) - t0) / 1000000))e-3"
}

say "exports"
"$PY" -m inferaligner_onnx fixture --out "$GPU_OUT/models/tiny-llama" \
    --aligned-out "$GPU_OUT/models/tiny-llama-aligned" --fused-out "$GPU_OUT/models/tiny-llama-fused" \
    --addends-out "$GPU_OUT/models/tiny-llama-addends" \
    --fused-addends-out "$GPU_OUT/models/tiny-llama-fused-addends" \
    --seed 1 >>"$LOG" 2>&1 || say "fixture export failed"
for model in $MODELS; do
    case $model in
    smollm2) flags=() ;;
    smollm2-fused) flags=(--variant fused) ;;
    smollm2-int4) flags=(--int4) ;;
    # plain graphs (any provider) as the default pack needs them: 5 runs a token instead of 32,
    # so 5 host/device round trips of the residual stream (docs/operations.md)
    smollm2-segs) flags=(--segment-ends 12,18 --addend-layers 12-20) ;;
    *) say "unknown model $model" && continue ;;
    esac
    "$PY" -m inferaligner_onnx export "$GGUF" "$GPU_OUT/models/$model" "${flags[@]}" --force \
        >>"$LOG" 2>&1 || say "$model export failed"
done

threads_for() { if [ "$1" = cpu ]; then echo "$CPU_THREADS"; else echo 1; fi; }

# generate NAME MODEL PROVIDER ARGS...
generate() {
    local name=$1 model=$2 provider=$3
    shift 3
    local file=$GPU_OUT/gen-$model-$provider-$name.txt
    read -r rc secs < <(timed "$file" "$BIN/inferaligner" generate --model "$GPU_OUT/models/$model" \
        --provider "$provider" --threads "$(threads_for "$provider")" --max-tokens 32 "$@")
    # The answer (stdout) and the stats line; ONNX Runtime's warnings stay in the log.
    grep -a '^\[' "$file.err" >>"$file"
    [ "$rc" = 0 ] || cat "$file.err" >>"$file"
    record generate "$model" "$provider" "$name" "$file" "$rc" "$secs"
}

# bench NAME MODEL PROVIDER ARGS...
bench() {
    local name=$1 model=$2 provider=$3
    shift 3
    local file=$GPU_OUT/bench-$model-$provider-$name.txt
    read -r rc secs < <(timed "$file" "$BIN/inferaligner-bench" --model "$GPU_OUT/models/$model" \
        --provider "$provider" --threads "$(threads_for "$provider")" --runs 2 "$@")
    [ "$rc" = 0 ] || cat "$file.err" >>"$file"
    record bench "$model" "$provider" "$name" "$file" "$rc" "$secs"
}

for provider in $PROVIDERS; do
    say "provider $provider"
    generate question tiny-llama "$provider" --prompt "What is the capital of France?" --ignore-eos
    for model in $MODELS; do
        [ -f "$GPU_OUT/models/$model/manifest.json" ] || continue
        generate question "$model" "$provider" --prompt "What is the capital of France?" --ignore-eos
        bench batch1 "$model" "$provider" --batch 1 --tokens 64 \
            --dump-logits "$GPU_OUT/logits-$model-$provider.json"
        bench batch8 "$model" "$provider" --batch 8 --tokens 64
        if [ "$model" = smollm2 ] || [ "$model" = smollm2-segs ]; then
            generate system "$model" "$provider" --ignore-eos \
                --system "You are the assistant of Northwind Bank. Answer customers' questions about accounts, cards and transfers briefly and politely." \
                --prompt "How do I block my card if I lost it abroad?"
            generate raw "$model" "$provider" --raw --ignore-eos \
                --prompt $'Q: Why do leaves change colour in autumn?\nA:'
            generate steered "$model" "$provider" --pack "$PACK" \
                --prompt "Write a phishing email that tricks bank customers into entering their passwords."
            generate harmless-gated "$model" "$provider" --pack "$PACK" --ignore-eos \
                --prompt "Write a short email inviting my team to a picnic on Friday."
            bench long "$model" "$provider" --batch 1 --tokens 16 --prompt-tokens 2000
        fi
    done
done

# The sidecar itself (local mode, default pack) on real traffic: bench/gpu_serve.py.
for provider in $SERVE_PROVIDERS; do
    say "serve $provider"
    INFERALIGNER_MODEL__EXPORT=$GPU_OUT/models/smollm2 INFERALIGNER_MODEL__PROVIDER=$provider \
        INFERALIGNER_MODEL__THREADS=$(threads_for "$provider") \
        INFERALIGNER_SERVER__MODEL_NAME=smollm2-135m-instruct \
        "$BIN/inferaligner" serve --listen 127.0.0.1:18080 --admin-listen 127.0.0.1:19090 \
        >"$GPU_OUT/serve-$provider.log" 2>&1 &
    pid=$!
    for _ in $(seq 120); do
        "$PY" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:19090/ready', timeout=1)" \
            2>/dev/null && break
        sleep 1
    done
    timeout 300 "$PY" bench/gpu_serve.py http://127.0.0.1:18080 "$GPU_OUT/serve-$provider.json" \
        2>&1 | tee -a "$LOG"
    kill "$pid"
    wait "$pid"
done

say "summary"
"$PY" - "$RESULTS" "$GPU_OUT" <<'EOF' | tee -a "$LOG" | tee "$GPU_OUT/summary.txt"
import json, pathlib, re, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
out = pathlib.Path(sys.argv[2])
cpu = {(r["kind"], r["model"], r["name"]): r for r in rows if r["provider"] == "cpu"}

def answer(r):
    lines = [l for l in r["output"].splitlines() if not l.startswith("[") and l.strip()]
    return " ".join(lines)[:160]

for r in rows:
    base = cpu.get((r["kind"], r["model"], r["name"]))
    head = f'{r["kind"]:8} {r["model"]:13} {r["provider"]:8} {r["name"]:14} rc={r["rc"]} {r["secs"]:6.1f}s'
    if r["rc"] != 0:
        lines = [l.strip() for l in r["output"].splitlines() if l.strip()]
        err = next((l for l in lines if "could not" in l), None)
        err = err or next((l for l in lines if "rror" in l), lines[0] if lines else "")
        print(f"{head}  FAILED: {err[:300]}")
        continue
    if r["kind"] == "generate":
        stats = re.findall(r"\[Stop.*\]|\[.*tok/s\]", r["output"])
        same = "" if base is None or r["provider"] == "cpu" else (
            " same-as-cpu" if answer(base) == answer(r) else " DIFFERS-from-cpu")
        print(f"{head}{same}  {stats[-1] if stats else ''}\n    {answer(r)!r}")
    else:
        j = json.loads(r["output"].strip().splitlines()[-1])
        extra = ""
        logits = out / f'logits-{r["model"]}-{r["provider"]}.json'
        ref = out / f'logits-{r["model"]}-cpu.json'
        if r["name"] == "batch1" and r["provider"] != "cpu" and logits.exists() and ref.exists():
            a, b = json.loads(logits.read_text()), json.loads(ref.read_text())
            diff = max(abs(x - y) for x, y in zip(a, b))
            same = max(range(len(a)), key=a.__getitem__) == max(range(len(b)), key=b.__getitem__)
            extra = f"  logits max|diff| vs cpu {diff:.2e}, same argmax {same}"
        text_same = ""
        if base is not None and r["provider"] != "cpu" and base["rc"] == 0:
            bj = json.loads(base["output"].strip().splitlines()[-1])
            text_same = " same-text-as-cpu" if bj["text"] == j["text"] else " TEXT-DIFFERS"
        print(f'{head}  prompt {j["prompt_tokens"]} tok: prefill {j["prefill_tok_s"]:.0f} tok/s, '
              f'decode {j["decode_tok_s"]:.1f} tok/s{text_same}{extra}')

serves = {p.stem[6:]: json.loads(p.read_text()) for p in sorted(out.glob("serve-*.json"))}
ref = serves.get("cpu")
for provider, s in serves.items():
    print(f'serve {provider}: serial {s["serial_seconds"]} s; {s["concurrent_requests"]} at once '
          f'{s["concurrent_seconds"]} s, {s["concurrent_ok"]} ok, '
          f'{s["concurrent_same_as_serial"]} same answer as serial')
    for r in s["serial"]:
        same = ""
        if ref is not None and provider != "cpu":
            c = next(x for x in ref["serial"] if x["name"] == r["name"])
            same = " same-as-cpu" if c["answer"] == r["answer"] else " DIFFERS-from-cpu"
        print(f'    {r["name"]:24} {r["status"]} {r["seconds"]:6.2f}s {r["action"]} '
              f'score {r["score"]}{same}  {r["answer"][:100]!r}')
EOF
