"""ONNX Runtime backend: build the graph, optimize it offline, write the backend files.

Graph interface (both layouts; `b` batch, `t` new tokens, `cap` KV capacity):
  inputs   input_ids int64 [b, t]; past_len int64 []; num_loops int64 [] (default B);
           num_logits int64 [] (default 1: logits of the last position only);
           one past K/V pair per KV entry (see `kv` in the manifest)
  outputs  logits [b, num_logits, vocab]; the new K/V of every depth (only the t new tokens;
           the host writes them into its buffers at past_len)
Layout `loop`: each looped stage is one ONNX Loop whose body is the K-layer block; per-depth
LoRA and vectors are Gathered with the iteration number; a KV entry stacks the B depths of
one block position: [B, b, kvh, cap, hd]. Layout `unrolled`: one copy of the block per depth,
all reading the same shared initializers; one KV entry per depth: [b, kvh, cap, hd].
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from edgeloop.compiler.loading import CompileInput
from edgeloop.compiler.onnx_graph import GraphBuilder
from edgeloop.compiler.onnx_layer import (AttentionInputs, DepthWeights, LoopWeights, emit_layer, prepare_block)
from edgeloop.compiler.options import CompileOptions
from edgeloop.spec import ModelSpec, Recursion, rope_tables

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


def build(model: CompileInput, options: CompileOptions, out_dir: Path) -> dict:
    """Backend entry point (see edgeloop.compiler.BACKENDS)."""
    from edgeloop.compiler.onnx_passes import finish_onnx

    float_dtype = np.float16 if options.target == "cuda" else np.float32
    # int8 LoRA is built float and packed by the quantization rewrite, like the shared weights
    lora_dtype = np.float16 if options.lora_dtype == "float16" else float_dtype
    graph, io = build_graph(model.spec, model.recursion, model.tensors, layout=options.layout,
                            float_dtype=float_dtype, lora_dtype=lora_dtype)
    section = finish_onnx(graph, io, model, options, out_dir)
    return section


def build_graph(spec: ModelSpec, recursion: Recursion, tensors: dict, *, layout: str = "loop",
                float_dtype=np.float32, lora_dtype=np.float32) -> tuple[GraphBuilder, dict]:
    # Unrolled graphs attend with GroupQueryAttention writing into the host's KV buffers in
    # place (DESIGN.md: the fastest CPU form). A Loop body cannot alias per-depth buffers, and
    # GQA has no per-query sliding window here, so those use the two-part softmax.
    inplace = layout == "unrolled" and (not spec.sliding_window or spec.sliding_window >= spec.max_position)
    g = GraphBuilder("edgeloop", float_dtype=float_dtype)
    fdt = g.float_dtype
    kvh, hd = spec.num_kv_heads, spec.head_dim

    ids = g.input("input_ids", np.int64, ["batch", "seq"])
    past_len = g.input("past_len", np.int64, [])
    # Required scalars (IOBinding cannot bind initializer-backed inputs): the runtime passes
    # num_loops = B unless it exits early, num_logits = 1 unless every position is wanted.
    num_loops = g.input("num_loops", np.int64, [])
    num_logits = g.input("num_logits", np.int64, [])

    # -- embedding and depth-independent attention inputs -----------------------------------
    embed = g.initializer("embed.weight", tensors["embed.weight"].astype(fdt), "embedding")
    x = g.op("Gather", embed, ids, axis=0, name="embed")
    if spec.embed_scale != 1.0:
        x = g.op("Mul", x, g.fconst(spec.embed_scale), name="embed_scaled")
    kv_entries = _kv_entries(recursion, layout)
    for entry in kv_entries:
        shape = (["repeats_" + entry["id"]] if entry["stacked"] else []) + ["batch", kvh, "capacity", hd]
        if entry["stacked"]:
            shape[0] = len(entry["depths"])
        for kind in ("past_key", "past_value"):
            g.input(entry[kind], fdt, shape)
    att = _attention_inputs(g, spec, ids, past_len, kv_entries[0], gqa=inplace)

    # -- the stages ---------------------------------------------------------------------------
    prepared = {u: prepare_block(spec, recursion, tensors, u) for u in range(recursion.num_blocks)}
    present: dict[str, str] = {}
    depth = 0
    delta = None  # a residual branch not yet added to x (the next norm adds it)
    for si, stage in enumerate(recursion.stages):
        if layout == "loop" and stage.repeats > 1:
            if delta is not None:  # the Loop carries one hidden tensor
                x, delta = g.op("Add", x, delta, name="residual"), None
            x = _emit_loop(g, spec, recursion, prepared, stage, si, x, att, num_loops, kv_entries, present, lora_dtype)
            depth += len(stage.blocks) * stage.repeats
            continue
        for r in range(stage.repeats):
            for u in stage.blocks:
                entry = next(e for e in kv_entries if e["depths"] == [depth])
                w = DepthWeights(g, spec, recursion, u, prepared[u], lora_dtype=lora_dtype, repeat=r, depth=depth)
                x, delta, nk, nv = emit_layer(g, spec, w, x, att, entry["past_key"], entry["past_value"], delta)
                present[entry["present_key"]], present[entry["present_value"]] = nk, nv
                depth += 1

    # -- final norm and LM head on the last num_logits positions --------------------------------
    from edgeloop.compiler.onnx_layer import residual_norm

    if delta is not None:
        x = g.op("Add", x, delta, name="residual")
    fn_w = g.initializer("final_norm.weight", tensors["final_norm.weight"].astype(fdt), "shared")
    fn_b = (g.initializer("final_norm.bias", tensors["final_norm.bias"].astype(fdt), "shared")
            if "final_norm.bias" in tensors else None)
    seq = g.op("Gather", g.op("Shape", ids), g.const(1), axis=0, name="seq_len")
    start = g.op("Max", g.op("Sub", seq, num_logits), g.const(0), name="logits_start")
    h = g.op("Slice", x, g.op("Unsqueeze", start, g.const([0])), g.const([np.iinfo(np.int64).max]), g.const([1]),
             name="last_hidden")
    h = residual_norm(g, spec, h, None, fn_w, fn_b)[0]
    head_name = "lm_head.weight" if not spec.tie_embeddings else "embed.weight"
    head = embed if spec.tie_embeddings else g.initializer("lm_head.weight", tensors["lm_head.weight"].astype(fdt),
                                                           "embedding")
    flat = g.op("Reshape", h, g.const([-1, spec.hidden_size]), name="head_in")
    logits = g.op("Gemm", flat, head, transB=1, name="logits_flat")
    out_shape = g.op("Concat", g.op("Slice", g.op("Shape", h), g.const([0]), g.const([2])), g.const([-1]), axis=0)
    g.op_to("Reshape", [logits, out_shape], ["logits"])
    g.output("logits", fdt, ["batch", "num_logits", spec.vocab_size])
    for entry in kv_entries:
        for kind in ("present_key", "present_value"):
            shape = (["loops"] if entry["stacked"] else []) + ["batch", kvh, "capacity" if inplace else "seq", hd]
            g.op_to("Identity", [present[entry[kind]]], [entry[kind]])
            g.output(entry[kind], fdt, shape)
    io = {
        "layout": layout,
        "float_dtype": np.dtype(fdt).name,
        "inputs": {"input_ids": "input_ids", "past_len": "past_len", "num_loops": "num_loops",
                   "num_logits": "num_logits"},
        "default_num_loops": recursion.loops,
        "logits": "logits",
        "kv": kv_entries,
        "kv_inplace": inplace,  # present outputs alias the past buffers (bind both to one buffer)
        "kv_heads": kvh,
        "head_dim": hd,
        "head": head_name,
    }
    return g, io


def _kv_entries(recursion: Recursion, layout: str) -> list[dict]:
    """KV buffers the host owns: one per block position of a looped stage (loop layout), else per depth."""
    entries = []
    depth = 0
    for si, stage in enumerate(recursion.stages):
        span = len(stage.blocks) * stage.repeats
        if layout == "loop" and stage.repeats > 1:
            for k, _ in enumerate(stage.blocks):
                depths = [depth + r * len(stage.blocks) + k for r in range(stage.repeats)]
                entries.append(_entry(f"s{si}.k{k}", depths, stacked=True))
        else:
            entries.extend(_entry(f"d{d}", [d], stacked=False) for d in range(depth, depth + span))
        depth += span
    return entries


def _entry(tag: str, depths: list[int], stacked: bool) -> dict:
    return {"id": tag, "depths": depths, "stacked": stacked,
            "past_key": f"past_key.{tag}", "past_value": f"past_value.{tag}",
            "present_key": f"present_key.{tag}", "present_value": f"present_value.{tag}"}


def _attention_inputs(g: GraphBuilder, spec: ModelSpec, ids: str, past_len: str, entry: dict,
                      gqa: bool = False) -> AttentionInputs:
    """RoPE rows for the new positions, the past mask (past_len, sliding window) and the causal mask."""
    rep = spec.num_heads // spec.num_kv_heads
    cos, sin = rope_tables(spec, spec.max_position)
    seq = g.op("Gather", g.op("Shape", ids), g.const(1), axis=0, name="seq_len")
    if gqa:
        total = g.op("Add", past_len, seq, name="total_len")
        total_len = g.op("Cast", total, to=6, name="total_len_i32")  # int32
        seqlens_k = g.op("Cast", g.op("Sub", g.op("Unsqueeze", total, g.const([0])), g.const([1])), to=6,
                         name="seqlens_k")
        if spec.rotary_dim == spec.head_dim:
            # GroupQueryAttention rotates q and k itself (do_rotary) from half-width tables, at the
            # positions it derives from seqlens_k: ~12 fewer nodes per layer than our own RoPE ops.
            half = spec.rotary_dim // 2
            cache = (g.initializer("rope.cos_cache", cos[:, :half].astype(g.float_dtype)),
                     g.initializer("rope.sin_cache", sin[:, :half].astype(g.float_dtype)))
            return AttentionInputs(None, None, None, None, None, None, None, seqlens_k, total_len, cache)
    cos_t = g.initializer("rope.cos", cos.astype(g.float_dtype))
    sin_t = g.initializer("rope.sin", sin.astype(g.float_dtype))
    positions = g.op("Range", past_len, g.op("Add", past_len, seq), g.const(1), name="positions")  # [t]
    cos_rows, sin_rows = g.op("Gather", cos_t, positions, axis=0), g.op("Gather", sin_t, positions, axis=0)
    rd = spec.rotary_dim
    cos_q = g.op("Reshape", cos_rows, g.const([-1, 1, 1, rd]), name="cos_q")
    sin_q = g.op("Reshape", sin_rows, g.const([-1, 1, 1, rd]), name="sin_q")
    cos_k = g.op("Reshape", cos_rows, g.const([-1, 1, rd]), name="cos_k")
    sin_k = g.op("Reshape", sin_rows, g.const([-1, 1, rd]), name="sin_k")

    if gqa:  # partial rotary (GPT-NeoX): our own RoPE ops before the attention op
        return AttentionInputs(cos_q, sin_q, cos_k, sin_k, None, None, None, seqlens_k, total_len)
    cap_axis = 3 if entry["stacked"] else 2
    cap = g.op("Gather", g.op("Shape", entry["past_key"]), g.const(cap_axis), axis=0, name="capacity")
    qpos = g.op("Tile", positions, g.const([rep]), name="qpos_rows")  # row r*t + i -> position of token i
    qcol = g.op("Unsqueeze", qpos, g.const([1]))  # [rep*t, 1]
    kpos = g.op("Range", g.const(0), cap, g.const(1), name="kpos")  # [cap]
    allowed = g.op("Less", kpos, past_len, name="past_valid")  # [cap]
    allowed = g.op("Unsqueeze", allowed, g.const([0]))  # [1, cap]
    new_pos = g.op("Unsqueeze", positions, g.const([0]))  # [1, t]
    causal = g.op("LessOrEqual", new_pos, qcol, name="causal")  # [rep*t, t]
    if spec.sliding_window:
        window = g.const(spec.sliding_window)
        allowed = g.op("And", allowed, g.op("Greater", g.op("Unsqueeze", kpos, g.const([0])), g.op("Sub", qcol, window)))
        causal = g.op("And", causal, g.op("Greater", new_pos, g.op("Sub", qcol, window)))
    zero, neg = g.fconst(0.0), g.fconst(-np.inf)
    past_mask = g.op("Where", allowed, zero, neg, name="past_mask")
    new_mask = g.op("Where", causal, zero, neg, name="new_mask")
    split_sizes = g.op("Concat", g.op("Unsqueeze", cap, g.const([0])), g.op("Unsqueeze", seq, g.const([0])), axis=0,
                       name="split_sizes")
    return AttentionInputs(cos_q, sin_q, cos_k, sin_k, past_mask, new_mask, split_sizes)


def _emit_loop(g: GraphBuilder, spec, recursion, prepared, stage, si, x, att, num_loops, kv_entries, present,
               lora_dtype) -> str:
    """One ONNX Loop running the stage's block `stage.repeats` times (or num_loops, if smaller)."""
    fdt = g.float_dtype
    body = GraphBuilder(f"stage{si}_block", parent=g, float_dtype=fdt)
    it = body.input(f"iter_{si}", np.int64, [])
    cond_in = body.input(f"cond_{si}", np.bool_, [])
    h = body.input(f"hidden_in_{si}", fdt, ["batch", "seq", spec.hidden_size])
    entries = [e for e in kv_entries if e["id"].startswith(f"s{si}.")]
    scan, delta = [], None
    for k, u in enumerate(stage.blocks):
        w = LoopWeights(body, spec, recursion, u, prepared[u], lora_dtype=lora_dtype, iteration=it)
        entry = entries[k]
        pk = body.op("Gather", entry["past_key"], it, axis=0, name="past_k")  # this depth's buffer
        pv = body.op("Gather", entry["past_value"], it, axis=0, name="past_v")
        h, delta, nk, nv = emit_layer(body, spec, w, h, att, pk, pv, delta)
        scan += [(entry["present_key"], nk), (entry["present_value"], nv)]
    if delta is not None:
        h = body.op("Add", h, delta, name="residual")
    # The condition is wired (constant true today) so early exit can end the loop later.
    body.op_to("Identity", [cond_in], [f"cond_out_{si}"])
    body.output(f"cond_out_{si}", np.bool_, [])
    body.op_to("Identity", [h], [f"hidden_out_{si}"])
    body.output(f"hidden_out_{si}", fdt, ["batch", "seq", spec.hidden_size])
    for name, value in scan:
        body.op_to("Identity", [value], [f"{name}_body"])
        body.output(f"{name}_body", fdt, ["batch", spec.num_kv_heads, "seq", spec.head_dim])
    trips = g.op("Min", num_loops, g.const(stage.repeats), name=f"trips_{si}")
    cond = g.const(True, np.bool_)
    outs = [g.fresh(f"hidden_after_stage{si}")] + [g.fresh(f"{name}_loop") for name, _ in scan]
    g.op_to("Loop", [trips, cond, x], outs, body=body.graph(with_initializers=False))
    for (name, _), out in zip(scan, outs[1:]):
        present[name] = out
    return outs[0]


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

