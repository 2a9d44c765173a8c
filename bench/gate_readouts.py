"""Which residuals should the gate read? A side study behind `calibrate --gate-readout`.

For every request of a calibration set, a tuning set and the measurement set it reads SmolLM2's
residual stream (transformers, the HF copy `bench/run.sh` makes) at layers 12-28 as the gate view
renders it (the last user turn alone, as a one-turn chat, cut to its first 64 and last 192 tokens),
pooled four ways: the last token, the mean over the request's own tokens (after the template's
one-turn prefix), and the mean over the last 32 or 64 of them. It then fits the probe `calibrate`
fits (class-balanced logistic regression, L2 0.01, threshold at 2 % FPR on a held-apart fifth of
the calibration harmless prompts) on each pooling, and on last + mean side by side, and prints
TPR / FPR per framing. Choose on the tuning set; the measurement set is printed for the record.

    bench/.venv/bin/python bench/gate_readouts.py CAL_DIR TUNE_DIR MEASURE_DIR [--layers 16,20]

Each *_DIR holds `harmful.jsonl` and `harmless.jsonl` as `inferaligner compose` writes them
(CAL_DIR: `compose --pieces config/calibration --per-framing 120`; TUNE_DIR: the same pieces
with `shared/data` train's requests as `harmful.txt`/`harmless.txt`, `--per-framing 60`;
MEASURE_DIR: `compose --pieces bench/gate-set/pieces`). Calibration and tuning requests are
also wrapped in the built-in jailbreak wrappers. About 25 minutes on 2 cores with the sizes below.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models/smollm2-hf"
LAYERS = list(range(12, 29))
POOLINGS = ("last", "mean", "t32", "t64")
# requests kept per set: (bare harmful, bare harmless, each framing, wrapped), to fit the time
SIZES = {"cal": (250, 550, 60, 150), "tun": (150, 300, 30, 60), "mea": (100, 100, 100, 0)}


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()]


def request_text(row: dict) -> str:
    """The last user turn, as `inferaligner::view` reads it (raw text: the turn it spells)."""
    if "messages" in row:
        users = [m["content"] for m in row["messages"] if m["role"] == "user"]
        return users[-1] if users else "\n".join(m["content"] for m in row["messages"])
    text, mark = row["prompt"], "<|im_start|>user\n"
    return text[text.rindex(mark) + len(mark) :].split("<|im_end|>")[0] if mark in text else text


def subsample(rows: list[dict], bare: int, framed: int) -> list[dict]:
    out, seen = [], {}
    for r in rows:
        f = r["framing"]
        if seen.get(f, 0) < (bare if f == "bare" else framed):
            out.append(r)
            seen[f] = seen.get(f, 0) + 1
    return out


def sets(dirs: dict[str, Path], scale: float) -> dict[str, list[dict]]:
    wrappers = [
        line.rstrip("\n")
        for line in (ROOT / "config/calibration/wrappers.txt").open()
        if "{instruction}" in line and not line.startswith("#")
    ]
    rnd = random.Random(0)
    out = {}
    for name, d in dirs.items():
        bare_h, bare_b, framed, wrapped = (round(n * scale) for n in SIZES[name])
        for cls, bare in (("h", bare_h), ("b", bare_b)):
            rows = load(d / ("harmful.jsonl" if cls == "h" else "harmless.jsonl"))
            kept = subsample(rows, bare, framed)
            bare_rows = [r for r in rows if r["framing"] == "bare"][:wrapped]
            kept += [
                {
                    "framing": "wrapped",
                    "messages": [
                        {
                            "role": "user",
                            "content": rnd.choice(wrappers).replace(
                                "{instruction}", r["messages"][0]["content"]
                            ),
                        }
                    ],
                }
                for r in bare_rows
            ]
            out[f"{name}_{cls}"] = kept
    return out


def features(rows: list[dict], tok, model) -> dict[str, np.ndarray]:
    prefix = tok.apply_chat_template(
        [{"role": "user", "content": "a"}], add_generation_prompt=True, tokenize=False
    ).split("a<|im_end|>")[0]
    start = len(tok(prefix, add_special_tokens=False)["input_ids"])

    def view(text: str) -> list[int]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) > 256:
            text = tok.decode(ids[:64]) + "\n[…]\n" + tok.decode(ids[-192:])
        chat = [{"role": "user", "content": text}]
        rendered = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        return tok(rendered, add_special_tokens=False)["input_ids"]

    ids_all = [view(request_text(r)) for r in rows]
    feats = {k: [None] * len(rows) for k in POOLINGS}
    order = np.argsort([len(x) for x in ids_all])
    for i in range(0, len(order), 16):
        idx = order[i : i + 16]
        batch = [ids_all[j] for j in idx]
        width = max(map(len, batch))
        x = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(x)
        for r, s in enumerate(batch):
            x[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        with torch.no_grad():
            hs = model(input_ids=x, attention_mask=mask, output_hidden_states=True).hidden_states
        h = torch.stack([hs[layer + 1] for layer in LAYERS], 1)
        for r, s in enumerate(batch):
            n, j = len(s), idx[r]
            feats["last"][j] = h[r, :, n - 1].numpy()
            feats["mean"][j] = h[r, :, start:n].mean(1).numpy()
            feats["t32"][j] = h[r, :, max(start, n - 32) : n].mean(1).numpy()
            feats["t64"][j] = h[r, :, max(start, n - 64) : n].mean(1).numpy()
    return {k: np.stack(v) for k, v in feats.items()}


def fit(xh: np.ndarray, xb: np.ndarray, l2: float = 1e-2):
    """The probe `calibrate` fits: class-balanced logistic regression on standardised inputs."""
    x = np.concatenate([xh, xb]).astype(np.float64)
    y = np.r_[np.ones(len(xh)), np.zeros(len(xb))]
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt, yt = torch.tensor((x - mu) / sd), torch.tensor(y)
    wt = torch.tensor(np.where(y == 1, 0.5 / len(xh), 0.5 / len(xb)))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = xt @ w + b
        loss = (wt * torch.nn.functional.softplus(-(2 * yt - 1) * z)).sum() + l2 * (w @ w) / 2
        loss.backward()
        return loss

    opt.step(closure)
    wn, bn = w.detach().numpy(), b.item()
    return lambda z: ((z.astype(np.float64) - mu) / sd) @ wn + bn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cal", type=Path)
    ap.add_argument("tune", type=Path)
    ap.add_argument("measure", type=Path)
    ap.add_argument("--layers", default="16,20,24,27")
    ap.add_argument("--scale", type=float, default=1.0, help="a share of the set sizes (try 0.1)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, torch_dtype=torch.float32).eval()
    data = sets({"cal": args.cal, "tun": args.tune, "mea": args.measure}, args.scale)
    feats = {k: features(rows, tok, model) for k, rows in data.items()}
    framing = {k: np.array([r["framing"] for r in rows]) for k, rows in data.items()}
    rng = np.random.default_rng(0)
    print("| pooling | layer | set | " + " | ".join(["all", "per framing (TPR/FPR %)"]) + " |")
    print("|---|---|---|---|---|")
    for layer in [int(x) for x in args.layers.split(",")]:
        li = LAYERS.index(layer)
        for spec in ("last", "mean", "t32", "t64", "last+mean"):

            def x(key: str, spec: str = spec, li: int = li) -> np.ndarray:
                return np.concatenate([feats[key][p][:, li] for p in spec.split("+")], 1)

            h, b = x("cal_h"), x("cal_b")
            ih, ib = rng.permutation(len(h)), rng.permutation(len(b))
            nh, nb = int(0.8 * len(h)), int(0.8 * len(b))
            score = fit(h[ih[:nh]], b[ib[:nb]])
            threshold = np.quantile(score(b[ib[nb:]]), 0.98)
            for name in ("tun", "mea"):
                sh, sb = score(x(f"{name}_h")), score(x(f"{name}_b"))
                fh, fb = framing[f"{name}_h"], framing[f"{name}_b"]
                per = ", ".join(
                    f"{f} {100 * (sh[fh == f] > threshold).mean():.0f}/"
                    f"{100 * (sb[fb == f] > threshold).mean():.0f}"
                    for f in sorted(set(fh))
                )
                overall = f"{100 * (sh > threshold).mean():.1f}/{100 * (sb > threshold).mean():.1f}"
                print(f"| {spec} | {layer} | {name} | {overall} | {per} |", flush=True)


if __name__ == "__main__":
    main()
