"""Host-side weight layout for the TVM lowering: fuse, stack and pack the model's tensors.

The Relax graph never fuses or transposes weights; everything it reads is laid out here once,
in numpy, at compile time (STYLE rule 3):

- The grouping, fusion and LoRA stacking are `block_layout`'s (shared with every lowering); this
  module only packs them for the TVM kernels.
- Every matrix is packed as ``[ceil(out / T), in, T]`` so an output tile of T columns reads
  contiguous memory and vectorizes as T-wide FMAs (T = 16 on AVX2 CPUs, 1 on GPUs where the
  packed shape is just the plain ``[out, in, 1]``).
- LoRA of a group: A with every member's slice padded to the group's largest rank ``rr``
  (`BlockTensors.padded_lora_a`), one matmul for the whole group; B packed per output tile so
  that the tile reads the rank slice of its own member (``seg(o // T) * rr + j``).
- Vectors (norm weights and biases, linear biases) are always ``[R, n]`` stacks, R = repeats of
  the block's stage (shared vectors are broadcast), so the graph selects them by repeat index.
- int4 (`Int4Config`): each shared group matrix is packed by `compiler/quant_pack.quantize_blocks`
  (the ORT MatMulNBits layout, same options) and only *re-tiled* here, never re-encoded: its
  code bytes ``[N, n_blocks * bs / 2]`` (byte j = codes of k = 2j, low nibble, and 2j + 1) become
  ``Wq [N/T, Kp/2, T]`` uint8, its scales ``Ws [N/T, n_blocks, T]`` and (asymmetric) its zero
  points ``Wz [N/T, n_blocks, T]``. Padded output columns get scale 0, so they add nothing.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import numpy as np

from edgeloop.compiler import quant_pack as qp
from edgeloop.compiler.block_layout import BlockTensors, block_tensors, groups
from edgeloop.spec import ModelSpec, Recursion, rope_tables


def tile_width(spec: ModelSpec, recursion: Recursion, preferred: int) -> int:
    """Largest T <= preferred that divides every member boundary (so a tile never straddles two)."""
    sizes = [m.out_features for g in groups(spec, recursion) for m in g.members]
    t = preferred
    while t > 1 and any(s % t for s in sizes):
        t //= 2
    return t


def pack_matrix(w: np.ndarray, t: int) -> np.ndarray:
    """[..., out, in] -> [..., ceil(out / t), in, t] (zero rows pad the last tile)."""
    *lead, out, inp = w.shape
    tiles = -(-out // t)
    pad = tiles * t - out
    if pad:
        w = np.concatenate([w, np.zeros((*lead, pad, inp), w.dtype)], axis=-2)
    w = w.reshape(*lead, tiles, t, inp)
    return np.ascontiguousarray(np.swapaxes(w, -1, -2))


@dataclass(frozen=True)
class Int4Config:
    """--quant int4 options, passed unchanged to `quant_pack.quantize_blocks`."""

    block_size: int = 32
    symmetric: bool = True
    search: bool = True
    keep_float: tuple[str, ...] = ()  # globs over "b{u}.{group}.W" (the ORT names) or "blocks.{u}.{group}"

    def keeps(self, u: int, group: str) -> bool:
        names = (f"b{u}.{group}.W", f"blocks.{u}.{group}")
        return any(fnmatch.fnmatchcase(n, pat) for n in names for pat in self.keep_float)


@dataclass
class ParamTable:
    """Ordered graph parameters: names, arrays and the index of each name."""

    names: list[str] = field(default_factory=list)
    arrays: list[np.ndarray] = field(default_factory=list)
    float_dtype: str = "float32"  # storage of every float tensor (float16: --dtype float16, GPU targets)
    quantized: list[str] = field(default_factory=list)  # int4 group matrices ("blocks.0.qkv")
    kept_float: list[str] = field(default_factory=list)
    sq_error: dict[str, float] = field(default_factory=lambda: {"chosen": 0.0, "norm": 0.0})

    def add(self, name: str, array: np.ndarray, dtype: str | None = None) -> None:
        self.names.append(name)
        if array.dtype == np.uint8:  # int4 codes stay bytes
            dtype = np.uint8
        self.arrays.append(np.ascontiguousarray(array, dtype=dtype or self.float_dtype))

    def index(self, name: str) -> int:
        return self.names.index(name)

    def has(self, name: str) -> bool:
        return name in self.names

    def shape(self, name: str) -> tuple[int, ...]:
        return self.arrays[self.index(name)].shape


def _stacked(v: np.ndarray, repeats: int) -> np.ndarray:
    """[R | 1, n] -> [R, n] (a shared vector broadcast to every repeat)."""
    return np.broadcast_to(v, (repeats, v.shape[-1]))


def build_params(spec: ModelSpec, recursion: Recursion, tensors: dict[str, np.ndarray], t: int,
                 max_context: int, int4: Int4Config | None = None, float_dtype: str = "float32") -> ParamTable:
    """Every tensor the graph reads, laid out for it (floats stored as float_dtype)."""
    p = ParamTable(float_dtype=float_dtype)
    embed = tensors["embed.weight"]
    head = embed if spec.tie_embeddings else tensors["lm_head.weight"]
    p.add("head.W", pack_matrix(head, t))
    if not spec.tie_embeddings:  # tied: the embedding is gathered from the packed head
        p.add("embed", embed)
    p.add("final_norm.weight", tensors["final_norm.weight"][None])
    if spec.norm_has_bias:
        p.add("final_norm.bias", tensors["final_norm.bias"][None])
    if spec.exit_gate:
        p.add("exit_gate.W", pack_matrix(tensors["exit_gate.weight"], t))
        p.add("exit_gate.bias", tensors["exit_gate.bias"][None])
    cos, sin = rope_tables(spec, max_context)
    p.add("rope.cos", cos, "float32")  # small; RoPE is computed in float32 whatever the storage
    p.add("rope.sin", sin, "float32")
    for u in range(recursion.num_blocks):
        _add_block(p, block_tensors(spec, recursion, tensors, u), t, int4)
    return p


def _add_block(p: ParamTable, bt: BlockTensors, t: int, int4: Int4Config | None) -> None:
    u, reps = bt.block, bt.repeats
    pre = f"blocks.{u}"
    for name, v in bt.vectors.items():
        p.add(f"{pre}.{name}", _stacked(v, reps))
    for g in bt.groups:
        w = bt.weights[g.name]
        if int4 is not None and not int4.keeps(u, g.name):
            _add_int4(p, f"{pre}.{g.name}", w, t, int4)
        else:
            if int4 is not None:
                p.kept_float.append(f"{pre}.{g.name}")
            p.add(f"{pre}.{g.name}.W", pack_matrix(w, t))
        if g.name in bt.biases:
            p.add(f"{pre}.{g.name}.bias", _stacked(bt.biases[g.name], reps))
        if g.name in bt.lora_a:
            p.add(f"{pre}.{g.name}.A", pack_matrix(bt.padded_lora_a(g.name), t))
            p.add(f"{pre}.{g.name}.B", pack_matrix(bt.padded_lora_b(g.name), t))


def _add_int4(p: ParamTable, prefix: str, w: np.ndarray, t: int, cfg: Int4Config) -> None:
    """W [out, in] -> quant_pack's MatMulNBits packing, re-tiled to Wq / Ws (/ Wz) (module docstring)."""
    packed = qp.quantize_blocks(np.asarray(w, np.float32).T, bits=4, block_size=cfg.block_size,
                                symmetric=cfg.symmetric, search=cfg.search)
    n, nb = packed.n, packed.n_blocks
    p.add(f"{prefix}.Wq", pack_matrix(packed.data.reshape(n, -1), t))
    p.add(f"{prefix}.Ws", pack_matrix(packed.scales.reshape(n, nb), t))
    if packed.zero_points is not None:
        p.add(f"{prefix}.Wz", pack_matrix(qp.unpack_zero_points(packed.zero_points, 4, n, nb), t))
    p.quantized.append(prefix)
    p.sq_error["chosen"] += float(((qp.dequantize_blocks(packed) - w.T) ** 2).sum())
    p.sq_error["norm"] += float((np.asarray(w, np.float64) ** 2).sum())


def int4_summary(p: ParamTable, cfg: Int4Config) -> dict:
    """The manifest's "quantization" section (same keys as the ORT backend where they apply)."""
    err = p.sq_error
    return {"scheme": "int4", "schemes_by_kind": {"shared": "int4-block"}, "block_size": cfg.block_size,
            "symmetric": cfg.symmetric, "scale_search": cfg.search,
            "compute": f"float32 (codes decoded in the matmul), {p.float_dtype} activations",
            "quantized_weights": sorted(p.quantized), "kept_float": sorted(p.kept_float), "lora_dtype": p.float_dtype,
            "rel_error": round(math.sqrt(err["chosen"] / err["norm"]), 6) if err["norm"] else 0.0}
