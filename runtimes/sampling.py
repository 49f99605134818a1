"""One sampler for every backend, and a portable one: the native runtime reproduces it token for token.

The algorithm (docs/sampling.md has it in full, for implementers in other languages):
1. repetition penalty on the float32 logits of every distinct token seen (positive / r, negative * r);
2. temperature 0 or top_k 1: greedy (the first index of the maximum);
3. z = logits (as float64) / temperature; top_k keeps the k largest z (ties: lower ids first);
4. p = exp(z - max z); top_p keeps, in (p descending, id ascending) order, the shortest prefix
   whose running sum reaches top_p x its total; min_p keeps p >= min_p (p is 1 at the maximum);
5. the draw: u = next uniform double; walk the kept ids in ascending order summing p in float64;
   the first id whose running sum exceeds u x total is the token.
Sums are sequential (left to right), never pairwise, so a C loop gives the same numbers.

The RNG is xoshiro256** seeded through SplitMix64 from a 64-bit seed; a uniform double is the top
53 bits of a draw times 2^-53. No seed: a random one, reported in the run statistics.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields

import numpy as np

from edgeloop.errors import EdgeloopError

MASK64 = (1 << 64) - 1
MAX_NEW_TOKENS = 1 << 20


# ---------------------------------------------------------------------------------------------
# the RNG


def _splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return state, z ^ (z >> 31)


def _rotl(x: int, k: int) -> int:
    return ((x << k) | (x >> (64 - k))) & MASK64


class Xoshiro256:
    """xoshiro256** (Blackman & Vigna), seeded with four SplitMix64 outputs of the seed."""

    def __init__(self, seed: int):
        state, self.s = seed & MASK64, []
        for _ in range(4):
            state, value = _splitmix64(state)
            self.s.append(value)

    def next_u64(self) -> int:
        s = self.s
        result = (_rotl((s[1] * 5) & MASK64, 7) * 9) & MASK64
        t = (s[1] << 17) & MASK64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = _rotl(s[3], 45)
        return result

    def uniform(self) -> float:
        """A double in [0, 1) from the top 53 bits."""
        return (self.next_u64() >> 11) * (1.0 / (1 << 53))


# ---------------------------------------------------------------------------------------------
# options


def _number(name: str, value, *, low: float, high: float, low_open: bool = False, high_open: bool = False,
            integer: bool = False):
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
        raise EdgeloopError(f"{name} must be {kind}, got {value!r}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise EdgeloopError(f"{name} must be in {lo}{_fmt(low)}, {_fmt(high)}{hi}, got {value!r}")
    return value


def _fmt(x) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e21 else f"{x:g}"


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # None: a random seed
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    truncate: bool = False  # drop the oldest prompt tokens instead of failing when the prompt is too long
    exit: str | None = None  # early-exit policy for this request ("none", "confidence:0.9", ...); None: the artifact's
    loops: int | None = None  # at most this many passes of the loop per token (None: all)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Every option checked here, for the CLI and the Python API alike."""
        _number("max_new_tokens", self.max_new_tokens, low=0, high=MAX_NEW_TOKENS, integer=True)
        _number("temperature", self.temperature, low=0, high=100)
        if 0 < self.temperature < 1e-3:
            raise EdgeloopError(f"temperature {self.temperature!r} is too small to sample from; use 0 for greedy")
        _number("top_k", self.top_k, low=0, high=1 << 31, integer=True)
        _number("top_p", self.top_p, low=0, high=1, low_open=True)
        _number("min_p", self.min_p, low=0, high=1, high_open=True)
        _number("repetition_penalty", self.repetition_penalty, low=0, high=100, low_open=True)
        if self.seed is not None:
            _number("seed", self.seed, low=0, high=MASK64, integer=True)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            raise EdgeloopError(f"stop must be a list of strings, got {self.stop!r}")
        self.stop = list(self.stop)
        for name in ("ignore_eos", "truncate"):
            if not isinstance(getattr(self, name), bool):
                raise EdgeloopError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.exit is not None and not isinstance(self.exit, str):
            raise EdgeloopError(f"exit must be a policy string such as 'none' or 'confidence:0.9', got {self.exit!r}")
        if self.loops is not None:
            _number("loops", self.loops, low=1, high=1 << 16, integer=True)

    @classmethod
    def from_defaults(cls, defaults, **overrides) -> GenerationConfig:
        """Model defaults (a GenerationDefaults or its dict) under the caller's explicit options."""
        d = defaults if isinstance(defaults, dict) else {f.name: getattr(defaults, f.name) for f in fields(defaults)}
        base = {}
        if d.get("do_sample"):
            for key in ("temperature", "top_k", "top_p"):
                if d.get(key) is not None:
                    base[key] = d[key]
        for key in ("repetition_penalty", "max_new_tokens"):
            if d.get(key) is not None:
                base[key] = d[key]
        names = {f.name for f in fields(cls)}
        unknown = [k for k in overrides if k not in names]
        if unknown:
            raise EdgeloopError(f"unknown generation option {unknown[0]!r}; known: {', '.join(sorted(names))}")
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


def generation_defaults_from(gen: dict):
    """generation_config.json values -> the contract's typed GenerationDefaults (null = unset); a wrong
    type or range is one clear error naming the key."""
    from edgeloop.runtimes.contract import GenerationDefaults

    checks = {
        "do_sample": lambda v: isinstance(v, bool) or _bad("do_sample must be true or false", v),
        "temperature": lambda v: _number("generation_config.json temperature", v, low=0, high=100),
        "top_k": lambda v: _number("generation_config.json top_k", v, low=0, high=1 << 31, integer=True),
        "top_p": lambda v: _number("generation_config.json top_p", v, low=0, high=1, low_open=True),
        "repetition_penalty": lambda v: _number("generation_config.json repetition_penalty", v, low=0, high=100,
                                                low_open=True),
        "max_new_tokens": lambda v: _number("generation_config.json max_new_tokens", v, low=0, high=MAX_NEW_TOKENS,
                                            integer=True),
    }
    out = {}
    for key, check in checks.items():
        value = gen.get(key)
        if value is not None:
            check(value)
            out[key] = float(value) if key in ("temperature", "top_p", "repetition_penalty") else value
    return GenerationDefaults(**out)


def _bad(message: str, value):
    raise EdgeloopError(f"generation_config.json: {message}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# the sampler


class Sampler:
    def __init__(self, config: GenerationConfig):
        self.config = config
        self.seed = config.seed if config.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.rng = Xoshiro256(self.seed)

    @property
    def greedy(self) -> bool:
        return self.config.temperature == 0 or self.config.top_k == 1

    def __call__(self, logits: np.ndarray, history=()) -> int:
        logits = self._penalized(logits, history)
        if self.greedy:
            return int(np.argmax(logits))
        ids, p = self._filtered(logits)
        return self._draw(ids, p)

    def _penalized(self, logits: np.ndarray, history) -> np.ndarray:
        c = self.config
        logits = np.asarray(logits, dtype=np.float32)
        if not np.isfinite(logits).all():
            raise EdgeloopError("the model produced non-finite logits (NaN or Inf); its weights or config are "
                                "broken, or the artifact is damaged")
        if c.repetition_penalty != 1.0 and len(history):
            logits = logits.copy()
            seen = np.unique(np.asarray(history, dtype=np.int64))
            vals = logits[seen]
            penalty = np.float32(c.repetition_penalty)
            logits[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
        return logits

    def _filtered(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(kept ids ascending, their unnormalized probabilities) after temperature, top-k, top-p, min-p."""
        c = self.config
        z = logits.astype(np.float64) / c.temperature
        vocab = z.size
        if 0 < c.top_k < vocab:
            order = np.lexsort((np.arange(vocab), -z))[: c.top_k]  # z descending, then id ascending
            ids = np.sort(order)
        else:
            ids = np.arange(vocab)
        p = np.exp(z[ids] - z.max())
        if c.top_p < 1.0:
            order = np.lexsort((ids, -p))  # p descending, then id ascending
            running = np.cumsum(p[order])
            cut = int(np.searchsorted(running, c.top_p * running[-1], side="left")) + 1
            keep = np.sort(order[:cut])
            ids, p = ids[keep], p[keep]
        if c.min_p > 0:
            keep = p >= c.min_p
            ids, p = ids[keep], p[keep]
        return ids, p

    def _draw(self, ids: np.ndarray, p: np.ndarray) -> int:
        running = np.cumsum(p)
        target = self.rng.uniform() * running[-1]
        pick = int(np.searchsorted(running, target, side="right"))
        return int(ids[min(pick, ids.size - 1)])

    # -- self-speculation: a draft from shallow logits, judged by the full model's ------------------

    def draft(self, logits: np.ndarray, history) -> int:
        return self(logits, history)

    def verify(self, full: np.ndarray, draft: np.ndarray, token: int, history) -> tuple[bool, int]:
        """(accepted, token to emit). Greedy: the draft stands when it is the full model's argmax, else the
        argmax replaces it. Sampling: the standard rejection rule — accept with probability
        min(1, p(token) / q(token)), else draw from max(0, p - q) normalized — so the tokens follow the
        full model's distribution p whatever the draft distribution q."""
        full = self._penalized(full, history)
        if self.greedy:
            top = int(np.argmax(full))
            return top == token, top
        p = self._dense(full)
        q = self._dense(self._penalized(draft, history))
        if q[token] > 0 and self.rng.uniform() * q[token] < p[token]:
            return True, token
        residual = np.maximum(p - q, 0.0)
        if residual.sum() <= 0:
            residual = p
        ids = np.nonzero(residual)[0]
        return False, self._draw(ids, residual[ids])

    def _dense(self, logits: np.ndarray) -> np.ndarray:
        ids, p = self._filtered(logits)
        out = np.zeros(logits.size, np.float64)
        out[ids] = p / np.cumsum(p)[-1]
        return out
