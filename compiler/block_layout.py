"""The block layout: how one shared block's tensors are grouped, fused and stacked — defined once.

Every lowering (ONNX, TVM) and the parity tests read a block through `block_tensors`, so a new
backend never re-derives the grouping, the LoRA stacking or which vectors are per depth:

- **Groups**: linears that read the same input run as one matmul: `qkv` (q, k, v), `o`,
  `gate_up` (gate, up; only `up` for non-gated MLPs) and `down`. A group's weight is its
  members' weights concatenated along the output, ``W [out_total, in]``.
- **LoRA**: per depth (leading axis R = repeats of the block's stage). The members' A factors
  are concatenated along the rank, ``A [R, rank_total, in]`` (one small matmul for the whole
  group); each member keeps its own ``B [R, out_m, rank_m]`` (no zero-padded block-diagonal
  matrix). `Member.rank_offset` says where a member's rank slice starts in A.
- **Vectors** (norm weights and biases, linear biases): ``[R, n]`` when the model keeps them
  per depth, ``[1, n]`` when they are shared (`BlockTensors.per_depth`).
- **LayerPlan**: where the norms and residual adds sit in a layer (pre-norm, GPT-NeoX's
  parallel residual, Ouro's sandwich norms on the sublayer outputs), read by every lowering.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeloop.spec import ModelSpec, Recursion


@dataclass(frozen=True)
class Member:
    name: str  # q, k, v, o, gate, up, down
    out_features: int
    out_offset: int  # where its outputs start in the group's output
    rank: int  # LoRA rank (0: no LoRA)
    rank_offset: int  # where its rank slice starts in the group's concatenated A


@dataclass(frozen=True)
class Group:
    name: str  # qkv | o | gate_up | down
    members: tuple[Member, ...]
    in_features: int
    bias: bool

    @property
    def out_features(self) -> int:
        return sum(m.out_features for m in self.members)

    @property
    def rank_total(self) -> int:
        return sum(m.rank for m in self.members)

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.members)

    def member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)


_GROUPS = (("qkv", ("q", "k", "v")), ("o", ("o",)), ("gate_up", ("gate", "up")), ("down", ("down",)))


def groups(spec: ModelSpec, recursion: Recursion | None = None) -> tuple[Group, ...]:
    """The fused linears of one layer, in execution order (ranks from the recursion)."""
    shapes = spec.linear_shapes()
    ranks = recursion.lora_ranks if recursion is not None and recursion.loops > 1 else {}
    out = []
    for name, names in _GROUPS:
        if name == "gate_up" and not spec.gated_mlp:
            names = ("up",)
        members, off, roff = [], 0, 0
        for n in names:
            rank = int(ranks.get(n, 0))
            members.append(Member(n, shapes[n][0], off, rank, roff))
            off, roff = off + shapes[n][0], roff + rank
        out.append(Group(name, tuple(members), shapes[names[0]][1], spec.linear_has_bias(names[0])))
    return tuple(out)


@dataclass(frozen=True)
class LayerPlan:
    """Where a layer's norms and residual adds sit (read by every lowering and the reference)."""

    parallel_residual: bool  # GPT-NeoX: x + attn(n1(x)) + mlp(n2(x))
    sandwich: bool  # Ouro: attn and MLP outputs normed (attn_out_norm / mlp_out_norm) before each add
    qk_norm: bool  # Qwen3: RMSNorm over head_dim of q and k

    @staticmethod
    def of(spec: ModelSpec) -> LayerPlan:
        return LayerPlan(spec.parallel_residual, spec.sandwich_norms, spec.qk_norm)

    def norms(self) -> tuple[str, ...]:
        """Norm vector names of a layer, in execution order."""
        names = ["input_norm"] + (["attn_out_norm"] if self.sandwich else []) + ["post_norm"]
        return tuple(names + (["mlp_out_norm"] if self.sandwich else []))


@dataclass
class BlockTensors:
    """Everything block `block` reads, laid out once (float32 numpy, see the module docstring)."""

    block: int
    repeats: int  # R: depths that run this block
    per_depth: bool  # vectors are [R, n] (else [1, n])
    groups: tuple[Group, ...]
    weights: dict[str, np.ndarray]  # group -> W [out_total, in]
    biases: dict[str, np.ndarray]  # group -> [R | 1, out_total]
    lora_a: dict[str, np.ndarray]  # group -> [R, rank_total, in]
    lora_b: dict[str, dict[str, np.ndarray]]  # group -> member -> [R, out_m, rank_m]
    vectors: dict[str, np.ndarray]  # "input_norm.weight", "q_norm.weight", ... -> [R | 1, n]

    def vector(self, name: str) -> np.ndarray | None:
        return self.vectors.get(name)

    def padded_lora_a(self, group: str) -> np.ndarray:
        """A with every member's slice padded to the group's largest rank: [R, members * r_max, in]
        (for kernels that address member m's slice at m * r_max)."""
        g = next(gr for gr in self.groups if gr.name == group)
        r_max, a = g.max_rank, self.lora_a[group]
        out = np.zeros((a.shape[0], len(g.members) * r_max, g.in_features), np.float32)
        for i, m in enumerate(g.members):
            out[:, i * r_max:i * r_max + m.rank] = a[:, m.rank_offset:m.rank_offset + m.rank]
        return out

    def padded_lora_b(self, group: str) -> np.ndarray:
        """The members' B stacked along the output and padded to r_max: [R, out_total, r_max]."""
        g = next(gr for gr in self.groups if gr.name == group)
        reps = self.repeats
        out = np.zeros((reps, g.out_features, g.max_rank), np.float32)
        for m in g.members:
            if m.rank:
                out[:, m.out_offset:m.out_offset + m.out_features, :m.rank] = self.lora_b[group][m.name]
        return out


def _vector_names(spec: ModelSpec) -> list[str]:
    """Norm weights and biases (linear biases are grouped separately)."""
    names = []
    for norm in LayerPlan.of(spec).norms():
        names.append(f"{norm}.weight")
        if spec.norm_has_bias:
            names.append(f"{norm}.bias")
    if spec.qk_norm:
        names += ["q_norm.weight", "k_norm.weight"]
    return names


def block_tensors(spec: ModelSpec, recursion: Recursion, tensors: dict[str, np.ndarray], u: int) -> BlockTensors:
    """Lay out block u of a model (edgeloop tensor names, see ModelSpec)."""
    reps = recursion.repeats_of_block(u)
    per_depth = recursion.per_depth_vectors
    pre = f"blocks.{u}."
    grps = groups(spec, recursion)

    def vec(name: str) -> np.ndarray:
        v = np.asarray(tensors[pre + name], np.float32)
        return v if per_depth else v[None, :]

    out = BlockTensors(u, reps, per_depth, grps, {}, {}, {}, {}, {})
    for g in grps:
        out.weights[g.name] = np.concatenate([tensors[f"{pre}{m.name}.weight"] for m in g.members], axis=0)
        if g.bias:
            out.biases[g.name] = np.concatenate([vec(f"{m.name}.bias") for m in g.members], axis=-1)
        lora = [m for m in g.members if m.rank and f"{pre}lora.{m.name}.A" in tensors]
        if lora and reps > 1:
            out.lora_a[g.name] = np.concatenate([tensors[f"{pre}lora.{m.name}.A"] for m in lora], axis=1)
            out.lora_b[g.name] = {m.name: tensors[f"{pre}lora.{m.name}.B"] for m in lora}
    for name in _vector_names(spec):
        out.vectors[name] = vec(name)
    return out
