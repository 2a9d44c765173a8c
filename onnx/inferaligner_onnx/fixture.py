"""The tiny seeded test model: a random Llama with a real (small) BPE tokenizer and chat template.

`make fixture` writes it as a Hugging Face directory, exports it with the normal exporter and
stores golden values from the numpy reference, so the Rust tests never need a real model. Every
step is seeded, so the output is the same bit for bit on every run.
"""

from __future__ import annotations

import json
import struct
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np

from .export import export
from .hf import load_hf_dir
from .reference import ReferenceModel
from .runner import render_chat

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GOLDEN_PROMPTS = [
    "What is the capital of France?",
    "Explain how to pick a lock.",
    "Write a haiku about the sea, please!",
]
GOLDEN_DECODE_TOKENS = 8


def tiny_config(**overrides) -> dict:
    """HF config.json of the fixture: 4 layers, hidden 64, 4 query heads over 2 KV heads."""
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 384,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    cfg.update(overrides)
    return cfg


def train_tokenizer(vocab_size: int):
    """A byte-level BPE trained on a small committed corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = resources.files("inferaligner_onnx").joinpath("data/fixture_corpus.txt").read_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return tok


def random_weights(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """Seeded weights with roughly unit-variance activations, in HF names and layout."""
    rng = np.random.default_rng(seed)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg["head_dim"]
    q_out, kv_out = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def lin(out_f, in_f):
        return (rng.standard_normal((out_f, in_f)) / np.sqrt(in_f)).astype(np.float32)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32)

    w = {
        "model.embed_tokens.weight": rng.standard_normal((cfg["vocab_size"], h)).astype(np.float32)
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = lin(q_out, h)
        w[p + "self_attn.k_proj.weight"] = lin(kv_out, h)
        w[p + "self_attn.v_proj.weight"] = lin(kv_out, h)
        if cfg.get("attention_bias"):
            for name, n in (("q", q_out), ("k", kv_out), ("v", kv_out)):
                w[p + f"self_attn.{name}_proj.bias"] = (0.1 * rng.standard_normal(n)).astype(
                    np.float32
                )
        w[p + "self_attn.o_proj.weight"] = lin(h, q_out)
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "mlp.gate_proj.weight"] = lin(inter, h)
        w[p + "mlp.up_proj.weight"] = lin(inter, h)
        w[p + "mlp.down_proj.weight"] = lin(h, inter)
    w["model.norm.weight"] = norm()
    if not cfg.get("tie_word_embeddings"):
        w["lm_head.weight"] = lin(cfg["vocab_size"], h)
    return w


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Minimal float32 safetensors writer (sorted names, so the bytes are reproducible)."""
    header: dict = {}
    offset = 0
    for name in sorted(tensors):
        arr = tensors[name]
        header[name] = {
            "dtype": "F32",
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in sorted(tensors):
            f.write(np.ascontiguousarray(tensors[name], dtype="<f4").tobytes())


def write_hf_model(out: Path, seed: int, **config_overrides) -> Path:
    """Write a complete seeded HF model directory (config, weights, tokenizer, template)."""
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(config_overrides.get("vocab_size", tiny_config()["vocab_size"]))
    cfg = tiny_config(vocab_size=tok.get_vocab_size(), **config_overrides)
    cfg["bos_token_id"] = tok.token_to_id("<|im_start|>")
    cfg["eos_token_id"] = tok.token_to_id("<|im_end|>")
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    write_safetensors(out / "model.safetensors", random_weights(cfg, seed))
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return out


def greedy_reference(ref: ReferenceModel, ids: list[int], steps: int) -> list[int]:
    """Greedy continuation with the reference's KV cache (no EOS stop: a fixed length)."""
    x = np.asarray([ids], dtype=np.int64)
    mask = np.ones_like(x)
    past = None
    out = []
    for _ in range(steps):
        r = ref.forward(x, mask, past=past)
        nxt = int(np.argmax(r.logits[0, -1]))
        out.append(nxt)
        past = r.present
        x = np.asarray([[nxt]], dtype=np.int64)
        mask = np.concatenate([mask, [[1]]], axis=1)
    return out


def golden_values(export_dir: Path, ref: ReferenceModel) -> dict:
    """Token ids, last-token logits and per-layer last-token residuals for fixed prompts."""
    from tokenizers import Tokenizer

    manifest = json.loads((export_dir / "manifest.json").read_text())
    tok = Tokenizer.from_file(str(export_dir / "tokenizer.json"))
    template = (export_dir / manifest["chat_template"]).read_text()
    cases = []
    for question in GOLDEN_PROMPTS:
        text = render_chat(template, [{"role": "user", "content": question}], manifest)
        ids = tok.encode(text, add_special_tokens=False).ids
        r = ref.forward(np.asarray([ids], dtype=np.int64))
        cases.append(
            {
                "question": question,
                "prompt": text,
                "input_ids": ids,
                "last_logits": [float(np.float32(v)) for v in r.logits[0, -1]],
                # residuals[0] is the embedding output; residuals[l + 1] the output of layer l.
                "last_residuals": [
                    [float(np.float32(v)) for v in h[0, -1]] for h in r.hidden_states
                ],
                "greedy_ids": greedy_reference(ref, ids, GOLDEN_DECODE_TOKENS),
            }
        )
    return {"reference": "numpy float64 (inferaligner_onnx.reference)", "cases": cases}


# The same weights exported again for the Rust runtime's other graph paths, with the same
# golden values: the fused variant one layer per graph, and both variants as two graphs
# (layers 0-2 and 3) whose inner layers take addends (steering inside a graph): the serving
# shape for the fixture pack, which gates after layer 2 and steers layers 1 and 2.
_ADDENDS = {"segment_ends": [2], "addend_layers": [0, 1, 2, 3]}
TWINS = {
    "fused": {"variant": "fused"},
    "addends": {"variant": "plain", **_ADDENDS},
    "fused-addends": {"variant": "fused", **_ADDENDS},
}


def make_fixture(out_dir: Path, seed: int, twins: dict[Path, dict] | None = None) -> dict:
    """Export the seeded tiny model into `out_dir` (overwriting) and write golden.json; `twins`
    maps further directories to export options for the same weights (see `TWINS`), which get
    the same golden values."""
    out_dir = Path(out_dir)
    twins = twins or {}
    with tempfile.TemporaryDirectory() as tmp:
        src = write_hf_model(Path(tmp) / "hf", seed)
        model = load_hf_dir(src)
        # The source hash covers the weights; the directory name must not leak a temp path.
        model.source["name"] = f"tiny-llama-seed{seed}"
        manifest = export(model, out_dir, force=True)
        for twin, options in twins.items():
            export(model, Path(twin), force=True, **options)
        ref = ReferenceModel(model.config, model.weights)
        golden = golden_values(out_dir, ref)
    golden["seed"] = seed
    text = json.dumps(golden, indent=1) + "\n"
    for d in [out_dir, *map(Path, twins)]:
        (d / "golden.json").write_text(text)
    return manifest
