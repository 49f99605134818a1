"""Relax IR of a recursive model: entry points, one function per stage, the paged KV cache.

Module layout (DESIGN section 4)::

    create_kv_cache(R.Shape([batch, total, chunk, page, sliding]))  -> TIRPagedKVCache
    prefill(ids [s], kv, params)      -> logits [1, V]  (last position)
    prefill_all(ids [s], kv, params)  -> logits [s, V]
    decode(ids [1], kv, params)       -> logits [1, V]
    stage{i}_{mode}(x, kv, pos, params, R.Shape([n]))   private, recursive

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
from edgeloop.compiler.tvm_params import ParamTable, linear_groups
from edgeloop.spec import ModelSpec, Recursion

MODES = ("prefill", "prefill_all", "decode")
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
        self.groups = {g.name: g for g in linear_groups(spec, recursion)}
        self.bb = relax.BlockBuilder()
        self.kernels: dict[str, int] = {}  # kernel name -> call sites
        self._cache: dict[tuple, relax.Var] = {}

    # -- module ----------------------------------------------------------------------------

    def build(self) -> tvm.IRModule:
        self._emit_create_kv_cache()
        for kind in ("prefill", "decode"):  # prefill_all runs the prefill stages
            stages = [self._emit_stage(i, kind) for i in range(len(self.recursion.stages))]
            for mode in MODES:
                if mode == kind or (kind == "prefill" and mode == "prefill_all"):
                    self._emit_entry(mode, stages)
        mod = self.bb.get()
        # drop the bodies built under temporary names (their code now lives in the stubs' slots)
        return tvm.IRModule({gv: f for gv, f in mod.functions.items() if not gv.name_hint.endswith("__impl")})

    def _params_type(self) -> relax.TupleType:
        return relax.TupleType([relax.TensorType(a.shape, str(a.dtype)) for a in self.params.arrays])

    def _emit_create_kv_cache(self) -> None:
        s = self.spec
        dims = [tirx.Var(n, "int64") for n in KV_CACHE_ARGS]
        cfg = relax.Var("cfg", relax.ShapeType(dims))
        with self.bb.function("create_kv_cache", [cfg]):
            cache = TIRPagedKVCache(
                attn_kind="mha", max_batch_size=dims[0], max_total_seq_len=dims[1], prefill_chunk_size=dims[2],
                page_size=dims[3], support_sliding_window=dims[4],
                layer_partition=relax.ShapeExpr([0, self.recursion.num_depths]),
                num_hidden_layers=self.recursion.num_depths, num_attention_heads=s.num_heads,
                num_key_value_heads=s.num_kv_heads, qk_head_dim=s.head_dim, v_head_dim=s.head_dim,
                mla_original_qk_head_dim=0, mla_original_v_head_dim=0,
                rope_mode=RopeMode.NONE,  # RoPE is ours (tables shared with the reference)
                rope_scale=1, rope_theta=int(s.rope_theta), rope_scaling={}, rope_ext_factors=relax.prim_value(0),
                rotary_dim=s.rotary_dim, enable_disaggregation=False, dtype=self.dtype, target=self.target)
            self.bb.emit_func_output(self.bb.emit(cache._expr))

    def _emit_entry(self, mode: str, stages: list[relax.GlobalVar]) -> None:
        s = self.spec
        seq = 1 if mode == "decode" else tirx.Var("s", "int64")
        ids = relax.Var("ids", relax.TensorType([seq], "int32"))
        kv = relax.Var("kv", relax.ObjectType())
        params = relax.Var("params", self._params_type())
        with self.bb.function(mode, [ids, kv, params]):
            scope = Scope(params, kv, None, mode == "decode")
            tied = s.tie_embeddings
            table = self._param(scope, "head.W" if tied else "embed")
            x = self._op("embed", ops.embed, [ids, table], dict(hidden=s.hidden_size, scale=float(s.embed_scale),
                                                                 t=self.t if tied else 0), scope, None)
            pos = self.bb.emit(relax.call_pure_packed("vm.builtin.attention_kv_cache_get_query_positions", kv,
                                                      ty_args=relax.TensorType([seq], "int32")))
            for gv in stages:
                x = self.bb.emit(relax.Call(gv, [x, kv, pos, params, relax.ShapeExpr([0])]))
            h = self._norm(scope, x, "final_norm", 0, last_only=mode != "prefill_all")
            logits = self._dense(scope, h, "head", s.vocab_size, 0)
            self.bb.emit_func_output(logits)

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
        pre = f"blocks.{u}"
        h = self._norm(scope, x, f"{pre}.input_norm", r)
        if self.spec.parallel_residual:  # GPT-NeoX: x + attn(ln1 x) + mlp(ln2 x)
            attn = self._attention(scope, h, u, r, layer_id, residual=x)
            h2 = self._norm(scope, x, f"{pre}.post_norm", r)
            return self._mlp(scope, h2, u, r, residual=attn)
        x = self._attention(scope, h, u, r, layer_id, residual=x)
        h2 = self._norm(scope, x, f"{pre}.post_norm", r)
        return self._mlp(scope, h2, u, r, residual=x)

    def _attention(self, scope: Scope, h, u: int, r, layer_id, residual) -> relax.Var:
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
        if not self.cpu:  # [s, heads * d] (a view): the GPU schedules read K contiguously
            out = self.bb.emit(relax.op.reshape(out, [seq, s.num_heads * s.head_dim]))
        return self._linear(scope, out, u, "o", r, residual=residual)

    def _mlp(self, scope: Scope, h, u: int, r, residual) -> relax.Var:
        s = self.spec
        inner = self._linear(scope, h, u, "gate_up", r, act=s.activation, gated=s.gated_mlp)
        return self._linear(scope, inner, u, "down", r, residual=residual)

    # -- kernels ---------------------------------------------------------------------------

    def _linear(self, scope: Scope, x, u: int, group: str, r, *, residual=None, act=None, gated=False):
        g, pre = self.groups[group], f"blocks.{u}.{group}"
        lora = None
        if g.rank:  # t = x A[r]^T for the whole group, one small matmul
            lora = self._dense(scope, x, f"{pre}.A", len(g.members) * g.rank, r, name="lora_a")
        seg_tiles = tuple(start // self.t for start in g.segment_starts())
        return self._dense(scope, x, pre, g.out_features, r, lora=lora, rank=g.rank, seg_tiles=seg_tiles,
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

    def _norm(self, scope: Scope, x, prefix: str, r, *, last_only: bool = False) -> relax.Var:
        s = self.spec
        w = self._param(scope, f"{prefix}.weight")
        b = self._param(scope, f"{prefix}.bias") if s.norm_has_bias else None
        return self._op("layer_norm" if s.norm == "layer" else "rms_norm", ops.norm, [x, w, b, r],
                        dict(kind=s.norm, eps=s.norm_eps, last_only=last_only), scope,
                        lambda sch: sched.schedule_rows(sch, out="norm", producers=("sumsq", "sum"),
                                                        decode=scope.decode or last_only))

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
