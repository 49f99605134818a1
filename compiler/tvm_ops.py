"""Tensor-expression kernels of the TVM lowering, one fused kernel per step of a layer.

Each op is a plain TE function over the packed layouts of `tvm_params` (a matrix is
``[ceil(out / T), in, T]``; a per-depth stack has a leading R axis indexed by the repeat
``r``, a PrimExpr that is the loop counter inside a looped stage). Fusion is decided here,
not by a pass: a linear carries its bias, its LoRA-B product, the residual add and (gate/up)
the activation in one kernel. `tvm_schedule` gives each kernel its CPU schedule.

Storage and activations are float32 or float16 (`--dtype float16`, GPU targets); sums, norms,
RoPE and activations are always computed in float32 (`_f32`) and the output is cast back.
"""

from __future__ import annotations

import math
from functools import reduce

from tvm import te, tirx

ACT = {
    "silu": lambda x: x * tirx.sigmoid(x),
    "sigmoid": lambda x: tirx.sigmoid(x),
    "gelu": lambda x: 0.5 * x * (1.0 + tirx.erf(x * (1.0 / math.sqrt(2.0)))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + tirx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x))),
}


F32 = "float32"


def _f32(e):
    """e in float32 (unchanged if it is already: the float32 kernels stay exactly as they were)."""
    dtype = getattr(e, "dtype", None)  # a tensor element; other expressions carry a type instead
    return e if str(dtype if dtype is not None else e.ty) == F32 else e.astype(F32)


def _out(e, dtype: str):
    return e if dtype == F32 else e.astype(dtype)


def _rep(r, i):
    """The repeat selecting per-depth tensors for row i: r itself (a loop counter, or 0), or — in the
    host-driven block step, where every token sits at its own depth — r[i] of a per-token tensor."""
    return r[i] if isinstance(r, te.Tensor) else r


def _packed(w: te.Tensor, r, o, k, t: int):
    """Element (o, k) of a packed matrix [O/T, K, T], or of repeat r of a stack [R, O/T, K, T]."""
    if len(w.shape) == 3:
        return w[o // t, k, o % t]
    return w[r, o // t, k, o % t]


def _int4(codes: te.Tensor, scales: te.Tensor, zeros, o, k, t: int, block: int):
    """Decoded weight (o, k) of the int4 layout (tvm_params): the nibble of byte k // 2 (even k low),
    minus its block's zero point (symmetric: 8), times its block's scale. Evaluated inside the
    matmul's reduction, so the fp32 weight never exists in memory."""
    byte = codes[o // t, k // 2, o % t].astype("int32")
    code = ((byte >> ((k % 2) * 4).astype("int32")) & 15).astype("float32")
    zero = zeros[o // t, k // block, o % t] if zeros is not None else tirx.const(8.0, "float32")
    return (code - _f32(zero)) * _f32(scales[o // t, k // block, o % t])


def _row_reader(x: te.Tensor, clamp: bool = False):
    """x as [s, K] whatever its trailing dims (the attention output is [s, heads, head_dim]).
    clamp: rows past the end read the last row (for matmuls padded to whole register tiles)."""
    last = x.shape[0] - 1
    row = (lambda i: tirx.min(i, last)) if clamp else (lambda i: i)
    if len(x.shape) == 2:
        return lambda i, k: x[row(i), k]
    d = x.shape[2]
    return lambda i, k: x[row(i), k // d, k % d]


def _padded_rows(s, rows: int):
    """s rounded up to whole tiles of `rows`: the tiled loops then need no bounds check, which is
    what lets the accumulators stay in registers (a predicated tile ran 3x slower)."""
    return s if rows == 1 else (s + rows - 1) // rows * rows


def _in_features(x: te.Tensor):
    return x.shape[1] if len(x.shape) == 2 else x.shape[1] * x.shape[2]


def dense(x, w, w_scale, w_zero, bias, lora_t, lora_b, residual, r, *, out_features: int, t: int, rank: int = 0,
          seg_tiles: tuple[int, ...] = (0,), act: str | None = None, gated: bool = False, block: int = 0,
          rows: int = 1, split_gated: bool = False):
    """y = x W^T (+ bias[r]) (+ lora_t B[r]^T per member) (+ residual), then act / act(gate) * up.

    x [s, K]; w packed [O/T, K, T] (or a stack [R, O/T, K, T], e.g. LoRA A), or with w_scale the int4
    codes [O/T, Kp/2, T] with scales (and zero points, None if symmetric) [O/T, K/block, T];
    lora_t [s, members*rank] is x A^T of the group; lora_b packed [R, O/T, rank, T]; seg_tiles:
    first tile of each member. rows: the schedule's register-tile height; the matmul and LoRA-B
    products are computed for s rounded up to it (the extra rows repeat the last and are dropped).

    split_gated (GPU): the gate and up halves are separate blocks ("matmul", "lora_b", "epilogue"
    and the same with "_up") over the same [s, F] domain as the output, so a GPU thread block
    that owns outputs h..h+n computes exactly its gate and up rows. With one [s, 2F] block the
    output h reads columns h and F + h, a region no tile schedule can split (dlight then ran the
    whole kernel in one thread block).
    """
    s, out = x.shape[0], out_features
    if gated and split_gated:
        f = out // 2
        gate = _dense_part(x, w, w_scale, w_zero, bias, lora_t, lora_b, None, r, 0, f, "", t=t, rank=rank,
                           seg_tiles=seg_tiles, block=block, rows=rows)
        up = _dense_part(x, w, w_scale, w_zero, bias, lora_t, lora_b, None, r, f, f, "_up", t=t, rank=rank,
                         seg_tiles=seg_tiles, block=block, rows=rows)
        return te.compute((s, f), lambda i, h: _out(ACT[act](gate[i, h]) * up[i, h], x.dtype), name="gated")
    z = _dense_part(x, w, w_scale, w_zero, bias, lora_t, lora_b, residual, r, 0, out, "", t=t, rank=rank,
                    seg_tiles=seg_tiles, block=block, rows=rows)
    if gated:
        f = out // 2
        return te.compute((s, f), lambda i, h: _out(ACT[act](z[i, h]) * z[i, f + h], x.dtype), name="gated")
    if act:
        return te.compute((s, out), lambda i, h: _out(ACT[act](z[i, h]), x.dtype), name="act")
    if x.dtype != F32:  # the epilogue sums in float32
        return te.compute((s, out), lambda i, h: z[i, h].astype(x.dtype), name="cast")
    return z


def _dense_part(x, w, w_scale, w_zero, bias, lora_t, lora_b, residual, r, lo: int, n: int, suffix: str, *,
                t: int, rank: int, seg_tiles: tuple[int, ...], block: int, rows: int):
    """Output columns [lo, lo + n) of `dense` before its activation: blocks matmul, lora_b, epilogue
    (each name + suffix)."""
    s, kdim = x.shape[0], _in_features(x)
    padded = -(-n // t) * t  # whole tiles: the matmul loops carry no tail predicate
    sp = _padded_rows(s, rows)
    xr = _row_reader(x, clamp=rows > 1)
    if rows > 1:  # x padded to sp rows as its own (inlined on CPU) block: a GPU schedule stages its tiles
        xp = te.compute((sp, kdim), lambda i, k: xr(i, k), name="x_pad" + suffix)
        xr = lambda i, k: xp[i, k]  # noqa: E731
    lt_row = (lambda i: tirx.min(i, s - 1)) if rows > 1 else (lambda i: i)
    col = (lambda o: o) if lo == 0 else (lambda o: o + lo)
    # per-token depths (block step): padded rows read the last row's
    rep = (lambda i: r[tirx.min(i, s - 1)]) if isinstance(r, te.Tensor) else (lambda i: r)
    k = te.reduce_axis((0, kdim), name="k")
    if w_scale is None:
        weight = lambda i, o, k: _packed(w, rep(i), col(o), k, t)  # noqa: E731
    else:
        weight = lambda i, o, k: _int4(w, w_scale, w_zero, col(o), k, t, block)  # noqa: E731
    y = te.compute((sp, padded), lambda i, o: te.sum(_f32(xr(i, k)) * _f32(weight(i, o, k)), axis=k),
                   name="matmul" + suffix)
    terms = [lambda i, o: y[i, o]]
    if bias is not None:
        terms.append(lambda i, o: _f32(bias[rep(i), col(o)]))
    if lora_t is not None:
        j = te.reduce_axis((0, rank), name="j")
        inner = [st for st in seg_tiles[1:] if lo // t < st < (lo + n) // t]
        if inner:  # the part spans several members: which one from the tile index
            def member(tile):
                return reduce(lambda acc, st: acc + tirx.if_then_else(tile >= st, 1, 0), seg_tiles[1:],
                              tirx.const(0, "int64"))
        else:  # one member (a split gate or up half, or a single-member group): a constant
            first = sum(1 for st in seg_tiles[1:] if st <= lo // t)
            member = lambda tile: first  # noqa: E731

        lb = te.compute((sp, padded), lambda i, o: te.sum(
            _f32(lora_t[lt_row(i), member(col(o) // t) * rank + j]) * _f32(lora_b[rep(i), col(o) // t, j, col(o) % t]),
            axis=j),
            name="lora_b" + suffix)
        terms.append(lambda i, o: lb[i, o])
    if residual is not None:
        terms.append(lambda i, o: _f32(residual[i, o]))
    return te.compute((s, n), lambda i, o: reduce(lambda a, f: a + f(i, o), terms[1:], terms[0](i, o)),
                      name="epilogue" + suffix)


def norm(x, w, b, r, pick, residual=None, *, kind: str, eps: float):
    """RMSNorm / LayerNorm over the last axis with the repeat-r weights, of every row of x or of the
    rows `pick` [n] (the positions whose logits are wanted); kind "none" only gathers the rows.
    residual: added after the norm (Ouro's sandwich norms: x + norm(sublayer output))."""
    s, h = x.shape
    rows = s if pick is None else pick.shape[0]

    def xr(i, c):
        return _f32(x[i, c] if pick is None else x[pick[i], c])

    if kind == "none":
        return te.compute((rows, h), lambda i, c: _out(xr(i, c), x.dtype), name="norm")
    rep = lambda i: _rep(r, i)  # noqa: E731
    add = (lambda i, c, v: v) if residual is None else (lambda i, c, v: v + _f32(residual[i, c]))  # noqa: E731
    k = te.reduce_axis((0, h), name="k")
    if kind == "rms":
        ss = te.compute((rows,), lambda i: te.sum(xr(i, k) * xr(i, k), axis=k), name="sumsq")
        return te.compute((rows, h), lambda i, c: _out(add(i, c, xr(i, c) * tirx.rsqrt(ss[i] / h + eps)
                                                           * _f32(w[rep(i), c])), x.dtype), name="norm")
    mean = te.compute((rows,), lambda i: te.sum(xr(i, k), axis=k), name="sum")
    k2 = te.reduce_axis((0, h), name="k2")
    var = te.compute((rows,), lambda i: te.sum((xr(i, k2) - mean[i] / h) * (xr(i, k2) - mean[i] / h), axis=k2), name="sumsq")
    return te.compute((rows, h), lambda i, c: _out(add(i, c, (xr(i, c) - mean[i] / h) * tirx.rsqrt(var[i] / h + eps)
                                                           * _f32(w[rep(i), c]) + _f32(b[rep(i), c])), x.dtype),
                      name="norm")


def qk_rope(qkv, cos, sin, pos, q_norm, k_norm, r, *, heads: int, kv_heads: int, head_dim: int,
            rotary_dim: int, eps: float):
    """[s, (h + 2kv) * d] -> [s, h + 2kv, d]: optional per-head RMSNorm of q and k, then RoPE on q and k.

    The tables are the reference's float64 cos/sin cast to float32, gathered at the cache's
    query positions, so RoPE (incl. llama3 scaling and partial rotary) matches bit for bit.
    """
    s, d, rot_heads = qkv.shape[0], head_dim, heads + kv_heads
    half = rotary_dim // 2
    src = lambda i, h, c: _f32(qkv[i, h * d + c])  # noqa: E731
    if q_norm is not None:
        k = te.reduce_axis((0, d), name="k")
        ss = te.compute((s, rot_heads), lambda i, h: te.sum(src(i, h, k) * src(i, h, k), axis=k), name="sumsq")
        weight = lambda i, h, c: tirx.if_then_else(h < heads, _f32(q_norm[_rep(r, i), c]),  # noqa: E731
                                                   _f32(k_norm[_rep(r, i), c]))
        xn = te.compute((s, rot_heads, d), lambda i, h, c: src(i, h, c) * tirx.rsqrt(ss[i, h] / d + eps)
                        * weight(i, h, c), name="qk_norm")
        normed = lambda i, h, c: xn[i, h, c]  # noqa: E731
    else:
        normed = src

    def rotated(i, h, c):
        p = pos[i]
        partner = tirx.if_then_else(c < half, -normed(i, h, c + half), normed(i, h, c - half))
        return normed(i, h, c) * _f32(cos[p, c]) + partner * _f32(sin[p, c])

    def out(i, h, c):
        rope = tirx.if_then_else(c < rotary_dim, rotated(i, h, tirx.min(c, rotary_dim - 1)), normed(i, h, c))
        return _out(tirx.if_then_else(h < rot_heads, rope, src(i, h, c)), qkv.dtype)

    return te.compute((s, heads + 2 * kv_heads, d), out, name="rope")


def embed(ids, table, *, hidden: int, scale: float, t: int = 0):
    """Rows of the embedding [s, H]; t > 0: gathered from the packed (tied) LM head [V/T, H, T]."""
    s = ids.shape[0]
    if t:
        row = lambda i, c: table[ids[i] // t, c, ids[i] % t]  # noqa: E731
    else:
        row = lambda i, c: table[ids[i], c]  # noqa: E731
    return te.compute((s, hidden), lambda i, c: _out(_f32(row(i, c)) * scale, table.dtype), name="embed")
