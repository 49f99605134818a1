"""The generation engine users touch: `edgeloop.load(path)` returns a `Model`.

One engine over any backend's step interface: tokenization, the shared sampler, stop
strings, streaming with UTF-8-safe detokenization, batched generation (several prompts step
together, rows leave as they finish), perplexity and chat sessions with KV reuse.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from edgeloop.errors import EdgeloopError
from edgeloop.runtimes.backend import Backend, Row, check_tokens
from edgeloop.runtimes.sampling import GenerationConfig, Sampler
from edgeloop.runtimes.tokenizer import IncrementalDecoder, Tokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0  # time to first token
    decode_s: float = 0.0
    finish_reason: str = ""
    dropped_prompt_tokens: int = 0  # --truncate: oldest prompt tokens left out
    seed: int | None = None
    depths: list[int] = field(default_factory=list)  # loop passes each generated token ran
    exit_policy: str = "none"
    drafted: int = 0  # self-speculation: draft tokens proposed / accepted
    accepted: int = 0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_s if self.decode_s and steps > 0 else 0.0

    @property
    def mean_loops(self) -> float:
        return float(np.mean(self.depths)) if self.depths else 0.0

    def to_dict(self) -> dict:
        out = {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
               "time_to_first_token_s": round(self.prefill_s, 5), "prefill_tok_s": round(self.prefill_tok_s, 2),
               "decode_tok_s": round(self.decode_tok_s, 2), "finish_reason": self.finish_reason, "seed": self.seed,
               "mean_loops": round(self.mean_loops, 4), "depths": list(self.depths), "exit": self.exit_policy}
        if self.drafted:
            out["speculation"] = {"drafted": self.drafted, "accepted": self.accepted,
                                  "acceptance": round(self.accepted / self.drafted, 4)}
        if self.dropped_prompt_tokens:
            out["dropped_prompt_tokens"] = self.dropped_prompt_tokens
        return out


class Model:
    def __init__(self, backend: Backend, directory: Path, generation_defaults, contract=None, *, tokenizer=None,
                 template: str | None = None):
        self.backend = backend
        self.path = Path(directory)
        self.defaults = generation_defaults
        self.contract = contract
        self._tokenizer_section, self._template = tokenizer, template
        self._tokenizer: Tokenizer | None = None
        self.last_stats: GenerationStats | list[GenerationStats] = GenerationStats()
        exit_section = getattr(contract, "exit", None)
        spec = contract.model if contract is not None else getattr(getattr(backend, "model", None), "spec", None)
        gate_default = f"gate:{spec.exit_threshold:g}" if spec is not None and spec.exit_gate and \
            spec.exit_threshold is not None and spec.exit_threshold < 1 else "none"
        self.default_exit = exit_section.policy if exit_section else gate_default
        self.kv_strategy = exit_section.kv_strategy if exit_section else "fill"  # see runtimes/stepping.py

    @property
    def description(self) -> dict:
        return self.contract.to_dict() if self.contract is not None else {"backend": self.backend.name}

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            if self._tokenizer_section is None:
                raise EdgeloopError(f"{self.path} has no tokenizer; text generation needs one (logits() works without)")
            self._tokenizer = Tokenizer(self.path, self._tokenizer_section, self._template)
        return self._tokenizer

    # -- raw model -------------------------------------------------------------------------

    def logits(self, token_ids) -> np.ndarray:
        """Logits [len(token_ids), vocab] (float32) for every position of one sequence."""
        ids = check_tokens(self.backend, token_ids)
        if ids.size == 0:
            raise EdgeloopError("token_ids is empty")
        if ids.size > self.backend.max_context:
            raise EdgeloopError(f"{ids.size} tokens exceed the model context of {self.backend.max_context}")
        state = self.backend.new_state()
        try:
            out = self.backend.step([Row(state, ids, all_logits=True)])[0].logits
        finally:
            self.backend.release(state)
        return _finite(out)

    def perplexity(self, text: str, *, window: int | None = None) -> float:
        """Perplexity of `text`, scored in non-overlapping windows of at most the context."""
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise EdgeloopError(f"window must be a positive number of tokens, got {window!r}")
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
        request = self._request(prompt, config)
        self.last_stats = request.stats
        yield from self._run_streaming(request)

    def generate(self, prompt: str | list[str] | list[int], **options) -> str | list[str]:
        """Text generated after `prompt`; a list of prompts runs as one batch and gives a list of texts."""
        config = options.pop("config", None) or self.generation_config(**options)
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            requests = [self._request(p, config) for p in prompt]
            self._run_batch(requests)
            self.last_stats = [r.stats for r in requests]
            return [r.text for r in requests]
        return "".join(self.stream(prompt, config=config))

    def generate_tokens(self, prompt_ids, **options) -> list[int]:
        """Token ids generated after `prompt_ids` (no tokenizer needed)."""
        config = self.generation_config(**options)
        request = self._request(check_tokens(self.backend, prompt_ids, what="prompt ids").tolist(), config, text=False)
        for _ in self._run_streaming(request):  # one sequence: no scheduler between the steps
            pass
        self.last_stats = request.stats
        return request.generated

    def chat(self, system: str | None = None, **options) -> ChatSession:
        return ChatSession(self, system, options)

    # -- internals -------------------------------------------------------------------------

    def exit_policy(self, config: GenerationConfig):
        """The request's exit policy (its own, else the artifact's calibrated one), validated."""
        from edgeloop.runtimes.exits import parse_policy

        spec = self.contract.model if self.contract is not None else getattr(self.backend, "model", None).spec
        gate_threshold = getattr(spec, "exit_threshold", None)
        policy = parse_policy(config.exit if config.exit is not None else self.default_exit, loops=self.backend.loops,
                              gate=spec.exit_gate, gate_threshold=gate_threshold)
        if (policy.kind != "none" or config.loops is not None) and not self.backend.host_loop:
            from edgeloop.runtimes.stepping import check_host_backend

            check_host_backend(self.backend)
        return policy

    def _request(self, prompt, config: GenerationConfig, *, text: bool = True) -> Request:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = check_tokens(self.backend, prompt, what="prompt ids").tolist()
        if not ids:
            bos = self._tokenizer_section.bos_token_id if self._tokenizer_section else None
            if bos is None:
                raise EdgeloopError("the prompt is empty and the model has no BOS token to start from")
            ids = [bos]
        ids, dropped = self._fit_context(ids, config)
        policy = self.exit_policy(config)
        request = Request(ids, config, Sampler(config), self._eos_ids(config),
                          TextStream(self.tokenizer, config.stop) if text else None, policy=policy,
                          strategy=self.kv_strategy)
        request.stats.dropped_prompt_tokens = dropped
        request.stats.seed = request.sampler.seed
        request.stats.exit_policy = str(policy) + (f", at most {config.loops} loops" if config.loops else "")
        return request

    def _fit_context(self, ids: list[int], config: GenerationConfig) -> tuple[list[int], int]:
        limit = self.backend.max_context
        if len(ids) < limit:
            return ids, 0
        if not config.truncate:
            raise EdgeloopError(f"the prompt has {len(ids)} tokens but the context holds {limit}; "
                                f"shorten it or pass --truncate to keep its last tokens")
        # keep room for the answer, but never less than half the context of prompt
        keep = max(limit - config.max_new_tokens, limit // 2, 1)
        keep = min(keep, limit - 1)
        return ids[-keep:], len(ids) - keep

    def _eos_ids(self, config: GenerationConfig) -> set[int]:
        if config.ignore_eos or self._tokenizer_section is None:
            return set()
        return set(self._tokenizer_section.eos_token_ids)

    def _run_streaming(self, request: Request) -> Iterator[str]:
        self.backend.prepare(host=request.host or request.policy.kind == "speculate")
        state = self.backend.new_state(host=request.host)
        try:
            yield from request.run_alone(self.backend, state)
        finally:
            self.backend.release(state)

    def _run_batch(self, requests: list[Request], *, scheduler: str = "depth") -> None:
        """The requests through the scheduling engine (runtimes/engine.py): rows step together, each
        leaving when it finishes; exiting rows use depth-wise batching. Self-speculating ones run alone."""
        from edgeloop.runtimes.engine import Engine

        for r in [r for r in requests if r.policy.kind == "speculate"]:
            for _ in self._run_streaming(r):
                pass
        batch = [r for r in requests if r.policy.kind != "speculate"]
        if not batch:
            return
        engine = Engine(self, max_rows=max(1, len(batch)), max_queue=len(batch), scheduler=scheduler)
        for r in batch:
            engine.submit(r)
        engine.run_until_idle()


def run_rows(backend, items: list) -> list:
    """One step of (request, state, tokens) rows: fused rows in one fused call, host-driven rows (exit
    policies, loop caps) through the host loop together."""
    from edgeloop.runtimes.stepping import StepRow, host_step

    out: list = [None] * len(items)
    fused = [i for i, (r, _, _) in enumerate(items) if not r.host]
    host = [i for i, (r, _, _) in enumerate(items) if r.host]
    if fused:
        for i, o in zip(fused, backend.step([Row(items[i][1], np.asarray(items[i][2], np.int64)) for i in fused])):
            out[i] = o
    if host:
        rows = [StepRow(items[i][1], np.asarray(items[i][2], np.int64), exit=items[i][0].token_exit(len(items[i][2])),
                        cap=items[i][0].config.loops) for i in host]
        strategy = items[host[0]][0].strategy
        for i, o in zip(host, host_step(backend, rows, strategy=strategy)):
            out[i] = o
    return out


def _finite(logits: np.ndarray) -> np.ndarray:
    if not np.isfinite(logits).all():
        raise EdgeloopError("the model produced non-finite logits (NaN or Inf); its weights or config are broken, "
                            "or the artifact is damaged")
    return logits


@dataclass
class Request:
    """One sequence being generated: its prompt, sampler, output so far and statistics."""

    prompt: list[int]
    config: GenerationConfig
    sampler: Sampler
    eos: set[int]
    text_stream: TextStream | None
    policy: object = None  # runtimes.exits.ExitPolicy
    strategy: str = "fill"
    generated: list[int] = field(default_factory=list)
    prompt_history: list[int] = field(default_factory=list)  # earlier tokens already in the cache (chat turns)
    pieces: list[str] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)
    done: bool = False
    _t0: float = 0.0
    _decode0: float = 0.0

    def __post_init__(self):
        self.stats.prompt_tokens = len(self.prompt)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def history(self) -> list[int]:
        """Every token of the sequence so far: what repetition_penalty looks at (nothing without one,
        so a plain decode step does not copy the sequence)."""
        if self.config.repetition_penalty == 1.0:
            return []
        return self.prompt_history + self.prompt + self.generated

    @property
    def host(self) -> bool:
        """Runs on the host-driven loop (an exit policy or a loop cap), not the fused graph."""
        return (self.policy is not None and self.policy.kind != "none") or self.config.loops is not None

    def token_exit(self, tokens: int):
        """The exit memory of a decode token (prompts run every pass)."""
        from edgeloop.runtimes.exits import TokenExit

        decoding = tokens == 1 and bool(self.generated)  # a prompt, even of one token, runs every pass
        return TokenExit(self.policy) if decoding and self.policy is not None and self.policy.exits else None

    def begin(self, t0: float) -> None:
        self._t0 = t0

    def accept(self, out, state, max_context: int) -> bool:
        """Sample from a step's output; False when the request is finished."""
        token = self.sampler(out.logits[-1], self.history)
        return self.push(token, int(out.depth), state, max_context)

    def push(self, token: int, depth: int, state, max_context: int) -> bool:
        """Take one generated token (ran `depth` passes); False when the request is finished."""
        c, stats = self.config, self.stats
        now = time.perf_counter()
        if not self.generated and not stats.new_tokens:
            stats.prefill_s = now - self._t0
            self._decode0 = now
        else:
            stats.decode_s = now - self._decode0
        if c.max_new_tokens == 0:
            return self._stop("length")
        if token in self.eos:
            return self._stop("eos")
        self.generated.append(token)
        stats.new_tokens += 1
        stats.depths.append(depth)
        if self.text_stream is not None:
            piece = self.text_stream.push(token)
            if piece:
                self.pieces.append(piece)
            if self.text_stream.stopped:
                return self._stop("stop")
        if len(self.generated) >= c.max_new_tokens:
            return self._stop("length")
        if state.length >= max_context:
            return self._stop("context")
        return True

    def _speculate(self, backend, state) -> bool:
        from edgeloop.runtimes.stepping import speculate

        budget = min(self.config.max_new_tokens - len(self.generated), backend.max_context - state.length - 1)
        tokens, passes, counts = speculate(backend, state, self.generated[-1], self.policy, self.sampler,
                                           self.history, budget=max(1, budget))
        self.stats.drafted += counts.drafted
        self.stats.accepted += counts.accepted
        for token, depth in zip(tokens, passes):
            if not self.push(token, depth, state, backend.max_context):
                return False
        return True

    def _stop(self, reason: str) -> bool:
        self.stats.finish_reason = reason
        self.done = True
        return False

    def finish(self) -> None:
        if self.text_stream is not None and not self.text_stream.stopped:
            tail = self.text_stream.flush()
            if tail:
                self.pieces.append(tail)
            if self.text_stream.stopped:
                self.stats.finish_reason = "stop"

    def run_alone(self, backend, state) -> Iterator[str]:
        """Generate with this request alone on `state` (already holding any reused prefix), yielding text."""
        self.begin(time.perf_counter())
        out = run_rows(backend, [(self, state, self.prompt)])[0]
        emitted = 0
        live = self.accept(out, state, backend.max_context)
        while True:
            while emitted < len(self.pieces):
                yield self.pieces[emitted]
                emitted += 1
            if not live:
                break
            if self.policy is not None and self.policy.kind == "speculate":
                live = self._speculate(backend, state)
            else:
                out = run_rows(backend, [(self, state, [self.generated[-1]])])[0]
                live = self.accept(out, state, backend.max_context)
        self.finish()
        while emitted < len(self.pieces):
            yield self.pieces[emitted]
            emitted += 1


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
        request = self.model._request(ids[common:], config)
        request.prompt_history = ids[:common]
        pieces = []
        for piece in request.run_alone(self.model.backend, self.state):
            pieces.append(piece)
            yield piece
        self.model.last_stats = request.stats
        # The cache holds the prompt and every generated token that was fed back.
        self.cached = (ids + request.generated)[: self.state.length]
        self.messages.append({"role": "assistant", "content": "".join(pieces)})

    def send(self, text: str, **options) -> str:
        return "".join(self.send_stream(text, **options))


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


class TextStream:
    """Token ids -> text pieces: UTF-8-safe detokenization and stop strings.

    Text that could still be the start of a stop string is held back, so the pieces never
    contain a stop string and always concatenate to the final text.
    """

    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.decoder = IncrementalDecoder(tokenizer)
        self.pending = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.pending += self.decoder.push(token)
        cut = _find_stop(self.pending, self.stops)
        if cut is not None:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        safe = len(self.pending) - _stop_prefix_len(self.pending, self.stops)
        out, self.pending = self.pending[:safe], self.pending[safe:]
        return out

    def flush(self) -> str:
        self.pending += self.decoder.flush()
        cut = _find_stop(self.pending, self.stops)
        if cut is not None:
            self.stopped = True
            self.pending = self.pending[:cut]
        out, self.pending = self.pending, ""
        return out
