"""The model description: one dataclass for the architecture, one for the recursion.

Everything downstream (reference model, converter, ONNX and TVM lowerings, runtimes) reads
these two objects and never the raw Hugging Face config. Family modules build a `ModelSpec`
from a config dict once; `Recursion` says how the unrolled depth positions map onto the
unique (shared) blocks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from edgeloop.errors import EdgeloopError

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
NORMS = ("rms", "layer")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a decoder-only transformer, family quirks resolved to plain fields."""

    family: str  # key in edgeloop.families.FAMILIES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int  # L: depth of the unrolled model
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    norm: str = "rms"  # "rms" or "layer" (LayerNorm with bias)
    norm_eps: float = 1e-5
    activation: str = "silu"
    gated_mlp: bool = True  # gate/up/down (SwiGLU, GeGLU) vs up/down (GPT-NeoX)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    parallel_residual: bool = False  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    rope_theta: float = 10000.0
    rotary_dim: int = 0  # 0 means head_dim; GPT-NeoX rotates only a prefix
    rope_scaling: dict | None = None  # {"type": "llama3" | "linear", ...}
    embed_scale: float = 1.0  # Gemma multiplies embeddings by sqrt(hidden_size)
    tie_embeddings: bool = False
    sliding_window: int | None = None
    # Natively looped checkpoints (Ouro): an RMSNorm on the attention and MLP outputs before each
    # residual add ("sandwich"), the final norm applied after every loop pass and fed to the next,
    # and a learned exit gate Linear(hidden -> 1) scoring every pass.
    sandwich_norms: bool = False
    loop_norm: bool = False
    exit_gate: bool = False  # exit_gate.weight [1, H] + bias [1] on the normed state of every loop boundary
    exit_threshold: float | None = None  # the checkpoint's own gate threshold (Ouro: early_exit_threshold)
    native_loops: int = 1  # a natively looped checkpoint (Ouro): it stores num_layers / native_loops layers

    def __post_init__(self):
        if self.rotary_dim == 0:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        self._check_ranges()
        if self.activation not in ACTIVATIONS:
            raise EdgeloopError(f"unsupported activation {self.activation!r}; edgeloop supports {', '.join(ACTIVATIONS)}")
        if self.norm not in NORMS:
            raise EdgeloopError(f"unsupported norm {self.norm!r}; edgeloop supports {', '.join(NORMS)}")
        if self.num_heads % self.num_kv_heads:
            raise EdgeloopError(
                f"inconsistent config: num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise EdgeloopError(f"inconsistent config: rotary dimension {self.rotary_dim} must be even and <= head_dim {self.head_dim}")

    def _check_ranges(self) -> None:
        """Sizes positive, floats finite and in range: a config that would give NaN logits is refused here,
        at convert, compile and load time alike."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise EdgeloopError(f"invalid model config: {name} must be a positive integer, got {value!r}")
        checks = {"norm_eps": (self.norm_eps, 0.0, 1.0), "rope_theta": (self.rope_theta, 0.0, math.inf),
                  "embed_scale": (self.embed_scale, 0.0, math.inf)}
        for name, (value, low, high) in checks.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not low < value < high:
                raise EdgeloopError(f"invalid model config: {name} must be a finite number in ({low:g}, {high:g}), "
                                    f"got {value!r}")
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool)
                                                or not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise EdgeloopError(f"invalid model config: sliding_window must be a positive integer, got {self.sliding_window!r}")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
        if isinstance(self.native_loops, bool) or not isinstance(self.native_loops, int) or self.native_loops < 1 \
                or self.num_layers % self.native_loops:
            raise EdgeloopError(f"invalid model config: {self.num_layers} unrolled layers cannot run "
                                f"{self.native_loops!r} loops")
        if self.exit_threshold is not None and (isinstance(self.exit_threshold, bool)
                                                or not isinstance(self.exit_threshold, (int, float))
                                                or not 0 < self.exit_threshold <= 1):
            raise EdgeloopError(f"invalid model config: the exit threshold must be in (0, 1], got {self.exit_threshold!r}")

    @property
    def stored_layers(self) -> int:
        """Layers a checkpoint of this model stores (natively looped ones store one loop's worth)."""
        return self.num_layers // self.native_loops

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def norm_has_bias(self) -> bool:
        return self.norm == "layer"

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of every linear in one decoder layer, in execution order."""
        h, f = self.hidden_size, self.intermediate_size
        shapes = {"q": (self.q_size, h), "k": (self.kv_size, h), "v": (self.kv_size, h), "o": (h, self.q_size)}
        if self.gated_mlp:
            shapes["gate"] = (f, h)
        shapes["up"] = (f, h)
        shapes["down"] = (h, f)
        return shapes

    def linear_has_bias(self, name: str) -> bool:
        if name in ("q", "k", "v"):
            return self.qkv_bias
        if name == "o":
            return self.o_bias
        return self.mlp_bias

    def vector_shapes(self) -> dict[str, int]:
        """Length of every vector parameter (norm weights and biases, linear biases) of one layer."""
        h = self.hidden_size
        norms = ("input_norm", "attn_out_norm", "post_norm", "mlp_out_norm") if self.sandwich_norms else \
            ("input_norm", "post_norm")
        vecs = {f"{n}.weight": h for n in norms}
        if self.norm_has_bias:
            vecs.update({f"{n}.bias": h for n in norms})
        if self.qk_norm:
            vecs.update({"q_norm.weight": self.head_dim, "k_norm.weight": self.head_dim})
        for name, (out, _) in self.linear_shapes().items():
            if self.linear_has_bias(name):
                vecs[f"{name}.bias"] = out
        return vecs

    def global_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameters outside the decoder layers."""
        shapes = {"embed.weight": (self.vocab_size, self.hidden_size), "final_norm.weight": (self.hidden_size,)}
        if self.norm_has_bias:
            shapes["final_norm.bias"] = (self.hidden_size,)
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        if self.exit_gate:
            shapes["exit_gate.weight"] = (1, self.hidden_size)
            shapes["exit_gate.bias"] = (1,)
        return shapes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        known = {f for f in cls.__dataclass_fields__}
        missing = [f for f in ("family", "vocab_size", "hidden_size", "num_layers") if f not in d]
        if missing:
            raise EdgeloopError(f"model config is missing {', '.join(missing)}; re-run `edgeloop convert`")
        return cls(**{k: v for k, v in d.items() if k in known})


def _check_rope_scaling(scaling: dict) -> None:
    if not isinstance(scaling, dict) or scaling.get("type") not in ("llama3", "linear"):
        raise EdgeloopError(f"invalid model config: rope scaling {scaling!r}; edgeloop supports llama3 and linear")
    keys = ("factor",) if scaling["type"] == "linear" else \
        ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    for key in keys:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise EdgeloopError(f"invalid model config: rope scaling {key} must be a finite number > 0, got {value!r}")
    if scaling["type"] == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise EdgeloopError("invalid model config: llama3 rope scaling needs high_freq_factor > low_freq_factor")


def rope_inv_freq(spec: ModelSpec) -> np.ndarray:
    """Inverse frequencies [rotary_dim // 2] (float64), including llama3 / linear scaling."""
    dim = spec.rotary_dim
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = spec.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling["type"]
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(is_medium, smoothed, scaled)
    raise EdgeloopError(f"unsupported rope scaling {kind!r}; edgeloop supports llama3 and linear")


def rope_tables(spec: ModelSpec, num_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables [num_positions, rotary_dim] in the rotate-half layout (float32)."""
    freqs = np.outer(np.arange(num_positions, dtype=np.float64), rope_inv_freq(spec))
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Recursion: unique blocks and the depth positions that run them

SHARING = ("none", "cycle", "sequence", "middle-cycle")
INITS = ("stepwise", "average", "lower")


@dataclass(frozen=True)
class Stage:
    """A run of unique blocks executed `repeats` times in a row (a loop when repeats > 1)."""

    blocks: tuple[int, ...]
    repeats: int


@dataclass(frozen=True)
class Depth:
    """One unrolled layer position: which block runs there and which repeat of its stage it is."""

    index: int  # d: 0..L-1, also the original layer index it replaces
    stage: int
    repeat: int  # r: selects the per-depth LoRA and vectors of the block
    block: int  # u: unique block id


@dataclass(frozen=True)
class Recursion:
    """How L depth positions map onto unique blocks, and how the blocks are relaxed."""

    sharing: str = "none"
    loops: int = 1  # B
    init: str = "stepwise"
    stages: tuple[Stage, ...] = ()
    lora_ranks: dict[str, int] = field(default_factory=dict)  # linear name -> rank (0 = none)
    per_depth_vectors: bool = False  # norm weights/biases and linear biases per depth position
    source_layers: tuple[int, ...] | None = None  # original layer of each block (stepwise, lower)

    @property
    def num_blocks(self) -> int:
        return sum(len(s.blocks) for s in self.stages)

    @property
    def num_depths(self) -> int:
        return sum(len(s.blocks) * s.repeats for s in self.stages)

    @property
    def shared_per_loop(self) -> int:
        """K: blocks in the looped stage (the largest one when there are several)."""
        looped = [len(s.blocks) for s in self.stages if s.repeats > 1]
        return max(looped) if looped else self.num_blocks

    def depths(self) -> list[Depth]:
        out, d = [], 0
        for si, stage in enumerate(self.stages):
            for r in range(stage.repeats):
                for u in stage.blocks:
                    out.append(Depth(d, si, r, u))
                    d += 1
        return out

    def repeats_of_block(self, block: int) -> int:
        for stage in self.stages:
            if block in stage.blocks:
                return stage.repeats
        raise KeyError(block)

    def to_dict(self) -> dict:
        return {
            "sharing": self.sharing,
            "loops": self.loops,
            "init": self.init,
            "stages": [{"blocks": list(s.blocks), "repeats": s.repeats} for s in self.stages],
            "lora_ranks": dict(self.lora_ranks),
            "per_depth_vectors": self.per_depth_vectors,
            "source_layers": list(self.source_layers) if self.source_layers is not None else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Recursion:
        src = d.get("source_layers")
        return cls(
            sharing=d["sharing"],
            loops=d["loops"],
            init=d.get("init", "stepwise"),
            stages=tuple(Stage(tuple(s["blocks"]), s["repeats"]) for s in d["stages"]),
            lora_ranks=dict(d.get("lora_ranks", {})),
            per_depth_vectors=d.get("per_depth_vectors", False),
            source_layers=tuple(src) if src is not None else None,
        )


def plan_stages(num_layers: int, loops: int, sharing: str) -> tuple[Stage, ...]:
    """Unique blocks and their repeats for L layers tied into `loops` loops."""
    if sharing not in SHARING:
        raise EdgeloopError(f"unknown sharing {sharing!r}; choose one of {', '.join(SHARING)}")
    if loops < 1:
        raise EdgeloopError(f"--loops must be >= 1, got {loops}")
    if loops == 1 or sharing == "none":
        return (Stage(tuple(range(num_layers)), 1),)
    looped = num_layers - 2 if sharing == "middle-cycle" else num_layers
    if looped <= 0 or looped % loops:
        raise EdgeloopError(_divisor_message(num_layers, loops, sharing))
    k = looped // loops
    if sharing == "cycle":
        return (Stage(tuple(range(k)), loops),)
    if sharing == "sequence":
        return tuple(Stage((i,), loops) for i in range(k))
    # middle-cycle: the first and last layers stay unique around a CYCLE-shared middle
    return (Stage((0,), 1), Stage(tuple(range(1, 1 + k)), loops), Stage((1 + k,), 1))


def _divisor_message(num_layers: int, loops: int, sharing: str) -> str:
    looped = num_layers - 2 if sharing == "middle-cycle" else num_layers
    ok = [b for b in range(2, looped + 1) if looped % b == 0] if looped > 0 else []
    what = f"the {looped} middle layers" if sharing == "middle-cycle" else f"the {num_layers} layers"
    return (f"--loops {loops} does not divide {what} ({sharing} sharing); "
            f"valid loop counts: {', '.join(map(str, ok)) or 'none'}")


def stepwise_layers(first: int, last: int, k: int) -> list[int]:
    """Stepwise init: k layers evenly spaced over [first, last], both ends kept."""
    return [int(round(x)) for x in np.linspace(first, last, k)]
