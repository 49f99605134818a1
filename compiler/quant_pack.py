"""Weight quantization on the host (numpy only), shared by every backend.

Two layouts, both described by a `QuantScheme` registered once by name in `SCHEMES`:

* **block**: 4- or 8-bit codes in blocks of `block_size` along the *input* dimension K, laid out
  exactly as ONNX Runtime's `com.microsoft.MatMulNBits` (and `GatherBlockQuantized`) read them.
  For a weight W [K, N] (stored [in, out], as edgeloop stores block weights)::

      data         uint8 [N, n_blocks, block_size * bits / 8]   row n = output column n of W;
                   4-bit: two codes per byte, the even k in the low nibble
      scales       float [N * n_blocks]                          (n, block) row-major
      zero_points  uint8 [N * ceil(n_blocks * bits / 8)]         asymmetric only; 4-bit: two per
                   byte, the even block in the low nibble. Absent = symmetric (zero point 2^(bits-1))

  W[k, n] = (code - zero_point) * scale. K need not be a multiple of block_size: the tail block is
  partial and padded (its padding codes multiply zero-padded activations, so they are harmless).
* **channel**: int8 per output channel (symmetric), codes int8 [K, N], scales [N]: the layout of
  `DynamicQuantizeMatMul` / `MatMulInteger` B inputs.

int4 scales can be *searched* (`search=True`): per block, a grid of shrunken ranges plus a
least-squares refit of the scale for the chosen codes, keeping whichever reconstructs the block
best. It is never worse than round-to-nearest (RTN is the first candidate), see `compare_rtn`.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

# Range shrink factors tried by the scale search (1.0 = plain round-to-nearest, always first).
SEARCH_GRID = tuple(np.round(np.linspace(1.0, 0.6, 21), 4))


@dataclass(frozen=True)
class QuantScheme:
    """How one kind of weight is stored. Registered once, by name, in SCHEMES."""

    name: str
    bits: int  # 4 | 8
    layout: str  # "block" (MatMulNBits layout) | "channel" (int8 per output channel)


SCHEMES: dict[str, QuantScheme] = {
    s.name: s for s in (
        QuantScheme("int4-block", 4, "block"),
        QuantScheme("int8-block", 8, "block"),
        QuantScheme("int8-channel", 8, "channel"),
    )
}


@dataclass
class BlockPacked:
    """One weight W [K, N] in MatMulNBits layout (see the module docstring)."""

    data: np.ndarray  # uint8 [N, n_blocks, block_size * bits // 8]
    scales: np.ndarray  # float32 [N * n_blocks]
    zero_points: np.ndarray | None  # uint8 [N * ceil(n_blocks * bits / 8)] or None (symmetric)
    k: int
    n: int
    bits: int
    block_size: int

    @property
    def n_blocks(self) -> int:
        return -(-self.k // self.block_size)

    @property
    def nbytes(self) -> int:
        zp = 0 if self.zero_points is None else self.zero_points.nbytes
        return self.data.nbytes + self.scales.nbytes + zp


@dataclass
class ChannelPacked:
    """int8 per-output-channel weight W [K, N] ~= codes * scales[None, :]."""

    codes: np.ndarray  # int8 [K, N]
    scales: np.ndarray  # float32 [N]

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes


# ---------------------------------------------------------------------------------------------
# block (MatMulNBits) layout


SEARCH_ROWS = 256  # output columns per scale-search task: blocks are independent, so the search is
# split into tasks that threads run in parallel (numpy releases the GIL) and that stay cache-sized


def quantize_blocks(w: np.ndarray, *, bits: int = 4, block_size: int = 32, symmetric: bool = False,
                    search: bool = False, workers: int | None = None) -> BlockPacked:
    """W [K, N] (input dim first) -> BlockPacked. `search`: per-block scale search (better than RTN),
    on `workers` threads (default: the CPUs this process may use); the result does not depend on it."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize_blocks expects a 2-D weight [K, N], got shape {w.shape}")
    if bits not in (4, 8) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"bits must be 4 or 8 and block_size a power of two >= 16, got {bits}, {block_size}")
    k, n = w.shape
    blocks, valid = _to_blocks(w, block_size)  # [N, nb, bs], [nb, bs]
    scales, zps = _block_params(blocks, bits, symmetric)
    codes = _encode(blocks, scales, zps, bits)
    if search:
        parts = [slice(i, i + SEARCH_ROWS) for i in range(0, n, SEARCH_ROWS)]
        workers = workers or len(os.sched_getaffinity(0))
        with ThreadPoolExecutor(max(1, min(workers, len(parts)))) as pool:
            found = list(pool.map(lambda r: _search(blocks[r], valid, bits, symmetric, scales[r], zps[r], codes[r]),
                                  parts))
        scales, zps, codes = (np.concatenate([f[i] for f in found]) for i in range(3))
    return BlockPacked(data=_pack_codes(codes, bits), scales=scales.reshape(-1).astype(np.float32),
                       zero_points=None if symmetric else _pack_zero_points(zps, bits), k=k, n=n, bits=bits,
                       block_size=block_size)


def dequantize_blocks(p: BlockPacked) -> np.ndarray:
    """BlockPacked -> W [K, N] float32, exactly what MatMulNBits multiplies by."""
    codes = _unpack_codes(p.data, p.bits, p.block_size).astype(np.float32)  # [N, nb, bs]
    scales = p.scales.reshape(p.n, p.n_blocks, 1)
    zps = unpack_zero_points(p.zero_points, p.bits, p.n, p.n_blocks)[..., None]
    w = (codes - zps) * scales  # [N, nb, bs]
    return np.ascontiguousarray(w.reshape(p.n, -1)[:, :p.k].T)


def _to_blocks(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] -> [N, n_blocks, block_size] plus a validity mask [n_blocks, block_size].

    The tail is padded by repeating the last real row, which leaves every block's min and max
    unchanged, so padding never widens a scale."""
    k, _ = w.shape
    nb = -(-k // block_size)
    padded = np.pad(w, ((0, nb * block_size - k), (0, 0)), mode="edge") if nb * block_size != k else w
    valid = (np.arange(nb * block_size) < k).reshape(nb, block_size)
    return np.ascontiguousarray(padded.T).reshape(w.shape[1], nb, block_size), valid


def _block_params(blocks: np.ndarray, bits: int, symmetric: bool, shrink: float = 1.0):
    """Round-to-nearest scale and zero point per block (ranges scaled by `shrink`)."""
    qmax = 2 ** bits - 1
    if symmetric:
        # Map the largest-magnitude value (with its sign) onto -2^(bits-1): uses all 2^bits levels.
        idx = np.abs(blocks).argmax(-1)[..., None]
        peak = np.take_along_axis(blocks, idx, -1)[..., 0] * shrink
        scales = peak / -(2 ** (bits - 1))
        scales = np.where(scales == 0, 1.0, scales)
        return scales.astype(np.float32), np.full(scales.shape, 2 ** (bits - 1), np.float32)
    lo = np.minimum(blocks.min(-1), 0.0) * shrink  # the range includes 0 so zero stays exact
    hi = np.maximum(blocks.max(-1), 0.0) * shrink
    scales = (hi - lo) / qmax
    scales = np.where(scales == 0, 1.0, scales)
    zps = np.clip(np.round(-lo / scales), 0, qmax)
    return scales.astype(np.float32), zps.astype(np.float32)


def _encode(blocks: np.ndarray, scales: np.ndarray, zps: np.ndarray, bits: int) -> np.ndarray:
    q = np.round(blocks / scales[..., None]) + zps[..., None]
    return np.clip(q, 0, 2 ** bits - 1).astype(np.uint8)


def _block_error(blocks, valid, scales, zps, codes) -> np.ndarray:
    recon = (codes.astype(np.float32) - zps[..., None]) * scales[..., None]
    return (((recon - blocks) ** 2) * valid).sum(-1)  # [N, nb]


def _search(blocks, valid, bits, symmetric, scales, zps, codes):
    """Per block: try shrunken ranges, refit each scale by least squares, keep the best."""
    best_err = _block_error(blocks, valid, scales, zps, codes)
    for shrink in SEARCH_GRID:
        s, z = _block_params(blocks, bits, symmetric, float(shrink))
        for _ in range(2):  # codes for this scale, then the scale that best fits those codes
            c = _encode(blocks, s, z, bits)
            s = _refit_scale(blocks, valid, z, c, s)
        c = _encode(blocks, s, z, bits)
        err = _block_error(blocks, valid, s, z, c)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        scales, zps = np.where(better, s, scales), np.where(better, z, zps)
        codes = np.where(better[..., None], c, codes)
    return scales, zps, codes


def _refit_scale(blocks, valid, zps, codes, fallback) -> np.ndarray:
    """argmin_s sum((s * (code - zp) - w)^2) over the block's real elements."""
    centered = (codes.astype(np.float32) - zps[..., None]) * valid
    den = (centered * centered).sum(-1)
    num = (centered * blocks).sum(-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), fallback).astype(np.float32)


def _pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return codes
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)  # even k in the low nibble


def _unpack_codes(data: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    if bits == 8:
        return data
    out = np.empty(data.shape[:-1] + (block_size,), np.uint8)
    out[..., 0::2], out[..., 1::2] = data & 0x0F, data >> 4
    return out


def _pack_zero_points(zps: np.ndarray, bits: int) -> np.ndarray:
    z = zps.astype(np.uint8)  # [N, nb]
    if bits == 8:
        return z.reshape(-1)
    if z.shape[1] % 2:
        z = np.pad(z, ((0, 0), (0, 1)))  # each row starts on a byte boundary
    return (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8).reshape(-1)


def unpack_zero_points(packed: np.ndarray | None, bits: int, n: int, nb: int) -> np.ndarray:
    if packed is None:
        return np.full((n, nb), 2 ** (bits - 1), np.float32)
    if bits == 8:
        return packed.reshape(n, nb).astype(np.float32)
    z = packed.reshape(n, -1)
    both = np.stack([z & 0x0F, z >> 4], axis=-1).reshape(n, -1)
    return both[:, :nb].astype(np.float32)


# ---------------------------------------------------------------------------------------------
# int8 per output channel


def quantize_channels(w: np.ndarray) -> ChannelPacked:
    """W [K, N] -> symmetric int8 codes [K, N] with one scale per output column."""
    w = np.asarray(w, dtype=np.float32)
    scales = np.abs(w).max(0) / 127.0
    scales = np.where(scales == 0, 1.0, scales).astype(np.float32)
    codes = np.clip(np.round(w / scales), -127, 127).astype(np.int8)
    return ChannelPacked(codes, scales)


def dequantize_channels(p: ChannelPacked) -> np.ndarray:
    return p.codes.astype(np.float32) * p.scales[None, :]


# ---------------------------------------------------------------------------------------------
# by scheme name


def quantize(w: np.ndarray, scheme: str, *, block_size: int = 32, symmetric: bool = False,
             search: bool = False) -> BlockPacked | ChannelPacked:
    s = SCHEMES[scheme]
    if s.layout == "channel":
        return quantize_channels(w)
    return quantize_blocks(w, bits=s.bits, block_size=block_size, symmetric=symmetric, search=search)


def dequantize(p: BlockPacked | ChannelPacked) -> np.ndarray:
    return dequantize_blocks(p) if isinstance(p, BlockPacked) else dequantize_channels(p)


def step_size(p: BlockPacked | ChannelPacked) -> np.ndarray:
    """The quantization step of every element of W [K, N] (for round-trip checks)."""
    if isinstance(p, ChannelPacked):
        return np.broadcast_to(p.scales[None, :], p.codes.shape)
    per_block = np.repeat(np.abs(p.scales).reshape(p.n, p.n_blocks), p.block_size, axis=1)[:, :p.k]
    return per_block.T


def compare_rtn(w: np.ndarray, *, bits: int = 4, block_size: int = 32, symmetric: bool = False) -> dict:
    """Reconstruction error (relative Frobenius) of plain RTN vs the searched scales."""
    norm = float(np.linalg.norm(w))

    def rel(p: BlockPacked) -> float:
        return float(np.linalg.norm(dequantize_blocks(p) - w)) / max(norm, 1e-30)

    rtn = rel(quantize_blocks(w, bits=bits, block_size=block_size, symmetric=symmetric))
    searched = rel(quantize_blocks(w, bits=bits, block_size=block_size, symmetric=symmetric, search=True))
    return {"rtn_rel_error": rtn, "searched_rel_error": searched}
