"""Build the ONNX segments of a layer-split export directly from weights (no torch).

Segments:
- embed:  input_ids [B,S] int64 → hidden_states [B,S,H]
- layers: hidden_states [B,S,H], position_ids [B,S] int64, attention_mask [B,P+S] int64,
          past_key.{i} / past_value.{i} [B,kvh,P,hd] for each layer i of the group
          → hidden_states_out [B,S,H], present_key.{i} / present_value.{i} [B,kvh,S,hd]

The past K/V inputs are a cache *buffer*: slot t of row b is attended to where
attention_mask[b, t] is 1, whatever order the slots were filled in. The present outputs hold the
K/V of the S new positions only (RoPE applied); the caller appends them to its cache. A runtime
can therefore keep one preallocated buffer and copy only the new entries at each step, and rows
of a batch may hold different numbers of tokens without any left padding.
- head:   hidden_states [B,S,H] → logits [B,S,V] (always float32)

Batch, sequence and past lengths are dynamic. Layer graphs come in *variants* (see
`LAYER_VARIANTS`); "plain" uses standard ONNX operators only (opset 18), so it runs on any
execution provider. Norms and softmax are computed in float32 even in a float16 export.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .config import ExportError, ModelConfig
from .reference import MASKED_SCORE
from .source import Weights, layer_prefix, lm_head_weight

OPSET = 18
MS_DOMAIN = "com.microsoft"
DTYPES = {"float32": (np.float32, TensorProto.FLOAT), "float16": (np.float16, TensorProto.FLOAT16)}


class GraphBuilder:
    """A thin, name-generating wrapper over `onnx.helper` for straight-line graphs."""

    def __init__(self, name: str, dtype: str) -> None:
        self.name = name
        self.np_dtype, self.onnx_dtype = DTYPES[dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def input(self, name: str, elem: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, name: str, elem: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    def weight(self, name: str, array: np.ndarray, dtype=None) -> str:
        arr = np.ascontiguousarray(array, dtype=dtype or self.np_dtype)
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def const(self, values, dtype=np.int64) -> str:
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(self.fresh("const"), arr, dtype=dtype)
        return self._consts[key]

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        name = out or self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], **attrs))
        return name

    def contrib(self, op_type: str, *inputs: str, outputs: int = 1, **attrs) -> list[str]:
        """An ONNX Runtime contrib operator (domain com.microsoft)."""
        names = [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, domain=MS_DOMAIN, **attrs))
        return names

    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", x, to=to)

    def to_float32(self, x: str) -> str:
        return x if self.onnx_dtype == TensorProto.FLOAT else self.cast(x, TensorProto.FLOAT)

    def to_model_dtype(self, x: str) -> str:
        return x if self.onnx_dtype == TensorProto.FLOAT else self.cast(x, self.onnx_dtype)

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, self.name, self.inputs, self.outputs, self.initializers
        )
        opsets = [helper.make_opsetid("", OPSET)]
        if any(n.domain == MS_DOMAIN for n in self.nodes):
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="inferaligner-onnx")
        model.ir_version = 8  # readable by every ONNX Runtime from 1.14 on
        return model

    # -- building blocks -------------------------------------------------------------------

    def rms_norm(self, x: str, weight: np.ndarray, eps: float, wname: str) -> str:
        """HF LlamaRMSNorm: normalise in float32, cast back, then scale.

        Written as Pow(2) → ReduceMean → Add → Sqrt → Div → Mul, the exact pattern ONNX Runtime's
        optimizer fuses into one SimplifiedLayerNormalization kernel.
        """
        x32 = self.to_float32(x)
        square = self.op("Pow", x32, self.const(2.0, np.float32))
        var = self.op("ReduceMean", square, self.const([-1]), keepdims=1)
        denom = self.op("Sqrt", self.op("Add", var, self.const(eps, np.float32)))
        normed = self.to_model_dtype(self.op("Div", x32, denom))
        return self.op("Mul", normed, self.weight(wname, weight))

    def split(self, x: str, sizes: list[int]) -> list[str]:
        """Split the last axis into parts of the given sizes."""
        outs = [self.fresh("split") for _ in sizes]
        self.nodes.append(helper.make_node("Split", [x, self.const(sizes)], outs, axis=-1))
        return outs

    def linear(self, x: str, weight: np.ndarray, wname: str, bias: np.ndarray | None = None) -> str:
        """x @ W^T (+ b), with W in HF [out, in] layout stored transposed."""
        y = self.op("MatMul", x, self.weight(wname, weight.T))
        if bias is not None:
            y = self.op("Add", y, self.weight(wname + ".bias", bias))
        return y


def build_embed(cfg: ModelConfig, weights: Weights, dtype: str) -> onnx.ModelProto:
    g = GraphBuilder("embed", dtype)
    ids = g.input("input_ids", TensorProto.INT64, ["batch", "seq"])
    table = g.weight("embed_tokens", weights.get("model.embed_tokens.weight"))
    g.op("Gather", table, ids, axis=0, out="hidden_states")
    g.output("hidden_states", g.onnx_dtype, ["batch", "seq", cfg.hidden_size])
    return g.model()


def build_head(cfg: ModelConfig, weights: Weights, dtype: str) -> onnx.ModelProto:
    g = GraphBuilder("head", dtype)
    x = g.input("hidden_states", g.onnx_dtype, ["batch", "seq", cfg.hidden_size])
    h = g.rms_norm(x, weights.get("model.norm.weight"), cfg.rms_norm_eps, "norm")
    logits = g.op("MatMul", h, g.weight("lm_head", lm_head_weight(cfg, weights).T))
    g.op("Identity", g.to_float32(logits), out="logits")
    g.output("logits", TensorProto.FLOAT, ["batch", "seq", cfg.vocab_size])
    return g.model()


def _qkv_weights(cfg: ModelConfig, w) -> tuple[np.ndarray, np.ndarray | None]:
    """q, k and v projections stacked into one MatMul (one pass over the activations)."""
    weight = np.concatenate([w(f"self_attn.{n}_proj.weight") for n in "qkv"], axis=0)
    bias = None
    if cfg.attention_bias:
        bias = np.concatenate([w(f"self_attn.{n}_proj.bias") for n in "qkv"], axis=0)
    return weight, bias


def _swiglu_mlp(g: GraphBuilder, cfg: ModelConfig, w, pre: str, h: str, x: str) -> str:
    """x + down(silu(gate(h)) * up(h)), with gate and up in one MatMul."""
    gate_up_w = np.concatenate([w("mlp.gate_proj.weight"), w("mlp.up_proj.weight")], axis=0)
    gate, up = g.split(
        g.linear(h, gate_up_w, pre + "gate_up_proj"),
        [cfg.intermediate_size, cfg.intermediate_size],
    )
    return g.op(
        "Add", x, g.linear(_swiglu(g, gate, up), w("mlp.down_proj.weight"), pre + "down_proj")
    )


def _swiglu(g: GraphBuilder, gate: str, up: str) -> str:
    """silu(gate) * up (ONNX Runtime fuses the silu into one QuickGelu kernel)."""
    return g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)


def layer_io_names(layers: range, variant: str = "plain", addends: Iterable[int] = ()) -> dict:
    """Tensor names of a layer-group graph, as recorded in the manifest. `addends` are the
    group's inner layers whose output takes a per-row addend (see `addend_inputs`)."""
    # What a step needs besides the residual stream and the cache: positions and a mask for
    # "plain"; GroupQueryAttention's sequence lengths and RoPE tables for "fused".
    step_inputs = (
        ["seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"]
        if variant == "fused"
        else ["position_ids", "attention_mask"]
    )
    return {
        "inputs": {
            "hidden_states": "hidden_states",
            **{name: name for name in step_inputs},
            "past_key": [f"past_key.{i}" for i in layers],
            "past_value": [f"past_value.{i}" for i in layers],
            # only when there are some, so that exports without them keep their manifests
            **({"addends": {str(i): f"addend.{i}" for i in sorted(addends)}} if addends else {}),
        },
        "outputs": {
            "hidden_states": "hidden_states_out",
            "present_key": [f"present_key.{i}" for i in layers],
            "present_value": [f"present_value.{i}" for i in layers],
        },
    }


def _plain_layers(
    cfg: ModelConfig, weights: Weights, layers: range, dtype: str, addends: frozenset[int]
):
    g = GraphBuilder(f"layers_{layers.start}_{layers.stop - 1}", dtype)
    names = layer_io_names(layers, "plain", addends)
    kv_shape = ["batch", cfg.num_kv_heads, "past", cfg.head_dim]
    x = g.input("hidden_states", g.onnx_dtype, ["batch", "seq", cfg.hidden_size])
    pos = g.input("position_ids", TensorProto.INT64, ["batch", "seq"])
    mask = g.input("attention_mask", TensorProto.INT64, ["batch", "total"])
    for pk, pv in zip(names["inputs"]["past_key"], names["inputs"]["past_value"], strict=True):
        g.input(pk, g.onnx_dtype, kv_shape)
        g.input(pv, g.onnx_dtype, kv_shape)
    added = addend_inputs(g, cfg, names)

    # RoPE tables shared by every layer of the group: [B, 1, S, hd].
    inv_freq = g.const(cfg.inv_freq().astype(np.float32), np.float32)
    freqs = g.op("Mul", g.op("Unsqueeze", g.cast(pos, TensorProto.FLOAT), g.const([-1])), inv_freq)
    emb = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const([1]))
    cos = g.to_model_dtype(g.op("Cos", emb))
    sin = g.to_model_dtype(g.op("Sin", emb))

    # Masks shared by every layer. Past slots (the KV cache buffer, capacity P) are visible where
    # attention_mask[:, :P] is 1: which slots of a row hold tokens is the runtime's business, and
    # every cached token precedes the new ones. New tokens see each other causally. Rows are laid
    # out as [rep * S] to match the grouped-query reshape below.
    first_past = names["inputs"]["past_key"][0]
    past_len = g.op("Slice", g.op("Shape", first_past), g.const([2]), g.const([3]))
    seq_len = g.op("Slice", g.op("Shape", x), g.const([1]), g.const([2]))
    total = g.op("Add", past_len, seq_len)
    mask_bool = g.cast(mask, TensorProto.BOOL)
    past_mask = g.op("Slice", mask_bool, g.const([0]), past_len, g.const([1]))
    past_visible = g.op("Unsqueeze", past_mask, g.const([1, 2]))  # [B,1,1,P]
    new_mask = g.op("Slice", mask_bool, past_len, total, g.const([1]))
    new_visible = g.op("Unsqueeze", new_mask, g.const([1, 2]))  # [B,1,1,S]
    idx = g.op("Range", g.const(0), g.op("Squeeze", seq_len, g.const([0])), g.const(1))
    causal = g.op(  # [S,S]: key <= query
        "LessOrEqual", g.op("Unsqueeze", idx, g.const([0])), g.op("Unsqueeze", idx, g.const([1]))
    )
    causal = g.op("Tile", causal, g.const([cfg.kv_groups, 1]))  # [rep*S, S]
    new_allowed = g.op("And", causal, new_visible)  # [B,1,rep*S,S]

    hd = cfg.head_dim
    half = hd // 2
    scale = g.const(1.0 / np.sqrt(hd), np.float32)
    masked = g.const(MASKED_SCORE, np.float32)

    def rope(t: str) -> str:
        x1 = g.op("Slice", t, g.const([0]), g.const([half]), g.const([-1]))
        x2 = g.op("Slice", t, g.const([half]), g.const([hd]), g.const([-1]))
        rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
        return g.op("Add", g.op("Mul", t, cos), g.op("Mul", rotated, sin))

    def heads(t: str, n: int) -> str:  # [B,S,n*hd] → [B,n,S,hd]
        return g.op("Transpose", g.op("Reshape", t, g.const([0, 0, n, hd])), perm=[0, 2, 1, 3])

    out_names = names["outputs"]
    for j, i in enumerate(layers):
        p = layer_prefix(i)
        w = lambda k, p=p: weights.get(p + k)  # noqa: E731
        pre = f"layers.{i}."
        h = g.rms_norm(x, w("input_layernorm.weight"), cfg.rms_norm_eps, pre + "input_norm")
        # One MatMul for q, k and v (one pass over the activations, one kernel), then split.
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        qkv_w, qkv_b = _qkv_weights(cfg, w)
        qkv = g.linear(h, qkv_w, pre + "qkv_proj", qkv_b)
        q, k, v = g.split(qkv, [q_out, kv_out, kv_out])
        q = rope(heads(q, cfg.num_heads))
        k = rope(heads(k, cfg.num_kv_heads))
        v = heads(v, cfg.num_kv_heads)
        g.op("Identity", k, out=out_names["present_key"][j])
        g.op("Identity", v, out=out_names["present_value"][j])
        past_k = names["inputs"]["past_key"][j]
        past_v = names["inputs"]["past_value"][j]
        # Grouped-query attention without copying K/V: fold the query heads of one KV head into
        # the row axis, [B,H,S,hd] → [B,kvh,rep*S,hd]. Scores against the cache buffer and
        # against the new keys are computed apart and softmaxed together, so the cache is only
        # read, never concatenated (copied).
        qg = g.op("Reshape", q, g.const([0, cfg.num_kv_heads, -1, hd]))

        def scores(keys: str, qg=qg) -> str:
            s = g.op("MatMul", qg, g.op("Transpose", keys, perm=[0, 1, 3, 2]))
            return g.op("Mul", g.to_float32(s), scale)

        both = g.op(
            "Concat",
            g.op("Where", past_visible, scores(past_k), masked),
            g.op("Where", new_allowed, scores(k), masked),
            axis=-1,
        )
        probs = g.to_model_dtype(g.op("Softmax", both, axis=-1))
        p_past = g.op("Slice", probs, g.const([0]), past_len, g.const([-1]))
        p_new = g.op("Slice", probs, past_len, total, g.const([-1]))
        ctx = g.op("Add", g.op("MatMul", p_past, past_v), g.op("MatMul", p_new, v))
        ctx = g.op("Reshape", ctx, g.const([0, cfg.num_heads, -1, hd]))
        ctx = g.op(
            "Reshape",
            g.op("Transpose", ctx, perm=[0, 2, 1, 3]),
            g.const([0, 0, cfg.num_heads * hd]),
        )
        x = g.op("Add", x, g.linear(ctx, w("self_attn.o_proj.weight"), pre + "o_proj"))

        h = g.rms_norm(x, w("post_attention_layernorm.weight"), cfg.rms_norm_eps, pre + "post_norm")
        x = _swiglu_mlp(g, cfg, w, pre, h, x)
        if i in added:
            x = g.op("Add", x, added[i])

    g.op("Identity", x, out=out_names["hidden_states"])
    g.output(out_names["hidden_states"], g.onnx_dtype, ["batch", "seq", cfg.hidden_size])
    present_shape = ["batch", cfg.num_kv_heads, "seq", cfg.head_dim]
    for pk, pv in zip(out_names["present_key"], out_names["present_value"], strict=True):
        g.output(pk, g.onnx_dtype, present_shape)
        g.output(pv, g.onnx_dtype, present_shape)
    return g.model()


def _add_and_norm(
    g: GraphBuilder, cfg: ModelConfig, y: str, x: str, wname: str, weight: np.ndarray
) -> tuple[str, str]:
    """RMS norm of x + y and the sum itself, in one SkipSimplifiedLayerNormalization kernel."""
    gamma = g.weight(wname, weight)
    normed, _, _, total = g.contrib(
        "SkipSimplifiedLayerNormalization", y, x, gamma, outputs=4, epsilon=cfg.rms_norm_eps
    )
    return normed, total


def _fused_layers(
    cfg: ModelConfig, weights: Weights, layers: range, dtype: str, addends: frozenset[int]
):
    """ONNX Runtime's GroupQueryAttention (RoPE, grouped-query attention and the KV-cache update
    in one kernel) and SkipSimplifiedLayerNormalization: a handful of nodes per layer instead of
    about fifty, which is what decode time on small models is made of.

    I/O differs from "plain": the K/V cache is a buffer `[B, kvh, MAX, hd]` in which each row's
    tokens fill slots 0..len_b (no padding anywhere); `seqlens_k[b]` (int32) is len_b + S - 1,
    `total_sequence_length` (int32 scalar) is max_b(len_b) + S, and `cos_cache`/`sin_cache`
    `[≥ total, hd/2]` are the RoPE tables the caller builds from `rope_inv_freq`. The present
    outputs have the buffer's shape: bound to the same memory as the past inputs (ONNX Runtime
    IoBinding), the new entries are written in place. CPU float32 only.
    """
    if dtype != "float32":
        raise ExportError("the fused variant (GroupQueryAttention on CPU) needs --dtype float32")
    if cfg.head_dim % 16:
        raise ExportError("the fused variant needs head_dim to be a multiple of 16")
    g = GraphBuilder(f"layers_{layers.start}_{layers.stop - 1}", dtype)
    names = layer_io_names(layers, "fused", addends)
    inputs = names["inputs"]
    x = g.input("hidden_states", g.onnx_dtype, ["batch", "seq", cfg.hidden_size])
    seqlens = g.input("seqlens_k", TensorProto.INT32, ["batch"])
    total = g.input("total_sequence_length", TensorProto.INT32, [])
    cos = g.input("cos_cache", TensorProto.FLOAT, ["max_positions", cfg.head_dim // 2])
    sin = g.input("sin_cache", TensorProto.FLOAT, ["max_positions", cfg.head_dim // 2])
    kv_shape = ["batch", cfg.num_kv_heads, "max_sequence", cfg.head_dim]
    for pk, pv in zip(inputs["past_key"], inputs["past_value"], strict=True):
        g.input(pk, g.onnx_dtype, kv_shape)
        g.input(pv, g.onnx_dtype, kv_shape)
    added = addend_inputs(g, cfg, names)

    out_names = names["outputs"]
    # The residual add that ends each layer is left to the next layer's input norm
    # (SkipSimplifiedLayerNormalization adds and normalises in one kernel, and also returns the
    # sum): `mlp_out` is the MLP output not yet added to `x`. Only the segment's first layer
    # normalises alone and only its last adds alone, so the residual stream at the segment's
    # boundaries is the same tensor as ever (hooks read and steer it there).
    mlp_out = None
    for j, i in enumerate(layers):
        p = layer_prefix(i)
        w = lambda k, p=p: weights.get(p + k)  # noqa: E731
        pre = f"layers.{i}."
        if mlp_out is None:
            h = g.rms_norm(x, w("input_layernorm.weight"), cfg.rms_norm_eps, pre + "input_norm")
        else:
            h, x = _add_and_norm(
                g, cfg, mlp_out, x, pre + "input_norm", w("input_layernorm.weight")
            )
        qkv_w, qkv_b = _qkv_weights(cfg, w)
        # the projections stay packed in one tensor: GroupQueryAttention reads q, k and v from its
        # query input when key and value are left out (no Split node: ~5 % of a decode step)
        qkv = g.linear(h, qkv_w, pre + "qkv_proj", qkv_b)
        attn, _, _ = g.contrib(
            "GroupQueryAttention",
            qkv,
            "",
            "",
            inputs["past_key"][j],
            inputs["past_value"][j],
            seqlens,
            total,
            cos,
            sin,
            outputs=3,
            num_heads=cfg.num_heads,
            kv_num_heads=cfg.num_kv_heads,
            do_rotary=1,
            rotary_interleaved=0,
        )
        # Name the present outputs (GQA's outputs 1 and 2).
        g.nodes[-1].output[1] = out_names["present_key"][j]
        g.nodes[-1].output[2] = out_names["present_value"][j]
        attn = g.linear(attn, w("self_attn.o_proj.weight"), pre + "o_proj")
        h, x = _add_and_norm(
            g, cfg, attn, x, pre + "post_norm", w("post_attention_layernorm.weight")
        )
        # gate and up as two MatMuls, as onnxruntime-genai's builder emits them: one packed
        # MatMul needs a Split after it, which copies both halves (~1.6 % of the kernel time of
        # a batch-8 step)
        gate = g.linear(h, w("mlp.gate_proj.weight"), pre + "gate_proj")
        up = g.linear(h, w("mlp.up_proj.weight"), pre + "up_proj")
        mlp_out = g.linear(_swiglu(g, gate, up), w("mlp.down_proj.weight"), pre + "down_proj")
        if i in added:
            # the layer ends as a segment does (the next one normalises alone), so a row's
            # residual is computed exactly as with a boundary here and the vector added there
            x = g.op("Add", g.op("Add", x, mlp_out), added[i])
            mlp_out = None

    g.op("Add", x, mlp_out, out=out_names["hidden_states"])
    g.output(out_names["hidden_states"], g.onnx_dtype, ["batch", "seq", cfg.hidden_size])
    for pk, pv in zip(out_names["present_key"], out_names["present_value"], strict=True):
        g.output(pk, g.onnx_dtype, kv_shape)
        g.output(pv, g.onnx_dtype, kv_shape)
    return g.model()


# Layer graph variants by name. The runtime picks the variant per segment from the manifest.
LAYER_VARIANTS: dict[
    str, Callable[[ModelConfig, Weights, range, str, frozenset[int]], onnx.ModelProto]
] = {
    "plain": _plain_layers,
    "fused": _fused_layers,
}


def build_layers(
    cfg: ModelConfig,
    weights: Weights,
    layers: range,
    dtype: str,
    variant: str = "plain",
    addends: Iterable[int] = (),
) -> onnx.ModelProto:
    """The graph of `layers`; each layer of `addends` (inner layers of the group) takes a per-row
    addend to its output as a graph input."""
    addends = frozenset(addends)
    outside = sorted(i for i in addends if not layers.start <= i < layers.stop - 1)
    if outside:
        raise ExportError(
            f"addend layers {outside} are not inner layers of the group "
            f"{layers.start}-{layers.stop - 1} (its last layer is a boundary already)"
        )
    return LAYER_VARIANTS[variant](cfg, weights, layers, dtype, addends)


def addend_inputs(g: GraphBuilder, cfg: ModelConfig, names: dict) -> dict[int, str]:
    """The addend inputs of a layer group, by layer: `[batch, 1, hidden]`, added to every new
    position of the row after that layer. They let a hook change the residual stream inside a
    segment (a steering vector per row, zeros for rows it leaves alone), so an export needs a
    boundary only where the residual stream is read (the gate layer), not after every steered
    layer: fewer ONNX Runtime runs per token."""
    added = {}
    for layer, name in names["inputs"].get("addends", {}).items():
        added[int(layer)] = g.input(name, g.onnx_dtype, ["batch", 1, cfg.hidden_size])
    return added
