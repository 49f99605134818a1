"""One decoder layer in ONNX, written once and used by both layouts.

The layer reads its tensors through a `LayerWeights` accessor: inside the Loop body the
accessor Gathers the per-depth LoRA and vectors with the iteration number; in unrolled code
it names per-depth initializers. Shared weights are always the same root initializers.

Fusions (q/k/v and gate/up) happen here on the host, once: each fused group stores one
[in, sum(out)] weight, one LoRA A [.., in, sum(r)] (the A's concatenated along r) and one B
per part (no zero-padded block-diagonal B).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from edgeloop.compiler.onnx_graph import GraphBuilder
from edgeloop.spec import ModelSpec, Recursion


@dataclass(frozen=True)
class Group:
    """Linears that read the same input and run as one MatMul."""

    name: str
    parts: tuple[str, ...]


def layer_groups(spec: ModelSpec) -> tuple[Group, ...]:
    mlp_in = Group("gate_up", ("gate", "up")) if spec.gated_mlp else Group("up", ("up",))
    return (Group("qkv", ("q", "k", "v")), Group("o", ("o",)), mlp_in, Group("down", ("down",)))


# ---------------------------------------------------------------------------------------------
# host-side weight preparation (numpy)


def prepare_block(spec: ModelSpec, recursion: Recursion, tensors: dict, u: int) -> dict[str, np.ndarray]:
    """Fused, transposed tensors of block u. Keys: '{group}.W', '{group}.bias', '{group}.A',
    '{group}.B.{part}', and vector names. Per-depth tensors keep their leading [R] axis."""
    out: dict[str, np.ndarray] = {}
    prefix = f"blocks.{u}."
    for group in layer_groups(spec):
        out[f"{group.name}.W"] = np.concatenate([tensors[f"{prefix}{p}.weight"].T for p in group.parts], axis=1)
        if spec.linear_has_bias(group.parts[0]):
            out[f"{group.name}.bias"] = np.concatenate([tensors[f"{prefix}{p}.bias"] for p in group.parts], axis=-1)
        lora_parts = [p for p in group.parts if recursion.lora_ranks.get(p, 0) and f"{prefix}lora.{p}.A" in tensors]
        if lora_parts:
            # A [R, r, in] -> [R, in, r], concatenated along r
            out[f"{group.name}.A"] = np.concatenate(
                [tensors[f"{prefix}lora.{p}.A"].transpose(0, 2, 1) for p in lora_parts], axis=2)
            for p in lora_parts:
                out[f"{group.name}.B.{p}"] = tensors[f"{prefix}lora.{p}.B"].transpose(0, 2, 1)  # [R, r, out]
    for name in spec.vector_shapes():
        if not name.endswith(".bias") or name.split(".")[0] in ("input_norm", "post_norm"):
            out[name] = tensors[prefix + name]
    return out


# ---------------------------------------------------------------------------------------------
# weight accessors


class LayerWeights(ABC):
    """Names, in the graph being built, of what one depth position reads."""

    def __init__(self, g: GraphBuilder, spec: ModelSpec, recursion: Recursion, block: int,
                 prepared: dict[str, np.ndarray], lora_dtype=np.float32):
        self.g, self.spec, self.recursion, self.block = g, spec, recursion, block
        self.prepared = prepared
        self.lora_dtype = np.dtype(lora_dtype)

    def shared(self, key: str) -> str:
        """A block weight stored once (root initializer), created on first use."""
        name = f"b{self.block}.{key}"
        if name not in self.g.root.initializers:
            self.g.initializer(name, self.prepared[key].astype(self.g.float_dtype), "shared")
        return name

    @abstractmethod
    def per_depth(self, key: str) -> str:
        """This depth's slice of a per-depth tensor (LoRA factor, norm vector, bias)."""

    def vector(self, key: str) -> str | None:
        if key not in self.prepared:
            return None
        return self.per_depth(key) if self.recursion.per_depth_vectors else self.shared(key)

    def bias(self, group: str) -> str | None:
        return self.vector(f"{group}.bias")

    def lora(self, group: Group) -> tuple[str, list[tuple[str, str, int]]] | None:
        """(A [in, r_total], [(part, B [r, out], r)]) for this depth, or None."""
        if f"{group.name}.A" not in self.prepared:
            return None
        a = self.per_depth(f"{group.name}.A")
        parts = [(p, self.per_depth(f"{group.name}.B.{p}"), self.prepared[f"{group.name}.B.{p}"].shape[1])
                 for p in group.parts if f"{group.name}.B.{p}" in self.prepared]
        return a, parts

    def _to_float(self, name: str, key: str) -> str:
        is_lora = ".A" in key or ".B." in key
        if is_lora and self.lora_dtype != self.g.float_dtype:
            from edgeloop.compiler.onnx_graph import DTYPES

            return self.g.op("Cast", name, to=DTYPES[self.g.float_dtype])
        return name


class LoopWeights(LayerWeights):
    """Inside a Loop body: the iteration number picks this depth's tensors.

    All per-depth tensors of the block (LoRA A and B, norm vectors, biases) are packed into
    one [R, total] stack per storage dtype, so each iteration runs one Gather and one Split
    instead of a dozen small Gathers: per-op overhead, not bytes, dominated here (measured).
    """

    def __init__(self, *args, iteration: str, **kw):
        super().__init__(*args, **kw)
        self.iteration = iteration
        self._cache: dict[str, str] | None = None

    def _per_depth_keys(self) -> list[str]:
        keys = [k for k in self.prepared if ".A" in k or ".B." in k]
        if self.recursion.per_depth_vectors:
            keys += [k for k in self.prepared if not k.endswith((".W", ".A")) and ".B." not in k]
        return keys

    def _unpack(self) -> dict[str, str]:
        by_dtype: dict[np.dtype, list[str]] = {}
        for key in self._per_depth_keys():
            is_lora = ".A" in key or ".B." in key
            by_dtype.setdefault(self.lora_dtype if is_lora else self.g.float_dtype, []).append(key)
        names: dict[str, str] = {}
        for dtype, keys in by_dtype.items():
            arrays = [self.prepared[k] for k in keys]
            repeats = arrays[0].shape[0]
            flat = np.concatenate([a.reshape(repeats, -1) for a in arrays], axis=1).astype(dtype)
            kind = "lora" if any(".A" in k or ".B." in k for k in keys) else "per_depth"
            stack = self.g.initializer(f"b{self.block}.per_depth.{np.dtype(dtype).name}", flat, kind)
            row = self.g.op("Gather", stack, self.iteration, axis=0, name=f"b{self.block}_depth_row")
            sizes = [int(np.prod(a.shape[1:])) for a in arrays]
            parts = self.g.op("Split", row, self.g.const(sizes), axis=0, outputs=len(keys), name="depth_part")
            parts = [parts] if len(keys) == 1 else parts
            for key, part, a in zip(keys, parts, arrays):
                if a.ndim > 2:
                    part = self.g.op("Reshape", part, self.g.const(list(a.shape[1:])), name=key.replace(".", "_"))
                names[key] = self._to_float(part, key)
        return names

    def per_depth(self, key: str) -> str:
        if self._cache is None:
            self._cache = self._unpack()
        return self._cache[key]


class DepthWeights(LayerWeights):
    """Unrolled code: depth `repeat` of the block reads its own slices, stored as initializers."""

    def __init__(self, *args, repeat: int, depth: int, **kw):
        super().__init__(*args, **kw)
        self.repeat, self.depth = repeat, depth

    def per_depth(self, key: str) -> str:
        name = f"d{self.depth}.{key}"
        if name not in self.g.root.initializers:
            kind = "lora" if ".A" in key or ".B." in key else "per_depth"
            dtype = self.lora_dtype if kind == "lora" else self.g.float_dtype
            self.g.initializer(name, self.prepared[key][self.repeat].astype(dtype), kind)
        return self._to_float(name, key)


# ---------------------------------------------------------------------------------------------
# the layer


@dataclass
class AttentionInputs:
    """Depth-independent values computed once in the main graph."""

    cos_q: str | None  # [t, 1, 1, rotary_dim]
    sin_q: str | None
    cos_k: str | None  # [t, 1, rotary_dim]
    sin_k: str | None
    past_mask: str | None  # [rep * t, capacity] additive
    new_mask: str | None  # [rep * t, t] additive (causal)
    split_sizes: str | None  # [capacity, t]
    # GroupQueryAttention writing into the host's KV buffers in place (unrolled layout):
    seqlens_k: str | None = None  # int32 [b]: past_len + t - 1
    total_len: str | None = None  # int32 []: past_len + t
    rotary_cache: tuple[str, str] | None = None  # (cos, sin) [max_position, rotary_dim / 2]: GQA rotates


def emit_layer(g: GraphBuilder, spec: ModelSpec, w: LayerWeights, x: str, att: AttentionInputs,
               past_k: str, past_v: str, delta: str | None = None) -> tuple[str, str | None, str, str]:
    """The hidden state x + delta [b, t, H] (delta: a residual branch not yet added, or None) ->
    (x_out, delta_out, new_k, new_v); new_k/new_v [b, kvh, t, hd] after RoPE.

    Residual adds are left pending and done by the next norm (`residual_norm`: one fused
    Skip*Normalization node instead of Add + norm), as onnxruntime-genai's graphs do: at small
    widths per-node overhead, not arithmetic, is the cost of a decode step."""
    groups = {gr.name: gr for gr in layer_groups(spec)}
    h, x = residual_norm(g, spec, x, delta, w.vector("input_norm.weight"), w.vector("input_norm.bias"))
    q, k, v = _linear(g, w, groups["qkv"], h)
    attention = _attention_gqa if att.seqlens_k else _attention
    attn, new_k, new_v = attention(g, spec, w, q, k, v, att, past_k, past_v)
    attn = _linear(g, w, groups["o"], attn)[0]
    if spec.parallel_residual:
        h2 = _norm(g, spec, x, w.vector("post_norm.weight"), w.vector("post_norm.bias"))
        return g.op("Add", x, attn, name="residual"), _mlp(g, spec, w, groups, h2), new_k, new_v
    h2, x = residual_norm(g, spec, x, attn, w.vector("post_norm.weight"), w.vector("post_norm.bias"))
    return x, _mlp(g, spec, w, groups, h2), new_k, new_v


def residual_norm(g: GraphBuilder, spec: ModelSpec, x: str, delta: str | None, weight: str,
                  bias: str | None) -> tuple[str, str]:
    """(norm(x + delta), x + delta) as one contrib node; just (norm(x), x) when delta is None."""
    if delta is None:
        return _norm(g, spec, x, weight, bias), x
    if spec.norm == "layer":
        outs = g.ms("SkipLayerNormalization", delta, x, weight, bias or "", epsilon=spec.norm_eps, outputs=4,
                    name="skip_layernorm")
    else:
        outs = g.ms("SkipSimplifiedLayerNormalization", delta, x, weight, epsilon=spec.norm_eps, outputs=4,
                    name="skip_rmsnorm")
    return outs[0], outs[3]


def _norm(g: GraphBuilder, spec: ModelSpec, x: str, weight: str, bias: str | None, eps: float | None = None) -> str:
    eps = spec.norm_eps if eps is None else eps
    if spec.norm == "layer":
        return g.op("LayerNormalization", x, weight, bias, axis=-1, epsilon=eps, name="layernorm")
    return g.op("RMSNormalization", x, weight, axis=-1, epsilon=eps, name="rmsnorm")


def _linear(g: GraphBuilder, w: LayerWeights, group: Group, x: str) -> list[str]:
    """The fused MatMul of a group plus its per-depth LoRA; returns one output per part."""
    y = g.op("MatMul", x, w.shared(f"{group.name}.W"), name=group.name)
    bias = w.bias(group.name)
    if bias:
        y = g.op("Add", y, bias, name=f"{group.name}_bias")
    sizes = [w.spec.linear_shapes()[p][0] for p in group.parts]
    parts = g.op("Split", y, g.const(sizes), axis=-1, outputs=len(sizes), name=group.name) if len(sizes) > 1 else y
    parts = list(parts) if len(sizes) > 1 else [parts]
    lora = w.lora(group)
    if lora:
        a, bs = lora
        hidden = g.op("MatMul", x, a, name=f"{group.name}_lora_a")  # [b, t, r_total]
        pieces = (g.op("Split", hidden, g.const([r for _, _, r in bs]), axis=-1, outputs=len(bs),
                       name=f"{group.name}_lora_h") if len(bs) > 1 else [hidden])
        pieces = list(pieces) if len(bs) > 1 else pieces
        for (part, b, _), piece in zip(bs, pieces):
            i = group.parts.index(part)
            parts[i] = g.op("Add", parts[i], g.op("MatMul", piece, b, name=f"{part}_lora_b"), name=f"{part}_lora")
    return parts


def _rope(g: GraphBuilder, spec: ModelSpec, x: str, cos: str, sin: str) -> str:
    rd, hd = spec.rotary_dim, spec.head_dim
    rot, rest = (g.op("Split", x, g.const([rd, hd - rd]), axis=-1, outputs=2, name="rope_split")
                 if rd < hd else (x, None))
    x1, x2 = g.op("Split", rot, g.const([rd // 2, rd // 2]), axis=-1, outputs=2, name="rope_half")
    rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1, name="rotate_half")
    out = g.op("Add", g.op("Mul", rot, cos), g.op("Mul", rotated, sin), name="rope")
    return g.op("Concat", out, rest, axis=-1, name="rope_full") if rest else out


def _attention(g: GraphBuilder, spec: ModelSpec, w: LayerWeights, q: str, k: str, v: str, att: AttentionInputs,
               past_k: str, past_v: str) -> tuple[str, str, str]:
    kvh, hd = spec.num_kv_heads, spec.head_dim
    rep = spec.num_heads // kvh
    # q heads grouped by their kv head: [b, t, kvh, rep, hd]; GQA needs no K/V repeat this way.
    q = g.op("Reshape", q, g.const([0, 0, kvh, rep, hd]), name="q_heads")
    k = g.op("Reshape", k, g.const([0, 0, kvh, hd]), name="k_heads")
    v = g.op("Reshape", v, g.const([0, 0, kvh, hd]), name="v_heads")
    if spec.qk_norm:
        q = _norm(g, spec, q, w.vector("q_norm.weight"), None)
        k = _norm(g, spec, k, w.vector("k_norm.weight"), None)
    q = _rope(g, spec, q, att.cos_q, att.sin_q)
    k = _rope(g, spec, k, att.cos_k, att.sin_k)
    q = g.op("Transpose", q, perm=[0, 2, 3, 1, 4], name="q_t")  # [b, kvh, rep, t, hd]
    q = g.op("Reshape", q, g.const([0, 0, -1, hd]), name="q_rows")  # [b, kvh, rep*t, hd]
    new_k = g.op("Transpose", k, perm=[0, 2, 1, 3], name="new_k")  # [b, kvh, t, hd]
    new_v = g.op("Transpose", v, perm=[0, 2, 1, 3], name="new_v")
    scale = 1.0 / float(np.sqrt(hd))
    # Two-part softmax: the host-owned past buffer (masked to past_len) and the new tokens.
    s_past = g.ms("FusedMatMul", q, past_k, transB=1, alpha=scale, name="scores_past")
    s_new = g.ms("FusedMatMul", q, new_k, transB=1, alpha=scale, name="scores_new")
    s = g.op("Concat", g.op("Add", s_past, att.past_mask), g.op("Add", s_new, att.new_mask), axis=-1, name="scores")
    p = g.op("Softmax", s, axis=-1, name="probs")
    p_past, p_new = g.op("Split", p, att.split_sizes, axis=-1, outputs=2, name="probs")
    o = g.op("Add", g.op("MatMul", p_past, past_v), g.op("MatMul", p_new, new_v), name="attn")  # [b, kvh, rep*t, hd]
    o = g.op("Reshape", o, g.const([0, kvh, rep, -1, hd]), name="attn_heads")
    o = g.op("Transpose", o, perm=[0, 3, 1, 2, 4], name="attn_t")  # [b, t, kvh, rep, hd]
    o = g.op("Reshape", o, g.const([0, 0, -1]), name="attn_flat")
    return o, new_k, new_v


def _attention_gqa(g: GraphBuilder, spec: ModelSpec, w: LayerWeights, q: str, k: str, v: str, att: AttentionInputs,
                   past_k: str, past_v: str) -> tuple[str, str, str]:
    """com.microsoft.GroupQueryAttention over buffers the host binds as both past and present.

    The op applies RoPE itself when the rotary is full-width (every family but GPT-NeoX's partial
    rotary, which runs our own ops first; Qwen3's q/k norm runs before it). It appends the new K/V into the shared buffer at past_len and attends in place.
    Returns (output, present_k, present_v); the presents alias the host buffers.
    """
    kvh, hd = spec.num_kv_heads, spec.head_dim
    if spec.qk_norm or not att.rotary_cache:
        q = g.op("Reshape", q, g.const([0, 0, spec.num_heads, hd]), name="q_heads")
        k = g.op("Reshape", k, g.const([0, 0, kvh, hd]), name="k_heads")
        if spec.qk_norm:
            q = _norm(g, spec, q, w.vector("q_norm.weight"), None)
            k = _norm(g, spec, k, w.vector("k_norm.weight"), None)
        if not att.rotary_cache:
            q = _rope(g, spec, q, att.cos_k, att.sin_k)  # cos_k is [t, 1, rd]: broadcasts over any head count
            k = _rope(g, spec, k, att.cos_k, att.sin_k)
        q = g.op("Reshape", q, g.const([0, 0, -1]), name="q_flat")
        k = g.op("Reshape", k, g.const([0, 0, -1]), name="k_flat")
    rotary = {"do_rotary": 1, "rotary_interleaved": 0} if att.rotary_cache else {}
    out, present_k, present_v = g.ms("GroupQueryAttention", q, k, v, past_k, past_v, att.seqlens_k, att.total_len,
                                     *(att.rotary_cache or ()), num_heads=spec.num_heads, kv_num_heads=kvh,
                                     scale=1.0 / float(np.sqrt(hd)), outputs=3, name="gqa", **rotary)
    return out, present_k, present_v


def _mlp(g: GraphBuilder, spec: ModelSpec, w: LayerWeights, groups: dict, x: str) -> str:
    if spec.gated_mlp:
        gate, up = _linear(g, w, groups["gate_up"], x)
        h = g.op("Mul", _act(g, spec, gate), up, name="glu")
    else:
        h = _act(g, spec, _linear(g, w, groups["up"], x)[0])
    return _linear(g, w, groups["down"], h)[0]


def _act(g: GraphBuilder, spec: ModelSpec, x: str) -> str:
    if spec.activation == "silu":
        return g.op("Mul", x, g.op("Sigmoid", x), name="silu")
    return g.op("Gelu", x, approximate="tanh" if spec.activation == "gelu_tanh" else "none", name="gelu")
