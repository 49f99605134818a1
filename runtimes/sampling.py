"""One sampler for every backend: repetition penalty, temperature, top-k, top-p, min-p, seed.

Temperature 0 (or top_k 1) is greedy. The sampler owns its RNG (numpy PCG64), so a seed
reproduces a run exactly; the native runtime mirrors these steps in this order.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from edgeloop.errors import EdgeloopError


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    truncate: bool = False  # drop the oldest prompt tokens instead of failing when the prompt is too long

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise EdgeloopError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise EdgeloopError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise EdgeloopError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise EdgeloopError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise EdgeloopError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise EdgeloopError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    @classmethod
    def from_defaults(cls, defaults: dict, **overrides) -> GenerationConfig:
        """Model defaults (generation_config.json keys) under the caller's explicit options."""
        base = {}
        if defaults.get("do_sample"):
            for key in ("temperature", "top_k", "top_p"):
                if key in defaults:
                    base[key] = defaults[key]
        if "repetition_penalty" in defaults:
            base["repetition_penalty"] = defaults["repetition_penalty"]
        names = {f.name for f in fields(cls)}
        unknown = [k for k in overrides if k not in names]
        if unknown:
            raise EdgeloopError(f"unknown generation option {unknown[0]!r}; known: {', '.join(sorted(names))}")
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


class Sampler:
    def __init__(self, config: GenerationConfig):
        self.config = config
        self.rng = np.random.Generator(np.random.PCG64(config.seed))

    def __call__(self, logits: np.ndarray, history: np.ndarray | list[int] = ()) -> int:
        c = self.config
        logits = np.asarray(logits, dtype=np.float32)
        if c.repetition_penalty != 1.0 and len(history):
            logits = logits.copy()
            seen = np.unique(np.asarray(history, dtype=np.int64))
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / c.repetition_penalty, vals * c.repetition_penalty)
        if c.temperature == 0 or c.top_k == 1:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / c.temperature
        if 0 < c.top_k < z.size:
            kth = np.partition(z, -c.top_k)[-c.top_k]
            z = np.where(z < kth, -np.inf, z)
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if c.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, c.top_p) + 1)]
            mask = np.zeros_like(probs, dtype=bool)
            mask[keep] = True
            probs = np.where(mask, probs, 0.0)
        if c.min_p > 0:
            probs = np.where(probs >= c.min_p * probs.max(), probs, 0.0)
        probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))
