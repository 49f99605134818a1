"""Early exit at loop boundaries: the policies that decide, per token, to leave the loop.

A policy sees, at the end of every pass r < B - 1 (a loop boundary), the head's logits of the
token (final norm + LM head on the hidden state of that boundary) and, for a learned gate, its
exit probability; it keeps what it needs between boundaries in a small per-token memory.

    none                   every token runs all B passes (the fused graph's result, bit for bit)
    confidence:TAU         exit when the top softmax probability reaches TAU (0 < TAU <= 1)
    agreement[:N]          exit when the argmax did not change over the last N boundaries (N >= 1)
    entropy:MAX            exit when the entropy of the next-token distribution is at most MAX nats
    kl:MAX                 exit when KL(this boundary || the previous one) is at most MAX (Huginn)
    gate[:THRESHOLD]       a learned exit gate (Ouro, or one trained by `edgeloop uptrain
                           --exit-gate`): exit when the cumulative exit probability
                           sum_r lambda_r * prod_{j<r} (1 - lambda_j) reaches THRESHOLD (default: the
                           checkpoint's own, e.g. Ouro's early_exit_threshold; 1.0 = every step,
                           run as `none` since the rule cannot fire before the last step)
    depth:D                every token exits after D passes (a forced depth, for measurements)
    depth:LO-HI            every token exits after a depth in [LO, HI] picked by a hash of its
                           argmax at the first boundary: forced, scattered depths (mean (LO+HI)/2)
                           that are the same whichever scheduler or batch runs the token
    speculate:DxN          self-speculative decoding: draft N tokens at depth D, verify them at
                           full depth in one pass (outputs equal full depth)

Prompt tokens always run every pass: exits apply to generated tokens. `--loops N` caps the passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgeloop.errors import EdgeloopError

POLICIES = ("none", "confidence", "agreement", "entropy", "kl", "gate", "depth", "speculate")
KV_STRATEGIES = ("fill", "recursion")  # what the deeper depths of an exited token hold (docs/early-exit.md)


@dataclass(frozen=True)
class ExitPolicy:
    kind: str = "none"
    threshold: float = 0.0  # confidence TAU, entropy / kl MAX, gate threshold
    count: int = 1  # agreement: boundaries without change; depth: passes; speculate: draft tokens
    draft_depth: int = 0  # speculate: passes of a draft
    low: int = 0  # depth:LO-HI: the shallowest forced depth (count is the deepest)

    @property
    def exits(self) -> bool:
        return self.kind not in ("none", "speculate")

    def __str__(self) -> str:
        if self.kind in ("none",):
            return "none"
        if self.kind == "agreement":
            return f"agreement:{self.count}"
        if self.kind == "depth":
            return f"depth:{self.low}-{self.count}" if self.low else f"depth:{self.count}"
        if self.kind == "speculate":
            return f"speculate:{self.draft_depth}x{self.count}"
        return f"{self.kind}:{self.threshold:g}"


def parse_policy(text: str | None, *, loops: int, gate: bool = False, gate_threshold: float | None = None) -> ExitPolicy:
    """'confidence:0.9' -> ExitPolicy; one clear error for anything else."""
    if text is None:
        return ExitPolicy()
    if not isinstance(text, str):
        raise EdgeloopError(f"exit policy must be a string such as 'confidence:0.9', got {text!r}")
    if text.strip().lower() in ("", "none"):
        return ExitPolicy()
    kind, _, arg = text.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in POLICIES:
        raise EdgeloopError(f"unknown exit policy {kind!r}; choose one of {', '.join(POLICIES)} "
                            "(e.g. confidence:0.9, agreement:1, gate:0.6, speculate:1x4)")

    def number(low: float, high: float, *, low_open=True) -> float:
        try:
            value = float(arg)
        except ValueError:
            raise EdgeloopError(f"exit policy {text!r}: {kind} needs a number, e.g. {kind}:{high if high < 9 else 1}") \
                from None
        if not math.isfinite(value) or (value <= low if low_open else value < low) or value > high:
            raise EdgeloopError(f"exit policy {text!r}: the threshold must be in {'(' if low_open else '['}{low:g}, "
                                f"{high:g}]")
        return value

    def integer(low: int, high: int, what: str) -> int:
        try:
            value = int(arg)
        except ValueError:
            raise EdgeloopError(f"exit policy {text!r}: {what} must be an integer") from None
        if not low <= value <= high:
            raise EdgeloopError(f"exit policy {text!r}: {what} must be in [{low}, {high}]")
        return value

    if kind == "confidence":
        return ExitPolicy(kind, number(0.0, 1.0))
    if kind in ("entropy", "kl"):
        return ExitPolicy(kind, number(0.0, 100.0, low_open=False))
    if kind == "agreement":
        return ExitPolicy(kind, count=integer(1, max(1, loops - 1), "the number of boundaries") if arg else 1)
    if kind == "depth":
        if "-" in arg:
            lo, _, hi = arg.partition("-")
            try:
                low, high = int(lo), int(hi)
            except ValueError:
                raise EdgeloopError(f"exit policy {text!r}: depth needs D or LO-HI, e.g. depth:1-3") from None
            if not 1 <= low < high <= loops:
                raise EdgeloopError(f"exit policy {text!r}: the depths must satisfy 1 <= LO < HI <= {loops}")
            return ExitPolicy(kind, count=high, low=low)
        return ExitPolicy(kind, count=integer(1, loops, "the depth"))
    if kind == "gate":
        if not gate:
            raise EdgeloopError("exit policy gate needs a model with a learned exit gate (an Ouro checkpoint, or "
                                "one uptrained with --exit-gate)")
        value = number(0.0, 1.0) if arg else (gate_threshold if gate_threshold is not None else 1.0)
        if value >= 1.0:  # the cumulative exit probability reaches 1 only at the last step: full depth
            return ExitPolicy()
        return ExitPolicy(kind, value)
    # speculate:DxN
    depth, _, n = arg.lower().partition("x")
    try:
        d, count = int(depth), int(n)
    except ValueError:
        raise EdgeloopError(f"exit policy {text!r}: speculate needs DEPTHxTOKENS, e.g. speculate:1x4") from None
    if not 1 <= d < loops or not 1 <= count <= 16:
        raise EdgeloopError(f"exit policy {text!r}: the draft depth must be in [1, {loops - 1}] and the draft "
                            "length in [1, 16]")
    return ExitPolicy("speculate", count=count, draft_depth=d)


def scattered_depth(token: int, low: int, high: int) -> int:
    """A depth in [low, high] from a SplitMix64 finaliser of the token id: uniform over the
    vocabulary, and a function of the token alone, so every scheduler forces the same depth."""
    mask = (1 << 64) - 1
    z = (token + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return low + z % (high - low + 1)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


@dataclass
class TokenExit:
    """The decision memory of one token through the loop (per row of a decode step)."""

    policy: ExitPolicy
    previous: np.ndarray | None = None  # log-probabilities at the previous boundary (kl)
    argmax: int = -1
    unchanged: int = 0
    survive: float = 1.0  # gate: probability mass not yet exited
    cdf: float = 0.0
    trace: list[float] = field(default_factory=list)

    def needs_logits(self) -> bool:
        """Does the next decision read the head's logits? Forced depths do not (once a scattered
        depth is fixed at the first boundary), so the head runs only where the token leaves."""
        p = self.policy
        return p.kind != "depth" or (p.low > 0 and self.argmax < 0)

    def decide(self, passes: int, logits: np.ndarray | None, gate: float | None) -> bool:
        """After `passes` passes (< B): leave the loop now?"""
        p = self.policy
        if p.kind == "depth" and p.low:
            if self.argmax < 0:  # the first boundary fixes this token's depth
                self.argmax = scattered_depth(int(np.argmax(logits)), p.low, p.count)
            return passes >= self.argmax
        if p.kind == "depth":
            return passes >= p.count
        if p.kind == "gate":
            lam = float(gate)
            self.cdf += lam * self.survive
            self.survive *= 1.0 - lam
            return self.cdf >= p.threshold
        if p.kind == "confidence":
            lp = log_softmax(logits)
            return float(np.exp(lp.max())) >= p.threshold
        if p.kind == "entropy":
            lp = log_softmax(logits)
            return float(-(np.exp(lp) * lp).sum()) <= p.threshold
        if p.kind == "kl":
            lp = log_softmax(logits)
            prev, self.previous = self.previous, lp
            return prev is not None and float((np.exp(lp) * (lp - prev)).sum()) <= p.threshold
        if p.kind == "agreement":
            top = int(np.argmax(logits))
            self.unchanged = self.unchanged + 1 if top == self.argmax else 0
            self.argmax = top
            return self.unchanged >= p.count
        return False
