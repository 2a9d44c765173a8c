"""What does the model make of a tool's result? A study (docs/sidecar.md, "Tool calls").

Twenty round trips written for the check (the question, the assistant's call, its result),
with the result laid out three ways — as a `tool` turn (the sidecar's layout), as Qwen 2.5
lays it out (a `user` turn with `<tool_response>` tags), and as a plain user turn — each
answered greedily (48 tokens, the tool still offered) by a sidecar with the gate off. An
answer uses the result when it carries the result's key words and does not echo it or call
again. Prints one JSON line per answer, and the counts on stderr.

    INFERALIGNER_POLICIES__DEFAULT__MODE=off target/release/inferaligner serve \
        --model models/smollm2-135m-instruct --listen 127.0.0.1:18080 &
    .venv/bin/python bench/tool_results.py [--url http://127.0.0.1:18080] > answers.jsonl
"""

import argparse
import json
import sys
import urllib.request

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--url", default="http://127.0.0.1:18080")
ap.add_argument("--model", default="smollm2-135m-instruct")
opts = ap.parse_args()
URL = opts.url + "/v1/chat/completions"
MODEL = opts.model
# (question, function name, parameters, arguments, result, words the answer should carry)
CASES = [
    (
        "What's the weather in Paris right now?",
        "get_weather",
        {"city": "string"},
        {"city": "Paris"},
        "18 C and sunny",
        ["18", "sunny"],
    ),
    (
        "How warm is it in Oslo today?",
        "get_weather",
        {"city": "string"},
        {"city": "Oslo"},
        "-3 C, light snow",
        ["-3", "snow"],
    ),
    (
        "What is 347 times 29?",
        "calculate",
        {"expression": "string"},
        {"expression": "347*29"},
        "10063",
        ["10063", "10,063"],
    ),
    (
        "What's the square root of 1849?",
        "calculate",
        {"expression": "string"},
        {"expression": "sqrt(1849)"},
        "43",
        ["43"],
    ),
    (
        "What is Apple's stock price?",
        "get_stock_price",
        {"ticker": "string"},
        {"ticker": "AAPL"},
        '{"ticker": "AAPL", "price": 231.42, "currency": "USD"}',
        ["231.42"],
    ),
    (
        "How much is Tesla trading at?",
        "get_stock_price",
        {"ticker": "string"},
        {"ticker": "TSLA"},
        '{"ticker": "TSLA", "price": 178.05, "currency": "USD"}',
        ["178.05"],
    ),
    (
        "What time is it in Tokyo?",
        "get_time",
        {"timezone": "string"},
        {"timezone": "Asia/Tokyo"},
        "21:47",
        ["21:47", "9:47"],
    ),
    (
        "What time is it in New York?",
        "get_time",
        {"timezone": "string"},
        {"timezone": "America/New_York"},
        "07:15",
        ["07:15", "7:15"],
    ),
    (
        "How many euros is 100 US dollars?",
        "convert_currency",
        {"amount": "number", "from": "string", "to": "string"},
        {"amount": 100, "from": "USD", "to": "EUR"},
        "92.31 EUR",
        ["92.31"],
    ),
    (
        "Convert 50 pounds to yen.",
        "convert_currency",
        {"amount": "number", "from": "string", "to": "string"},
        {"amount": 50, "from": "GBP", "to": "JPY"},
        "9,645 JPY",
        ["9,645", "9645"],
    ),
    (
        "Who wrote the book 'The Left Hand of Darkness'?",
        "search_books",
        {"title": "string"},
        {"title": "The Left Hand of Darkness"},
        '{"author": "Ursula K. Le Guin", "year": 1969}',
        ["Le Guin"],
    ),
    (
        "When was 'Beloved' published?",
        "search_books",
        {"title": "string"},
        {"title": "Beloved"},
        '{"author": "Toni Morrison", "year": 1987}',
        ["1987"],
    ),
    (
        "Do I have any meetings tomorrow?",
        "get_calendar",
        {"date": "string"},
        {"date": "tomorrow"},
        '[{"time": "10:00", "title": "Budget review"}]',
        ["10:00", "Budget"],
    ),
    (
        "What's on my calendar on Friday?",
        "get_calendar",
        {"date": "string"},
        {"date": "Friday"},
        '[{"time": "15:30", "title": "Dentist"}]',
        ["15:30", "Dentist"],
    ),
    (
        "How long does it take to drive from Lyon to Marseille?",
        "get_route",
        {"from": "string", "to": "string"},
        {"from": "Lyon", "to": "Marseille"},
        "3 h 10 min, 314 km",
        ["3 h", "3 hours", "314"],
    ),
    (
        "How far is Berlin from Munich by car?",
        "get_route",
        {"from": "string", "to": "string"},
        {"from": "Berlin", "to": "Munich"},
        "5 h 50 min, 585 km",
        ["585", "5 h", "5 hours"],
    ),
    (
        "Is order 4471 shipped yet?",
        "get_order_status",
        {"order_id": "string"},
        {"order_id": "4471"},
        "shipped on 2 December, arriving 5 December",
        ["shipped", "5 December"],
    ),
    (
        "Where is my order 9012?",
        "get_order_status",
        {"order_id": "string"},
        {"order_id": "9012"},
        "in the warehouse, ships tomorrow",
        ["warehouse", "tomorrow"],
    ),
    (
        "How many calories are in a banana?",
        "nutrition_lookup",
        {"food": "string"},
        {"food": "banana"},
        "105 kcal per medium banana",
        ["105"],
    ),
    (
        "How much protein does an egg have?",
        "nutrition_lookup",
        {"food": "string"},
        {"food": "egg"},
        "6.3 g protein per large egg",
        ["6.3"],
    ),
]


def tool(name, params):
    props = {k: {"type": v} for k, v in params.items()}
    return {
        "type": "function",
        "function": {
            "name": name,
            "parameters": {"type": "object", "properties": props, "required": list(params)},
        },
    }


def ask(messages, tools):
    body = {
        "model": MODEL,
        "messages": messages,
        "tools": tools,
        "temperature": 0,
        "max_tokens": 48,
    }
    req = urllib.request.Request(
        URL, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req) as r:
        m = json.load(r)["choices"][0]["message"]
    if m.get("tool_calls"):
        return "CALL " + json.dumps([c["function"] for c in m["tool_calls"]])
    return m["content"]


def layouts(q, name, args, result):
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(args)},
            }
        ],
    }
    u = {"role": "user", "content": q}
    return {
        "tool turn (now)": [u, call, {"role": "tool", "tool_call_id": "call_1", "content": result}],
        "user turn, tags (Qwen 2.5)": [
            u,
            call,
            {"role": "user", "content": f"<tool_response>\n{result}\n</tool_response>"},
        ],
        "user turn, plain": [
            u,
            call,
            {"role": "user", "content": f"The function {name} returned: {result}"},
        ],
    }


score = {}
for q, name, params, args, result, words in CASES:
    for lay, msgs in layouts(q, name, args, result).items():
        a = ask(msgs, [tool(name, params)])
        echo = "tool_response" in a or a.strip() == result or a.startswith("CALL")
        used = any(w.lower() in a.lower() for w in words) and not echo
        s = score.setdefault(lay, [0, 0])
        s[0] += used
        s[1] += echo
        print(json.dumps({"q": q, "layout": lay, "used": used, "echo": echo, "answer": a}))
for lay, (u, e) in score.items():
    n = len(CASES)
    print(
        f"{lay}: answers that use the result {u}/{n}, echo or call again {e}/{n}", file=sys.stderr
    )
