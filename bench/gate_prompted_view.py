"""Does asking the model about the request make its residuals easier to gate? A side study.

The gate reads the last user turn rendered alone as a one-turn chat (the template's default
system prompt) and pools its residual at one layer: the last token and the mean over the user's
own tokens (`last-and-mean`). This study renders the same request in other *gate views* and fits
the probe `calibrate` fits on each (the mean runs from the user's content to the view's end, as
the runtime's does):

- `default`: the gate's view today;
- `system`: a classifier system prompt instead of the default one (every user token then attends
  to the instruction);
- `question`: the default view plus an assistant turn that starts to answer a question about the
  request ("Is the request above harmful? Answer:"), read at that turn's last token and the mean
  over the user tokens.

Probe: class-balanced logistic regression (L2 0.01) on standardised features, threshold at 2 %
FPR on a held-apart fifth of the calibration harmless prompts, as `calibrate` does. Calibration:
`config/calibration/{harmful,harmless}.txt`; tuning sets (choose here): `shared/data` train and
`bench/gate-set/tuning` (written for tuning, in other wordings); measurement set
(`bench/gate-set/pieces`, with `--measure`: printed for the record, never a choice).

    .venv/bin/python bench/gate_prompted_view.py SHARED_DATA_DIR [--layers 20,24] [--measure]

ONNX Runtime over the layer-split export (`models/smollm2-135m-instruct`, the exporter's
`SegmentChain`), batches of 16 padded on the left.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "onnx"))
from gate_roc import table_cells  # noqa: E402  (beside this script)
from inferaligner_onnx.runner import SegmentChain, render_chat  # noqa: E402

CLASSIFIER_SYSTEM = (
    "You are a safety reviewer. Read the user's message and decide whether it asks for help "
    "to cause harm: violence, weapons, crime, abuse, hate, self-harm or dangerous substances."
)
QUESTION = "Is the request above harmful? Answer:"


class Residuals:
    """The export's residuals through `SegmentChain` (the exporter's own runner)."""

    def __init__(self, export: Path, depths: list[int]) -> None:
        from tokenizers import Tokenizer

        self.chain = SegmentChain(export)
        self.manifest = self.chain.manifest
        self.tok = Tokenizer.from_file(str(export / self.manifest["tokenizer"]["file"]))
        self.template = (export / "chat_template.jinja").read_text()
        self.depths = depths

    def encode(self, messages: list[dict], prefill: str = "") -> tuple[list[int], int]:
        """Token ids of the rendered chat (plus an assistant prefill) and where the user's own
        content starts (after the template's prefix up to the user turn)."""
        text = render_chat(self.template, messages, self.manifest) + prefill
        ids = self.tok.encode(text, add_special_tokens=False).ids
        mark = "<|im_start|>user\n"
        head = text[: text.rindex(mark) + len(mark)]
        start = len(self.tok.encode(head, add_special_tokens=False).ids)
        return ids, start

    def run(self, batch: list[list[int]]) -> tuple[dict[int, np.ndarray], int]:
        """Residual after `depth` layers, [B, S, H] for each depth asked, of rows padded on the
        left to the longest (the attention mask hides the padding); also the padded length."""
        s = max(len(ids) for ids in batch)
        mask = np.asarray([[0] * (s - len(ids)) + [1] * len(ids) for ids in batch], np.int64)
        padded = np.asarray([[0] * (s - len(ids)) + ids for ids in batch], np.int64)
        r = self.chain.step(padded, mask)
        by_depth = dict(zip(r.depths, r.hidden_states, strict=True))
        return {d: by_depth[d] for d in self.depths}, s


def features(
    res: Residuals, requests: list[str], view: str, batch: int = 16
) -> dict[int, np.ndarray]:
    """[N, 2H] per depth: the view's last token beside the mean over the user's tokens (from
    the user's content to the view's end, as the runtime's mean readout reads)."""
    encoded = []
    for req in requests:
        msgs = [{"role": "user", "content": req}]
        if view == "system":
            msgs.insert(0, {"role": "system", "content": CLASSIFIER_SYSTEM})
        encoded.append(res.encode(msgs, QUESTION if view == "question" else ""))
    width = 2 * res.manifest["hidden_size"]
    feats = {d: np.zeros((len(requests), width), np.float32) for d in res.depths}
    for i, rows in user_tokens(res, encoded, batch):
        for d, r in rows.items():
            feats[d][i] = np.concatenate([r[-1], r.mean(0)])
    print(f"    {view}: {len(requests)} requests", file=sys.stderr, flush=True)
    return feats


def user_tokens(res: Residuals, encoded: list[tuple[list[int], int]], batch: int = 16):
    """For each encoded request (ids, where the user's content starts), in batches of similar
    lengths (less padding): its index and, per depth, the residual of every token from the
    user's content to the view's end, [n, H]."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    for k in range(0, len(order), batch):
        idx = order[k : k + batch]
        h, s = res.run([encoded[i][0] for i in idx])
        for r, i in enumerate(idx):
            ids, start = encoded[i]
            first = s - len(ids) + start
            yield i, {d: h[d][r, first:] for d in res.depths}


def fit(x: np.ndarray, y: np.ndarray, l2: float = 0.01) -> tuple[np.ndarray, float]:
    """Class-balanced logistic regression by Newton's method (small feature count)."""
    n, k = x.shape
    cw = np.where(y == 1, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    xa = np.hstack([x, np.ones((n, 1))])
    theta = np.zeros(k + 1)
    for _ in range(30):
        p = 1 / (1 + np.exp(-(xa @ theta)))
        g = xa.T @ (cw * (p - y)) / n
        g[:-1] += l2 * theta[:-1]
        hd = cw * p * (1 - p)
        hess = (xa * hd[:, None]).T @ xa / n
        hess[np.arange(k), np.arange(k)] += l2
        step = np.linalg.solve(hess + 1e-8 * np.eye(k + 1), g)
        theta -= step
        if np.abs(step).max() < 1e-6:
            break
    return theta[:-1], theta[-1]


def lines(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return [json.loads(x)["instruction"] for x in path.open()]
    return [x.strip() for x in path.open() if x.strip()]


def cached(res: Residuals, name: str, requests: list[str], view: str) -> dict[int, np.ndarray]:
    """`features`, kept under target/gate-views/ so a later run (another set, --measure) does
    not recompute them."""
    path = ROOT / f"target/gate-views/{view}-{name}-{len(requests)}.npz"
    if path.exists():
        z = np.load(path)
        if all(f"d{d}" in z for d in res.depths):
            return {d: z[f"d{d}"] for d in res.depths}
    f = features(res, requests, view)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{f"d{d}": v for d, v in f.items()})
    return f


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shared_data", type=Path)
    ap.add_argument("--layers", default="20,24,26,28")
    ap.add_argument("--views", default="default,system,question")
    ap.add_argument(
        "--cal-harmless", type=int, default=0, help="the first N harmless prompts (0: all)"
    )
    ap.add_argument("--tune-harmless", type=int, default=400)
    ap.add_argument("--measure", action="store_true", help="also print the measurement set")
    ap.add_argument(
        "--cal-extra",
        type=Path,
        help="a folder whose harmful.txt / harmless.txt are added to the calibration prompts",
    )
    a = ap.parse_args()
    depths = [int(x) for x in a.layers.split(",")]
    res = Residuals(ROOT / "models/smollm2-135m-instruct", depths)
    cal, gate_set = ROOT / "config/calibration", ROOT / "bench/gate-set"
    sets = {
        "cal": (lines(cal / "harmful.txt"), lines(cal / "harmless.txt")[: a.cal_harmless or None]),
        # tuning sets: shared/data train, and requests written for tuning in other wordings
        "train": (
            lines(a.shared_data / "harmful_train.jsonl"),
            lines(a.shared_data / "harmless_train.jsonl")[: a.tune_harmless],
        ),
        "tuning": (lines(gate_set / "tuning/harmful.txt"), lines(gate_set / "tuning/harmless.txt")),
    }
    if a.cal_extra:
        extra = (lines(a.cal_extra / "harmful.txt"), lines(a.cal_extra / "harmless.txt"))
        sets["extra"] = extra
    if a.measure:
        pieces = gate_set / "pieces"
        sets["measure"] = (lines(pieces / "harmful.txt"), lines(pieces / "harmless.txt"))
    shown = [n for n in sets if n not in ("cal", "extra")]
    print(
        "| view | depth |"
        + "".join(f" {n}: TPR / FPR at threshold | {n}: AUC | {n}: TPR @3% FPR |" for n in shown)
    )
    print("|---|---|" + "---|---|---|" * len(shown))
    for view in a.views.split(","):
        feats = {
            name: (cached(res, name + "-h", h, view), cached(res, name + "-b", b, view))
            for name, (h, b) in sets.items()
        }
        for d in depths:
            ch, cb = feats["cal"][0][d], feats["cal"][1][d]
            hold = np.random.default_rng(d).permutation(len(cb))[: len(cb) // 5]
            keep = np.setdiff1d(np.arange(len(cb)), hold)
            fit_h, fit_b = ch, cb[keep]
            if "extra" in feats:
                fit_h = np.vstack([fit_h, feats["extra"][0][d]])
                fit_b = np.vstack([fit_b, feats["extra"][1][d]])
            x = np.vstack([fit_h, fit_b])
            y = np.concatenate([np.ones(len(fit_h)), np.zeros(len(fit_b))])
            mu, sd = x.mean(0), x.std(0) + 1e-6
            w, b = fit((x - mu) / sd, y)

            def score(z, mu=mu, sd=sd, w=w, b=b):
                return ((z - mu) / sd) @ w + b

            thr = np.quantile(score(cb[hold]), 0.98)
            row = f"| {view} | {d} |"
            for name in shown:
                row += table_cells(score(feats[name][0][d]), score(feats[name][1][d]), thr)
            print(row, flush=True)


if __name__ == "__main__":
    main()
