"""The generation engine users touch: `edgeloop.load(path)` returns a `Model`.

One engine over any backend's step interface: tokenization, the shared sampler, stop
strings, streaming with UTF-8-safe detokenization, perplexity and chat sessions with KV reuse.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from edgeloop.errors import EdgeloopError
from edgeloop.runtimes.backend import Backend
from edgeloop.runtimes.sampling import GenerationConfig, Sampler
from edgeloop.runtimes.tokenizer import IncrementalDecoder, Tokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0  # time to first token
    decode_s: float = 0.0
    finish_reason: str = ""

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_s if self.decode_s and steps > 0 else 0.0

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "time_to_first_token_s": round(self.prefill_s, 5), "prefill_tok_s": round(self.prefill_tok_s, 2),
                "decode_tok_s": round(self.decode_tok_s, 2), "finish_reason": self.finish_reason}


class Model:
    def __init__(self, backend: Backend, directory: Path, generation_defaults: dict, description: dict | None = None):
        self.backend = backend
        self.path = Path(directory)
        self.defaults = dict(generation_defaults)
        self.description = description or {}
        self._tokenizer: Tokenizer | None = None
        self.last_stats = GenerationStats()

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.path, self.defaults)
        return self._tokenizer

    # -- raw model -------------------------------------------------------------------------

    def logits(self, token_ids) -> np.ndarray:
        """Logits [len(token_ids), vocab] (float32) for every position of one sequence."""
        ids = self._check_ids(token_ids)
        state = self.backend.new_state()
        return self.backend.step(state, ids, all_logits=True)

    def perplexity(self, text: str, *, window: int | None = None) -> float:
        """Perplexity of `text`, scored in non-overlapping windows of at most the context."""
        ids = np.asarray(self.tokenizer.encode(text), dtype=np.int64)
        window = min(window or self.backend.max_context, self.backend.max_context)
        if len(ids) < 2:
            raise EdgeloopError("perplexity needs a text of at least two tokens")
        nll, count = 0.0, 0
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window + 1]
            if len(chunk) < 2:
                break
            logits = self.logits(chunk[:-1]).astype(np.float64)
            logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            nll += float((logz - logits[np.arange(len(chunk) - 1), chunk[1:]]).sum())
            count += len(chunk) - 1
        return math.exp(nll / count)

    # -- generation ------------------------------------------------------------------------

    def generation_config(self, **options) -> GenerationConfig:
        return GenerationConfig.from_defaults(self.defaults, **options)

    def stream(self, prompt: str | list[int], **options) -> Iterator[str]:
        """Yield text pieces as they are generated; they concatenate to `generate(prompt)`."""
        config = options.pop("config", None) or self.generation_config(**options)
        state = self.backend.new_state()
        prompt_ids = self._prompt_ids(prompt, config)
        yield from self._generate_into(state, prompt_ids, config)

    def generate(self, prompt: str | list[str] | list[int], **options) -> str | list[str]:
        """Text generated after `prompt`; a list of prompts gives a list of texts."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            return [self.generate(p, **options) for p in prompt]
        return "".join(self.stream(prompt, **options))

    def generate_tokens(self, prompt_ids, **options) -> list[int]:
        """Token ids generated after `prompt_ids` (no tokenizer needed)."""
        config = self.generation_config(**options)
        state = self.backend.new_state()
        ids = self._prompt_ids(list(prompt_ids), config)
        return list(self._token_loop(state, ids, config))

    def chat(self, system: str | None = None, **options) -> ChatSession:
        return ChatSession(self, system, options)

    # -- internals -------------------------------------------------------------------------

    def _check_ids(self, token_ids) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise EdgeloopError("token_ids is empty")
        if ids.min() < 0 or ids.max() >= self.backend.vocab_size:
            raise EdgeloopError(f"token ids must be in [0, {self.backend.vocab_size}); got {ids.min()}..{ids.max()}")
        if ids.size > self.backend.max_context:
            raise EdgeloopError(f"{ids.size} tokens exceed the model context of {self.backend.max_context}")
        return ids

    def _prompt_ids(self, prompt, config: GenerationConfig) -> list[int]:
        ids = list(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt)
        if not ids:
            bos = self.defaults.get("bos_token_id")
            if bos is None and (self.path / "tokenizer.json").is_file():
                bos = self.tokenizer.bos_id
            if bos is None:
                raise EdgeloopError("the prompt is empty and the model has no BOS token to start from")
            ids = [bos]
        limit = self.backend.max_context
        if len(ids) >= limit:
            if not config.truncate:
                raise EdgeloopError(f"the prompt has {len(ids)} tokens but the context holds {limit}; "
                                    f"shorten it or pass --truncate to keep its last tokens")
            keep = max(1, limit - max(config.max_new_tokens, 1))
            ids = ids[-keep:]
        return ids

    def _token_loop(self, state, prompt_ids: list[int], config: GenerationConfig) -> Iterator[int]:
        sampler = Sampler(config)
        stats = self.last_stats = GenerationStats(prompt_tokens=len(prompt_ids))
        history = list(prompt_ids)
        start = time.perf_counter()
        logits = self.backend.step(state, np.asarray(prompt_ids, dtype=np.int64))[-1]
        eos = set() if config.ignore_eos else self._eos_ids()
        for i in range(config.max_new_tokens):
            token = sampler(logits, history)
            now = time.perf_counter()
            if i == 0:
                stats.prefill_s = now - start
                decode_start = now
            else:
                stats.decode_s = now - decode_start
            if token in eos:
                stats.finish_reason = "eos"
                return
            stats.new_tokens += 1
            history.append(token)
            yield token
            if i + 1 == config.max_new_tokens:
                break
            if state.length >= self.backend.max_context:
                stats.finish_reason = "context"
                return
            logits = self.backend.step(state, np.asarray([token], dtype=np.int64))[-1]
        stats.finish_reason = "length"

    def _eos_ids(self) -> set[int]:
        if self._tokenizer is not None or (self.path / "tokenizer.json").is_file():
            return self.tokenizer.eos_ids
        eos = self.defaults.get("eos_token_id")
        return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    def _generate_into(self, state, prompt_ids: list[int], config: GenerationConfig) -> Iterator[str]:
        text = TextStream(self.tokenizer, config.stop)
        yield from text.run(self._token_loop(state, prompt_ids, config))
        if text.stopped:
            self.last_stats.finish_reason = "stop"


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best


@dataclass
class ChatSession:
    """A conversation whose KV cache is reused across turns.

    Each turn renders the whole conversation with the chat template, keeps the longest
    common token prefix already in the cache and feeds only the rest.
    """

    model: Model
    system: str | None
    options: dict
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if self.system:
            self.messages.append({"role": "system", "content": self.system})
        self.state = self.model.backend.new_state()
        self.cached: list[int] = []  # tokens whose KV is in self.state

    def send_stream(self, text: str, **options) -> Iterator[str]:
        config = self.model.generation_config(**{**self.options, **options})
        messages = self.messages + [{"role": "user", "content": text}]
        prompt = self.model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.model.tokenizer.encode(prompt)
        if len(ids) + 1 >= self.model.backend.max_context:  # checked before anything changes
            raise EdgeloopError(f"the conversation has {len(ids)} tokens, the context holds "
                                f"{self.model.backend.max_context}; start a new chat")
        self.messages = messages
        common = 0
        for a, b in zip(self.cached, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # always feed at least one token to get logits
        self.model.backend.rewind(self.state, common)
        produced: list[int] = []

        def tokens():
            for tok in self.model._token_loop(self.state, ids[common:], config):
                produced.append(tok)
                yield tok

        pieces = []
        for piece in TextStream(self.model.tokenizer, config.stop).run(tokens()):
            pieces.append(piece)
            yield piece
        # The cache holds the prompt and every generated token that was fed back.
        self.cached = (ids + produced)[: self.state.length]
        self.messages.append({"role": "assistant", "content": "".join(pieces)})

    def send(self, text: str, **options) -> str:
        return "".join(self.send_stream(text, **options))


class TextStream:
    """Token ids -> text pieces: UTF-8-safe detokenization and stop strings.

    Text that could still be the start of a stop string is held back, so the pieces never
    contain a stop string and always concatenate to the final text.
    """

    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.stopped = False

    def run(self, tokens: Iterator[int]) -> Iterator[str]:
        decoder = IncrementalDecoder(self.tokenizer)
        pending = ""
        for token in tokens:
            pending += decoder.push(token)
            cut = _find_stop(pending, self.stops)
            if cut is not None:
                self.stopped = True
                if cut:
                    yield pending[:cut]
                return
            safe = len(pending) - _stop_prefix_len(pending, self.stops)
            if safe > 0:
                yield pending[:safe]
                pending = pending[safe:]
        pending += decoder.flush()
        cut = _find_stop(pending, self.stops)
        if cut is not None:
            self.stopped = True
            pending = pending[:cut]
        if pending:
            yield pending
