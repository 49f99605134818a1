"""ONNX graphs of a recursive model: the fused forward graph and the host-driven loop's graphs.

Entry points (names and roles are written into the artifact contract; `b` rows, `t` new tokens
per row (right-padded), `cap` KV capacity, `n` logit positions per row):

  forward   input_ids [b, t]; past_len [b]; num_loops []; logit_positions [b, n]; the past K/V
            of every KV entry -> logits [b, n, V]; present K/V (the new tokens' K/V, or — with
            GroupQueryAttention in place — the bound buffers themselves).
            layout `unrolled`: one copy of the block per depth, all reading the same shared
            initializers, one KV entry per depth [b, kvh, cap, hd].
            layout `loop`: each looped stage is one ONNX Loop whose body is the K-layer block
            (per-depth tensors Gathered with the iteration number); a KV entry stacks the
            repeats of one block position [b, R, kvh, cap, hd].
  prologue  input_ids [b, t] -> hidden [b, t, H] (embedding)
  block     hidden [b, t, H]; depth [b]; past_len [b]; slot [b]; per block position k the KV
            pools [slots, kvh, cap, hd] -> hidden [b, t, H]; new K/V [b, kvh, t, hd] per k.
            One pass of the looped block, each row at its own depth (its LoRA, vectors and KV
            slot gathered per row): the host drives the loop, exits and mixes depths.
  kv_fill   hidden [b, t, H]; depth [b]; past_len [b] -> per block position k the K/V the layer would
            store at that depth (input norm, k/v with the depth's LoRA, RoPE): a token that left the
            loop early has its exit state copied forward to the depths it skipped
  epilogue  hidden [b, n, H] -> logits [b, n, V] (final norm + LM head)
The host-driven graphs exist when the model has a single looped stage (CYCLE sharing, or a
vanilla model): `loop.host_loop` in the contract.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx

from edgeloop.compiler.artifact import has_host_loop
from edgeloop.compiler.block_layout import BlockTensors, block_tensors
from edgeloop.compiler.onnx_graph import GraphBuilder
from edgeloop.compiler.onnx_layer import (EMBEDDING, SHARED, AttentionInputs, FixedDepth, GatheredDepth,
                                          attention_inputs, emit_kv, emit_layer, gqa_supported, plain_norm)
from edgeloop.spec import ModelSpec, Recursion

I64 = np.int64
KV_CHUNK = 256  # host KV buffers grow by this many positions


@dataclass
class BuiltGraph:
    """One entry point's graph: the builder (initializers and their kinds) and its contract entry."""

    name: str  # entry point name: forward | prologue | block | epilogue
    file: str  # the .onnx file it is saved as
    builder: GraphBuilder
    kv_inplace: bool = False  # forward: GroupQueryAttention writes the bound KV buffers in place

    def model(self) -> onnx.ModelProto:
        """The graph as an ONNX model. The weights move into it: the builder keeps no copy, so a large
        model holds each graph's weights once (the graph's names, kinds and contract stay)."""
        return self.builder.model()

    @property
    def kinds(self) -> dict[str, str]:
        return dict(self.builder.root.initializer_kind)


def block_depths(recursion: Recursion) -> dict[int, list[int]]:
    """Block u -> the depth position of each of its repeats."""
    out: dict[int, list[int]] = {}
    for d in recursion.depths():
        out.setdefault(d.block, []).append(d.index)
    return out


def fused_kv_entries(recursion: Recursion, layout: str) -> list[tuple[str, tuple[int, ...]]]:
    """(entry id, depths) of the host buffers of the fused graph: per block position of a looped
    stage (loop layout, stacked), else per depth."""
    entries, depth = [], 0
    for si, stage in enumerate(recursion.stages):
        span = len(stage.blocks) * stage.repeats
        if layout == "loop" and stage.repeats > 1:
            for k, _ in enumerate(stage.blocks):
                entries.append((f"s{si}.k{k}", tuple(depth + r * len(stage.blocks) + k for r in range(stage.repeats))))
        else:
            entries.extend((f"d{d}", (d,)) for d in range(depth, depth + span))
        depth += span
    return entries


# ---------------------------------------------------------------------------------------------
# shared pieces


def _embed(g: GraphBuilder, spec: ModelSpec, tensors: dict, ids: str) -> tuple[str, str]:
    """(hidden [b, t, H], the embedding initializer)."""
    embed = g.initializer("embed.weight", tensors["embed.weight"].astype(g.float_dtype), EMBEDDING)
    x = g.op("Gather", embed, ids, axis=0, name="embed")
    if spec.embed_scale != 1.0:
        x = g.op("Mul", x, g.fconst(spec.embed_scale), name="embed_scaled")
    return x, embed


def _head(g: GraphBuilder, spec: ModelSpec, tensors: dict, h: str, embed: str | None, *, normed: bool) -> str:
    """Final norm (unless already applied) and LM head: h [b, n, H] -> logits [b, n, V]."""
    fdt = g.float_dtype
    if not normed:
        w = g.initializer("final_norm.weight", tensors["final_norm.weight"].astype(fdt), SHARED)
        b = (g.initializer("final_norm.bias", tensors["final_norm.bias"].astype(fdt), SHARED)
             if "final_norm.bias" in tensors else None)
        h = plain_norm(g, spec, h, w, b)
    if spec.tie_embeddings:
        head = embed or g.initializer("embed.weight", tensors["embed.weight"].astype(fdt), EMBEDDING)
    else:
        head = g.initializer("lm_head.weight", tensors["lm_head.weight"].astype(fdt), EMBEDDING)
    flat = g.op("Reshape", h, g.const([-1, spec.hidden_size]), name="head_in")
    logits = g.op("Gemm", flat, head, transB=1, name="logits_flat")
    out_shape = g.op("Concat", g.op("Slice", g.op("Shape", h), g.const([0]), g.const([2])), g.const([-1]), axis=0)
    return g.op("Reshape", logits, out_shape, name="logits")


def _loop_norm(g: GraphBuilder, spec: ModelSpec, tensors: dict, x: str) -> str:
    """Ouro: the final norm closes every loop pass and its output feeds the next pass."""
    w = g.initializer("final_norm.weight", tensors["final_norm.weight"].astype(g.float_dtype), SHARED) \
        if "final_norm.weight" not in g.root.initializers else "final_norm.weight"
    return plain_norm(g, spec, x, w, None)


# ---------------------------------------------------------------------------------------------
# the fused forward graph


def build_forward(spec: ModelSpec, recursion: Recursion, tensors: dict, *, layout: str, float_dtype=np.float32,
                  lora_dtype=np.float32) -> tuple[BuiltGraph, bool]:
    """The fused graph and whether it writes its KV in place (GroupQueryAttention)."""
    inplace = layout == "unrolled" and gqa_supported(spec)
    g = GraphBuilder("edgeloop", float_dtype=float_dtype)
    fdt = g.float_dtype
    kvh, hd = spec.num_kv_heads, spec.head_dim

    ids = g.input("input_ids", I64, ["batch", "seq"], role="input_ids")
    past_len = g.input("past_len", I64, ["batch"], role="past_len")
    num_loops = g.input("num_loops", I64, [], role="loops")
    positions = g.input("logit_positions", I64, ["batch", "num_logits"], role="logit_positions")

    x, embed = _embed(g, spec, tensors, ids)
    entries = fused_kv_entries(recursion, layout)
    for eid, depths in entries:
        shape = ["batch"] + ([len(depths)] if layout == "loop" and len(depths) > 1 else []) + [kvh, "capacity", hd]
        g.input(f"past_key.{eid}", fdt, shape, role="past_key", kv=eid)
        g.input(f"past_value.{eid}", fdt, shape, role="past_value", kv=eid)
    seq = g.op("Gather", g.op("Shape", ids), g.const(1), axis=0, name="seq_len")
    cap_axis = 3 if layout == "loop" and len(entries[0][1]) > 1 else 2
    cap = g.op("Gather", g.op("Shape", f"past_key.{entries[0][0]}"), g.const(cap_axis), axis=0, name="capacity")
    att = attention_inputs(g, spec, seq, past_len, cap, gqa=inplace)

    layouts = {u: block_tensors(spec, recursion, tensors, u) for u in range(recursion.num_blocks)}
    depth_of = block_depths(recursion)
    present: dict[str, str] = {}
    depth, delta = 0, None  # delta: a residual branch not yet added to x (the next norm adds it)
    for si, stage in enumerate(recursion.stages):
        if layout == "loop" and stage.repeats > 1:
            if delta is not None:  # the Loop carries one hidden tensor
                x, delta = g.op("Add", x, delta, name="residual"), None
            x = _emit_loop(g, spec, tensors, layouts, depth_of, stage, si, x, att, num_loops, present, lora_dtype)
            depth += len(stage.blocks) * stage.repeats
            continue
        for r in range(stage.repeats):
            for u in stage.blocks:
                w = FixedDepth(g, layouts[u], depth_of[u], repeat=r, lora_dtype=lora_dtype)
                x, delta, nk, nv = emit_layer(g, spec, w, x, att, f"past_key.d{depth}", f"past_value.d{depth}", delta)
                present[f"d{depth}"] = (nk, nv)
                depth += 1
            if spec.loop_norm:
                if delta is not None:
                    x, delta = g.op("Add", x, delta, name="residual"), None
                x = _loop_norm(g, spec, tensors, x)

    if delta is not None:
        x = g.op("Add", x, delta, name="residual")
    # logits only where the host asks: per row [n] positions of its new tokens (last one, or all)
    h = g.op("GatherND", x, g.op("Unsqueeze", positions, g.const([2])), batch_dims=1, name="logit_rows")
    g.op_to("Identity", [_head(g, spec, tensors, h, embed, normed=spec.loop_norm)], ["logits"])
    g.output("logits", fdt, ["batch", "num_logits", spec.vocab_size], role="logits")
    for eid, depths in entries:
        stacked = layout == "loop" and len(depths) > 1
        shape = (["loops"] if stacked else []) + ["batch", kvh, "capacity" if inplace else "seq", hd]
        for kind, value in zip(("key", "value"), present[eid]):
            g.op_to("Identity", [value], [f"present_{kind}.{eid}"])
            g.output(f"present_{kind}.{eid}", fdt, shape, role=f"present_{kind}", kv=eid)
    return BuiltGraph("forward", "model.onnx", g, kv_inplace=inplace), inplace


def _emit_loop(g: GraphBuilder, spec, tensors, layouts: dict[int, BlockTensors], depth_of, stage, si, x,
               att: AttentionInputs, num_loops, present, lora_dtype) -> str:
    """One ONNX Loop running the stage's block `stage.repeats` times (or num_loops, if smaller)."""
    fdt = g.float_dtype
    body = GraphBuilder(f"stage{si}_block", parent=g, float_dtype=fdt)
    it = body.input(f"iter_{si}", np.int64, [])
    cond_in = body.input(f"cond_{si}", np.bool_, [])
    h = body.input(f"hidden_in_{si}", fdt, ["batch", "seq", spec.hidden_size])
    scan, delta = [], None
    for k, u in enumerate(stage.blocks):
        w = GatheredDepth(body, layouts[u], depth_of[u], index=it, per_row=False, lora_dtype=lora_dtype)
        eid = f"s{si}.k{k}"
        pk = body.op("Gather", f"past_key.{eid}", it, axis=1, name="past_k")  # this depth's buffer [b, kvh, cap, hd]
        pv = body.op("Gather", f"past_value.{eid}", it, axis=1, name="past_v")
        h, delta, nk, nv = emit_layer(body, spec, w, h, att, pk, pv, delta)
        scan += [(eid, "key", nk), (eid, "value", nv)]
    if delta is not None:
        h = body.op("Add", h, delta, name="residual")
    if spec.loop_norm:
        h = _loop_norm(body, spec, tensors, h)
    # The condition is wired (constant true) so a body can end the loop early.
    body.op_to("Identity", [cond_in], [f"cond_out_{si}"])
    body.output(f"cond_out_{si}", np.bool_, [])
    body.op_to("Identity", [h], [f"hidden_out_{si}"])
    body.output(f"hidden_out_{si}", fdt, ["batch", "seq", spec.hidden_size])
    for eid, kind, value in scan:
        body.op_to("Identity", [value], [f"new_{kind}_{eid}_body"])
        body.output(f"new_{kind}_{eid}_body", fdt, ["batch", spec.num_kv_heads, "seq", spec.head_dim])
    trips = g.op("Min", num_loops, g.const(stage.repeats), name=f"trips_{si}")
    outs = [g.fresh(f"hidden_after_stage{si}")] + [g.fresh(f"new_{kind}_{eid}_loop") for eid, kind, _ in scan]
    g.op_to("Loop", [trips, g.const(True, np.bool_), x], outs, body=body.graph(with_initializers=False))
    for (eid, kind, _), out in zip(scan, outs[1:]):
        present.setdefault(eid, [None, None])[0 if kind == "key" else 1] = out
    return outs[0]


# ---------------------------------------------------------------------------------------------
# the host-driven loop: prologue, block step, epilogue


def build_prologue(spec: ModelSpec, tensors: dict, *, float_dtype=np.float32) -> BuiltGraph:
    g = GraphBuilder("edgeloop_prologue", float_dtype=float_dtype)
    ids = g.input("input_ids", I64, ["batch", "seq"], role="input_ids")
    x, _ = _embed(g, spec, tensors, ids)
    g.op_to("Identity", [x], ["hidden"])
    g.output("hidden", g.float_dtype, ["batch", "seq", spec.hidden_size], role="hidden")
    return BuiltGraph("prologue", "prologue.onnx", g)


def build_block(spec: ModelSpec, recursion: Recursion, tensors: dict, *, float_dtype=np.float32,
                lora_dtype=np.float32, dense: bool = False) -> BuiltGraph:
    """One pass of the (single) looped stage's K blocks; every row at its own depth.

    `block` (masked) attends, at a row's depth, to the cached positions its `kv_valid` mask allows:
    what the recursion-wise KV strategy needs, where a position that left the loop early holds
    nothing at deeper depths. `block_dense` (where GroupQueryAttention runs) attends to every
    position before `past_len` — every depth is complete under the fill strategy, at full depth and
    in self-speculation — with GroupQueryAttention doing RoPE, the masks and the softmax in one op:
    about a third of the masked graph's nodes, and per-node overhead is most of a pass at small
    widths (measured: 275 vs 80-odd nodes for the bundled model's two layers)."""
    dense = dense and gqa_supported(spec)
    stage = recursion.stages[0]
    g = GraphBuilder("edgeloop_block", float_dtype=float_dtype)
    fdt = g.float_dtype
    kvh, hd, hidden = spec.num_kv_heads, spec.head_dim, spec.hidden_size
    x = g.input("hidden", fdt, ["batch", "seq", hidden], role="hidden")
    depth = g.input("depth", I64, ["batch"], role="depth")
    past_len = g.input("past_len", I64, ["batch"], role="past_len")
    slot = g.input("slot", I64, ["batch"], role="slot")
    kv_valid = None if dense else g.input("kv_valid", np.bool_, ["batch", "capacity"], role="kv_valid")
    for k in range(len(stage.blocks)):
        g.input(f"kv_pool_key.k{k}", fdt, ["slots", kvh, "capacity", hd], role="kv_pool_key", kv=f"k{k}")
        g.input(f"kv_pool_value.k{k}", fdt, ["slots", kvh, "capacity", hd], role="kv_pool_value", kv=f"k{k}")
    seq = g.op("Gather", g.op("Shape", x), g.const(1), axis=0, name="seq_len")
    cap = g.op("Gather", g.op("Shape", "kv_pool_key.k0"), g.const(2), axis=0, name="capacity")
    att = attention_inputs(g, spec, seq, past_len, cap, gqa=dense, kv_valid=kv_valid)
    if dense:
        # GQA returns the whole present buffer; the new tokens' K/V sit at past_len + i of each row:
        # indices [b, kvh, t, 1] for one GatherND (batch_dims 2) per tensor
        steps = g.op("Range", g.const(0), seq, g.const(1), name="new_steps")
        pos = g.op("Add", g.op("Unsqueeze", past_len, g.const([1])), g.op("Unsqueeze", steps, g.const([0])))
        new_index = g.op("Expand", g.op("Unsqueeze", pos, g.const([1, 3])), g.const([1, kvh, 1, 1]),
                         name="new_positions")
    delta, new = None, []
    for k, u in enumerate(stage.blocks):
        w = GatheredDepth(g, block_tensors(spec, recursion, tensors, u), block_depths(recursion)[u], index=depth,
                          per_row=True, lora_dtype=lora_dtype)
        pk = g.op("Gather", f"kv_pool_key.k{k}", slot, axis=0, name="row_past_k")  # [b, kvh, cap, hd]
        pv = g.op("Gather", f"kv_pool_value.k{k}", slot, axis=0, name="row_past_v")
        x, delta, nk, nv = emit_layer(g, spec, w, x, att, pk, pv, delta)
        if dense:  # present [b, kvh, cap, hd] -> the new positions [b, kvh, t, hd]
            nk = g.op("GatherND", nk, new_index, batch_dims=2, name="new_k")
            nv = g.op("GatherND", nv, new_index, batch_dims=2, name="new_v")
        new.append((k, nk, nv))
    if delta is not None:
        x = g.op("Add", x, delta, name="residual")
    if spec.loop_norm:
        x = _loop_norm(g, spec, tensors, x)
    g.op_to("Identity", [x], ["hidden_out"])
    g.output("hidden_out", fdt, ["batch", "seq", hidden], role="hidden")
    for k, nk, nv in new:
        for kind, value in (("key", nk), ("value", nv)):
            g.op_to("Identity", [value], [f"new_{kind}.k{k}"])
            g.output(f"new_{kind}.k{k}", fdt, ["batch", kvh, "seq", hd], role=f"new_{kind}", kv=f"k{k}")
    name = "block_dense" if dense else "block"
    return BuiltGraph(name, f"{name}.onnx", g)


def build_kv_fill(spec: ModelSpec, recursion: Recursion, tensors: dict, *, float_dtype=np.float32,
                  lora_dtype=np.float32) -> BuiltGraph:
    """The K/V each block position would store at a row's depth, from hidden states it is given (a token's
    exit state, copied forward to the depths it skipped): no attention, no MLP."""
    stage = recursion.stages[0]
    g = GraphBuilder("edgeloop_kv_fill", float_dtype=float_dtype)
    fdt = g.float_dtype
    kvh, hd = spec.num_kv_heads, spec.head_dim
    x = g.input("hidden", fdt, ["batch", "seq", spec.hidden_size], role="hidden")
    depth = g.input("depth", I64, ["batch"], role="depth")
    past_len = g.input("past_len", I64, ["batch"], role="past_len")
    seq = g.op("Gather", g.op("Shape", x), g.const(1), axis=0, name="seq_len")
    att = attention_inputs(g, spec, seq, past_len, None, gqa=False, rope_only=True)
    for k, u in enumerate(stage.blocks):
        w = GatheredDepth(g, block_tensors(spec, recursion, tensors, u), block_depths(recursion)[u], index=depth,
                          per_row=True, lora_dtype=lora_dtype)
        nk, nv = emit_kv(g, spec, w, x, att)
        for kind, value in (("key", nk), ("value", nv)):
            g.op_to("Identity", [value], [f"new_{kind}.k{k}"])
            g.output(f"new_{kind}.k{k}", fdt, ["batch", kvh, "seq", hd], role=f"new_{kind}", kv=f"k{k}")
    return BuiltGraph("kv_fill", "kv_fill.onnx", g)


def build_epilogue(spec: ModelSpec, tensors: dict, *, float_dtype=np.float32) -> BuiltGraph:
    g = GraphBuilder("edgeloop_epilogue", float_dtype=float_dtype)
    h = g.input("hidden", g.float_dtype, ["batch", "num_logits", spec.hidden_size], role="hidden")
    g.op_to("Identity", [_head(g, spec, tensors, h, None, normed=spec.loop_norm)], ["logits"])
    g.output("logits", g.float_dtype, ["batch", "num_logits", spec.vocab_size], role="logits")
    if spec.exit_gate:
        gate_w = g.initializer("exit_gate.weight", tensors["exit_gate.weight"].T.astype(g.float_dtype), SHARED)
        gate_b = g.initializer("exit_gate.bias", tensors["exit_gate.bias"].astype(g.float_dtype), SHARED)
        score = g.op("Sigmoid", g.op("Add", g.op("MatMul", h, gate_w), gate_b), name="exit_prob")  # [b, n, 1]
        g.op_to("Squeeze", [score, g.const([2])], ["exit_score"])
        g.output("exit_score", g.float_dtype, ["batch", "num_logits"], role="exit_score")
    return BuiltGraph("epilogue", "epilogue.onnx", g)


def build_graphs(spec: ModelSpec, recursion: Recursion, tensors: dict, *, layout: str, float_dtype=np.float32,
                 lora_dtype=np.float32, block_lora_dtype=None) -> Iterator[BuiltGraph]:
    """Every entry point's graph, forward first, built one at a time as the caller asks for the next:
    the block, the dense block, the forward graph and kv_fill each carry the shared weights, so a
    compiler that finishes (quantizes, saves) one graph before building the next holds one copy.
    block_lora_dtype: the block step's LoRA storage when it differs (int8 LoRA runs only as MatMulNBits
    initializers of the unrolled graph; the block step gathers float16 factors)."""
    yield build_forward(spec, recursion, tensors, layout=layout, float_dtype=float_dtype, lora_dtype=lora_dtype)[0]
    if not has_host_loop(recursion):
        return
    block_lora = block_lora_dtype or lora_dtype
    yield build_prologue(spec, tensors, float_dtype=float_dtype)
    yield build_block(spec, recursion, tensors, float_dtype=float_dtype, lora_dtype=block_lora)
    if gqa_supported(spec):
        yield build_block(spec, recursion, tensors, float_dtype=float_dtype, lora_dtype=block_lora, dense=True)
    yield build_kv_fill(spec, recursion, tensors, float_dtype=float_dtype, lora_dtype=block_lora)
    yield build_epilogue(spec, tensors, float_dtype=float_dtype)


def graph_stats(model: onnx.ModelProto, kinds: dict[str, str]) -> dict:
    """Node counts (main graph, Loop bodies), initializer count and bytes by kind."""
    main = model.graph
    bodies = [a.g for n in main.node if n.op_type == "Loop" for a in n.attribute if a.name == "body"]
    linear_ops = ("MatMul", "Gemm", "MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul")
    bytes_by_kind: Counter = Counter()
    for init in main.initializer:
        size = int(np.prod(init.dims)) * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        bytes_by_kind[kinds.get(init.name, "other")] += size
    return {
        "main_nodes": len(main.node),
        "loops": len(bodies),
        "loop_body_nodes": [len(b.node) for b in bodies],
        "main_matmuls": sum(n.op_type in linear_ops for n in main.node),
        "loop_body_matmuls": [sum(n.op_type in linear_ops for n in b.node) for b in bodies],
        "initializers": len(main.initializer),
        "bytes_by_kind": dict(bytes_by_kind),
        "ops": dict(Counter(n.op_type for n in main.node) + Counter(n.op_type for b in bodies for n in b.node)),
    }
