"""Would the gate rank requests better reading a window of the turn than its whole mean? A study.

The gate reads the last user turn as a one-turn chat and pools the residual at one layer: the
last token beside the mean over the user's tokens (`last-and-mean`). A long request whose ask
sits in a few words of a long turn ("…and I still know where he parks, so tell me how to…")
is read mostly as its backstory by the mean. This study keeps every token's residual and tries
other readouts with the probe `calibrate` fits (`gate_layers.fit`), fitted on the bare
calibration prompts:

- `last-and-mean`: today's readout (the baseline; the study fits on bare rows only, so it sits
  below the committed pack, which also fits framed and wrapped rows);
- `last-and-maxwin-K`: no refit, the baseline's probe, with the mean half of its score taken
  over the K-token window of the user's tokens that scores highest (the whole turn when it is
  shorter than K); a linear probe's mean half is the mean of per-token scores, so this is the
  highest mean of K consecutive per-token scores;
- `suffix-and-mean`: the mean over the template's tokens after the user's content
  (`<|im_end|>`, `<|im_start|>assistant`…) instead of the last one, refitted;
- `token probe`: a probe fitted on every token's residual, pooled by mean or max.

Choose on tuning sets only (`shared/data` train, `bench/gate-set/{tuning,pairs,agent-tuning}`);
`--measure` adds the measurement set, for the record.

    .venv/bin/python bench/gate_windows.py SHARED_DATA_DIR [--layers 15,18] [--measure]

Residuals come from ONNX Runtime over `models/smollm2-135m-instruct` (the exporter's
`SegmentChain`, as `bench/gate_prompted_view.py`), kept under target/gate-windows/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gate_layers import fit, logistic
from gate_prompted_view import Residuals, lines, user_tokens
from gate_roc import table_cells

ROOT = Path(__file__).resolve().parent.parent


def tokens(res: Residuals, requests: list[str], batch: int = 16) -> dict[int, list[np.ndarray]]:
    """Per request and depth: the residual of every token from the user's content to the
    view's end, [n, H] float32."""
    encoded = [res.encode([{"role": "user", "content": r}]) for r in requests]
    out: dict[int, list[np.ndarray]] = {d: [None] * len(requests) for d in res.depths}
    for k, (i, rows) in enumerate(user_tokens(res, encoded, batch)):
        for d, r in rows.items():
            out[d][i] = r.astype(np.float32)
        print(f"\r    {k + 1}/{len(encoded)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return out


def cached(res: Residuals, name: str, requests: list[str]) -> dict[int, list[np.ndarray]]:
    path = ROOT / f"target/gate-windows/{name}-{len(requests)}.npz"
    if path.exists():
        z = np.load(path)
        if all(f"d{d}" in z for d in res.depths):
            return {d: np.split(z[f"d{d}"], z["ends"][:-1]) for d in res.depths}
    t = tokens(res, requests)
    path.parent.mkdir(parents=True, exist_ok=True)
    first = next(iter(t.values()))
    ends = np.cumsum([len(a) for a in first])
    np.savez(path, ends=ends, **{f"d{d}": np.concatenate(v) for d, v in t.items()})
    return t


SUFFIX = 5  # <|im_end|> \n <|im_start|> assistant \n


def last_and_mean(rows: list[np.ndarray]) -> np.ndarray:
    return np.stack([np.concatenate([r[-1], r.mean(0)]) for r in rows])


def suffix_and_mean(rows: list[np.ndarray]) -> np.ndarray:
    return np.stack([np.concatenate([r[-SUFFIX:].mean(0), r.mean(0)]) for r in rows])


def maxwin_scores(
    rows: list[np.ndarray], d: np.ndarray, bias: float, k: int, blend: float = 1.0
) -> np.ndarray:
    """The baseline probe's score with its mean half over the best k-token window (`blend`
    1), or that and the whole mean mixed (`blend` of the window's)."""
    h = len(d) // 2
    out = np.empty(len(rows))
    for i, r in enumerate(rows):
        last = r[-1] @ d[:h]
        per = r @ d[h:]
        if len(per) <= k:
            best = per.mean()
        else:
            c = np.concatenate([[0.0], np.cumsum(per)])
            best = ((c[k:] - c[:-k]) / k).max()
        out[i] = last + blend * best + (1 - blend) * per.mean() + bias
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shared_data", type=Path)
    ap.add_argument("--layers", default="15,18", help="layers as the packs number them")
    ap.add_argument("--windows", default="8,16,24,32")
    ap.add_argument("--blends", default="1", help="the window's share of the mean half")
    ap.add_argument("--measure", action="store_true")
    a = ap.parse_args()
    layers = [int(x) for x in a.layers.split(",")]
    res = Residuals(ROOT / "models/smollm2-135m-instruct", [n + 1 for n in layers])
    cal, gs = ROOT / "config/calibration", ROOT / "bench/gate-set"
    sets = {
        "cal": (lines(cal / "harmful.txt"), lines(cal / "harmless.txt")),
        "train": (
            lines(a.shared_data / "harmful_train.jsonl"),
            lines(a.shared_data / "harmless_train.jsonl"),
        ),
    }
    for name in ("tuning", "pairs", "agent-tuning") + (("pieces",) if a.measure else ()):
        sets[name] = (
            lines(gs / name / "harmful.txt"),
            lines(gs / name / "harmless.txt"),
        )
    toks = {n: (cached(res, n + "-h", h), cached(res, n + "-b", b)) for n, (h, b) in sets.items()}
    shown = [n for n in sets if n != "cal"]
    print("| layer | readout |" + "".join(f" {n}: TPR / FPR | AUC | TPR@3% |" for n in shown))
    print("|---|---|" + "---|---|---|" * len(shown))
    for layer in layers:
        study(
            layer,
            toks,
            shown,
            [int(x) for x in a.windows.split(",")],
            [float(x) for x in a.blends.split(",")],
        )


def study(layer: int, toks: dict, shown: list[str], windows: list[int], blends: list[float]):
    """One table row per readout at `layer`."""
    d = layer + 1

    def row(name: str, score) -> None:
        line = f"| {layer} | {name} |"
        # the threshold fit() sets: 2 % FPR on every fifth calibration harmless row
        cb = score(toks["cal"][1][d])
        held = np.sort(cb[np.arange(len(cb)) % 5 == 4])
        thr = held[len(held) - int(0.02 * len(held)) - 1]
        for n in shown:
            line += table_cells(score(toks[n][0][d]), score(toks[n][1][d]), thr)
        print(line, flush=True)

    direction, bias = fit(last_and_mean(toks["cal"][0][d]), last_and_mean(toks["cal"][1][d]))
    row("last-and-mean", lambda rows: last_and_mean(rows) @ direction + bias)
    for k in windows:
        for blend in blends:
            row(
                f"last-and-maxwin-{k} x{blend}",
                lambda rows, k=k, bl=blend: maxwin_scores(rows, direction, bias, k, bl),
            )
    sd, sb = fit(suffix_and_mean(toks["cal"][0][d]), suffix_and_mean(toks["cal"][1][d]))
    row("suffix-and-mean", lambda rows: suffix_and_mean(rows) @ sd + sb)
    td, tb = token_probe(toks["cal"][0][d], toks["cal"][1][d])
    for pool in ("mean", "max"):
        row(
            f"token probe, {pool}",
            lambda rows, pool=pool: np.array([getattr(r @ td + tb, pool)() for r in rows]),
        )


def token_probe(harmful: list[np.ndarray], harmless: list[np.ndarray], l2: float = 1e-2):
    """A probe fitted on every token's residual, each labelled with its request's class (a
    request's tokens share its weight, classes balanced), as `fit` fits one on pooled rows;
    the calibration harmless requests `fit` holds apart (every fifth) are left out."""
    harmless = [r for i, r in enumerate(harmless) if i % 5 != 4]
    x = np.concatenate(harmful + harmless).astype(np.float64)
    y = np.r_[np.ones(sum(map(len, harmful))), np.zeros(sum(map(len, harmless)))]
    wts = (
        0.5
        * np.r_[
            np.concatenate([np.full(len(r), 1 / len(r)) for r in harmful]) / len(harmful),
            np.concatenate([np.full(len(r), 1 / len(r)) for r in harmless]) / len(harmless),
        ]
    )
    mu, sd = x.mean(0), x.std(0) + 1e-6
    w, b = logistic((x - mu) / sd, y, wts, l2, 400)
    return w / sd, b - mu @ (w / sd)


if __name__ == "__main__":
    main()
