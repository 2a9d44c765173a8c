"""Write a GGUF model as a float32 Hugging Face directory, so that peers that read HF weights
(transformers, the onnxruntime-genai model builder) run exactly the weights our export runs.

    .venv/bin/python bench/gguf_to_hf.py downloads/SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2-hf
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from inferaligner_onnx.export import load_source
from inferaligner_onnx.fixture import write_safetensors


def main(src: str, out: str) -> None:
    model = load_source(Path(src))
    cfg = model.config
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: model.weights.get(name) for name in model.weights.names()}
    write_safetensors(out_dir / "model.safetensors", tensors)
    sp = model.special
    (out_dir / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"],
        "model_type": cfg.model_type,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": sp.bos_token_id,
        "eos_token_id": sp.eos_token_ids[0],
        "pad_token_id": sp.pad_token_id,
        "torch_dtype": "float32",
        "hidden_act": "silu",
    }, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps({
        "bos_token_id": sp.bos_token_id, "eos_token_id": sp.eos_token_ids,
        "pad_token_id": sp.pad_token_id, "do_sample": False}))
    (out_dir / "tokenizer.json").write_text(model.tokenizer_json)
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": sp.bos_token, "eos_token": sp.eos_token, "pad_token": sp.eos_token,
        "add_bos_token": sp.add_bos_token, "chat_template": model.chat_template,
        "model_max_length": cfg.max_position_embeddings}, indent=2))
    print(f"wrote {out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main(*sys.argv[1:3])
