"""A vectorized CPU kernel for the paged KV cache's ragged prefill attention (fresh prompt tokens).

TVM 0.27's CPU `tir_attention_prefill_ragged_cpu` (the causal self-attention of the new tokens,
which the cache runs inside `attention_with_fused_qkv` before merging in any cached history) is
fully scalar: it was about 45% of a 128-token prefill. This kernel has the same signature and
the same outputs (attention output and its log2-sum-exp, which the cache merges with the history
part), and is swapped in for it by `install` after the module is built.

Per sequence, K is first transposed to ``kT [h_kv, d, len]`` so that a query's scores against a
block of BK keys are BK contiguous lanes (one broadcast FMA per head dimension). Each (query,
head) row is one parallel iteration running an online softmax over key blocks (flash-attention
style), so nothing of size len is allocated per row; masked keys in the last block get a large
negative score, as in TVM's kernel. RoPE is applied by our own kernel before the cache, so the
cache is built in RopeMode.NONE and the rotary arguments are unused here.
"""

from __future__ import annotations

import math

import tvm
from tvm.script import tirx as T

RAGGED_KERNEL = "tir_attention_prefill_ragged_cpu"  # the name TIRPagedKVCache registers it under
BK = 16  # keys per block: two AVX2 vectors of scores (a power of two >= 8: the max tree halves it 3 times)
NEG = -5e4  # TVM's masked score


def _exp2(x):
    """2^x for x <= 0 in plain arithmetic, so it vectorizes (llvm's exp2 is a scalar libm call per
    score, which dominated the kernel): Cephes' exp2f polynomial on [-0.5, 0.5] (relative error
    about 1e-7) times 2^n built in the exponent bits; below -126 the result is 0."""
    n = T.floor(x + T.float32(0.5))
    f = x - n
    p = T.float32(1.535336188319500e-4)
    for c in (1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2, 2.402264791363012e-1,
              6.931472028550421e-1):
        p = p * f + T.float32(c)
    scale = T.reinterpret("float32", T.shift_left(T.Cast("int32", T.max(n, T.float32(-126))) + 127, 23))
    return T.if_then_else(x < T.float32(-126), T.float32(0), (p * f + T.float32(1)) * scale)


def ragged_prefill(h_kv: int, h_q: int, d: int, dtype: str = "float32"):
    group = h_q // h_kv
    log2e = math.log2(math.e)

    @T.prim_func
    def batch_prefill_ragged_kv(
        var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle, var_kv_indptr: T.handle,
        var_q_rope_position: T.handle, var_k_rope_pos_offset: T.handle, var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_elem_offset = T.int32()
        kv_indptr_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q = T.match_buffer(var_q, (qo_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        k = T.match_buffer(var_k, (kv_len, h_kv, d), dtype)
        v = T.match_buffer(var_v, (kv_len, h_kv, d), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_elem_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32",  # noqa: F841 - signature
                                         elem_offset=q_rope_position_elem_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32",  # noqa: F841
                                           elem_offset=k_rope_pos_offset_elem_offset)
        output = T.match_buffer(var_output, (qo_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (qo_len, h_q), "float32")

        # K transposed, padded to whole key blocks (the pad is never read unmasked)
        kt = T.decl_buffer((h_kv, d, kv_len + BK), "float32")
        for j in T.parallel(kv_len):
            for hk, c in T.grid(h_kv, d):
                kt[hk, c, j] = k[j, hk, c]
        for hk, c, j in T.grid(h_kv, d, BK):
            kt[hk, c, kv_len + j] = T.float32(0)

        for b in T.serial(batch_size):
            for row in T.parallel((q_indptr[b + 1] - q_indptr[b]) * h_q):
                qi: T.int32 = q_indptr[b] + row // h_q
                h: T.int32 = row % h_q
                k0: T.int32 = kv_indptr[b]
                n_q: T.int32 = q_indptr[b + 1] - q_indptr[b]
                n_k: T.int32 = kv_indptr[b + 1] - kv_indptr[b]
                # keys this query sees: causal -> the history plus the new tokens up to itself
                visible: T.int32 = T.if_then_else(causal > 0, n_k - n_q + row // h_q + 1, n_k)
                acc = T.decl_buffer((d,), "float32", scope="local")
                sc = T.decl_buffer((BK,), "float32", scope="local")
                lsum = T.decl_buffer((BK,), "float32", scope="local")  # softmax sum, per lane until the end
                red = T.decl_buffer((BK // 2,), "float32", scope="local")
                qs = T.decl_buffer((d,), "float32", scope="local")
                st = T.decl_buffer((3,), "float32", scope="local")  # running max, new max, rescale factor
                for c in T.vectorized(d):
                    acc[c] = T.float32(0)
                    qs[c] = q[qi, h, c] * (sm_scale * log2e)
                for j in T.vectorized(BK):
                    lsum[j] = T.float32(0)
                st[0] = T.float32(NEG * 2)
                for blk in T.serial((visible + BK - 1) // BK):
                    for j in T.vectorized(BK):
                        sc[j] = T.float32(0)
                    for c in T.serial(d):
                        for j in T.vectorized(BK):
                            sc[j] = sc[j] + qs[c] * kt[h // group, c, k0 + blk * BK + j]
                    for j in T.vectorized(BK):
                        sc[j] = T.if_then_else(blk * BK + j < visible, sc[j], T.float32(NEG))
                    # block max as a halving tree of vector maxes (a serial scan is a long latency chain)
                    for j in T.vectorized(BK // 2):
                        red[j] = T.max(sc[j], sc[j + BK // 2])
                    for j in T.vectorized(BK // 4):
                        red[j] = T.max(red[j], red[j + BK // 4])
                    for j in T.vectorized(BK // 8):
                        red[j] = T.max(red[j], red[j + BK // 8])
                    st[1] = T.max(st[0], T.max(red[0], red[1]))
                    st[2] = _exp2(st[0] - st[1])  # rescales what was accumulated under the old max
                    st[0] = st[1]
                    for j in T.vectorized(BK):
                        sc[j] = _exp2(sc[j] - st[0])
                        lsum[j] = lsum[j] * st[2] + sc[j]
                    for c in T.vectorized(d):
                        acc[c] = acc[c] * st[2]
                    for j in T.serial(T.min(BK, visible - blk * BK)):
                        for c in T.vectorized(d):
                            acc[c] = acc[c] + sc[j] * v[k0 + blk * BK + j, h // group, c]
                st[1] = T.float32(0)
                for j in T.serial(BK):
                    st[1] = st[1] + lsum[j]
                for c in T.vectorized(d):
                    output[qi, h, c] = acc[c] / st[1]
                lse[qi, h] = st[0] + T.log2(st[1])

    return batch_prefill_ragged_kv


def install(mod: tvm.IRModule, *, h_kv: int, h_q: int, d: int) -> tvm.IRModule:
    """Replace the cache's scalar ragged prefill kernel in `mod` (CPU builds) with ours."""
    gv = next((g for g in mod.functions if g.name_hint == RAGGED_KERNEL), None)
    if gv is None:  # a TVM version that no longer registers it: keep its own
        return mod
    mod = mod.shallow_copy() if hasattr(mod, "shallow_copy") else mod
    mod[gv] = ragged_prefill(h_kv, h_q, d).with_attr("global_symbol", RAGGED_KERNEL)
    return mod
