"""Would reading the model's own answer help the gate? A side study (docs/evaluation.md,
"Reading the answer too").

The gate reads the request before any token is generated. This study reads, instead or as
well, the request followed by the target's own unsteered greedy answer (`eval --policy monitor
--samples`: `answer_unsteered`), rendered with SmolLM2's chat template as raw text and read
whole (`calibrate --gate-view prompt`, last token and mean). It fits the probe on calibration
answers at a few layers (as `bench/gate_layers.py` does) and scores a tuning set's answers
alone, summed with the request gate's score from the same samples, and as the higher of the two.

    target/release/inferaligner eval --model M --pack P --policy monitor --max-tokens 32 \\
        --harmful H --harmless S --samples SAMPLES          # for the calibration and tuning sets
    .venv/bin/python bench/gate_answer_view.py render SAMPLES OUT   # OUT-harmful.jsonl, …
    target/release/inferaligner calibrate --target M --steering-from P --no-framings \\
        --no-wrappers --gate-view prompt --harmful OUT-harmful.jsonl \\
        --harmless OUT-harmless.jsonl --save-residuals DIR --out /tmp/x.safetensors
    .venv/bin/python bench/gate_answer_view.py score CAL_DIR TUNE_DIR TUNE_SAMPLES

Choose on tuning sets only; never pass the measurement set here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from gate_layers import auc, fit, load, tpr_at

SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n"
)


def render(samples: Path, out: str) -> None:
    rows = [json.loads(line) for line in samples.open()]
    for cls in ("harmful", "harmless"):
        with open(f"{out}-{cls}.jsonl", "w") as f:
            for r in rows:
                if r["class"] == cls:
                    text = (
                        f"{SYSTEM}<|im_start|>user\n{r['request']}<|im_end|>\n"
                        f"<|im_start|>assistant\n{r['answer_unsteered'] or ''}"
                    )
                    f.write(json.dumps({"prompt": text}) + "\n")


def score(cal: Path, tune: Path, samples: Path, layers: list[int]) -> None:
    ch, cs = load(cal)
    th, ts = load(tune)
    rows = [json.loads(line) for line in samples.open()]
    gate = np.array([r["score"] for r in rows])
    y = np.array([r["class"] == "harmful" for r in rows])

    def show(name: str, s: np.ndarray) -> None:
        hs, ss = s[y], s[~y]
        print(
            f"{name:<14} AUC {auc(hs, ss):.3f}  TPR@3% {100 * tpr_at(hs, ss, 0.03):5.1f}  "
            f"at 0: TPR {100 * (hs > 0).mean():5.1f} FPR {100 * (ss > 0).mean():4.1f}"
        )

    show("request gate", gate)
    for layer in layers:
        d, b = fit(ch[:, layer], cs[:, layer])
        a = np.r_[th[:, layer] @ d + b, ts[:, layer] @ d + b]
        show(f"{layer} answer", a)
        show(f"{layer} sum", a + gate)
        show(f"{layer} max", np.maximum(a, gate))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render")
    r.add_argument("samples", type=Path)
    r.add_argument("out")
    s = sub.add_parser("score")
    s.add_argument("cal", type=Path)
    s.add_argument("tune", type=Path)
    s.add_argument("samples", type=Path)
    s.add_argument("--layers", default="14,16,18")
    a = p.parse_args()
    if a.cmd == "render":
        render(a.samples, a.out)
    else:
        score(a.cal, a.tune, a.samples, [int(x) for x in a.layers.split(",")])


if __name__ == "__main__":
    main()
