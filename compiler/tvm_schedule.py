"""Tuning-free CPU schedules for the kernels of `tvm_ops` (TVM's llvm pipeline schedules nothing).

Each kernel is scheduled right where it is created, knowing its block names, so nothing
pattern-matches generic TIR; the KV-cache kernels that TVM ships are never touched (some are not
marked scheduled and break when rescheduled). Matmuls are register tiled: an output tile of
``rows x T`` accumulators stays in registers (a ``local`` cache written back once), the weight
tile streams contiguously from the packed layout, and T lanes vectorize as FMAs. Work is split
across cores by output tiles; small decode kernels stay single-threaded (a parallel launch
costs more than they do).
"""

from __future__ import annotations

from tvm import s_tir

PARALLEL_MIN_WORK = 1 << 15  # multiply-adds below which a decode matmul runs on one thread
PREFILL_ROWS = 4  # rows of a prefill register tile: 4 x 16 measured best with LoRA-B + SiLU (6: 0.75x, 8: 0.5x)


def _has_block(sch: s_tir.Schedule, name: str) -> bool:
    try:
        sch.get_sblock(name)
        return True
    except Exception:  # noqa: BLE001 - TVM raises a generic error for a missing block
        return False


def _vector_width(extent, preferred: int = 8) -> int:
    if not isinstance(extent, int):
        return 1
    v = preferred
    while v > 1 and extent % v:
        v //= 2
    return v


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if hasattr(ext, "value") else None


def tile_reduction(sch: s_tir.Schedule, name: str, t: int, rows: int, parallel: bool, k_pairs: bool = False) -> None:
    """Block (i, o, k): tiles of rows x t outputs accumulated in registers over k.

    k_pairs (int4): k runs as (k // 2, k % 2) with the inner pair unrolled, so each code byte is
    loaded once and its two nibble shifts are constants."""
    block = sch.get_sblock(name)
    i, o, k = sch.get_loops(block)
    ob, ot = sch.split(o, [None, t])
    ks = list(sch.split(k, [None, 2])) if k_pairs else [k]
    k = ks[0]
    if rows > 1:
        ib, it = sch.split(i, [None, rows])
        sch.reorder(ob, ib, *ks, it, ot)
    else:
        ib, it = i, None
        sch.reorder(ob, ib, *ks, ot)
    if k_pairs:
        sch.unroll(ks[1])
    write_back = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(write_back, ib)
    # loop kinds before decompose_reduction: parallel needs the block still a complete reduction
    if parallel:
        sch.parallel(ob)
    if t > 1:
        sch.vectorize(ot)
        sch.vectorize(sch.get_loops(write_back)[-1])
    if it is not None:
        sch.unroll(it)
    init = sch.decompose_reduction(block, k)
    if t > 1:
        sch.vectorize(sch.get_loops(init)[-1])


def elementwise(sch: s_tir.Schedule, name: str, parallel: bool, vectorize: bool = True) -> None:
    block = sch.get_sblock(name)
    loops = sch.get_loops(block)
    vec = _vector_width(_extent(sch, loops[-1])) if vectorize else 1
    if vec > 1:
        _, inner = sch.split(loops[-1], [None, vec])
        sch.vectorize(inner)
    if parallel:
        sch.parallel(loops[0])


def schedule_dense(sch: s_tir.Schedule, *, t: int, rows: int, decode: bool, work: int, int4: bool = False) -> None:
    """rows: the register-tile height the kernel was built with (tvm_ops.dense pads s to it)."""
    parallel = not decode or work >= PARALLEL_MIN_WORK
    if _has_block(sch, "x_pad"):  # the padded rows are read in place (clamped index) on CPU
        sch.compute_inline(sch.get_sblock("x_pad"))
    tile_reduction(sch, "matmul", t, rows, parallel, k_pairs=int4)
    if _has_block(sch, "lora_b"):
        tile_reduction(sch, "lora_b", t, rows, False)
    final = next((n for n in ("gated", "act", "cast") if _has_block(sch, n)), "epilogue")
    if final != "epilogue":
        sch.compute_inline(sch.get_sblock("epilogue"))
    elementwise(sch, final, not decode)


def schedule_rows(sch: s_tir.Schedule, *, out: str, producers: tuple[str, ...], decode: bool,
                  vectorize: bool = True) -> None:
    """Row-wise kernels (norms, qk-norm + RoPE): producers computed per row, rows across cores."""
    row = sch.get_loops(sch.get_sblock(out))[0]
    for name in producers:
        if _has_block(sch, name):
            sch.compute_at(sch.get_sblock(name), row)
    elementwise(sch, out, not decode, vectorize)
