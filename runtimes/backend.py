"""The step interface every backend driver implements, and the registry that picks one.

A backend runs the model; the generation engine on top (tokenizer, sampler, streaming,
exits, scheduling) is shared. Two ways to run it:

- **fused** (`step`): a batch of rows, each a sequence state and its new tokens (rows may have
  different lengths and different past lengths); every row runs the full depth in one call of
  the fused graph / function, and gets back its logits.
- **host-driven** (`embed`, `block`, `head`; when `host_loop`): the host runs the loop itself,
  one pass of the looped block at a time, and each row of a pass sits at its own depth (its
  LoRA, vectors and KV slot are chosen per row). This is what early exit and depth-wise
  batching are made of. A state is created for one of the two (`new_state(host=...)`): their
  KV caches are laid out differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from edgeloop.registry import resolve


class State(Protocol):
    length: int  # tokens whose KV is complete at every depth
    host: bool  # made for the host-driven entry points


@dataclass
class Row:
    """One sequence's share of a call: its state, its new tokens, which positions want logits."""

    state: State
    tokens: np.ndarray  # [t] int64
    all_logits: bool = False  # logits of every new token (else of the last)


@dataclass
class RowOutput:
    logits: np.ndarray  # [n, vocab] float32: n = t (all_logits) or 1
    depth: int  # loop passes this row ran
    exit_score: np.ndarray | None = None  # the learned gate's exit probability per position (Ouro)


@dataclass
class BlockRow:
    """A row of one host-driven pass: hidden states of the row's new tokens at loop `depth`."""

    state: State
    hidden: np.ndarray  # [t, hidden]
    depth: int  # the repeat of the looped stage this pass runs (0 .. loops - 1)
    position: int | None = None  # first token position (default: state.length)


class Backend(Protocol):
    name: str
    vocab_size: int
    max_context: int  # positions the model (and its KV cache) can hold
    loops: int  # B: passes of the looped block at full depth
    host_loop: bool  # embed / block / head are available

    def new_state(self, *, host: bool = False) -> State: ...

    def reserve(self, streams: int) -> None:
        """Make room for `streams` sequences stepping together (before creating them)."""

    def release(self, state: State) -> None:
        """Give the state's cache back (also done when the state is garbage collected)."""

    def prepare(self, *, host: bool = False) -> None:
        """Load what a step will need (the host loop's entry points), so the first token's timing
        is the model's, not the loader's."""

    def step(self, rows: Sequence[Row]) -> list[RowOutput]:
        """Append each row's tokens to its sequence (full depth); logits per row, float32."""

    def rewind(self, state: State, length: int) -> None:
        """Forget everything after the first `length` tokens (chat sessions reuse the prefix)."""

    # -- host-driven loop ----------------------------------------------------------------------

    def embed(self, rows: Sequence[Row]) -> list[np.ndarray]:
        """Hidden states [t, hidden] entering the loop for each row's new tokens."""

    def block(self, rows: Sequence[BlockRow], *, complete: bool = False) -> list[np.ndarray]:
        """One pass of the looped block; each row at its own depth writes its KV slot (state, depth) at
        positions [position, position + t) and gets back its hidden states. complete: the caller
        knows every cached position before each row's start holds K/V at the row's depth (the fill
        strategy, full depth, self-speculation), so a backend may skip the per-position validity mask."""

    def head(self, hidden: Sequence[np.ndarray]) -> list[RowOutput]:
        """Final norm and LM head (and the exit gate, when the model has one) for each [n, hidden]."""

    def advance(self, state: State, count: int) -> None:
        """Mark `count` more tokens of a host-driven state as complete at every depth."""


# backend name -> "module:class"; imported lazily so the base install never imports torch or tvm
BACKENDS = {
    "onnxruntime": "edgeloop.runtimes.ort:OrtBackend",
    "tvm": "edgeloop.runtimes.tvm:TvmBackend",
    "reference": "edgeloop.reference:ReferenceBackend",
}


def backend_class(name: str):
    return resolve(BACKENDS, name, "backend")


def check_tokens(backend, tokens, *, what: str = "token ids") -> np.ndarray:
    """A 1-D int64 array of valid ids, or one clear EdgeloopError (negative ids would wrap around,
    ids past the vocabulary would fail inside the backend, nested lists must not be flattened)."""
    from edgeloop.errors import EdgeloopError

    if isinstance(tokens, np.ndarray):
        arr = tokens
    else:
        seq = list(tokens) if not isinstance(tokens, (str, bytes)) else None
        if seq is None or any(isinstance(t, (list, tuple, np.ndarray, str, bytes, float)) or isinstance(t, bool)
                              for t in seq):
            raise EdgeloopError(f"{what} must be a flat list of integers")
        arr = np.asarray(seq, dtype=np.int64) if seq else np.zeros(0, np.int64)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise EdgeloopError(f"{what} must be a flat list of integers, got an array of shape {arr.shape} "
                            f"and dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= backend.vocab_size):
        raise EdgeloopError(f"{what} must be in [0, {backend.vocab_size}); got {int(arr.min())}..{int(arr.max())}")
    return arr
