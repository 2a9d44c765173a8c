"""Make an aligned sibling of SmolLM2-135M-Instruct: a small safety fine-tune on CPU.

Harmful instructions (data/harmful.jsonl) are answered with the short, reasoned refusals written
beside them; harmless instructions (data/harmless.jsonl) with the base model's own greedy answers
(generated here, deterministically, and cached), so the model keeps its utility. Full fine-tune of
the decoder layers and the final norm; the tied embedding/LM head stays frozen, so the sibling
reads and writes the residual stream in the same basis as the target. Loss on assistant tokens
only. Deterministic given --seed (fixed data order, no dropout, greedy answers).

    bench/.venv/bin/python recipes/aligned-sibling/train.py \
        --base models/smollm2-hf --out models/smollm2-aligned-hf
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def prompt_text(tok, instruction: str) -> str:
    """The templated prompt, exactly as the runtime renders it (user turn, default system)."""
    messages = [{"role": "user", "content": instruction}]
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def greedy_answers(model, tok, instructions: list[str], max_new: int, batch: int) -> list[dict]:
    """Greedy answers of the base model, batched (left padding), in input order."""
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = [encode(tok, prompt_text(tok, i)) for i in instructions]
    order = sorted(range(len(prompts)), key=lambda k: (len(prompts[k]), k))
    answers: list[dict | None] = [None] * len(prompts)
    model.eval()
    started = time.time()
    for b in range(0, len(order), batch):
        idx = order[b : b + batch]
        width = max(len(prompts[k]) for k in idx)
        ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, k in enumerate(idx):
            p = prompts[k]
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id,
        )
        for row, k in enumerate(idx):
            new = out[row, width:].tolist()
            finished = eos in new
            if finished:
                new = new[: new.index(eos)]
            answers[k] = {
                "instruction": instructions[k],
                "answer": tok.decode(new, skip_special_tokens=True).strip(),
                "finished": finished,
            }
        done = min(b + batch, len(order))
        log(f"harmless answers {done}/{len(order)} ({time.time() - started:.0f} s)")
    return answers  # type: ignore[return-value]


def load_or_make_answers(args, model, tok, harmless: list[dict]) -> list[dict]:
    """Greedy answers for the harmless prompts, cached per prompt under models/ (not committed).

    Only prompts missing from the cache are generated. Batched greedy decoding depends very
    slightly on which prompts share a batch, so a run from an empty cache (`--fresh`) is the
    reference; the cache only saves time while iterating on the data.
    """
    instructions = [r["instruction"] for r in harmless]
    key = {
        "base_sha256": sha256(args.base / "model.safetensors"),
        "max_new_tokens": args.answer_tokens,
        "batch": args.gen_batch,
    }
    cache, cached = args.answers, {}
    if cache.is_file() and not args.fresh:
        stored = json.loads(cache.read_text(encoding="utf-8"))
        if stored.get("key") == key:
            cached = stored["answers"]
    missing = [i for i in instructions if i not in cached]
    log(
        f"harmless answers: {len(instructions) - len(missing)} cached, {len(missing)} to "
        f"generate (greedy, <= {args.answer_tokens} tokens)"
    )
    if missing:
        for a in greedy_answers(model, tok, missing, args.answer_tokens, args.gen_batch):
            cached[a["instruction"]] = a
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "answers": cached}, indent=1), encoding="utf-8")
    return [cached[i] for i in instructions]


def build_examples(
    tok, harmful: list[dict], answers: list[dict], max_len: int, harmless_repeat: int = 1
) -> list[dict]:
    """Token ids and labels (-100 on the prompt) per example; the answer ends with <|im_end|>
    unless the base model's answer was cut at the token cap. Each harmless example appears
    `harmless_repeat` times per epoch (weighting utility against refusal)."""
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    rows = [(r["instruction"], r["response"], True, "harmful") for r in harmful]
    rows += [
        (a["instruction"], a["answer"], a["finished"], "harmless") for a in answers
    ] * harmless_repeat
    examples = []
    for instruction, answer, finished, kind in rows:
        p = encode(tok, prompt_text(tok, instruction))
        a = encode(tok, answer) + ([eos] if finished else [])
        ids = (p + a)[:max_len]
        labels = ([-100] * len(p) + a)[:max_len]
        examples.append({"ids": ids, "labels": labels, "kind": kind})
    return examples


def collate(batch: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(e["ids"]) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e["ids"])
        ids[row, :n] = torch.tensor(e["ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return ids, labels, mask


def assistant_loss(model, ids, labels, mask) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy on assistant tokens only; the LM head runs on those positions
    alone (about a fifth of the compute of a full forward is the 49k-row head)."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    logits = model.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits, target[keep]), int(keep.sum())


def lr_at(step: int, peak: float, warmup: int) -> float:
    """Linear warmup, then constant: the model after epoch k of a longer run is exactly the
    model of an `--epochs k` run (same data order), so epochs can be compared in one run."""
    return peak * min(1.0, (step + 1) / warmup)


def train(args, model, tok, examples: list[dict], after_epoch=None) -> dict:
    """Train in place; `after_epoch(epoch, model)` (optional) runs after each epoch."""
    for p in model.parameters():
        p.requires_grad_(True)
    model.model.embed_tokens.weight.requires_grad_(False)  # tied with lm_head: both frozen
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    steps_per_epoch = math.ceil(len(examples) / args.batch)
    total = steps_per_epoch * args.epochs
    warmup = args.warmup
    log(
        f"training {n_train / 1e6:.1f} M parameters on {len(examples)} examples: "
        f"{args.epochs} epochs x {steps_per_epoch} steps of {args.batch}, lr {args.lr}"
    )
    model.train()
    gen = torch.Generator().manual_seed(args.seed)
    started = time.time()
    step, history = 0, []
    for epoch in range(args.epochs):
        order = torch.randperm(len(examples), generator=gen).tolist()
        run_loss, run_tok = 0.0, 0
        for b in range(0, len(order), args.batch):
            batch = [examples[k] for k in order[b : b + args.batch]]
            ids, labels, mask = (t.to(args.device) for t in collate(batch, tok.pad_token_id))
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args.lr, warmup)
            loss, n_tok = assistant_loss(model, ids, labels, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            run_loss += loss.item() * n_tok
            run_tok += n_tok
            if step % args.log_every == 0 or step == total:
                elapsed = time.time() - started
                eta = elapsed / step * (total - step)
                log(
                    f"epoch {epoch + 1}/{args.epochs} step {step}/{total} "
                    f"loss {run_loss / run_tok:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                    f"{elapsed:.0f} s elapsed, ~{eta:.0f} s left"
                )
        history.append({"epoch": epoch + 1, "loss": run_loss / max(1, run_tok)})
        if after_epoch is not None:
            after_epoch(epoch + 1, model)
            model.train()
        if args.save_epochs and epoch + 1 < args.epochs:
            out = args.out.parent / f"{args.out.name}-epoch{epoch + 1}"
            save(args, model, out, {"epochs_done": epoch + 1, "seconds": time.time() - started})
    return {
        "steps": total,
        "trainable_parameters": n_train,
        "epochs": history,
        "seconds": time.time() - started,
    }


def save(args, model, out: Path, info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {
        name: t.detach().cpu().contiguous()
        for name, t in model.state_dict().items()
        if name != "lm_head.weight"  # tied to model.embed_tokens.weight
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in COPIED_FILES:
        shutil.copyfile(args.base / name, out / name)
    (out / "training.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    log(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--base",
        type=Path,
        default=Path("models/smollm2-hf"),
        help="HF directory of SmolLM2-135M-Instruct (bench/gguf_to_hf.py)",
    )
    ap.add_argument("--out", type=Path, default=Path("models/smollm2-aligned-hf"))
    ap.add_argument("--data", type=Path, default=HERE / "data")
    ap.add_argument(
        "--answers",
        type=Path,
        default=Path("models/aligned-sibling-answers.json"),
        help="cache of the base model's greedy answers to the harmless prompts",
    )
    ap.add_argument(
        "--fresh", action="store_true", help="ignore the cache and regenerate every answer"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--warmup", type=int, default=10, help="warmup steps (then constant lr)")
    ap.add_argument(
        "--save-epochs", action="store_true", help="also save OUT-epochK after each earlier epoch"
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument(
        "--harmless-repeat", type=int, default=2, help="each harmless example N times per epoch"
    )
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--answer-tokens", type=int, default=96, help="cap of the greedy answers")
    ap.add_argument("--gen-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all CPUs)")
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument(
        "--device",
        default="cpu",
        help="torch device for training (the reference run is on CPU; `cuda` only speeds up "
        "sweeps, and its float arithmetic differs slightly)",
    )
    args = ap.parse_args()

    started = time.time()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    tok = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).to(args.device)
    harmful = read_jsonl(args.data / "harmful.jsonl")
    harmless = read_jsonl(args.data / "harmless.jsonl")

    t0 = time.time()
    answers = load_or_make_answers(args, model, tok, harmless)
    gen_seconds = time.time() - t0
    examples = build_examples(tok, harmful, answers, args.max_len, args.harmless_repeat)
    result = train(args, model, tok, examples)
    model.eval()
    info = {
        "base_sha256": sha256(args.base / "model.safetensors"),
        "data": {n: sha256(args.data / n) for n in ("harmful.jsonl", "harmless.jsonl")},
        "harmful_examples": len(harmful),
        "harmless_examples": len(harmless),
        "assistant_tokens": sum(sum(x != -100 for x in e["labels"]) for e in examples),
        "seed": args.seed,
        "epochs": args.epochs,
        "lr": args.lr,
        "warmup_steps": args.warmup,
        "batch": args.batch,
        "harmless_repeat": args.harmless_repeat,
        "max_len": args.max_len,
        "answer_tokens": args.answer_tokens,
        "threads": torch.get_num_threads(),
        "answer_seconds": gen_seconds,
        "train": result,
        "total_seconds": time.time() - started,
    }
    save(args, model, args.out, info)
    log(
        f"done in {info['total_seconds']:.0f} s (answers {gen_seconds:.0f} s, "
        f"training {result['seconds']:.0f} s)"
    )


if __name__ == "__main__":
    main()
