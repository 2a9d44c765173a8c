"""Which layers should the gate read? A side study on residuals `calibrate --save-residuals` wrote.

`calibrate` picks one gate layer by cross-validated balanced accuracy on its own calibration set;
this study refits the same probe (class-balanced logistic regression on standardised features, L2
0.01, 500 Nesterov steps of 1/L, threshold at 2 % FPR on every fifth harmless row) per layer and on
several layers at once, and scores every fit on tuning sets whose residuals were dumped the same
way (calibrate --no-framings --no-wrappers --harmful T --harmless T --save-residuals DIR). It
prints, per fit: ROC AUC, TPR at 3 % FPR and TPR / FPR at the fitted threshold on each tuning set.
Choose on tuning sets only; never pass the measurement set here.

    .venv/bin/python bench/gate_layers.py CAL_DIR TUNE_DIR [TUNE_DIR ...] [--layers 12-28] \
        [--sets 16,20,24 20,24] [--extra NEW_CAL_DIR ...]

`--extra` appends further calibration dumps (say, prompts you consider adding to
config/calibration, dumped bare) to CAL_DIR's rows: what would they change, before a re-gate?
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from gate_roc import auc, tpr_at  # beside this script


def load(dir_: Path) -> tuple[np.ndarray, np.ndarray]:
    shape = json.loads((dir_ / "shape.json").read_text())
    out = []
    for name in ("harmful", "harmless"):
        a = np.fromfile(dir_ / f"{name}.f32", dtype="<f4").reshape(shape[name])
        out.append(a)
    return out[0], out[1]


def fit(h: np.ndarray, s: np.ndarray, l2=1e-2, iterations=500, target_fpr=0.02):
    """The probe `inferaligner_core::gate::fit_probe` fits, as (direction, bias) on raw rows."""
    val = np.arange(len(s)) % 5 == 4
    train_s, val_s = s[~val], s[val]
    x = np.concatenate([h, train_s]).astype(np.float64)
    y = np.r_[np.ones(len(h)), np.zeros(len(train_s))]
    wts = np.where(y == 1, 0.5 / len(h), 0.5 / len(train_s))
    mean, std = x.mean(0), x.std(0)
    std[std <= 1e-12] = 1.0
    w, _ = logistic((x - mean) / std, y, wts, l2, iterations)
    d = w / std
    d /= np.linalg.norm(d)
    scores = np.sort(val_s @ d)
    allowed = int(np.floor(target_fpr * len(scores)))
    threshold = scores[len(scores) - allowed - 1]
    return d, -threshold


def logistic(z: np.ndarray, y: np.ndarray, wts: np.ndarray, l2: float, iterations: int):
    """Weighted logistic regression on standardised rows `z`, as `fit_probe` runs it: Nesterov
    steps of 1/L, L from the curvature bound. Returns (weights, bias)."""
    v = np.full(z.shape[1], z.shape[1] ** -0.5)
    for _ in range(50):  # the curvature bound, by power iteration
        u = z.T @ ((z @ v) * wts)
        lam = np.linalg.norm(u)
        v = u / lam
    lr = 1 / (0.25 * max(lam, 1.0) + l2)
    w, b = np.zeros(z.shape[1]), 0.0
    vw, vb = np.zeros_like(w), 0.0
    for _ in range(iterations):
        lw, lb = w + 0.9 * vw, b + 0.9 * vb
        err = (1 / (1 + np.exp(-(z @ lw + lb))) - y) * wts
        vw = 0.9 * vw - lr * (z.T @ err + lw * l2)
        vb = 0.9 * vb - lr * err.sum()
        w, b = w + vw, b + vb
    return w, b


def features(a: np.ndarray, layers: list[int]) -> np.ndarray:
    return a[:, layers, :].reshape(len(a), -1)


def layer_list(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cal", type=Path)
    ap.add_argument("tune", type=Path, nargs="+")
    ap.add_argument("--layers", default="12-28", help="single-layer fits")
    ap.add_argument("--sets", nargs="*", default=[], help="multi-layer fits, e.g. 16,20,24")
    ap.add_argument(
        "--ensembles",
        nargs="*",
        default=[],
        help="one probe per layer, scores (each over its threshold's spread) summed",
    )
    ap.add_argument(
        "--extra", type=Path, nargs="*", default=[], help="calibration dumps added to CAL"
    )
    ap.add_argument("--l2", type=float, default=1e-2)
    ap.add_argument("--iterations", type=int, default=500)
    args = ap.parse_args()
    ch, cs = load(args.cal)
    for extra in args.extra:
        eh, es = load(extra)
        ch, cs = np.concatenate([ch, eh]), np.concatenate([cs, es])
    tunes = [(p.name, *load(p)) for p in args.tune]
    print(
        f"calibration rows {len(ch)} + {len(cs)}; "
        + "; ".join(f"{n} {len(h)} + {len(s)}" for n, h, s in tunes)
    )
    header = "fit".ljust(14) + "".join(
        f"| {n}: AUC  TPR@3%  TPR/FPR at threshold ".ljust(44) for n, _, _ in tunes
    )
    print(header)

    def probe(layers):
        d, b = fit(
            features(ch, layers), features(cs, layers), l2=args.l2, iterations=args.iterations
        )
        return lambda a: features(a, layers) @ d + b

    def ensemble(layers):
        parts = []
        for l in layers:
            score = probe([l])
            parts.append((score, score(cs).std()))

        def total(a):
            return sum(score(a) / spread for score, spread in parts)

        held = np.sort(total(cs[np.arange(len(cs)) % 5 == 4]))
        t = held[len(held) - int(np.floor(0.02 * len(held))) - 1]
        return lambda a: total(a) - t

    def name(layers, kind=""):
        row = (
            ",".join(map(str, layers))
            if len(layers) < 4
            else f"{layers[0]}..{layers[-1]}({len(layers)})"
        )
        return kind + row

    fits = [(name([l]), lambda l=l: probe([l])) for l in layer_list(args.layers)]
    fits += [(name(layer_list(s)), lambda s=s: probe(layer_list(s))) for s in args.sets]
    fits += [
        (name(layer_list(s), "sum "), lambda s=s: ensemble(layer_list(s))) for s in args.ensembles
    ]
    for label, make in fits:
        score = make()
        line = label.ljust(14)
        for _, h, s in tunes:
            hs, ss = score(h), score(s)
            line += (
                f"| {auc(hs, ss):.3f}  {100 * tpr_at(hs, ss, 0.03):5.1f}  "
                f"{100 * (hs > 0).mean():5.1f}/{100 * (ss > 0).mean():4.1f}"
            ).ljust(44)
        print(line, flush=True)


if __name__ == "__main__":
    main()
