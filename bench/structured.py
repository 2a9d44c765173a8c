"""What an answer option costs: decode throughput of the same requests with and without it,
against a running sidecar in local mode, in one run. Options: a JSON schema (`response_format`),
log-probabilities with 20 alternatives a token (`logprobs`, `top_logprobs`), or sampling instead
of greedy decoding (`sampling`: the API's default temperature 1; `nucleus`: temperature 0.7
and top-p 0.9).

The schema asks for one string of at least 2,000 characters, so that every answer runs to
`max_tokens` with and without it and the batches stay full alike; log-probabilities change no
token, so both runs write the same answers; the sampling options ban the end-of-turn token
(`logit_bias`, on both sides) for the same reason. Prints tokens/s per round and the ratio
(with / without).

    target/release/inferaligner serve &      # local mode, SmolLM2
    .venv/bin/python bench/structured.py --url http://127.0.0.1:8080 --concurrency 8
    .venv/bin/python bench/structured.py --option logprobs
    .venv/bin/python bench/structured.py --option sampling
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

QUESTIONS = [
    "Write a long story about a dragon who learns to bake bread.",
    "Describe the history of the bicycle in detail.",
    "Explain how a refrigerator works, step by step.",
    "Write a travel guide for a week in Portugal.",
    "Describe a day in the life of a lighthouse keeper.",
    "Explain the rules of chess to a beginner.",
    "Write a letter to a friend about a new hobby.",
    "Describe how to plant and care for tomatoes.",
]
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "text",
        "schema": {
            "type": "object",
            "properties": {"text": {"type": "string", "minLength": 2000}},
            "required": ["text"],
        },
    },
}


OPTIONS = {
    "json_schema": {"response_format": SCHEMA},
    "logprobs": {"logprobs": True, "top_logprobs": 20},
    "sampling": {"temperature": 1.0},
    "nucleus": {"temperature": 0.7, "top_p": 0.9},
}
# SmolLM2's end-of-turn token (`<|im_end|>`), banned on both sides of the sampling options
NO_EOS = {"logit_bias": {"2": -100}}
SAMPLING = ("sampling", "nucleus")


def ask(url: str, question: str, option: dict | None, max_tokens: int, extra: dict) -> int:
    body = {
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "frequency_penalty": 0.3,
        **extra,
    }
    body.update(option or {})
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        json.dumps(body).encode(),
        {"content-type": "application/json"},
    )
    with urllib.request.urlopen(request) as r:
        return json.load(r)["usage"]["completion_tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--option", choices=sorted(OPTIONS), default="json_schema")
    args = ap.parse_args()
    questions = (QUESTIONS * args.concurrency)[: args.concurrency]
    extra = NO_EOS if args.option in SAMPLING else {}
    rates = {False: [], True: []}
    for rnd in range(args.rounds):
        for structured in (False, True):
            start = time.time()
            with ThreadPoolExecutor(args.concurrency) as pool:
                tokens = sum(
                    pool.map(
                        lambda q, s=structured: ask(
                            args.url,
                            q,
                            OPTIONS[args.option] if s else None,
                            args.max_tokens,
                            extra,
                        ),
                        questions,
                    )
                )
            rate = tokens / (time.time() - start)
            rates[structured].append(rate)
            name = args.option if structured else "text"
            print(f"round {rnd}: {name:11} c={args.concurrency} {tokens} tokens, {rate:.1f} tok/s")
    ratio = sum(rates[True]) / sum(rates[False])
    print(f"{args.option} / text: {ratio:.2f}x")


if __name__ == "__main__":
    main()
