"""Sweep the recipe's learning rate, harmless weighting and epoch count, checking the sibling on
the validation sets after every epoch. Meant for a GPU (a CPU run of one configuration takes half
an hour); the chosen configuration is then trained on CPU with train.py, which is the reference.

    python recipes/aligned-sibling/sweep.py --device cuda --configs 3e-5:1 2e-5:2 --epochs 3 \
        --json sweep.json

Each configuration is LR:HARMLESS_REPEAT. The learning rate is constant after warmup, so the
model after epoch k of a 3-epoch run is the model of a k-epoch run (same data order).
The harmless answers come from train.py's cache (`--answers`), whatever its key.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_sibling
import train as recipe


def judge(model, tok, sets: dict[str, list[str]], max_tokens: int, batch: int) -> dict:
    model.eval()
    harmful = check_sibling.generate(model, tok, sets["harmful"], max_tokens, batch, "harmful")
    harmless = check_sibling.generate(model, tok, sets["harmless"], max_tokens, batch, "harmless")
    refused = [
        a
        for a in harmful
        if check_sibling.is_refusal(a["answer"])
        and check_sibling.distinct_ratio(a["tokens"]) >= check_sibling.MIN_DISTINCT_TOKEN_RATIO
    ]
    over = [a for a in harmless if check_sibling.is_refusal(a["answer"])]
    return {
        "harmful_refusal_rate": len(refused) / len(harmful),
        "harmless_non_refusing_rate": 1 - len(over) / len(harmless),
        "over_refused": [a["prompt"] for a in over],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, default=Path("models/smollm2-hf"))
    ap.add_argument("--data", type=Path, default=recipe.HERE / "data")
    ap.add_argument("--answers", type=Path, default=Path("models/aligned-sibling-answers.json"))
    ap.add_argument("--harmful", type=Path, default=Path("../shared/data/harmful_val.jsonl"))
    ap.add_argument("--harmless", type=Path, default=Path("../shared/data/harmless_val.jsonl"))
    ap.add_argument("--configs", nargs="+", default=["3e-5:1", "2e-5:1", "2e-5:2"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--eval-batch", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False  # keep float32 arithmetic, as on CPU
    torch.backends.cudnn.allow_tf32 = False
    tok = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).to(args.device)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    harmful = recipe.read_jsonl(args.data / "harmful.jsonl")
    harmless = recipe.read_jsonl(args.data / "harmless.jsonl")
    cached = json.loads(args.answers.read_text(encoding="utf-8"))["answers"]
    answers = [cached[r["instruction"]] for r in harmless]
    sets = {
        "harmful": check_sibling.read_prompts(args.harmful),
        "harmless": check_sibling.read_prompts(args.harmless),
    }
    results: list[dict] = []

    def record(row: dict) -> None:
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "over_refused"}), flush=True)
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")

    started = time.time()
    record(
        {"config": "base", "epoch": 0, **judge(model, tok, sets, args.max_tokens, args.eval_batch)}
    )
    for config in args.configs:
        lr, repeat = config.split(":")
        model.load_state_dict(base_state)
        examples = recipe.build_examples(tok, harmful, answers, args.max_len, int(repeat))
        run = argparse.Namespace(
            lr=float(lr),
            epochs=args.epochs,
            batch=args.batch,
            warmup=args.warmup,
            seed=args.seed,
            log_every=1000,
            save_epochs=False,
            device=args.device,
            out=None,
        )
        t0 = time.time()

        def after_epoch(epoch: int, m, config=config, t0=t0) -> None:
            seconds = time.time() - t0
            verdict = judge(m, tok, sets, args.max_tokens, args.eval_batch)
            record({"config": config, "epoch": epoch, "train_seconds": seconds, **verdict})

        torch.manual_seed(args.seed)
        recipe.train(run, model, tok, examples, after_epoch)
    print(f"sweep done in {time.time() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
