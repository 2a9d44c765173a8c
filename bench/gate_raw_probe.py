"""Would raw completions be gated better by a probe of their own? A side study for issue 15.

The pack holds one gate for every endpoint. This fits a probe on raw-completion calibration rows
alone (and on bare + raw rows), at several layers and penalties, on the residuals `calibrate
--save-residuals` writes (the gate's own readout, so the committed pack scores them exactly as
serving does), and prints TPR / FPR at a threshold held at 2 % FPR on a fifth of the harmless
calibration rows (as `calibrate` places it), ROC AUC and TPR at 3 % FPR, on the raw-format
*tuning* set (`bench/gate-set/raw-tuning`: formats written apart from calibration's) and, for
the record, the measurement set's raw and bare rows. Choose on the tuning rows only.

    S=target/rawstudy; mkdir -p $S/calp $S/tunp
    cp config/calibration/{harmful,harmless,completions}.txt $S/calp/
    cp bench/gate-set/tuning/harm*.txt bench/gate-set/raw-tuning/completions.txt $S/tunp/
    for d in calp tunp; do for f in systems histories documents conversation-jailbreaks; do
      : > $S/$d/$f.jsonl; done; done
    target/release/inferaligner compose --pieces $S/calp --out $S/cal --per-framing 600
    target/release/inferaligner compose --pieces $S/tunp --out $S/tun --per-framing 120
    .venv/bin/python bench/gate_raw_probe.py prepare $S target/gate-bench/set
    target/release/inferaligner calibrate --target models/smollm2-135m-instruct \\
        --steering-from PACK --harmful $S/all-harmful.jsonl --harmless $S/all-harmless.jsonl \\
        --no-framings --no-wrappers --gate-layer 18 --save-residuals $S/res \\
        --out $S/pack.safetensors
    # (stop calibrate once $S/res/shape.json is written: the residuals are all this needs)
    .venv/bin/python bench/gate_raw_probe.py study $S PACK --layers 14,16,18
"""

from __future__ import annotations

import argparse
import json
import random
import struct
from pathlib import Path

import numpy as np

PARTS = ("tun/raw-completion", "tun/bare", "mea/raw-completion", "mea/bare")


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()]


def prepare(study: Path, measure: Path) -> None:
    """One harmful and one harmless file to calibrate on, and which set each row is from."""
    random.seed(0)
    index = {}
    for cls in ("harmful", "harmless"):
        cal = load(study / "cal" / f"{cls}.jsonl")
        bare = [r for r in cal if r["framing"] == "bare"]
        raw = [r for r in cal if r["framing"] != "bare"]
        bare = random.sample(bare, min(len(bare), len(raw) + 5))
        mea = [
            r for r in load(measure / f"{cls}.jsonl") if r["framing"] in ("bare", "raw-completion")
        ]
        sets = (
            ("cal", bare + raw),
            ("tun", load(study / "tun" / f"{cls}.jsonl")),
            ("mea", mea),
        )
        rows = [(name, r) for name, rs in sets for r in rs]
        with (study / f"all-{cls}.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for _, r in rows)
        index[cls] = [f"{name}/{r['framing']}" for name, r in rows]
    (study / "index.json").write_text(json.dumps(index))


def pack_gate(path: Path) -> tuple[np.ndarray, float, int]:
    """The pack's gate direction, bias and layer."""
    b = path.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    head = json.loads(b[8 : 8 + n])

    def tensor(k: str) -> np.ndarray:
        lo, hi = head[k]["data_offsets"]
        return np.frombuffer(b[8 + n + lo : 8 + n + hi], dtype="<f4")

    layer = json.loads(head["__metadata__"]["inferaligner"])["gate_layer"]
    return (
        tensor("gate_direction").astype(np.float64),
        float(tensor("gate_bias")[0]),
        layer,
    )


def fit(xh: np.ndarray, xb: np.ndarray, l2: float):
    """`calibrate`'s probe: class-balanced logistic regression on standardised inputs (solved
    by Newton's method here)."""
    x = np.concatenate([xh, xb]).astype(np.float64)
    y = np.r_[np.ones(len(xh)), np.zeros(len(xb))]
    sw = np.where(y == 1, 0.5 / len(xh), 0.5 / len(xb))
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = np.c_[(x - mu) / sd, np.ones(len(x))]
    w = np.zeros(z.shape[1])
    reg = np.full(z.shape[1], l2)
    reg[-1] = 0
    for _ in range(30):
        p = 1 / (1 + np.exp(-(z @ w)))
        grad = z.T @ (sw * (p - y)) + reg * w
        hess = (z * (sw * p * (1 - p))[:, None]).T @ z + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return lambda a: ((a.astype(np.float64) - mu) / sd) @ w[:-1] + w[-1]


def auc(h: np.ndarray, b: np.ndarray) -> float:
    ranks = np.r_[h, b].argsort().argsort() + 1
    return (ranks[: len(h)].sum() - len(h) * (len(h) + 1) / 2) / (len(h) * len(b))


def study(dir_: Path, pack: Path, layers: list[int]) -> None:
    index = json.loads((dir_ / "index.json").read_text())
    shape = json.loads((dir_ / "res" / "shape.json").read_text())
    x = {
        c: np.fromfile(dir_ / "res" / f"{c}.f32", dtype="<f4").reshape(shape[c])
        for c in ("harmful", "harmless")
    }
    tags = {c: np.array(index[c]) for c in index}

    def rows(cls: str, part: str) -> np.ndarray:
        return x[cls][tags[cls] == part]

    def report(name: str, score, threshold: float) -> None:
        cells = []
        for part in PARTS:
            h, b = score(rows("harmful", part)), score(rows("harmless", part))
            at3 = np.quantile(b, 0.97)
            cells.append(
                f"{100 * (h > threshold).mean():.1f} / {100 * (b > threshold).mean():.1f} %, "
                f"{auc(h, b):.3f}, {100 * (h > at3).mean():.1f} %"
            )
        print(f"| {name} | " + " | ".join(cells) + " |")

    print(
        "| gate | " + " | ".join(f"{p}: TPR / FPR, ROC AUC, TPR at 3 % FPR" for p in PARTS) + " |"
    )
    print("|---" * (len(PARTS) + 1) + "|")
    d, bias, layer = pack_gate(pack)
    report(f"the pack (layer {layer})", lambda a: a[:, layer] @ d + bias, 0.0)
    for layer in layers:
        for l2 in (1e-2, 1e-1, 1.0):
            for name, framings in (
                ("raw only", ["raw-completion"]),
                ("bare + raw", ["bare", "raw-completion"]),
            ):
                xh = np.concatenate([rows("harmful", f"cal/{f}")[:, layer] for f in framings])
                xb = [rows("harmless", f"cal/{f}")[:, layer] for f in framings]
                fifth = [np.arange(len(b)) % 5 == 4 for b in xb]
                train = np.concatenate([b[~k] for b, k in zip(xb, fifth, strict=True)])
                held = np.concatenate([b[k] for b, k in zip(xb, fifth, strict=True)])
                probe = fit(xh, train, l2)
                threshold = np.quantile(probe(held), 0.98)
                report(
                    f"{name}, layer {layer}, L2 {l2}",
                    lambda a, p=probe, i=layer: p(a[:, i]),
                    threshold,
                )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("dir", type=Path)
    p.add_argument("measure", type=Path)
    s = sub.add_parser("study")
    s.add_argument("dir", type=Path)
    s.add_argument("pack", type=Path)
    s.add_argument("--layers", default="14,16,18")
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args.dir, args.measure)
    else:
        study(args.dir, args.pack, [int(v) for v in args.layers.split(",")])


if __name__ == "__main__":
    main()
