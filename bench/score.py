"""Score texts through the sidecar as evaluation harnesses do, and check the scores.

lm-evaluation-harness and its kin rank the options of a multiple-choice question by the
log-likelihood the model gives each continuation: `/v1/completions` with `echo: true`,
`logprobs`, and `max_tokens` 0 or 1, reading `token_logprobs` after the context (found by
`text_offset`). This script does that against a running sidecar on a small set written for it
(`bench/score-set/mc.jsonl`: 30 general-knowledge questions and 8 benign ones on edgy topics,
4 options each), reports accuracy (summed and per-byte log-likelihood) and the gate's action
on every request, checks the first texts' token scores against the float64 numpy reference of
the model (`--source`, the GGUF the export was made from), and times scoring a long pasted
document against answering it.

    make smollm2 && target/release/inferaligner serve --model models/smollm2-135m-instruct &
    .venv/bin/python bench/score.py --base-url http://127.0.0.1:8080/v1 \
        --source downloads/SmolLM2-135M-Instruct.Q4_1.gguf --export models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# `model` of every request (`--model`: e.g. `<model>@<policy>` to select a policy)
MODEL: str | None = None


def post(base: str, body: dict) -> tuple[dict, str]:
    """The answer of `/v1/completions` and the gate's action."""
    if MODEL:
        body = {**body, "model": MODEL}
    req = urllib.request.Request(
        f"{base}/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.load(r), r.headers.get("x-inferaligner-action", "-")
    except urllib.error.HTTPError as e:
        raise SystemExit(f"{e.code}: {e.read().decode()[:300]}") from e


def score(base: str, context: str, continuation: str) -> tuple[list[float], dict, str]:
    """The continuation's token log-probabilities after `context`, the answer, the action."""
    body = {
        "prompt": context + continuation,
        "echo": True,
        "logprobs": 0,
        "max_tokens": 0,
        "temperature": 0,
    }
    answer, action = post(base, body)
    return after(answer["choices"][0]["logprobs"], context), answer, action


def after(lp: dict | None, context: str) -> list[float]:
    """The scores of the tokens after `context` in a choice's `logprobs` (found by
    `text_offset`); none when the choice has no scores (blocked: the policy's refusal)."""
    if lp is None:
        return []
    start = next(i for i, o in enumerate(lp["text_offset"]) if o >= len(context))
    return lp["token_logprobs"][start:]


def score_batch(base: str, context: str, continuations: list[str]) -> list[list[float]]:
    """`score` of each continuation, all in one request (a prompt list)."""
    body = {
        "prompt": [context + c for c in continuations],
        "echo": True,
        "logprobs": 0,
        "max_tokens": 0,
        "temperature": 0,
    }
    answer, _ = post(base, body)
    choices = sorted(answer["choices"], key=lambda c: c["index"])
    return [after(c["logprobs"], context) for c in choices]


def solved(items: list[dict]) -> str:
    """Solved questions, as a few-shot evaluation puts them before each question: the same
    prefix for every request, which the sidecar's prefix cache serves after the first."""
    return "".join(
        f"Question: {i['question']}\nAnswer: {i['options'][i['answer']]}\n\n"
        for i in items
    )


def multiple_choice(base: str, items: list[dict], batch: bool, shots: str = "") -> dict:
    right = right_norm = blocked = 0
    actions: dict[str, int] = {}
    rows = []
    for item in items:
        sums, norms = [], []
        conts = [" " + option for option in item["options"]]
        context = f"{shots}Question: {item['question']}\nAnswer:"
        if batch:
            scored = score_batch(base, context, conts)
        else:
            scored = []
            for cont in conts:
                lps, _, action = score(base, context, cont)
                actions[action] = actions.get(action, 0) + 1
                scored.append(lps)
        for cont, lps in zip(conts, scored, strict=True):
            sums.append(sum(lps) if lps else None)
            norms.append(sum(lps) / len(cont.encode()) if lps else None)
        if None in sums:
            # an option the gate blocked has no score: the question cannot be ranked
            blocked += 1
            rows.append((item["question"], "(blocked)", False))
            continue
        pick = max(range(4), key=sums.__getitem__)
        pick_norm = max(range(4), key=norms.__getitem__)
        right += pick == item["answer"]
        right_norm += pick_norm == item["answer"]
        rows.append((item["question"], item["options"][pick], pick == item["answer"]))
    return {
        "items": len(items),
        "blocked": blocked,
        "acc": right / len(items),
        "acc_norm": right_norm / len(items),
        "actions": actions,
        "rows": rows,
    }


def reference_check(base: str, texts: list[str], source: Path, export: Path) -> float:
    """Largest |sidecar − numpy float64 reference| over the texts' token scores."""
    import numpy as np
    from inferaligner_onnx.export import load_source
    from inferaligner_onnx.reference import ReferenceModel
    from tokenizers import Tokenizer

    model = load_source(source, None)
    ref = ReferenceModel(model.config, model.weights)
    tok = Tokenizer.from_file(str(export / "tokenizer.json"))
    worst = 0.0
    for text in texts:
        answer, _ = post(
            base,
            {"prompt": text, "echo": True, "logprobs": 0, "max_tokens": 0},
        )
        lp = answer["choices"][0]["logprobs"]
        if lp is None:
            raise SystemExit(f"blocked by the gate, no scores to check: {text!r}")
        got = lp["token_logprobs"][1:]
        ids = np.asarray(
            [tok.encode(text, add_special_tokens=False).ids], dtype=np.int64
        )
        logits = ref.forward(ids, np.ones_like(ids)).logits[0]  # [S, V], float64
        logz = np.log(
            np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)
        ) + logits.max(-1)
        want = [logits[i, ids[0, i + 1]] - logz[i] for i in range(ids.shape[1] - 1)]
        assert len(got) == len(want), (len(got), len(want))
        worst = max(worst, max(abs(g - w) for g, w in zip(got, want, strict=True)))
    return worst


def long_document(base: str, tokens: int) -> dict:
    """Score a pasted document of about `tokens` tokens, against answering a question on it."""
    text = (ROOT / "docs" / "operations.md").read_text()
    doc = text[: tokens * 4]
    ask = doc + "\n\nSummarise the text above in one sentence."
    t0 = time.perf_counter()
    _answered, action_a = post(base, {"prompt": ask, "max_tokens": 1, "temperature": 0})
    t1 = time.perf_counter()
    scored, action_s = post(
        base,
        {"prompt": ask, "echo": True, "logprobs": 5, "max_tokens": 0, "temperature": 0},
    )
    t2 = time.perf_counter()
    # another question on the same text: its start comes from the prefix cache (as much of
    # it as `prefix_cache_tokens` holds), with the scores the first scoring stored
    other = doc + "\n\nWhich metric shows the gate's hit rate?"
    post(base, {"prompt": other, "echo": True, "logprobs": 5, "max_tokens": 0})
    t3 = time.perf_counter()
    lp = scored["choices"][0]["logprobs"]
    return {
        "prompt_tokens": scored["usage"]["prompt_tokens"],
        "answer_1_token_s": round(t1 - t0, 2),
        "score_whole_prompt_s": round(t2 - t1, 2),
        "score_other_question_s": round(t3 - t2, 2),
        "actions": [action_a, action_s],
        "scored_tokens": 0 if lp is None else len(lp["token_logprobs"]),
        "mean_token_logprob": None
        if lp is None
        else round(sum(lp["token_logprobs"][1:]) / (len(lp["token_logprobs"]) - 1), 3),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    p.add_argument(
        "--set", type=Path, default=ROOT / "bench" / "score-set" / "mc.jsonl"
    )
    p.add_argument("--source", type=Path, help="GGUF of the model: check against numpy")
    p.add_argument(
        "--export", type=Path, default=ROOT / "models" / "smollm2-135m-instruct"
    )
    p.add_argument("--long-tokens", type=int, default=2000)
    p.add_argument("--model", help="`model` of each request, e.g. MODEL@POLICY")
    p.add_argument(
        "--batch",
        action="store_true",
        help="send a question's options as one request (a prompt list)",
    )
    p.add_argument(
        "--shots",
        type=int,
        default=0,
        help="solved questions before each (the first general ones, then not scored)",
    )
    args = p.parse_args()
    global MODEL
    MODEL = args.model
    items = [
        json.loads(line) for line in args.set.read_text().splitlines() if line.strip()
    ]
    plain = [i for i in items if not i.get("edgy")]
    edgy = [i for i in items if i.get("edgy")]
    shots, plain = solved(plain[: args.shots]), plain[args.shots :]
    for name, subset in [("general", plain), ("edgy topics", edgy)]:
        started = time.perf_counter()
        r = multiple_choice(args.base_url, subset, args.batch, shots)
        took = time.perf_counter() - started
        print(
            f"{name}: {r['items']} questions ({r['blocked']} unranked: an option "
            f"blocked), acc {r['acc']:.3f}, "
            f"acc_norm {r['acc_norm']:.3f}, gate actions {r['actions'] or '-'}, "
            f"{took:.1f} s"
        )
        for q, picked, ok in r["rows"][:4]:
            print(f"  {'right' if ok else 'wrong'}: {q} -> {picked}")
    if args.source:
        # with --shots, the texts share the solved questions: all but the first read their
        # scores from the prefix cache
        texts = [
            f"{shots}Question: {i['question']}\nAnswer: {i['options'][i['answer']]}"
            for i in plain[:5]
        ]
        worst = reference_check(args.base_url, texts, args.source, args.export)
        print(
            f"token scores vs the numpy float64 reference, 5 texts: max |diff| {worst:.2e}"
        )
    print("long document:", json.dumps(long_document(args.base_url, args.long_tokens)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
