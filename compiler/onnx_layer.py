"""One decoder layer in ONNX, written once and used by every graph (fused unrolled, Loop body,
host-driven block step).

The layer reads its tensors through a `LayerWeights` accessor over the shared block layout
(`block_layout.BlockTensors`); the accessor decides how a depth selects its per-depth tensors:

- `FixedDepth` (unrolled graphs): each depth's slices are their own initializers;
- `GatheredDepth` with a scalar index (Loop body: the iteration number) or a per-row index
  [b] (block step: rows at different depths): all per-depth tensors of the block are packed
  into one [R, total] stack per storage dtype, so one Gather and one Split select them — per-op
  overhead, not bytes, dominated the Loop body (measured).

Shared weights are always the same root initializers, stored once. A per-row selection gives
[b, ...] tensors: LoRA factors become batched matmuls, norm weights a multiply after a unit norm.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from edgeloop.compiler.block_layout import BlockTensors, Group, LayerPlan
from edgeloop.compiler.onnx_graph import DTYPES, GraphBuilder
from edgeloop.spec import ModelSpec

# Initializer kinds (the quantizer selects by kind, the graph statistics sum bytes by kind)
SHARED, LORA, PER_DEPTH, EMBEDDING, OTHER = "shared", "lora", "per_depth", "embedding", "other"


@dataclass(frozen=True)
class DepthTensor:
    """A per-depth tensor of a block: its key, kind and the array with a leading [R] axis, in the
    orientation ONNX reads it (A [R, in, r], B [R, r, out], vectors and biases [R, n])."""

    key: str
    kind: str
    array: np.ndarray


def depth_tensors(bt: BlockTensors) -> list[DepthTensor]:
    out = []
    for g in bt.groups:
        if g.name in bt.lora_a:
            out.append(DepthTensor(f"{g.name}.A", LORA, bt.lora_a[g.name].transpose(0, 2, 1)))
            for m, b in bt.lora_b[g.name].items():
                out.append(DepthTensor(f"{g.name}.B.{m}", LORA, b.transpose(0, 2, 1)))
        if bt.per_depth and g.name in bt.biases:
            out.append(DepthTensor(f"{g.name}.bias", PER_DEPTH, bt.biases[g.name]))
    if bt.per_depth:
        out += [DepthTensor(name, PER_DEPTH, v) for name, v in bt.vectors.items()]
    return out


# ---------------------------------------------------------------------------------------------
# weight accessors


@dataclass(frozen=True)
class LoraPlan:
    """How a group's LoRA enters its matmul: x A [* mask] B (b: block-diagonal over the members,
    added before the group's split), or per member (members: (name, B, columns) after the split)."""

    a: str
    b: str | None
    members: list
    mask: str | None = None  # [b, 1, columns]: per-row depth selection (the block step)


class LayerWeights(ABC):
    """Names, in the graph being built, of what one depth position (or one row's depth) reads.

    Every graph stores a depth's tensors as the initializers `d{depth}.{key}` (the depth
    position of repeat r of the block), so the entry points of an artifact share them on disk."""

    per_row = False  # per-depth tensors come out [b, ...] (rows at different depths)

    def __init__(self, g: GraphBuilder, bt: BlockTensors, depths: list[int], lora_dtype=np.float32):
        self.g, self.bt, self.depths = g, bt, depths  # depths[r]: the depth position of repeat r
        self.lora_dtype = np.dtype(lora_dtype)
        self._depth = {t.key: t for t in depth_tensors(bt)}

    def depth_initializer(self, key: str, repeat: int) -> str:
        """The initializer holding repeat `repeat`'s slice of a per-depth tensor (created on first use)."""
        t = self._depth[key]
        name = f"d{self.depths[repeat]}.{key}"
        if name not in self.g.root.initializers:
            dtype = self.lora_dtype if t.kind == LORA else self.g.float_dtype
            self.g.initializer(name, t.array[repeat].astype(dtype), t.kind)
        return name

    def shared(self, key: str, array: np.ndarray) -> str:
        """A block tensor stored once (root initializer), created on first use."""
        name = f"b{self.bt.block}.{key}"
        if name not in self.g.root.initializers:
            self.g.initializer(name, array.astype(self.g.float_dtype), SHARED)
        return name

    @abstractmethod
    def per_depth(self, key: str) -> str:
        """This depth's slice of a per-depth tensor."""

    def weight(self, group: Group) -> str:
        return self.shared(f"{group.name}.W", self.bt.weights[group.name].T)  # [in, out]

    def vector(self, name: str) -> str | None:
        """A norm weight or bias: [n] (shared or fixed depth) or [b, 1, n] (per row)."""
        if name not in self.bt.vectors:
            return None
        return self.per_depth(name) if self.bt.per_depth else self.shared(name, self.bt.vectors[name][0])

    def bias(self, group: Group) -> str | None:
        if group.name not in self.bt.biases:
            return None
        key = f"{group.name}.bias"
        return self.per_depth(key) if self.bt.per_depth else self.shared(key, self.bt.biases[group.name][0])

    def lora(self, group: Group) -> LoraPlan | None:
        """This depth's LoRA of a group: A [in, r_total], then one matmul per member's B after the
        group's split. A block-diagonal B [r_total, out_total] (one matmul and add before the split)
        was measured on the bundled model's fused graph (int4, 2 threads, `edgeloop bench`, 5-7
        interleaved rounds): no gain at rank 8 (657 vs 653 tok/s) and 6-9% slower at rank 32 (the
        zeros triple the B matmul of q/k/v), so only the block step, whose rows need every depth's
        factors at once, uses the block-diagonal form (GatheredDepth.lora)."""
        if group.name not in self.bt.lora_a:
            return None
        members = [m for m in group.members if m.rank and m.name in self.bt.lora_b[group.name]]
        a = self.per_depth(f"{group.name}.A")
        return LoraPlan(a, None, [(m.name, self.per_depth(f"{group.name}.B.{m.name}"), m.rank) for m in members])

    def _padded_b(self, group: Group, member, b: str) -> str:
        """A member's B [r, out_m] padded to the group's output columns: [r, out_total]."""
        g = self.g.root
        right = group.out_features - member.out_offset - member.out_features
        if member.out_offset == 0 and right == 0:
            return b
        return g.op("Pad", b, g.const([0, member.out_offset, 0, right]), name=f"{member.name}_lora_b_cols")

    def _stack_rows(self, blocks: list[str], name: str) -> str:
        """Concat along the rank rows; the name carries `.per_depth.` so the compile-time optimizer
        leaves it for ORT to fold at load (compiler/onnx_pipeline.py)."""
        if len(blocks) == 1:
            return blocks[0]
        g = self.g.root
        if name not in g.initializers and not any(name == o for n in g.nodes for o in n.output):
            g.op_to("Concat", blocks, [name], axis=0)
        return name

    def _as_float(self, name: str, kind: str) -> str:
        if kind == LORA and self.lora_dtype != self.g.float_dtype:
            return self.g.op("Cast", name, to=DTYPES[self.g.float_dtype])
        return name


class FixedDepth(LayerWeights):
    """Unrolled code: repeat `repeat` of the block reads its own initializers."""

    def __init__(self, g, bt, depths: list[int], *, repeat: int, lora_dtype=np.float32):
        super().__init__(g, bt, depths, lora_dtype)
        self.repeat = repeat

    def per_depth(self, key: str) -> str:
        return self._as_float(self.depth_initializer(key, self.repeat), self._depth[key].kind)


class GatheredDepth(LayerWeights):
    """A depth index selects the per-depth tensors: a scalar (Loop iteration) or one per row [b]."""

    def __init__(self, g, bt, depths: list[int], *, index: str, per_row: bool, lora_dtype=np.float32):
        super().__init__(g, bt, depths, lora_dtype)
        self.index, self.per_row = index, per_row
        self._names: dict[str, str] | None = None

    def _stack(self, items: list[DepthTensor], dtype) -> str:
        """[R, total]: every repeat's tensors flattened and concatenated. Built from the per-depth
        initializers with constant nodes, which ORT folds when the session loads: on disk the
        tensors stay the ones the unrolled graph reads (stored once per artifact)."""
        g = self.g.root
        name = f"b{self.bt.block}.per_depth.{np.dtype(dtype).name}"
        if name in g.initializers or any(name == o for n in g.nodes for o in n.output):
            return name
        rows = []
        for r in range(items[0].array.shape[0]):
            flat = [g.op("Reshape", self.depth_initializer(t.key, r), g.const([1, -1])) for t in items]
            rows.append(g.op("Concat", *flat, axis=1) if len(flat) > 1 else flat[0])
        g.op_to("Concat", rows, [name], axis=0)
        return name

    def _unpack(self) -> dict[str, str]:
        by_dtype: dict[np.dtype, list[DepthTensor]] = {}
        for t in self._depth.values():
            if self.per_row and t.kind == LORA:
                continue  # per-row LoRA is masked, not gathered (lora() below)
            by_dtype.setdefault(self.lora_dtype if t.kind == LORA else self.g.float_dtype, []).append(t)
        names: dict[str, str] = {}
        for dtype, items in by_dtype.items():
            stack_name = self._stack(items, dtype)
            row = self.g.op("Gather", stack_name, self.index, axis=0, name=f"b{self.bt.block}_depth_row")
            sizes = [int(np.prod(t.array.shape[1:])) for t in items]
            axis = 1 if self.per_row else 0
            parts = self.g.op("Split", row, self.g.const(sizes), axis=axis, outputs=len(items), name="depth_part")
            parts = [parts] if len(items) == 1 else parts
            for t, part in zip(items, parts):
                if t.array.ndim > 2:  # a matrix: [b, in, r] per row, [in, r] for a scalar index
                    shape = ([0] if self.per_row else []) + list(t.array.shape[1:])
                    part = self.g.op("Reshape", part, self.g.const(shape), name=t.key.replace(".", "_"))
                elif self.per_row:  # a vector: [b, 1, n] broadcasts over the tokens of the row
                    part = self.g.op("Unsqueeze", part, self.g.const([1]), name=t.key.replace(".", "_"))
                names[t.key] = self._as_float(part, t.kind)
        return names

    def per_depth(self, key: str) -> str:
        if self._names is None:
            self._names = self._unpack()
        return self._names[key]

    def lora(self, group: Group):
        """Rows at different depths: every depth's LoRA at once, masked to the row's own depth.

        A row's update is x A_d B_d. With A_all = [A_0 .. A_{R-1}] (columns) and B_all = [B_0; ..;
        B_{R-1}] (rows), x A_all masked to the columns of depth d, times B_all, is exactly that: one
        pair of plain matmuls whose weights are read once for the whole batch. Gathering each row's
        factors instead copied them per row and call (~0.6 MB per layer and row at rank 32 on the
        bundled model), which cost more than the block's arithmetic. The extra flops (R x the LoRA's)
        are small next to the shared weights'."""
        if not self.per_row:  # a Loop body: the iteration's factors, gathered from the stack
            return super().lora(group)
        if group.name not in self.bt.lora_a:
            return None
        members = [m for m in group.members if m.rank and m.name in self.bt.lora_b[group.name]]
        reps = self.bt.lora_a[group.name].shape[0]
        a = self._depth[f"{group.name}.A"]
        g = self.g.root
        # columns member-major, depth-minor: [m0: d0 .. dR-1][m1: d0 ..]; B's rows in the same order
        cols, rows, col_depth = [], [], []
        for m in members:
            for r in range(reps):
                cols.append(g.op("Slice", self.depth_initializer(a.key, r), g.const([m.rank_offset]),
                                 g.const([m.rank_offset + m.rank]), g.const([1])))
                rows.append(self._padded_b(group, m, self.depth_initializer(f"{group.name}.B.{m.name}", r)))
                col_depth += [r] * m.rank
        stem = f"b{self.bt.block}.per_depth.{group.name}"
        a_all = f"{stem}.A_all"
        if not any(a_all == o for n in g.nodes for o in n.output):
            g.op_to("Concat", cols, [a_all], axis=1)
        b_all = self._stack_rows(rows, f"{stem}.B_all")
        return LoraPlan(self._as_float(a_all, LORA), self._as_float(b_all, LORA), [], self._depth_mask(col_depth))

    def _depth_mask(self, col_depth: list[int]) -> str:
        """[b, 1, columns]: 1 on the columns of each row's depth, 0 elsewhere."""
        key = tuple(col_depth)
        cache = self.__dict__.setdefault("_masks", {})
        if key not in cache:
            g = self.g
            row_depth = g.op("Unsqueeze", self.index, g.const([1, 2]), name="row_depth")  # [b, 1, 1]
            same = g.op("Equal", row_depth, g.const(np.asarray(col_depth, np.int64)), name="depth_columns")
            cache[key] = g.op("Cast", same, to=DTYPES[g.float_dtype], name="depth_mask")
        return cache[key]


# ---------------------------------------------------------------------------------------------
# attention inputs, computed once per graph


@dataclass
class AttentionInputs:
    """Depth-independent values of one graph (positions are per row: past_len [b] + arange(t))."""

    cos_q: str | None  # [b, t, 1, 1, rotary_dim] (q as [b, t, kvh, rep, hd])
    sin_q: str | None
    cos_k: str | None  # [b, t, 1, rotary_dim]
    sin_k: str | None
    past_mask: str | None  # additive, broadcasts to [b, kvh, rep * t, capacity]
    new_mask: str | None  # additive [rep * t, t] (causal among the new tokens)
    split_sizes: str | None  # [capacity, t]
    # GroupQueryAttention writing into the host's KV buffers in place (fused unrolled graphs):
    seqlens_k: str | None = None  # int32 [b]: past_len + t - 1
    total_len: str | None = None  # int32 []: max(past_len) + t
    rotary_cache: tuple[str, str] | None = None  # (cos, sin) [max_position, rotary_dim / 2]: GQA rotates


def gqa_supported(spec: ModelSpec) -> bool:
    """ORT's GroupQueryAttention (CPU) needs head_dim % 8 == 0 and has no per-query sliding window here."""
    windowed = spec.sliding_window and spec.sliding_window < spec.max_position
    return spec.head_dim % 8 == 0 and not windowed


def gqa_rotates(spec: ModelSpec) -> bool:
    """GQA's own rotary (do_rotary) needs full-width rotary and head_dim % 16 == 0."""
    return spec.rotary_dim == spec.head_dim and spec.head_dim % 16 == 0


def attention_inputs(g: GraphBuilder, spec: ModelSpec, seq: str, past_len: str, capacity: str | None,
                     *, gqa: bool, kv_valid: str | None = None, rope_only: bool = False) -> AttentionInputs:
    """RoPE rows of every row's new positions and the attention masks (see AttentionInputs).
    kv_valid [b, capacity] (bool): which cached positions a row may attend to (the host-driven loop:
    a position whose token left the loop before this depth holds nothing there); default: < past_len."""
    from edgeloop.spec import rope_tables

    rep = spec.num_heads // spec.num_kv_heads
    cos, sin = rope_tables(spec, spec.max_position)
    half = spec.rotary_dim // 2
    # The tables are stored half width (the rotate-half layout repeats them), the same bytes in every
    # entry point of the artifact; the full width is a constant Concat that ORT folds at load.
    cos_half = g.initializer("rope.cos_half", cos[:, :half].astype(g.float_dtype)) \
        if "rope.cos_half" not in g.root.initializers else "rope.cos_half"
    sin_half = g.initializer("rope.sin_half", sin[:, :half].astype(g.float_dtype)) \
        if "rope.sin_half" not in g.root.initializers else "rope.sin_half"
    if gqa:
        total = g.op("Add", g.op("ReduceMax", past_len, keepdims=0), seq, name="total_len")
        total_len = g.op("Cast", total, to=DTYPES[np.dtype("int32")], name="total_len_i32")
        seqlens_k = g.op("Cast", g.op("Sub", g.op("Add", past_len, seq), g.const(1)), to=DTYPES[np.dtype("int32")],
                         name="seqlens_k")
        if gqa_rotates(spec):  # GQA rotates q and k itself at the positions it derives from seqlens_k
            return AttentionInputs(None, None, None, None, None, None, None, seqlens_k, total_len,
                                   (cos_half, sin_half))
    cos_t = g.op("Concat", cos_half, cos_half, axis=1, name="rope_cos")
    sin_t = g.op("Concat", sin_half, sin_half, axis=1, name="rope_sin")
    steps = g.op("Range", g.const(0), seq, g.const(1), name="steps")  # [t]
    positions = g.op("Add", g.op("Unsqueeze", past_len, g.const([1])), g.op("Unsqueeze", steps, g.const([0])),
                     name="positions")  # [b, t]
    cos_rows, sin_rows = g.op("Gather", cos_t, positions, axis=0), g.op("Gather", sin_t, positions, axis=0)
    rd = spec.rotary_dim
    cos_q = g.op("Reshape", cos_rows, g.const([0, 0, 1, 1, rd]), name="cos_q")
    sin_q = g.op("Reshape", sin_rows, g.const([0, 0, 1, 1, rd]), name="sin_q")
    cos_k = g.op("Reshape", cos_rows, g.const([0, 0, 1, rd]), name="cos_k")
    sin_k = g.op("Reshape", sin_rows, g.const([0, 0, 1, rd]), name="sin_k")
    if gqa:  # partial rotary or head_dim % 16 != 0: our own RoPE ops before the attention op
        return AttentionInputs(cos_q, sin_q, cos_k, sin_k, None, None, None, seqlens_k, total_len)
    if rope_only:
        return AttentionInputs(cos_q, sin_q, cos_k, sin_k, None, None, None)

    kpos = g.op("Range", g.const(0), capacity, g.const(1), name="kpos")  # [cap]
    valid = kv_valid or g.op("Less", g.op("Unsqueeze", kpos, g.const([0])), g.op("Unsqueeze", past_len, g.const([1])),
                             name="past_valid")  # [b, cap]
    qi = g.op("Tile", steps, g.const([rep]), name="q_step_rows")  # row r*t + i -> new token i
    causal = g.op("LessOrEqual", g.op("Unsqueeze", steps, g.const([0])), g.op("Unsqueeze", qi, g.const([1])),
                  name="causal")  # [rep*t, t]
    if spec.sliding_window:
        window = g.const(spec.sliding_window)
        qpos = g.op("Tile", positions, g.const([1, rep]), name="q_pos_rows")  # [b, rep*t]
        in_window = g.op("Greater", g.op("Unsqueeze", kpos, g.const([0, 1])),
                         g.op("Sub", g.op("Unsqueeze", qpos, g.const([2])), window))  # [b, rep*t, cap]
        valid = g.op("And", g.op("Unsqueeze", valid, g.const([1])), in_window)  # [b, rep*t, cap]
        causal = g.op("And", causal, g.op("Greater", g.op("Unsqueeze", steps, g.const([0])),
                                          g.op("Sub", g.op("Unsqueeze", qi, g.const([1])), window)))
    else:
        valid = g.op("Unsqueeze", valid, g.const([1]))  # [b, 1, cap]
    zero, neg = g.fconst(0.0), g.fconst(-np.inf)
    past_mask = g.op("Unsqueeze", g.op("Where", valid, zero, neg), g.const([1]), name="past_mask")  # [b, 1, ., cap]
    new_mask = g.op("Where", causal, zero, neg, name="new_mask")
    split_sizes = g.op("Concat", g.op("Unsqueeze", capacity, g.const([0])), g.op("Unsqueeze", seq, g.const([0])),
                       axis=0, name="split_sizes")
    return AttentionInputs(cos_q, sin_q, cos_k, sin_k, past_mask, new_mask, split_sizes)


# ---------------------------------------------------------------------------------------------
# the layer


def emit_layer(g: GraphBuilder, spec: ModelSpec, w: LayerWeights, x: str, att: AttentionInputs,
               past_k: str, past_v: str, delta: str | None = None) -> tuple[str, str | None, str, str]:
    """The hidden state x + delta [b, t, H] (delta: a residual branch not yet added, or None) ->
    (x_out, delta_out, new_k, new_v); new_k/new_v [b, kvh, t, hd] after RoPE (or, with GQA in place,
    the present buffers that alias the past ones).

    Residual adds are left pending and done by the next norm (one fused Skip*Normalization node
    instead of Add + norm), as onnxruntime-genai's graphs do: at small widths per-node overhead,
    not arithmetic, is the cost of a decode step."""
    plan = LayerPlan.of(spec)
    groups = {gr.name: gr for gr in w.bt.groups}
    h, x = residual_norm(g, spec, w, x, delta, "input_norm")
    q, k, v = linear(g, w, groups["qkv"], h)
    attention = _attention_gqa if att.seqlens_k else _attention
    attn, new_k, new_v = attention(g, spec, w, q, k, v, att, past_k, past_v)
    attn = linear(g, w, groups["o"], attn)[0]
    if plan.sandwich:
        attn = norm(g, spec, w, attn, "attn_out_norm")
    if plan.parallel_residual:
        h2 = norm(g, spec, w, x, "post_norm")
        return g.op("Add", x, attn, name="residual"), _mlp(g, spec, w, groups, h2, plan), new_k, new_v
    h2, x = residual_norm(g, spec, w, x, attn, "post_norm")
    return x, _mlp(g, spec, w, groups, h2, plan), new_k, new_v


def emit_kv(g: GraphBuilder, spec: ModelSpec, w: LayerWeights, x: str, att: AttentionInputs) -> tuple[str, str]:
    """Only the K/V a layer would store for hidden states x [b, t, H] (its input norm, k and v with this
    depth's LoRA, RoPE): what filling a skipped depth from a token's exit state needs."""
    groups = {gr.name: gr for gr in w.bt.groups}
    h = norm(g, spec, w, x, "input_norm")
    _, k, v = linear(g, w, groups["qkv"], h)
    kvh, hd = spec.num_kv_heads, spec.head_dim
    k = g.op("Reshape", k, g.const([0, 0, kvh, hd]), name="k_heads")
    v = g.op("Reshape", v, g.const([0, 0, kvh, hd]), name="v_heads")
    if spec.qk_norm:
        k = _head_norm(g, spec, w, k, "k_norm")
    k = _rope(g, spec, k, att.cos_k, att.sin_k)
    return g.op("Transpose", k, perm=[0, 2, 1, 3], name="fill_k"), g.op("Transpose", v, perm=[0, 2, 1, 3],
                                                                         name="fill_v")


def norm(g: GraphBuilder, spec: ModelSpec, w: LayerWeights, x: str, name: str) -> str:
    return residual_norm(g, spec, w, x, None, name)[0]


def residual_norm(g: GraphBuilder, spec: ModelSpec, w: LayerWeights, x: str, delta: str | None,
                  name: str) -> tuple[str, str]:
    """(norm(x + delta), x + delta), one contrib node when the weights are plain vectors."""
    weight, bias = w.vector(f"{name}.weight"), w.vector(f"{name}.bias")
    if w.per_row and w.bt.per_depth:  # [b, 1, H] weights: a unit norm, then the row's weight and bias
        if delta is not None:
            x = g.op("Add", x, delta, name="residual")
        ones = w.shared("norm.ones", np.ones(spec.hidden_size, np.float32))
        zeros = w.shared("norm.zeros", np.zeros(spec.hidden_size, np.float32)) if bias else None
        y = plain_norm(g, spec, x, ones, zeros)
        y = g.op("Mul", y, weight, name=f"{name}_w")
        return (g.op("Add", y, bias, name=f"{name}_b") if bias else y), x
    if delta is None:
        return plain_norm(g, spec, x, weight, bias), x
    if spec.norm == "layer":
        outs = g.ms("SkipLayerNormalization", delta, x, weight, bias or "", epsilon=spec.norm_eps, outputs=4,
                    name="skip_layernorm")
    else:
        outs = g.ms("SkipSimplifiedLayerNormalization", delta, x, weight, epsilon=spec.norm_eps, outputs=4,
                    name="skip_rmsnorm")
    return outs[0], outs[3]


def plain_norm(g: GraphBuilder, spec: ModelSpec, x: str, weight: str, bias: str | None) -> str:
    if spec.norm == "layer":
        return g.op("LayerNormalization", x, weight, bias, axis=-1, epsilon=spec.norm_eps, name="layernorm")
    return g.op("RMSNormalization", x, weight, axis=-1, epsilon=spec.norm_eps, name="rmsnorm")


def _head_norm(g: GraphBuilder, spec: ModelSpec, w: LayerWeights, x: str, name: str) -> str:
    """Qwen3's q/k RMSNorm over head_dim (x [..., hd])."""
    weight = w.vector(f"{name}.weight")
    if w.per_row and w.bt.per_depth:  # [b, 1, hd] -> [b, 1, 1, hd] against [b, t, heads, hd]
        ones = w.shared("head_norm.ones", np.ones(spec.head_dim, np.float32))
        y = g.op("RMSNormalization", x, ones, axis=-1, epsilon=spec.norm_eps, name="qk_norm")
        return g.op("Mul", y, g.op("Unsqueeze", weight, g.const([2])), name="qk_norm_w")
    return g.op("RMSNormalization", x, weight, axis=-1, epsilon=spec.norm_eps, name="qk_norm")


def linear(g: GraphBuilder, w: LayerWeights, group: Group, x: str) -> list[str]:
    """The fused MatMul of a group plus its per-depth LoRA; one output per member."""
    y = g.op("MatMul", x, w.weight(group), name=group.name)
    bias = w.bias(group)
    if bias:
        y = g.op("Add", y, bias, name=f"{group.name}_bias")
    lora = w.lora(group)
    hidden = None
    if lora:
        hidden = g.op("MatMul", x, lora.a, name=f"{group.name}_lora_a")  # [b, t, r_total]
        if lora.mask:  # per-row depths: every depth's columns computed, the row's own kept
            hidden = g.op("Mul", hidden, lora.mask, name=f"{group.name}_lora_depth")
        if lora.b:  # block-diagonal B: the whole group's update at once
            y = g.op("Add", y, g.op("MatMul", hidden, lora.b, name=f"{group.name}_lora_b"), name=f"{group.name}_lora")
    sizes = [m.out_features for m in group.members]
    parts = list(g.op("Split", y, g.const(sizes), axis=-1, outputs=len(sizes), name=group.name)) \
        if len(sizes) > 1 else [y]
    if lora and not lora.b and lora.members:
        pieces = list(g.op("Split", hidden, g.const([r for _, _, r in lora.members]), axis=-1,
                           outputs=len(lora.members), name=f"{group.name}_lora_h")) \
            if len(lora.members) > 1 else [hidden]
        for (member, b, _), piece in zip(lora.members, pieces):
            i = [m.name for m in group.members].index(member)
            parts[i] = g.op("Add", parts[i], g.op("MatMul", piece, b, name=f"{member}_lora_b"), name=f"{member}_lora")
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
    """Two-part softmax over the host's past buffer [b, kvh, cap, hd] (masked per row to its past
    length) and the new tokens (causal); returns the new K/V for the host to write in."""
    kvh, hd = spec.num_kv_heads, spec.head_dim
    rep = spec.num_heads // kvh
    # q heads grouped by their kv head: [b, t, kvh, rep, hd]; GQA needs no K/V repeat this way.
    q = g.op("Reshape", q, g.const([0, 0, kvh, rep, hd]), name="q_heads")
    k = g.op("Reshape", k, g.const([0, 0, kvh, hd]), name="k_heads")
    v = g.op("Reshape", v, g.const([0, 0, kvh, hd]), name="v_heads")
    if spec.qk_norm:
        q = _head_norm(g, spec, w, q, "q_norm") if not w.per_row else \
            g.op("Reshape", _head_norm(g, spec, w, g.op("Reshape", q, g.const([0, 0, -1, hd])), "q_norm"),
                 g.const([0, 0, kvh, rep, hd]))
        k = _head_norm(g, spec, w, k, "k_norm")
    q = _rope(g, spec, q, att.cos_q, att.sin_q)
    k = _rope(g, spec, k, att.cos_k, att.sin_k)
    q = g.op("Transpose", q, perm=[0, 2, 3, 1, 4], name="q_t")  # [b, kvh, rep, t, hd]
    q = g.op("Reshape", q, g.const([0, 0, -1, hd]), name="q_rows")  # [b, kvh, rep*t, hd]
    new_k = g.op("Transpose", k, perm=[0, 2, 1, 3], name="new_k")  # [b, kvh, t, hd]
    new_v = g.op("Transpose", v, perm=[0, 2, 1, 3], name="new_v")
    scale = 1.0 / float(np.sqrt(hd))
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
    """com.microsoft.GroupQueryAttention over buffers the host binds as both past and present: it
    appends the new K/V at each row's past length and attends in place (rows: decode tokens, or
    fresh prompts right-padded). RoPE inside the op when it can (`gqa_rotates`), ours otherwise."""
    kvh, hd = spec.num_kv_heads, spec.head_dim
    if spec.qk_norm or not att.rotary_cache:
        q = g.op("Reshape", q, g.const([0, 0, spec.num_heads, hd]), name="q_heads")
        k = g.op("Reshape", k, g.const([0, 0, kvh, hd]), name="k_heads")
        if spec.qk_norm:
            q = _head_norm(g, spec, w, q, "q_norm")
            k = _head_norm(g, spec, w, k, "k_norm")
        if not att.rotary_cache:
            q = _rope(g, spec, q, att.cos_k, att.sin_k)  # cos_k [b, t, 1, rd] broadcasts over any head count
            k = _rope(g, spec, k, att.cos_k, att.sin_k)
        q = g.op("Reshape", q, g.const([0, 0, -1]), name="q_flat")
        k = g.op("Reshape", k, g.const([0, 0, -1]), name="k_flat")
    rotary = {"do_rotary": 1, "rotary_interleaved": 0} if att.rotary_cache else {}
    out, present_k, present_v = g.ms("GroupQueryAttention", q, k, v, past_k, past_v, att.seqlens_k, att.total_len,
                                     *(att.rotary_cache or ()), num_heads=spec.num_heads, kv_num_heads=kvh,
                                     scale=1.0 / float(np.sqrt(hd)), outputs=3, name="gqa", **rotary)
    return out, present_k, present_v


def _mlp(g: GraphBuilder, spec: ModelSpec, w: LayerWeights, groups: dict, x: str, plan: LayerPlan) -> str:
    if spec.gated_mlp:
        gate, up = linear(g, w, groups["gate_up"], x)
        h = g.op("Mul", _act(g, spec, gate), up, name="glu")
    else:  # GPT-NeoX: the group holds `up` alone
        h = _act(g, spec, linear(g, w, groups["gate_up"], x)[0])
    out = linear(g, w, groups["down"], h)[0]
    return norm(g, spec, w, out, "mlp_out_norm") if plan.sandwich else out


def _act(g: GraphBuilder, spec: ModelSpec, x: str) -> str:
    if spec.activation == "silu":
        return g.op("Mul", x, g.op("Sigmoid", x), name="silu")
    return g.op("Gelu", x, approximate="tanh" if spec.activation == "gelu_tanh" else "none", name="gelu")
