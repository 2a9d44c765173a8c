"""Peers for bench/run.sh, measured like the Rust bench: one configuration per process, a chat
prompt, greedy decoding of N tokens (EOS ignored), the median of several runs after a warm-up.
Prints one JSON object. onnxruntime-genai also samples (`--temperature`, `--top-p`, `--top-k`,
with its own sampler), as the Rust bench does with the engine's.

    python bench/peers.py genai models/smollm2-genai-fp32 --batch 8
    python bench/peers.py genai models/smollm2-genai-int4 --temperature 0.7 --top-p 0.9
    python bench/peers.py transformers models/smollm2-hf --batch 1
    python bench/peers.py onnx-chain models/smollm2-135m-instruct   (our export, Python-chained)
    python bench/peers.py llamacpp downloads/SmolLM2-135M-Instruct.Q4_1.gguf --batch 8
        (needs llama-cpp-python: bench/run.sh installs it in bench/.venv-llamacpp with LLAMACPP=1)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

import numpy as np

PROMPT = "Can you explain in a few sentences why the sky is blue during the day?"
# Token ids given with --prompt-ids (the Rust bench's --dump-prompt): the same long prompt for
# every engine.
PROMPT_IDS: list[int] | None = None


def chat_ids(model_dir: Path) -> list[int]:
    if PROMPT_IDS is not None:
        return PROMPT_IDS
    import jinja2
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    cfg_file = model_dir / "tokenizer_config.json"
    template = None
    if (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text()
    elif cfg_file.is_file():
        template = json.loads(cfg_file.read_text()).get("chat_template")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(template).render(
        messages=[{"role": "user", "content": PROMPT}], add_generation_prompt=True
    )
    return tok.encode(text, add_special_tokens=False).ids


def measure(prefill, decode, runs: int) -> tuple[float, float, list[int]]:
    """prefill() -> state; decode(state) -> tokens. Returns median prefill and decode seconds."""
    p_times, d_times, out = [], [], []
    for run in range(runs + 1):
        t0 = time.perf_counter()
        state = prefill()
        t1 = time.perf_counter()
        out = decode(state)
        t2 = time.perf_counter()
        if run:
            p_times.append(t1 - t0)
            d_times.append(t2 - t1)
    return statistics.median(p_times), statistics.median(d_times), out


# Sampling settings (--temperature, --top-p, --top-k); greedy when the temperature is 0.
SAMPLING = {"temperature": 0.0, "top_p": 1.0, "top_k": 0}


def genai(model_dir: Path, batch: int, tokens: int, runs: int):
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    ids = chat_ids(model_dir)
    rows = np.asarray([ids] * batch, dtype=np.int32)
    total = len(ids) + tokens
    sample = SAMPLING["temperature"] > 0
    settings = dict(SAMPLING, random_seed=0) if sample else {}

    def prefill():
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=sample, max_length=total, min_length=total,
                                  batch_size=batch, **settings)
        gen = og.Generator(model, params)
        gen.append_tokens(rows)
        return gen

    def decode(gen):
        out = []
        while not gen.is_done():
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        return out

    return len(ids), measure(prefill, decode, runs)


def transformers_peer(model_dir: Path, batch: int, tokens: int, runs: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = chat_ids(model_dir)
    rows = torch.tensor([ids] * batch)

    def prefill():
        with torch.inference_mode():
            out = model(rows, use_cache=True)
        return out

    def decode(first):
        with torch.inference_mode():
            past = first.past_key_values
            nxt = first.logits[:, -1].argmax(-1, keepdim=True)
            out = [int(nxt[0, 0])]
            for _ in range(tokens - 1):
                step = model(nxt, past_key_values=past, use_cache=True)
                past = step.past_key_values
                nxt = step.logits[:, -1].argmax(-1, keepdim=True)
                out.append(int(nxt[0, 0]))
        return out

    return len(ids), measure(prefill, decode, runs)


def onnx_chain(model_dir: Path, batch: int, tokens: int, runs: int):
    from inferaligner_onnx.runner import SegmentChain

    chain = SegmentChain(model_dir)
    ids = chat_ids(model_dir)
    rows = np.asarray([ids] * batch, dtype=np.int64)

    def prefill():
        mask = np.ones_like(rows)
        return chain.step(rows, mask), mask

    def decode(state):
        r, mask = state
        out = []
        for _ in range(tokens - 1):
            nxt = r.logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            out.append(int(nxt[0, 0]))
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            r = chain.step(nxt, mask, r.present)
        return out

    return len(ids), measure(prefill, decode, runs)


def llamacpp(gguf: Path, batch: int, tokens: int, runs: int):
    """llama.cpp through llama-cpp-python's low-level API: the GGUF as given (Q4_1 as shipped),
    all rows in one llama_batch (prefill and every decode step), 2 threads, greedy argmax over
    the logits it returns. Token ids from --tokenizer's chat template, as for the others."""
    import ctypes

    import llama_cpp as lc

    def api(*names):  # the binding renamed several functions across releases
        return next(getattr(lc, n) for n in names if hasattr(lc, n))

    lc.llama_backend_init()
    mparams = lc.llama_model_default_params()
    # On CPUs with AMX, llama.cpp repacks Q4_1 weights into its AMX buffers ("extra buffer
    # types"), and llama-cpp-python 0.3.36 then crashes (SIGSEGV) when the context is created
    # (seen 2026-12-04 on an AMX Xeon); without them it runs its usual CPU kernels.
    # LLAMACPP_EXTRA_BUFTS=1 keeps them.
    if hasattr(mparams, "use_extra_bufts") and os.environ.get("LLAMACPP_EXTRA_BUFTS") != "1":
        mparams.use_extra_bufts = False
    model = api("llama_model_load_from_file", "llama_load_model_from_file")(
        str(gguf).encode(), mparams)
    ids = chat_ids(TOKENIZER_DIR)
    n = len(ids)
    cparams = lc.llama_context_default_params()
    cparams.n_ctx = batch * (n + tokens) + 64
    cparams.n_batch = cparams.n_ubatch = max(512, batch * n)
    cparams.n_seq_max = batch
    cparams.n_threads = cparams.n_threads_batch = 2
    ctx = api("llama_init_from_model", "llama_new_context_with_model")(model, cparams)
    if hasattr(lc, "llama_vocab_n_tokens"):
        vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    else:
        vocab = lc.llama_n_vocab(model)

    def clear():
        if hasattr(lc, "llama_memory_clear"):
            lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        else:
            api("llama_kv_self_clear", "llama_kv_cache_clear")(ctx)

    def run(rows: list[tuple[int, int, int, bool]]) -> None:
        b = lc.llama_batch_init(len(rows), 0, batch)
        for k, (token, pos, seq, want) in enumerate(rows):
            b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = token, pos, 1, want
            b.seq_id[k][0] = seq
        b.n_tokens = len(rows)
        if lc.llama_decode(ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        lc.llama_batch_free(b)

    def argmax(i: int) -> int:
        ptr = lc.llama_get_logits_ith(ctx, i)
        return int(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                         shape=(vocab,)).argmax())

    def prefill():
        clear()
        run([(t, i, s, i == n - 1) for s in range(batch) for i, t in enumerate(ids)])
        return [argmax(s * n + n - 1) for s in range(batch)]

    def decode(first):
        cur, out = first, [first[0]]
        for step in range(tokens - 1):
            run([(cur[s], n + step, s, True) for s in range(batch)])
            cur = [argmax(s) for s in range(batch)]
            out.append(cur[0])
        return out

    return n, measure(prefill, decode, runs)


PEERS = {"genai": genai, "transformers": transformers_peer, "onnx-chain": onnx_chain,
         "llamacpp": llamacpp}
# Where llamacpp reads the tokenizer and chat template (its model argument is a GGUF file).
TOKENIZER_DIR = Path("models/smollm2-hf")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("peer", choices=sorted(PEERS))
    p.add_argument("model", type=Path)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--label", default=None)
    p.add_argument("--prompt-ids", type=Path, default=None, help="JSON list of prompt token ids")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="llamacpp: directory with tokenizer.json and the chat template")
    p.add_argument("--temperature", type=float, default=0.0, help="genai: sample at this")
    p.add_argument("--top-p", type=float, default=1.0, help="genai: with --temperature")
    p.add_argument("--top-k", type=int, default=0, help="genai: with --temperature; 0 is off")
    a = p.parse_args()
    if a.temperature > 0 and a.peer != "genai":
        p.error("--temperature: only the genai peer samples")
    SAMPLING.update(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k)
    if a.tokenizer is not None:
        global TOKENIZER_DIR
        TOKENIZER_DIR = a.tokenizer
    if a.prompt_ids is not None:
        global PROMPT_IDS
        PROMPT_IDS = json.loads(a.prompt_ids.read_text())
    prompt_len, (prefill_s, decode_s, out) = PEERS[a.peer](a.model, a.batch, a.tokens, a.runs)
    print(json.dumps({
        "engine": a.label or a.peer,
        "batch": a.batch,
        "prompt_tokens": prompt_len,
        "new_tokens": a.tokens,
        "prefill_tok_s": a.batch * prompt_len / prefill_s,
        "decode_tok_s": a.batch * (a.tokens - 1) / decode_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "first_tokens": out[:8],
    }))


if __name__ == "__main__":
    main()
