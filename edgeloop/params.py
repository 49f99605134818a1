"""Parameter counts, computed from the description alone (no weights needed)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgeloop.spec import ModelSpec, Recursion


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # token embedding + untied LM head
    shared: int  # unique block weights (+ shared vectors) + final norm: "non-embedding"
    lora: int
    per_depth_vectors: int
    total: int
    original_total: int  # the vanilla L-layer model
    original_non_embedding: int

    @property
    def compression(self) -> float:
        return self.original_total / self.total

    def to_dict(self) -> dict:
        return {**asdict(self), "compression": round(self.compression, 4)}


def _layer_params(spec: ModelSpec) -> tuple[int, int]:
    """(linear weights, vectors) of one decoder layer."""
    weights = sum(o * i for o, i in spec.linear_shapes().values())
    return weights, sum(spec.vector_shapes().values())


def count_params(spec: ModelSpec, recursion: Recursion) -> ParamCounts:
    embedding = sum(int(_prod(s)) for n, s in spec.global_shapes().items() if n in ("embed.weight", "lm_head.weight"))
    final_norm = spec.hidden_size * (2 if spec.norm_has_bias else 1) + (spec.hidden_size + 1 if spec.exit_gate else 0)
    weights, vectors = _layer_params(spec)
    shapes = spec.linear_shapes()
    lora = per_depth = 0
    shared = final_norm
    for stage in recursion.stages:
        for _ in stage.blocks:
            shared += weights
            if recursion.per_depth_vectors:
                per_depth += vectors * stage.repeats
            else:
                shared += vectors
            if stage.repeats > 1:
                lora += stage.repeats * sum(r * (shapes[n][0] + shapes[n][1]) for n, r in recursion.lora_ranks.items())
    original_non_embedding = spec.stored_layers * (weights + vectors) + final_norm
    return ParamCounts(
        embedding=embedding,
        shared=shared,
        lora=lora,
        per_depth_vectors=per_depth,
        total=embedding + shared + lora + per_depth,
        original_total=embedding + original_non_embedding,
        original_non_embedding=original_non_embedding,
    )


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    for unit, div in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def describe_model(spec: ModelSpec, recursion: Recursion) -> dict:
    looped = [s for s in recursion.stages if s.repeats > 1]
    return {
        "family": spec.family,
        "layers": spec.num_layers,
        "unique_blocks": recursion.num_blocks,
        "shared_per_loop": recursion.shared_per_loop,
        "loops": recursion.loops,
        "sharing": recursion.sharing,
        "init": recursion.init,
        "stages": [{"blocks": list(s.blocks), "repeats": s.repeats} for s in recursion.stages],
        "looped_stages": len(looped),
        "lora_ranks": recursion.lora_ranks,
        "per_depth_vectors": recursion.per_depth_vectors,
        "hidden_size": spec.hidden_size,
        "heads": f"{spec.num_heads}q/{spec.num_kv_heads}kv x {spec.head_dim}",
        "vocab_size": spec.vocab_size,
        "max_position": spec.max_position,
        "params": count_params(spec, recursion).to_dict(),
        **({"natively_looped": {"stored_layers": spec.stored_layers, "loops": spec.native_loops}}
           if spec.native_loops > 1 else {}),
        **({"exit_gate": {"threshold": spec.exit_threshold, "rule": "cumulative exit probability >= threshold"}}
           if spec.exit_gate else {}),
        **({"norms": "sandwich (sublayer outputs normed), final norm after every loop"}
           if spec.sandwich_norms else {}),
    }
