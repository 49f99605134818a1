"""Tuning-free GPU schedules for the fused dense kernels of `tvm_ops` (CUDA, and any dlight GPU target).

Why our own and not dlight's: a dense of `tvm_ops` is two reductions (the matmul and the LoRA-B
product) plus an epilogue. dlight's GEMV and Matmul rules accept one reduction block, so the
kernel fell to GeneralReduction, which maps only the spatial axes shared by every block to
`blockIdx`: the gate/up kernel's output h reads matmul columns h and F + h, so it ran in ONE
thread block of 256 threads (97.9% of decode time on an H200), and every other dense ran one
block per output row with 256 threads reducing K and LoRA-B (248 of them idle). Each kernel is
scheduled where it is created, by block name, like the CPU schedules (`tvm_schedule`); the
function is then marked scheduled and dlight leaves it alone. Norms, RoPE, the embedding and
TVM's KV-cache kernels stay with dlight.

Decode (s = 1), a GEMV: the output columns are split over thread blocks, ``rows`` per block (one
warp each, threadIdx.y), chosen so that there are at least two blocks per SM when the columns
allow it. The warp splits K: each lane accumulates ``vec`` consecutive elements per step (one
128-bit load of fp32 weights, 32 bits of int4 codes), the lanes are reduced with warp shuffles
(rfactor + cross-thread reduction); then every lane adds the LoRA-B product (rank multiply-adds
on broadcast reads), bias and residual and applies the activation, and lane 0 stores.

Prefill (symbolic s), a GEMM: output tiles of ``TY*MI x TX*NI`` per thread block, ``MI x NI``
accumulators per thread in registers; x and W tiles of ``TILE_K`` stream through shared memory;
the LoRA-B product and the epilogue are computed per thread on its own outputs.
"""

from __future__ import annotations

from tvm import s_tir, tirx

WARP = 32
ROW_CHOICES = (8, 4, 2, 1)  # output columns (warps) per decode block
# prefill GEMM tile: TY x TX threads, MI x NI outputs each (a 32 x 32 tile: the models this targets
# have 500-2000 columns, so wider tiles would leave SMs idle at a few hundred tokens); TILE_K of the
# reduction per shared-memory step
TY, TX, MI, NI, TILE_K = 8, 8, 4, 4, 16
TILE_M = TY * MI  # prefill rows per thread block: the matmul is computed for s rounded up to it


def _has_block(sch: s_tir.Schedule, name: str) -> bool:
    try:
        sch.get_sblock(name)
        return True
    except Exception:  # noqa: BLE001 - TVM raises a generic error for a missing block
        return False


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def decode_rows(columns: int, sm_count: int) -> int:
    """Output columns per decode block: the most (fewer, fuller blocks) that still leaves at least
    two blocks per SM; one per block when even that is fewer than 2 x SMs."""
    for rows in ROW_CHOICES:
        if -(-columns // rows) >= 2 * sm_count:
            return rows
    return 1


def _vector(kdim: int, weight_dtype: str) -> int:
    """K elements a lane reads per step: 4 floats (a 128-bit load in fp32, 64-bit in fp16: TVM 0.27's
    CUDA codegen cannot declare the float32x8 accumulators of 8 halves), 8 int4 codes (32 bits);
    smaller when K is not a multiple of the warp's step (then a tail predicate is needed)."""
    v = 8 if weight_dtype == "uint8" else 4
    while v > 1 and kdim % (WARP * v):
        v //= 2
    return v


def _parts(sch: s_tir.Schedule) -> list[str]:
    return [sfx for sfx in ("", "_up") if _has_block(sch, "matmul" + sfx)]


def _final(sch: s_tir.Schedule) -> str:
    """Inline the epilogues into the activation (if any): the output block is what the schedule tiles."""
    final = next((n for n in ("gated", "act", "cast") if _has_block(sch, n)), None)
    if final is None:
        return "epilogue"
    for sfx in _parts(sch):
        if _has_block(sch, "epilogue" + sfx):
            sch.compute_inline(sch.get_sblock("epilogue" + sfx))
    return final


def schedule_dense(sch: s_tir.Schedule, *, decode: bool, sm_count: int, int4: bool = False) -> None:
    """Schedule one `tvm_ops.dense` kernel (decode: GEMV, else GEMM); see the module docstring."""
    final = _final(sch)
    if decode:
        _gemv(sch, final, sm_count, int4)
    else:
        _gemm(sch, final)


def _gemv(sch: s_tir.Schedule, final: str, sm_count: int, int4: bool) -> None:
    parts = _parts(sch)
    chains = [_split_k(sch, "matmul" + sfx) for sfx in parts]
    out = sch.get_sblock(final)
    _, h = sch.get_loops(out)
    rows = decode_rows(_extent(sch, h), sm_count)
    bx, ty = sch.split(h, [None, rows])
    sch.bind(bx, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    for sfx, (rf, rf2, total, vec) in zip(parts, chains):
        if _has_block(sch, "lora_b" + sfx):  # rank multiply-adds, read by every lane of the warp
            lora = sch.get_sblock("lora_b" + sfx)
            sch.compute_at(lora, ty)
            sch.set_scope(lora, 0, "local")
        # consumers first: each lands before its consumer under ty. rf and rf2 keep one loop per
        # iterator, in iterator order: rf (lane*vec, i, o, k steps), rf2 (lane, i, o, vec), so steps
        # or vec of extent 1 still have a loop; total keeps only its lane loop (a cross-lane
        # reduction needs it innermost)
        sch.compute_at(total, ty)
        sch.compute_at(rf2, ty, preserve_unit_loops=True)
        sch.compute_at(rf, ty, preserve_unit_loops=True)
        lane_v, ko = sch.get_loops(rf)[-4], sch.get_loops(rf)[-1]
        assert _extent(sch, lane_v) == WARP * vec, "unexpected loop order after rfactor / compute_at"
        lane, v = sch.split(lane_v, [WARP, vec])
        sch.reorder(lane, ko, v)
        sch.bind(lane, "threadIdx.x")
        if int4:
            sch.unroll(v)  # nibble pairs of 4 code bytes: constant shifts
        else:
            sch.vectorize(v)  # one vector load of 4 weights and of 4 x per step (128 bits in fp32)
        sch.set_scope(rf, 0, "local")
        sch.decompose_reduction(rf, ko)
        # rf2: each lane sums its vec partials; total: the lanes, with warp shuffles
        sch.bind(sch.get_loops(rf2)[-4], "threadIdx.x")
        sch.set_scope(rf2, 0, "local")
        sch.bind(sch.get_loops(total)[-1], "threadIdx.x")
        sch.set_scope(total, 0, "local")


def _split_k(sch: s_tir.Schedule, name: str):
    """rfactor the matmul block (i, o, k) twice: (lane, vec) partials, then per-lane sums, then the
    block reduces the WARP lanes. Done before compute_at (rfactor needs the block's own loops)."""
    block = sch.get_sblock(name)
    k = sch.get_loops(block)[-1]
    vec = _vector(_extent(sch, k), str(sch.get(block).reads[1].source.dtype))  # reads: x, then the weight
    _, lane, v = sch.split(k, [None, WARP, vec])
    rf = sch.rfactor(sch.fuse(lane, v), 0)
    lane, _ = sch.split(sch.get_loops(block)[-1], [WARP, vec])
    rf2 = sch.rfactor(lane, 0)
    return rf, rf2, block, vec


def _gemm(sch: s_tir.Schedule, final: str) -> None:
    out = sch.get_sblock(final)
    i, h = sch.get_loops(out)
    by, ty, mi = sch.split(i, [None, TY, MI])
    bx, tx, ni = sch.split(h, [None, TX, NI])
    sch.reorder(by, bx, ty, tx, mi, ni)
    sch.bind(by, "blockIdx.y")
    sch.bind(bx, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    for sfx in _parts(sch):
        if _has_block(sch, "lora_b" + sfx):  # per thread, on its own MI x NI outputs
            lora = sch.get_sblock("lora_b" + sfx)
            sch.compute_at(lora, tx)
            sch.set_scope(lora, 0, "local")
        block = sch.get_sblock("matmul" + sfx)
        sch.compute_at(block, tx)
        a, b, k = sch.get_loops(block)[-3:]
        ko, ki = sch.split(k, [None, TILE_K])
        sch.reorder(ko, ki, a, b)
        depth = len(sch.get_loops(block)) - 3  # loops down to and including ko
        # x tiles: the padded-rows block itself, staged in shared memory (a cache of x would have a
        # symbolic size: its last tile's rows are clamped to s); W tiles (int4: the code bytes)
        x_tile = sch.get_sblock("x_pad" + sfx)
        sch.set_scope(x_tile, 0, "shared")
        for cache in (x_tile, sch.cache_read(block, 1, "shared", consumer_blocks=[block])):
            sch.compute_at(cache, ko)
            # rows padded to TILE_K + 1 words: the lanes of a warp read rows NI (or MI) apart, which
            # with unpadded rows of 16 words land in the same banks
            sch.storage_align(cache, 0, axis=0, factor=TILE_K, offset=1)
            fused = sch.fuse(*sch.get_loops(cache)[depth:])
            _, cy, cx = sch.split(fused, [None, TY, TX])
            sch.bind(cy, "threadIdx.y")
            sch.bind(cx, "threadIdx.x")
        sch.unroll(a)
        sch.unroll(b)
        sch.set_scope(block, 0, "local")
        sch.decompose_reduction(block, ko)
