"""Host-side weight layout for the TVM lowering: fuse, stack and pack the model's tensors.

The Relax graph never fuses or transposes weights; everything it reads is laid out here once,
in numpy, at compile time (STYLE rule 3):

- q/k/v and gate/up are fused along the output dimension ("groups": qkv, o, gate_up, down).
- Every matrix is packed as ``[ceil(out / T), in, T]`` so an output tile of T columns reads
  contiguous memory and vectorizes as T-wide FMAs (T = 16 on AVX2 CPUs, 1 on GPUs where the
  packed shape is just the plain ``[out, in, 1]``).
- LoRA of a group: A of every member concatenated along the rank (each padded to the group's
  largest rank ``rr``), one matmul for the whole group; B packed per output tile so that the
  tile reads the rank slice of its own member (``seg(o // T) * rr + j``).
- Vectors (norm weights and biases, linear biases) are always ``[R, n]`` stacks, R = repeats of
  the block's stage (shared vectors are broadcast), so the graph selects them by repeat index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgeloop.spec import ModelSpec, Recursion, rope_tables


@dataclass(frozen=True)
class Group:
    """A fused linear: members (name, out_features) concatenated along the output."""

    name: str
    members: tuple[tuple[str, int], ...]
    in_features: int
    rank: int  # rr: the largest LoRA rank among the members, 0 without LoRA
    bias: bool

    @property
    def out_features(self) -> int:
        return sum(out for _, out in self.members)

    def segment_starts(self) -> list[int]:
        """Output offset where each member starts."""
        starts, acc = [], 0
        for _, out in self.members:
            starts.append(acc)
            acc += out
        return starts


def linear_groups(spec: ModelSpec, recursion: Recursion) -> list[Group]:
    """The fused linears of one layer, in execution order."""
    shapes = spec.linear_shapes()
    plan = [("qkv", ("q", "k", "v")), ("o", ("o",)),
            ("gate_up", ("gate", "up") if spec.gated_mlp else ("up",)), ("down", ("down",))]
    groups = []
    for gname, names in plan:
        rank = max(recursion.lora_ranks.get(n, 0) for n in names)
        groups.append(Group(gname, tuple((n, shapes[n][0]) for n in names), shapes[names[0]][1], rank,
                            spec.linear_has_bias(names[0])))
    return groups


def tile_width(spec: ModelSpec, recursion: Recursion, preferred: int) -> int:
    """Largest T <= preferred that divides every member boundary (so a tile never straddles two)."""
    sizes = [out for g in linear_groups(spec, recursion) for _, out in g.members]
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


@dataclass
class ParamTable:
    """Ordered graph parameters: names, arrays and the index of each name."""

    names: list[str] = field(default_factory=list)
    arrays: list[np.ndarray] = field(default_factory=list)

    def add(self, name: str, array: np.ndarray) -> None:
        self.names.append(name)
        self.arrays.append(np.ascontiguousarray(array, dtype=np.float32))

    def index(self, name: str) -> int:
        return self.names.index(name)

    def has(self, name: str) -> bool:
        return name in self.names

    def shape(self, name: str) -> tuple[int, ...]:
        return self.arrays[self.index(name)].shape


def _stacked_vector(tensors: dict, key: str, repeats: int, per_depth: bool) -> np.ndarray:
    v = np.asarray(tensors[key], dtype=np.float32)
    return v if per_depth else np.broadcast_to(v, (repeats, v.shape[-1]))


def build_params(spec: ModelSpec, recursion: Recursion, tensors: dict[str, np.ndarray], t: int,
                 max_context: int) -> ParamTable:
    """Every tensor the graph reads, laid out for it."""
    p = ParamTable()
    embed = tensors["embed.weight"]
    head = embed if spec.tie_embeddings else tensors["lm_head.weight"]
    p.add("head.W", pack_matrix(head, t))
    if not spec.tie_embeddings:  # tied: the embedding is gathered from the packed head
        p.add("embed", embed)
    p.add("final_norm.weight", tensors["final_norm.weight"][None])
    if spec.norm_has_bias:
        p.add("final_norm.bias", tensors["final_norm.bias"][None])
    cos, sin = rope_tables(spec, max_context)
    p.add("rope.cos", cos)
    p.add("rope.sin", sin)
    for u in range(recursion.num_blocks):
        _add_block(p, spec, recursion, tensors, u, t)
    return p


def _add_block(p: ParamTable, spec: ModelSpec, recursion: Recursion, tensors: dict, u: int, t: int) -> None:
    reps, per_depth = recursion.repeats_of_block(u), recursion.per_depth_vectors
    pre = f"blocks.{u}"
    for name in ("input_norm.weight", "input_norm.bias", "post_norm.weight", "post_norm.bias",
                 "q_norm.weight", "k_norm.weight"):
        if f"{pre}.{name}" in tensors:
            p.add(f"{pre}.{name}", _stacked_vector(tensors, f"{pre}.{name}", reps, per_depth))
    for g in linear_groups(spec, recursion):
        w = np.concatenate([tensors[f"{pre}.{n}.weight"] for n, _ in g.members], axis=0)
        p.add(f"{pre}.{g.name}.W", pack_matrix(w, t))
        if g.bias:
            p.add(f"{pre}.{g.name}.bias", np.concatenate(
                [_stacked_vector(tensors, f"{pre}.{n}.bias", reps, per_depth) for n, _ in g.members], axis=-1))
        if g.rank:
            a, b = _group_lora(tensors, pre, g, reps)
            p.add(f"{pre}.{g.name}.A", pack_matrix(a, t))
            p.add(f"{pre}.{g.name}.B", pack_matrix(b, t))


def _group_lora(tensors: dict, pre: str, g: Group, reps: int) -> tuple[np.ndarray, np.ndarray]:
    """A [R, members * rr, in] and B [R, out, rr], each member's rank zero-padded to rr."""
    rr, n = g.rank, len(g.members)
    a = np.zeros((reps, n * rr, g.in_features), np.float32)
    b = np.zeros((reps, g.out_features, rr), np.float32)
    for m, ((name, out), start) in enumerate(zip(g.members, g.segment_starts())):
        la, lb = tensors.get(f"{pre}.lora.{name}.A"), tensors.get(f"{pre}.lora.{name}.B")
        if la is None:  # this member has no LoRA: its rows stay zero
            continue
        r = la.shape[1]
        a[:, m * rr:m * rr + r] = la
        b[:, start:start + out, :r] = lb
    return a, b
