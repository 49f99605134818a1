"""The step interface every backend driver implements, and the registry that picks one.

A backend runs the model; the generation engine on top (tokenizer, sampler, streaming) is
shared. A `State` is one sequence's KV cache; `step` feeds new tokens and returns logits.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from edgeloop.registry import resolve


class State(Protocol):
    length: int  # tokens already in the KV cache


class Backend(Protocol):
    name: str
    vocab_size: int
    max_context: int  # positions the model (and its KV buffers) can hold

    def new_state(self) -> State: ...

    def step(self, state: State, tokens: np.ndarray, *, all_logits: bool = False) -> np.ndarray:
        """Append `tokens` [t] to the sequence; logits [t, vocab] (all_logits) or [1, vocab] (last), float32."""
        ...

    def rewind(self, state: State, length: int) -> None:
        """Forget everything after the first `length` tokens (chat sessions reuse the prefix)."""
        ...


# backend name -> "module:class"; imported lazily so the base install never imports torch or tvm
BACKENDS = {
    "onnxruntime": "edgeloop.runtimes.ort:OrtBackend",
    "tvm": "edgeloop.runtimes.tvm:TvmBackend",
    "reference": "edgeloop.reference:ReferenceBackend",
}


def backend_class(name: str):
    return resolve(BACKENDS, name, "backend")
