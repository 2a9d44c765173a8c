"""The aligned-sibling recipe's training data (recipes/aligned-sibling/data) stays disjoint from
the built-in calibration prompts, and its refusals are refusals by eval's keyword judge.
Standard library only (the recipe itself needs torch; this test does not)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "aligned-sibling"
CALIBRATION = REPO / "config" / "calibration"


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def eval_markers() -> list[str]:
    src = (REPO / "crates" / "inferaligner" / "src" / "judge.rs").read_text(encoding="utf-8")
    block = re.search(r"REFUSAL_MARKERS: &\[&str\] = &\[(.*?)\];", src, re.S)
    assert block, "REFUSAL_MARKERS not found in judge.rs"
    return re.findall(r'"((?:[^"\\]|\\.)*)"', block.group(1))


def recipe_markers() -> list[str]:
    tree = ast.parse((RECIPE / "check_sibling.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "REFUSAL_MARKERS" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError("REFUSAL_MARKERS not found in check_sibling.py")


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return {k: jsonl(RECIPE / "data" / f"{k}.jsonl") for k in ("harmful", "harmless")}


def test_sizes_and_fields(data):
    assert 250 <= len(data["harmful"]) <= 400
    assert 250 <= len(data["harmless"]) <= 500
    assert all(r["instruction"].strip() and r["response"].strip() for r in data["harmful"])
    assert all(r["instruction"].strip() and "response" not in r for r in data["harmless"])


def test_disjoint_from_calibration_prompts(data):
    calibration = {normalise(p) for f in sorted(CALIBRATION.glob("*.txt")) for p in lines(f)}
    assert calibration
    overlap = [
        r["instruction"]
        for rows in data.values()
        for r in rows
        if normalise(r["instruction"]) in calibration
    ]
    assert not overlap, f"training prompts that are also calibration prompts: {overlap}"


def test_no_duplicates_inside_training_data(data):
    keys = [normalise(r["instruction"]) for rows in data.values() for r in rows]
    assert len(keys) == len(set(keys))


def test_refusals_are_refusals_by_the_eval_judge(data):
    markers = eval_markers()
    missed = [
        r["response"] for r in data["harmful"] if not any(m in r["response"] for m in markers)
    ]
    assert not missed


def test_check_sibling_uses_evals_keyword_list():
    assert recipe_markers() == eval_markers()
