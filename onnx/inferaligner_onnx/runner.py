"""Chain the exported segments with onnxruntime (Python): parity checks and a greedy generator.

This is a checking tool, not the product: the Rust runtime owns generation in the sidecar.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .reference import position_ids_from_mask


def render_chat(
    template: str, messages: list[dict], manifest: dict, add_generation_prompt: bool = True
) -> str:
    """Render a HF chat template with jinja2, as transformers does."""
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(ValueError(msg))
    tok = manifest["tokenizer"]
    return env.from_string(template).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=tok.get("bos_token") or "",
        eos_token=tok.get("eos_token") or "",
    )


@dataclass
class StepResult:
    logits: np.ndarray  # [B, S, V]
    # Residual stream at each segment boundary: the embeddings, then the output of each layer
    # group (of every layer when the export has one layer per segment).
    hidden_states: list[np.ndarray]
    # For each entry of hidden_states, the number of decoder layers applied (0 = embeddings).
    depths: list[int]
    present: list[tuple[np.ndarray, np.ndarray]]


class SegmentChain:
    """One onnxruntime session per segment of an export, run in order."""

    def __init__(self, export_dir: Path, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        self.dir = Path(export_dir)
        self.manifest = json.loads((self.dir / "manifest.json").read_text())
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.sessions = [
            (
                seg,
                ort.InferenceSession(
                    str(self.dir / seg["file"]),
                    opts,
                    providers=providers or ["CPUExecutionProvider"],
                ),
            )
            for seg in self.manifest["segments"]
        ]
        self.np_dtype = np.float16 if self.manifest["dtype"] == "float16" else np.float32
        # where `step` can add a vector: after a segment's last layer, or through an addend
        layer_segs = [seg for seg in self.manifest["segments"] if seg["kind"] == "layers"]
        self.steerable = {seg["layers"][1] for seg in layer_segs} | {
            int(layer) for seg in layer_segs for layer in seg["inputs"].get("addends", {})
        }

    def empty_past(self, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        m = self.manifest
        shape = (batch, m["num_key_value_heads"], 0, m["head_dim"])
        return [
            (np.zeros(shape, self.np_dtype), np.zeros(shape, self.np_dtype))
            for _ in range(m["num_layers"])
        ]

    def step(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        past: list[tuple[np.ndarray, np.ndarray]] | None = None,
        add: dict[int, np.ndarray] | None = None,
    ) -> StepResult:
        """One forward pass. `add` maps layers to vectors `[batch, hidden]` added to the residual
        stream after that layer at every new position (steering): through the graph's addend
        input inside a segment, between the graphs at a segment's end."""
        add = add or {}
        if not set(add) <= self.steerable:
            raise ValueError(
                f"layers {sorted(set(add) - self.steerable)} end no segment and take no addend"
            )
        b, s = input_ids.shape
        past = past or self.empty_past(b)
        past_len = past[0][0].shape[2]
        pos = position_ids_from_mask(attention_mask, past_len, s)
        hidden: list[np.ndarray] = []
        depths: list[int] = []
        present: list[tuple[np.ndarray, np.ndarray]] = []
        x = None
        logits = None
        for seg, sess in self.sessions:
            if seg["kind"] == "embed":
                (x,) = sess.run(None, {"input_ids": input_ids.astype(np.int64)})
                hidden.append(x)
                depths.append(0)
            elif seg["kind"] == "layers":
                first, last = seg["layers"]
                fused = seg.get("variant") == "fused"
                feed = {seg["inputs"]["hidden_states"]: x}
                if fused:
                    feed.update(self._fused_inputs(seg, attention_mask, past_len, s))
                else:
                    feed[seg["inputs"]["position_ids"]] = pos
                    feed[seg["inputs"]["attention_mask"]] = attention_mask.astype(np.int64)
                for j, layer in enumerate(range(first, last + 1)):
                    feed[seg["inputs"]["past_key"][j]] = past[layer][0]
                    feed[seg["inputs"]["past_value"][j]] = past[layer][1]
                zero = np.zeros((b, self.manifest["hidden_size"]), self.np_dtype)
                for layer, name in seg["inputs"].get("addends", {}).items():
                    feed[name] = add.get(int(layer), zero).astype(self.np_dtype)[:, None, :]
                outs = dict(
                    zip([o.name for o in sess.get_outputs()], sess.run(None, feed), strict=True)
                )
                x = outs[seg["outputs"]["hidden_states"]]
                if last in add:
                    x = x + add[last].astype(self.np_dtype)[:, None, :]
                hidden.append(x)
                depths.append(last + 1)
                # Plain graphs return the new positions' K/V (the cache is past + new); fused
                # ones, run without a shared buffer, return the whole updated cache.
                for j, layer in enumerate(range(first, last + 1)):
                    new_k = outs[seg["outputs"]["present_key"][j]]
                    new_v = outs[seg["outputs"]["present_value"][j]]
                    if fused:
                        present.append((new_k, new_v))
                        continue
                    present.append(
                        (
                            np.concatenate([past[layer][0], new_k], axis=2),
                            np.concatenate([past[layer][1], new_v], axis=2),
                        )
                    )
            else:
                (logits,) = sess.run(None, {seg["inputs"]["hidden_states"]: x})
        return StepResult(logits, hidden, depths, present)

    def _fused_inputs(self, seg: dict, mask: np.ndarray, past_len: int, s: int) -> dict:
        """GroupQueryAttention's inputs for rows that all hold `past_len` tokens (no padding)."""
        if not mask.all():
            raise ValueError("the fused variant takes no padding: run rows of equal length")
        b = mask.shape[0]
        total = past_len + s
        inv_freq = np.asarray(self.manifest["rope_inv_freq"], dtype=np.float64)
        freqs = np.arange(total, dtype=np.float64)[:, None] * inv_freq[None, :]
        names = seg["inputs"]
        return {
            names["seqlens_k"]: np.full((b,), total - 1, dtype=np.int32),
            names["total_sequence_length"]: np.asarray(total, dtype=np.int32),
            names["cos_cache"]: np.cos(freqs).astype(np.float32),
            names["sin_cache"]: np.sin(freqs).astype(np.float32),
        }

    def greedy(
        self, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int] | None = None
    ) -> list[int]:
        """Greedy decoding with the KV cache, stopping at `stop_ids` (default: the EOS ids)."""
        eos = set(self.manifest["tokenizer"]["eos_token_ids"]) if stop_ids is None else stop_ids
        ids = np.asarray([prompt_ids], dtype=np.int64)
        mask = np.ones_like(ids)
        out: list[int] = []
        past = None
        for _ in range(max_new_tokens):
            r = self.step(ids, mask, past)
            nxt = int(np.argmax(r.logits[0, -1]))
            if nxt in eos:
                break
            out.append(nxt)
            past = r.present
            ids = np.asarray([[nxt]], dtype=np.int64)
            mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
        return out


def chat_once(export_dir: Path, question: str, max_new_tokens: int = 48) -> str:
    """Render `question` with the export's chat template, decode greedily, return the text."""
    from tokenizers import Tokenizer

    chain = SegmentChain(export_dir)
    m = chain.manifest
    tok = Tokenizer.from_file(str(Path(export_dir) / m["tokenizer"]["file"]))
    template = (Path(export_dir) / m["chat_template"]).read_text() if m["chat_template"] else None
    if template:
        prompt = render_chat(template, [{"role": "user", "content": question}], m)
        ids = tok.encode(prompt, add_special_tokens=False).ids
    else:
        ids = tok.encode(question).ids
    return tok.decode(chain.greedy(ids, max_new_tokens), skip_special_tokens=True)
