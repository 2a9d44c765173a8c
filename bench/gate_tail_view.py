"""Would a tail view help the gate? A side study (docs/evaluation.md, "One lead").

A long first-person request is often one run-on sentence whose ask comes last, and the gate's
mean over the whole turn reads the backstory. This study scores each request of a tuning set
twice with the probe `calibrate` fits (refitted here from CAL_DIR at one layer, as
`bench/gate_layers.py` does): as the gate reads it today, and its last `--words` words alone
when it has more than `--longer-than` words; the gate would take the higher score. It prints
ROC AUC, TPR at 3 % FPR and TPR / FPR at the threshold, both ways, and the long requests alone.

    # the tail views of a set, then their residuals (calibrate dumps them as it reads them)
    .venv/bin/python bench/gate_tail_view.py tails bench/gate-set/tuning /tmp/tuning-tails
    target/release/inferaligner calibrate --target models/smollm2-135m-instruct \\
        --steering-from config/packs/smollm2-135m-instruct-refusal-answers.safetensors \\
        --no-framings --no-wrappers --harmful /tmp/tuning-tails/harmful.txt \\
        --harmless /tmp/tuning-tails/harmless.txt --save-residuals TAIL_DIR --out /tmp/x.safetensors
    # (and the set itself the same way into FULL_DIR, the calibration set into CAL_DIR)
    .venv/bin/python bench/gate_tail_view.py score CAL_DIR bench/gate-set/tuning FULL_DIR TAIL_DIR

Choose on tuning sets only; never pass the measurement set here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from gate_layers import auc, fit, load, tpr_at

CLASSES = ("harmful", "harmless")


def tail(line: str, longer_than: int, words: int) -> str:
    w = line.split()
    return " ".join(w[-words:] if len(w) > longer_than else w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tails", help="write the tail views of SET_DIR's requests to OUT_DIR")
    t.add_argument("set_dir", type=Path)
    t.add_argument("out_dir", type=Path)
    s = sub.add_parser("score", help="score a set both ways")
    for name in ("cal", "set_dir", "full", "tails"):
        s.add_argument(name, type=Path)
    s.add_argument("--layer", type=int, default=18)
    for p in (t, s):
        p.add_argument("--longer-than", type=int, default=28)
        p.add_argument("--words", type=int, default=18)
    args = ap.parse_args()
    lines = {c: (args.set_dir / f"{c}.txt").read_text().splitlines() for c in CLASSES}
    if args.cmd == "tails":
        args.out_dir.mkdir(parents=True, exist_ok=True)
        for c in CLASSES:
            views = [tail(line, args.longer_than, args.words) for line in lines[c]]
            (args.out_dir / f"{c}.txt").write_text("\n".join(views) + "\n")
        return
    ch, cs = load(args.cal)
    d, b = fit(ch[:, args.layer], cs[:, args.layer])
    full = [a[:, args.layer] @ d + b for a in load(args.full)]
    tails = [a[:, args.layer] @ d + b for a in load(args.tails)]
    long = [np.array([len(x.split()) > args.longer_than for x in lines[c]]) for c in CLASSES]
    for label, (h, s) in (
        ("as read today", full),
        ("higher of it and the tail", [np.maximum(f, t) for f, t in zip(full, tails, strict=True)]),
    ):
        print(
            f"{label:26s} AUC {auc(h, s):.3f}  TPR@3%FPR {100 * tpr_at(h, s, 0.03):5.1f}  "
            f"at threshold {100 * (h > 0).mean():5.1f} / {100 * (s > 0).mean():4.1f} %  "
            f"long flagged: harmful {(h[long[0]] > 0).sum()}/{long[0].sum()}, "
            f"harmless {(s[long[1]] > 0).sum()}/{long[1].sum()}"
        )


if __name__ == "__main__":
    main()
