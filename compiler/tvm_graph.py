"""Relax IR of a recursive model: entry points, one function per stage, the paged KV cache.

Module layout (DESIGN section 4)::

    create_kv_cache(R.Shape([batch, total, chunk, page, sliding]))  -> TIRPagedKVCache (L layers)
    forward(ids [s], kv, logit_pos [n], params) -> logits [n, V]   rows' tokens concatenated (ragged);
                                                                  logits at the chosen positions
    decode(ids [1], kv, params)                 -> logits [1, V]   one stream, one token (s = 1 static)
    stage{i}_{mode}(x, kv, pos, params, R.Shape([n]))   private, recursive
  the host-driven loop (models with one looped stage):
    create_step_kv_cache(...)                   -> TIRPagedKVCache (K layers; a sequence per
                                                   (stream, depth), so one call mixes depths)
    prologue(ids [s], params)                   -> hidden [s, H]
    block(x [s, H], kv, depth [s], pos [s], params) -> hidden [s, H]   one pass, each token at its depth
    kv_fill(x [s, H], kv, depth [s], pos [s], params)   K/V only, from given hidden states (skipped depths)
    epilogue(x [s, H], params)                  -> logits [s, V] (and the exit gate's [s, 1])

A stage with R repeats is one private function that runs its K blocks once and calls itself
with the host-side shape counter ``n + 1`` while ``n + 1 < R``: the IR is constant in R, there
is no device sync, and ``n`` selects the LoRA / vector stacks and the KV layer ``D0 + n*K + j``.
Parameters travel as one tuple (read with TupleGetItem), so a call is four arguments, not a
hundred. Decode is emitted separately from prefill so its kernels see s = 1 statically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.frontend.nn.llm.kv_cache import RopeMode, TIRPagedKVCache
from tvm.relax.utils import gen_call_tir_inputs

from edgeloop.compiler import tvm_ops as ops
from edgeloop.compiler import tvm_gpu_schedule as gsched
from edgeloop.compiler import tvm_schedule as sched
from edgeloop.compiler.block_layout import LayerPlan, groups
from edgeloop.compiler.tvm_params import ParamTable
from edgeloop.spec import ModelSpec, Recursion
KV_CACHE_ARGS = ("max_batch_size", "max_total_seq_len", "prefill_chunk_size", "page_size", "support_sliding_window")


@dataclass
class Scope:
    """Relax values of the function being emitted."""

    params: relax.Var
    kv: relax.Var
    pos: relax.Expr | None
    decode: bool


class GraphBuilder:
    def __init__(self, spec: ModelSpec, recursion: Recursion, params: ParamTable, *, tile: int,
                 target: tvm.target.Target, cpu_schedules: bool, sm_count: int = 0):
        self.spec, self.recursion, self.params = spec, recursion, params
        self.t, self.target, self.cpu = tile, target, cpu_schedules
        self.dtype = params.float_dtype  # activations and KV cache (float32, or float16 on GPUs)
        self.sm_count = sm_count  # GPU: multiprocessors the decode GEMVs spread over (tvm_gpu_schedule)
        self.dense_kernels: dict[str, dict] = {}  # kernel -> output columns, K, s == 1 (launch checks)
        self._last_kernel = ""
        self.groups = {g.name: g for g in groups(spec, recursion)}
        self.host_loop = len(recursion.stages) == 1
        self.bb = relax.BlockBuilder()
        self.kernels: dict[str, int] = {}  # kernel name -> call sites
        self._cache: dict[tuple, relax.Var] = {}

    # -- module ----------------------------------------------------------------------------

    def build(self) -> tvm.IRModule:
        self._emit_create_kv_cache("create_kv_cache", self.recursion.num_depths)
        for kind in ("prefill", "decode"):
            stages = [self._emit_stage(i, kind) for i in range(len(self.recursion.stages))]
            self._emit_entry("forward" if kind == "prefill" else "decode", stages)
        if self.host_loop:
            self._emit_create_kv_cache("create_step_kv_cache", len(self.recursion.stages[0].blocks))
            self._emit_prologue()
            self._emit_block()
            self._emit_kv_fill()
            self._emit_epilogue()
        mod = self.bb.get()
        # drop the bodies built under temporary names (their code now lives in the stubs' slots)
        return _unique_symbols(tvm.IRModule({gv: f for gv, f in mod.functions.items()
                                             if not gv.name_hint.endswith("__impl")}))

    def _params_type(self) -> relax.TupleType:
        return relax.TupleType([relax.TensorType(a.shape, str(a.dtype)) for a in self.params.arrays])

    def _emit_create_kv_cache(self, name: str, layers: int) -> None:
        s = self.spec
        dims = [tirx.Var(n, "int64") for n in KV_CACHE_ARGS]
        cfg = relax.Var("cfg", relax.ShapeType(dims))
        with self.bb.function(name, [cfg]):
            cache = TIRPagedKVCache(
                attn_kind="mha", max_batch_size=dims[0], max_total_seq_len=dims[1], prefill_chunk_size=dims[2],
                page_size=dims[3], support_sliding_window=dims[4],
                layer_partition=relax.ShapeExpr([0, layers]),
                num_hidden_layers=layers, num_attention_heads=s.num_heads,
                num_key_value_heads=s.num_kv_heads, qk_head_dim=s.head_dim, v_head_dim=s.head_dim,
                mla_original_qk_head_dim=0, mla_original_v_head_dim=0,
                rope_mode=RopeMode.NONE,  # RoPE is ours (tables shared with the reference)
                rope_scale=1, rope_theta=int(s.rope_theta), rope_scaling={}, rope_ext_factors=relax.prim_value(0),
                rotary_dim=s.rotary_dim, enable_disaggregation=False, dtype=self.dtype, target=self.target)
            self.bb.emit_func_output(self.bb.emit(cache._expr))

    def _embed(self, scope: Scope, ids) -> relax.Var:
        s = self.spec
        tied = s.tie_embeddings
        table = self._param(scope, "head.W" if tied else "embed")
        return self._op("embed", ops.embed, [ids, table], dict(hidden=s.hidden_size, scale=float(s.embed_scale),
                                                               t=self.t if tied else 0), scope, None)

    def _head(self, scope: Scope, x, pick=None) -> relax.Var:
        """Final norm (unless every pass already ends with it) and LM head, of the rows `pick` (or all)."""
        if not self.spec.loop_norm or pick is not None:
            x = self._norm(scope, x, "final_norm", 0, pick=pick, apply=not self.spec.loop_norm)
        return self._dense(scope, x, "head", self.spec.vocab_size, 0)

    def _emit_entry(self, mode: str, stages: list[relax.GlobalVar]) -> None:
        seq = 1 if mode == "decode" else tirx.Var("s", "int64")
        ids = relax.Var("ids", relax.TensorType([seq], "int32"))
        kv = relax.Var("kv", relax.ObjectType())
        pick = relax.Var("logit_pos", relax.TensorType([tirx.Var("n", "int64")], "int32")) if mode == "forward" \
            else None
        params = relax.Var("params", self._params_type())
        with self.bb.function(mode, [ids, kv] + ([pick] if pick is not None else []) + [params]):
            scope = Scope(params, kv, None, mode == "decode")
            x = self._embed(scope, ids)
            pos = self.bb.emit(relax.call_pure_packed("vm.builtin.attention_kv_cache_get_query_positions", kv,
                                                      ty_args=relax.TensorType([seq], "int32")))
            for gv in stages:
                x = self.bb.emit(relax.Call(gv, [x, kv, pos, params, relax.ShapeExpr([0])]))
            self.bb.emit_func_output(self._head(scope, x, pick))

    # -- the host-driven loop --------------------------------------------------------------

    def _emit_prologue(self) -> None:
        ids = relax.Var("ids", relax.TensorType([tirx.Var("s", "int64")], "int32"))
        params = relax.Var("params", self._params_type())
        with self.bb.function("prologue", [ids, params]):
            self.bb.emit_func_output(self._embed(Scope(params, None, None, False), ids))
        self._cache.clear()

    def _emit_block(self) -> None:
        """One pass of the looped stage; token i runs at depth[i] (its LoRA, vectors and, through the
        sequence the host declared for it, its KV), RoPE at the positions the host gives."""
        seq = tirx.Var("s", "int64")
        x = relax.Var("x", relax.TensorType([seq, self.spec.hidden_size], self.dtype))
        kv = relax.Var("kv", relax.ObjectType())
        depth = relax.Var("depth", relax.TensorType([seq], "int32"))
        pos = relax.Var("pos", relax.TensorType([seq], "int32"))
        params = relax.Var("params", self._params_type())
        with self.bb.function("block", [x, kv, depth, pos, params]):
            scope = Scope(params, kv, pos, False)
            with self.bb.dataflow():
                y = x
                for j, u in enumerate(self.recursion.stages[0].blocks):
                    y = self._layer(scope, y, u, depth, j)
                if self.spec.loop_norm:
                    y = self._norm(scope, y, "final_norm", 0)
                y = self.bb.emit_output(y)
            self.bb.emit_func_output(y)
        self._cache.clear()

    def _emit_kv_fill(self) -> None:
        """Each block position's K/V at per-token depths from given hidden states (a token's exit state
        copied forward to a depth it skipped): the layer's input norm and q/k/v, appended through the
        paged cache (whose attention output is returned only so that the calls are kept)."""
        seq = tirx.Var("s", "int64")
        x = relax.Var("x", relax.TensorType([seq, self.spec.hidden_size], self.dtype))
        kv = relax.Var("kv", relax.ObjectType())
        depth = relax.Var("depth", relax.TensorType([seq], "int32"))
        pos = relax.Var("pos", relax.TensorType([seq], "int32"))
        params = relax.Var("params", self._params_type())
        with self.bb.function("kv_fill", [x, kv, depth, pos, params]):
            scope = Scope(params, kv, pos, False)
            outs = []
            for j, u in enumerate(self.recursion.stages[0].blocks):
                h = self._norm(scope, x, f"blocks.{u}.input_norm", depth)
                outs.append(self._cached_attention(scope, h, u, depth, j))
            self.bb.emit_func_output(relax.Tuple(outs))
        self._cache.clear()

    def _emit_epilogue(self) -> None:
        s = self.spec
        x = relax.Var("x", relax.TensorType([tirx.Var("s", "int64"), s.hidden_size], self.dtype))
        params = relax.Var("params", self._params_type())
        with self.bb.function("epilogue", [x, params]):
            scope = Scope(params, None, None, False)
            h = x if s.loop_norm else self._norm(scope, x, "final_norm", 0)
            logits = self._dense(scope, h, "head", s.vocab_size, 0)
            if s.exit_gate:  # sigmoid(w . h + b): the probability of exiting at this pass
                gate = self._dense(scope, h, "exit_gate", 1, 0, act="sigmoid", name="exit_gate")
                self.bb.emit_func_output(relax.Tuple([logits, gate]))
            else:
                self.bb.emit_func_output(logits)
        self._cache.clear()

    def _emit_stage(self, index: int, mode: str) -> relax.GlobalVar:
        """The recursive function of stage `index` (see the module docstring)."""
        stage = self.recursion.stages[index]
        name = f"stage{index}_{mode}"
        # A typed stub gives the body a GlobalVar to call; the body replaces it below. Relax wants
        # fresh Vars per function, hence two signatures.
        gv = self.bb.add_func(self._stage_signature(mode)[0], name)
        x, kv, pos, params, counter, n = self._stage_signature(mode)[1]
        first_depth = sum(len(st.blocks) * st.repeats for st in self.recursion.stages[:index])
        # the attr keeps structurally equal stages apart (the builder would merge them into one name)
        with self.bb.function(name + "__impl", [x, kv, pos, params, counter], attrs={"edgeloop_stage": name},
                              private=True):
            scope = Scope(params, kv, pos, mode == "decode")
            with self.bb.dataflow():
                y = x
                for j, u in enumerate(stage.blocks):
                    layer_id = first_depth + n * len(stage.blocks) + j
                    y = self._layer(scope, y, u, n, layer_id)
                if self.spec.loop_norm:  # Ouro: the final norm closes every pass and feeds the next
                    y = self._norm(scope, y, "final_norm", 0)
                y = self.bb.emit_output(y)
            if stage.repeats > 1:
                again = relax.Call(gv, [y, kv, pos, params, relax.ShapeExpr([n + 1])])
                y = self.bb.emit(relax.If(relax.prim_value(n + 1 < stage.repeats), again, y))
            self.bb.emit_func_output(y)
        impl = self.bb.get()[name + "__impl"]
        self.bb.update_func(gv, impl.with_attr("global_symbol", name))
        self._cache.clear()
        return gv

    def _stage_signature(self, mode: str):
        seq = 1 if mode == "decode" else tirx.Var("s", "int64")
        n = tirx.Var("n", "int64")
        x = relax.Var("x", relax.TensorType([seq, self.spec.hidden_size], self.dtype))
        kv = relax.Var("kv", relax.ObjectType())
        pos = relax.Var("pos", relax.TensorType([seq], "int32"))
        params = relax.Var("params", self._params_type())
        counter = relax.Var("loop", relax.ShapeType([n]))
        stub = relax.Function([x, kv, pos, params, counter], x, ret_ty=x.ty, is_pure=True)
        return stub, (x, kv, pos, params, counter, n)

    # -- one layer -------------------------------------------------------------------------

    def _layer(self, scope: Scope, x, u: int, r, layer_id) -> relax.Var:
        """One layer, its norms and residual adds where `block_layout.LayerPlan` puts them."""
        pre, plan = f"blocks.{u}", LayerPlan.of(self.spec)
        h = self._norm(scope, x, f"{pre}.input_norm", r)
        if plan.parallel_residual:  # GPT-NeoX: x + attn(ln1 x) + mlp(ln2 x)
            attn = self._attention(scope, h, u, r, layer_id, residual=x)
            h2 = self._norm(scope, x, f"{pre}.post_norm", r)
            return self._mlp(scope, h2, u, r, residual=attn)
        if plan.sandwich:  # Ouro: x + norm(attn(norm x)), then the same around the MLP
            attn = self._attention(scope, h, u, r, layer_id, residual=None)
            x = self._norm(scope, attn, f"{pre}.attn_out_norm", r, residual=x)
            mlp = self._mlp(scope, self._norm(scope, x, f"{pre}.post_norm", r), u, r, residual=None)
            return self._norm(scope, mlp, f"{pre}.mlp_out_norm", r, residual=x)
        x = self._attention(scope, h, u, r, layer_id, residual=x)
        h2 = self._norm(scope, x, f"{pre}.post_norm", r)
        return self._mlp(scope, h2, u, r, residual=x)

    def _attention(self, scope: Scope, h, u: int, r, layer_id, residual) -> relax.Var:
        s = self.spec
        out = self._cached_attention(scope, h, u, r, layer_id)
        seq = out.ty.shape[0]
        if not self.cpu:  # [s, heads * d] (a view): the GPU schedules read K contiguously
            out = self.bb.emit(relax.op.reshape(out, [seq, s.num_heads * s.head_dim]))
        return self._linear(scope, out, u, "o", r, residual=residual)

    def _cached_attention(self, scope: Scope, h, u: int, r, layer_id) -> relax.Var:
        """q/k/v of normed hidden states h, RoPE, then the paged cache: appends this layer's K/V for the
        new tokens and attends over the sequence. Output [s, heads, head_dim]."""
        s, pre = self.spec, f"blocks.{u}"
        qkv = self._linear(scope, h, u, "qkv", r)
        q_norm = self._param(scope, f"{pre}.q_norm.weight") if s.qk_norm else None
        k_norm = self._param(scope, f"{pre}.k_norm.weight") if s.qk_norm else None
        cos, sin = self._param(scope, "rope.cos"), self._param(scope, "rope.sin")
        qkv = self._op("qk_rope", ops.qk_rope, [qkv, cos, sin, scope.pos, q_norm, k_norm, r],
                       dict(heads=s.num_heads, kv_heads=s.num_kv_heads, head_dim=s.head_dim,
                            rotary_dim=s.rotary_dim, eps=s.norm_eps), scope,
                       lambda sch: sched.schedule_rows(sch, out="rope", producers=("qk_norm", "sumsq"),
                                                       decode=scope.decode, vectorize=False))
        seq = qkv.ty.shape[0]
        out = self.bb.emit(relax.call_dps_packed(
            "vm.builtin.attention_kv_cache_attention_with_fused_qkv",
            [scope.kv, relax.prim_value(layer_id), relax.prim_value(1.0 / math.sqrt(s.head_dim)), qkv],
            out_ty=relax.TensorType([seq, s.num_heads, s.head_dim], self.dtype)))
        self.kernels["paged_attention"] = self.kernels.get("paged_attention", 0) + 1
        return out

    def _mlp(self, scope: Scope, h, u: int, r, residual) -> relax.Var:
        s = self.spec
        inner = self._linear(scope, h, u, "gate_up", r, act=s.activation, gated=s.gated_mlp)
        return self._linear(scope, inner, u, "down", r, residual=residual)

    # -- kernels ---------------------------------------------------------------------------

    def _linear(self, scope: Scope, x, u: int, group: str, r, *, residual=None, act=None, gated=False):
        g, pre = self.groups[group], f"blocks.{u}.{group}"
        lora, rank = None, 0
        if self.params.has(f"{pre}.A"):  # t = x A[r]^T for the whole group, one small matmul
            rank = g.max_rank
            lora = self._dense(scope, x, f"{pre}.A", len(g.members) * rank, r, name="lora_a")
        seg_tiles = tuple(m.out_offset // self.t for m in g.members)
        return self._dense(scope, x, pre, g.out_features, r, lora=lora, rank=rank, seg_tiles=seg_tiles,
                           residual=residual, act=act, gated=gated, name=group)

    def _dense(self, scope: Scope, x, prefix: str, out: int, r, *, lora=None, rank=0, seg_tiles=(0,),
               residual=None, act=None, gated=False, name: str | None = None):
        int4 = self.params.has(f"{prefix}.Wq")
        w, scale, zero, kwargs = self._weights(scope, prefix)
        bias = self._param(scope, f"{prefix}.bias") if self.params.has(f"{prefix}.bias") else None
        b = self._param(scope, f"{prefix}.B") if lora is not None else None
        kdim = int(x.ty.shape[-1]) if len(x.ty.shape) == 2 else int(x.ty.shape[-1]) * int(x.ty.shape[-2])
        single = isinstance(x.ty.shape[0], tirx.IntImm) and int(x.ty.shape[0]) == 1  # decode, last-token head
        rows = 1 if single else (sched.PREFILL_ROWS if self.cpu else gsched.TILE_M)
        kwargs.update(out_features=out, t=self.t, rank=rank, seg_tiles=seg_tiles, act=act, gated=gated, rows=rows,
                      split_gated=not self.cpu)
        if int4:
            name = f"{name}_int4"
        if self.cpu:
            schedule = lambda sch: sched.schedule_dense(sch, t=self.t, rows=rows, decode=scope.decode,  # noqa: E731
                                                        work=out * kdim, int4=int4)
        elif _per_token(r):  # block step: weights picked per token, left to dlight's rules
            schedule = None
        else:
            schedule = lambda sch: gsched.schedule_dense(sch, decode=single, sm_count=self.sm_count,  # noqa: E731
                                                         int4=int4)
        y = self._op(name or prefix.split(".")[-1], ops.dense, [x, w, scale, zero, bias, lora, b, residual, r],
                     kwargs, scope, schedule, gpu=True)
        self.dense_kernels[self._last_kernel] = {"columns": out // 2 if gated else out, "k": kdim, "single": single}
        return y

    def _weights(self, scope: Scope, prefix: str):
        """(weight, int4 scales, int4 zero points, extra kwargs) of a dense: float, or the int4 triple."""
        if prefix.endswith(".A"):  # LoRA A stacks are always float
            return self._param(scope, prefix), None, None, {}
        if not self.params.has(f"{prefix}.Wq"):
            return self._param(scope, f"{prefix}.W"), None, None, {}
        scales = self._param(scope, f"{prefix}.Ws")
        zeros = self._param(scope, f"{prefix}.Wz") if self.params.has(f"{prefix}.Wz") else None
        kdim = int(self.params.shape(f"{prefix}.Wq")[-2]) * 2  # padded to whole blocks
        block = kdim // int(self.params.shape(f"{prefix}.Ws")[-2])
        return self._param(scope, f"{prefix}.Wq"), scales, zeros, {"block": block}

    def _norm(self, scope: Scope, x, prefix: str, r, *, pick=None, apply: bool = True, residual=None) -> relax.Var:
        """The norm of the rows of x (or of the rows `pick`; apply=False only gathers them), plus a residual."""
        s = self.spec
        w = self._param(scope, f"{prefix}.weight")
        b = self._param(scope, f"{prefix}.bias") if s.norm_has_bias else None
        name = ("layer_norm" if s.norm == "layer" else "rms_norm") if apply else "gather_rows"
        return self._op(name, ops.norm, [x, w, b, r, pick, residual],
                        dict(kind=s.norm if apply else "none", eps=s.norm_eps),
                        scope, lambda sch: sched.schedule_rows(sch, out="norm", producers=("sumsq", "sum"),
                                                               decode=scope.decode))

    def _param(self, scope: Scope, name: str) -> relax.Var:
        key = (scope.params, name)
        if key not in self._cache:
            self._cache[key] = self.bb.emit(relax.TupleGetItem(scope.params, self.params.index(name)))
        return self._cache[key]

    def _op(self, name: str, fn, args: list, kwargs: dict, scope: Scope, schedule, gpu: bool = False) -> relax.Var:
        """Emit one TE kernel as call_tir, scheduled right here: every kernel on CPU, the dense kernels
        on GPU (`gpu`: `schedule` is a GPU schedule); the rest are left to dlight's GPU rules."""
        func, call_args, out_ty = gen_call_tir_inputs(fn, *args, **kwargs)
        if schedule is not None and (self.cpu or (gpu and self.sm_count)):  # sm_count 0: left unscheduled
            sch = s_tir.Schedule(func)
            schedule(sch)
            func = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        kernel = f"{name}_{'decode' if scope.decode else 'prefill'}"
        gv = self.bb.add_func(func, kernel)
        self._last_kernel = gv.name_hint
        self.kernels[gv.name_hint] = self.kernels.get(gv.name_hint, 0) + 1
        return self.bb.emit(relax.call_tir(gv, call_args, out_ty))


def _per_token(r) -> bool:
    """A repeat given per token (the block step's depth tensor), not a loop counter or a constant."""
    return isinstance(getattr(r, "ty", None), relax.TensorType)


def _unique_symbols(mod: tvm.IRModule) -> tvm.IRModule:
    """Two KV caches (fused and step) register some kernels twice under one global symbol (the
    decode kernel, the debug reader sized by the layer count); give the second copies their own."""
    seen: set[str] = set()
    for gv, func in list(mod.functions.items()):
        symbol = func.attrs.get("global_symbol") if func.attrs else None
        if symbol is None:
            continue
        if str(symbol) in seen:
            mod[gv] = func.with_attr("global_symbol", gv.name_hint)
        seen.add(str(symbol))
    return mod
