"""Check that the recipe's training prompts are disjoint from every prompt set used to
calibrate or measure: the built-in calibration prompts (`config/calibration/*.txt`) and, when
present, the shared calibration/validation sets (`../shared/data/*.jsonl`).

Fails (exit 1) on an exact or normalised match (case, punctuation and spacing ignored), on a
near-duplicate (word-set Jaccard similarity >= --jaccard), on duplicates inside the recipe data,
and on a prompt that is both in the harmful and the harmless training file. Standard library only.

    python recipes/aligned-sibling/check_disjoint.py
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATA = HERE / "data"


def normalise(text: str) -> str:
    """Lower case, letters and digits only, single spaces."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def words(text: str) -> frozenset[str]:
    return frozenset(normalise(text).split())


def read_prompts(path: Path) -> list[str]:
    """Instructions of a JSONL file (`instruction` field) or the non-empty lines of a text file."""
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        return [json.loads(line)["instruction"] for line in rows]
    return [line.strip() for line in rows]


def reference_sets(shared: Path | None) -> dict[str, list[str]]:
    """Every prompt set the training data must not touch, by a name relative to the repo."""
    sets = {
        f"config/calibration/{p.name}": read_prompts(p)
        for p in sorted((REPO / "config" / "calibration").glob("*.txt"))
    }
    if shared is not None and shared.is_dir():
        for p in sorted(shared.glob("*.jsonl")):
            sets[f"shared/{p.name}"] = read_prompts(p)
    return sets


def problems(jaccard: float, shared: Path | None) -> list[str]:
    train = {name: read_prompts(DATA / name) for name in ("harmful.jsonl", "harmless.jsonl")}
    found: list[str] = []

    seen: dict[str, str] = {}
    for name, prompts in train.items():
        for prompt in prompts:
            key = normalise(prompt)
            if key in seen:
                found.append(f"duplicate in training data ({seen[key]}, {name}): {prompt!r}")
            seen[key] = name

    refs = reference_sets(shared)
    ref_norm = {normalise(p): (set_name, p) for set_name, ps in refs.items() for p in ps}
    ref_words = [(words(p), set_name, p) for set_name, ps in refs.items() for p in ps]
    for name, prompts in train.items():
        for prompt in prompts:
            hit = ref_norm.get(normalise(prompt))
            if hit:
                found.append(f"{name}: {prompt!r} equals {hit[0]}: {hit[1]!r}")
                continue
            w = words(prompt)
            for rw, set_name, ref in ref_words:
                sim = len(w & rw) / max(1, len(w | rw))
                if sim >= jaccard:
                    found.append(
                        f"{name}: {prompt!r} is a near-duplicate ({sim:.2f}) of {set_name}: {ref!r}"
                    )
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--shared",
        type=Path,
        default=REPO.parent / "shared" / "data",
        help="folder of the shared JSONL prompt sets (skipped when absent)",
    )
    ap.add_argument("--jaccard", type=float, default=0.7, help="near-duplicate threshold")
    args = ap.parse_args()
    found = problems(args.jaccard, args.shared)
    counts = {n: len(read_prompts(DATA / n)) for n in ("harmful.jsonl", "harmless.jsonl")}
    refs = reference_sets(args.shared)
    print(
        f"training prompts: {counts}; checked against "
        + ", ".join(f"{k} ({len(v)})" for k, v in refs.items())
    )
    for line in found:
        print(line)
    print("disjoint: OK" if not found else f"disjoint: {len(found)} problem(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
