"""The Responses API against chat on real traffic shapes: each chat request of a composed set
(bare, behind a system prompt, multi-turn, beside a pasted document, after a jailbreak set-up)
is sent to a running sidecar both as `/v1/chat/completions` and as the `/v1/responses`
request it amounts to (the system message as `instructions`, the turns as `input` items), and
the two must get the same gate score, the same action, the same prompt length and, greedy,
the same answer. Prints a per-framing table with the time of each endpoint (the chat request
goes first, so the Responses one reads its prompt from the prefix cache: the times say that
the rewriting costs nothing visible, not which endpoint is faster); exits 1 on any
difference.

    target/release/inferaligner compose --pieces bench/gate-set/pieces --out target/gate-bench/set
    target/release/inferaligner serve --model models/smollm2-135m-instruct &
    python3 bench/responses_parity.py --base-url http://127.0.0.1:8080 \\
        --set target/gate-bench/set --per-framing 10 --max-tokens 24
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
import urllib.error
import urllib.request


def post(base: str, path: str, body: dict) -> tuple[dict, dict, float]:
    """The JSON answer, its headers and the seconds it took."""
    request = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as r:
            answer, headers = json.load(r), dict(r.headers)
    except urllib.error.HTTPError as e:
        answer, headers = json.load(e), dict(e.headers)
    return answer, headers, time.perf_counter() - start


def as_responses(messages: list[dict], max_tokens: int) -> dict:
    """A chat request's messages as the Responses request they amount to."""
    body: dict = {"temperature": 0, "max_output_tokens": max_tokens}
    if messages and messages[0]["role"] == "system":
        body["instructions"] = messages[0]["content"]
        messages = messages[1:]
    body["input"] = [
        {
            "role": m["role"],
            "content": [
                {
                    "type": "output_text" if m["role"] == "assistant" else "input_text",
                    "text": m["content"],
                }
            ],
        }
        for m in messages
    ]
    return body


def output_text(response: dict) -> str | None:
    """A Response's text, or None when it has no message."""
    texts = [
        part.get("text", part.get("refusal", ""))
        for item in response.get("output", [])
        if item.get("type") == "message"
        for part in item["content"]
    ]
    return "".join(texts) if texts else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8080")
    ap.add_argument(
        "--set", required=True, help="a composed set: harmful.jsonl, harmless.jsonl"
    )
    ap.add_argument(
        "--per-framing", type=int, default=10, help="requests per framing and class"
    )
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args()
    rows: dict[str, list] = collections.defaultdict(list)
    differences = []
    for cls in ("harmful", "harmless"):
        taken: collections.Counter = collections.Counter()
        with open(f"{args.set}/{cls}.jsonl") as f:
            lines = f.readlines()
        for line in lines:
            request = json.loads(line)
            framing = request.get("framing", "-")
            if "messages" not in request or taken[framing] >= args.per_framing:
                continue
            taken[framing] += 1
            messages = request["messages"]
            chat_body = {
                "messages": messages,
                "temperature": 0,
                "max_tokens": args.max_tokens,
            }
            chat, ch, chat_s = post(args.base_url, "/v1/chat/completions", chat_body)
            resp, rh, resp_s = post(
                args.base_url, "/v1/responses", as_responses(messages, args.max_tokens)
            )
            same = {
                "score": ch.get("x-inferaligner-score")
                == rh.get("x-inferaligner-score"),
                "action": ch.get("x-inferaligner-action")
                == rh.get("x-inferaligner-action"),
                "tokens": chat.get("usage", {}).get("prompt_tokens")
                == resp.get("usage", {}).get("input_tokens"),
                "answer": chat["choices"][0]["message"]["content"] == output_text(resp),
            }
            for what, ok in same.items():
                if not ok:
                    differences.append(
                        (cls, framing, what, messages[-1]["content"][:60])
                    )
            rows[framing].append(
                (
                    cls,
                    ch.get("x-inferaligner-action"),
                    chat["usage"]["prompt_tokens"],
                    chat_s,
                    resp_s,
                    all(same.values()),
                )
            )
    print(
        "| framing | requests | prompt tokens (median) | flagged | identical (score, action, tokens, answer) | chat s | responses s |"
    )
    print("|---|---|---|---|---|---|---|")
    for framing, r in rows.items():
        tokens = sorted(x[2] for x in r)[len(r) // 2]
        flagged = sum(x[1] in ("steer", "block") for x in r)
        print(
            f"| {framing} | {len(r)} | {tokens} | {flagged} | {sum(x[5] for x in r)} of {len(r)} "
            f"| {sum(x[3] for x in r):.1f} | {sum(x[4] for x in r):.1f} |"
        )
    for d in differences:
        print("DIFFERENT", *d, file=sys.stderr)
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
