"""The PyTorch reference model: the oracle every backend is tested against.

Plain, readable eager code over the edgeloop tensor names. Each depth position d runs block
u = depth.block with its repeat index r selecting the per-depth LoRA (A[r], B[r]) and, when
the model keeps them, the per-depth norm weights and biases. One KV-cache slot per depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from edgeloop.spec import Depth, ModelSpec, Recursion, rope_inv_freq


@dataclass
class KVCache:
    """One (k, v) buffer per depth position, each [batch, kv_heads, capacity, head_dim], written at
    explicit positions (the host-driven loop writes depths out of order, fills skipped ones)."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    length: int = 0
    valid: list[torch.Tensor | None] = field(default_factory=list)  # per depth: positions that hold K/V

    @classmethod
    def empty(cls, num_depths: int) -> KVCache:
        return cls([None] * num_depths, [None] * num_depths, 0, [None] * num_depths)

    def write(self, d: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [b, kvh, t, hd] at positions [start, start + t) of depth d; the cache up to there."""
        end = start + k.shape[2]
        for store in (self.keys, self.values):
            old = store[d]
            if old is None or old.shape[2] < end:
                grown = k.new_zeros((k.shape[0], k.shape[1], max(end, 2 * (old.shape[2] if old is not None else 0)),
                                     k.shape[3]))
                if old is not None:
                    grown[:, :, :old.shape[2]] = old
                store[d] = grown
        self.keys[d][:, :, start:end] = k
        self.values[d][:, :, start:end] = v
        old = self.valid[d]
        if old is None or old.shape[0] < self.keys[d].shape[2]:
            grown = torch.zeros(self.keys[d].shape[2], dtype=torch.bool)
            if old is not None:
                grown[:old.shape[0]] = old
            self.valid[d] = grown
        self.valid[d][start:end] = True
        return self.keys[d][:, :, :end], self.values[d][:, :, :end]

    def forget(self, start: int) -> None:
        """Positions from `start` on hold nothing at any depth."""
        for valid in self.valid:
            if valid is not None:
                valid[start:] = False


class ReferenceModel(torch.nn.Module):
    def __init__(self, spec: ModelSpec, recursion: Recursion, tensors: dict[str, np.ndarray],
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec, self.recursion = spec, recursion
        self.w = {k: torch.from_numpy(np.asarray(v)).to(dtype) for k, v in tensors.items()}
        self.depths: list[Depth] = recursion.depths()
        self.inv_freq = torch.from_numpy(rope_inv_freq(spec))  # float64, cast at use
        self.dtype = dtype

    # -- pieces ----------------------------------------------------------------------------

    def _vec(self, depth: Depth, name: str) -> torch.Tensor | None:
        t = self.w.get(f"blocks.{depth.block}.{name}")
        if t is None:
            return None
        return t[depth.repeat] if self.recursion.per_depth_vectors else t

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.spec.norm == "layer":
            return F.layer_norm(x, (x.shape[-1],), weight, bias, self.spec.norm_eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.spec.norm_eps) * weight

    def _linear(self, x: torch.Tensor, depth: Depth, name: str) -> torch.Tensor:
        y = x @ self.w[f"blocks.{depth.block}.{name}.weight"].T
        bias = self._vec(depth, f"{name}.bias")
        if bias is not None:
            y = y + bias
        a = self.w.get(f"blocks.{depth.block}.lora.{name}.A")
        if a is not None:
            b = self.w[f"blocks.{depth.block}.lora.{name}.B"]
            y = y + (x @ a[depth.repeat].T) @ b[depth.repeat].T
        return y

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        act = self.spec.activation
        if act == "silu":
            return F.silu(x)
        return F.gelu(x, approximate="tanh" if act == "gelu_tanh" else "none")

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rd = self.spec.rotary_dim
        rot, rest = x[..., :rd], x[..., rd:]
        half = rd // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        return torch.cat([rot * cos + rotated * sin, rest], dim=-1)

    def _attention(self, x, depth: Depth, cache: KVCache | None, start: int, cos, sin):
        s = self.spec
        bsz, t, _ = x.shape
        q = self._linear(x, depth, "q").view(bsz, t, s.num_heads, s.head_dim)
        k = self._linear(x, depth, "k").view(bsz, t, s.num_kv_heads, s.head_dim)
        v = self._linear(x, depth, "v").view(bsz, t, s.num_kv_heads, s.head_dim)
        if s.qk_norm:
            q = self._norm(q, self._vec(depth, "q_norm.weight"), None)
            k = self._norm(k, self._vec(depth, "k_norm.weight"), None)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (b, heads, t, hd)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        valid = None
        if cache is not None:
            k, v = cache.write(depth.index, start, k, v)
            valid = cache.valid[depth.index][: k.shape[2]]  # a position that left the loop earlier: nothing here
        rep = s.num_heads // s.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(s.head_dim)  # (b, h, t, seen)
        qpos = torch.arange(start, start + t, device=x.device)[:, None]
        kpos = torch.arange(k.shape[2], device=x.device)[None, :]
        allowed = kpos <= qpos
        if valid is not None:
            allowed = allowed & valid[None, :]
        if s.sliding_window:
            allowed &= kpos > qpos - s.sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v
        out = out.transpose(1, 2).reshape(bsz, t, s.q_size)
        return self._linear(out, depth, "o")

    def kv_of(self, x: torch.Tensor, depth: Depth, start: int, cache: KVCache) -> None:
        """Store at `depth` the K/V this layer computes from hidden states x (no attention): a token's
        exit state copied forward to a depth it skipped."""
        s = self.spec
        bsz, t, _ = x.shape
        h = self._layer_norm(x, depth, "input_norm")
        k = self._linear(h, depth, "k").view(bsz, t, s.num_kv_heads, s.head_dim)
        v = self._linear(h, depth, "v").view(bsz, t, s.num_kv_heads, s.head_dim)
        if s.qk_norm:
            k = self._norm(k, self._vec(depth, "k_norm.weight"), None)
        cos, sin = self._rope_rows(start, t)
        k = self._rope(k.transpose(1, 2), cos, sin)
        cache.write(depth.index, start, k, v.transpose(1, 2))

    def _mlp(self, x: torch.Tensor, depth: Depth) -> torch.Tensor:
        if self.spec.gated_mlp:
            h = self._act(self._linear(x, depth, "gate")) * self._linear(x, depth, "up")
        else:
            h = self._act(self._linear(x, depth, "up"))
        return self._linear(h, depth, "down")

    def _layer_norm(self, x, depth: Depth, name: str) -> torch.Tensor:
        return self._norm(x, self._vec(depth, f"{name}.weight"), self._vec(depth, f"{name}.bias"))

    def _layer(self, x, depth: Depth, cache, start, cos, sin):
        attn = self._attention(self._layer_norm(x, depth, "input_norm"), depth, cache, start, cos, sin)
        if self.spec.sandwich_norms:  # Ouro: the sublayer outputs are normed before each residual add
            attn = self._layer_norm(attn, depth, "attn_out_norm")
        if self.spec.parallel_residual:
            return x + attn + self._mlp(self._layer_norm(x, depth, "post_norm"), depth)
        x = x + attn
        mlp = self._mlp(self._layer_norm(x, depth, "post_norm"), depth)
        if self.spec.sandwich_norms:
            mlp = self._layer_norm(mlp, depth, "mlp_out_norm")
        return x + mlp

    # -- entry points ----------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.w["embed.weight"][input_ids] * self.spec.embed_scale

    def _rope_rows(self, start: int, t: int):
        freqs = torch.arange(start, start + t, dtype=torch.float64, device=self.inv_freq.device)[:, None] \
            * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def run_depths(self, x: torch.Tensor, depths: list[Depth], cache: KVCache | None, start: int) -> torch.Tensor:
        """The layers at `depths` (in order) on hidden states x [b, t, H] of positions start.."""
        cos, sin = self._rope_rows(start, x.shape[1])
        for depth in depths:
            x = self._layer(x, depth, cache, start, cos, sin)
        return x

    def loop_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, self.w["final_norm.weight"], self.w.get("final_norm.bias"))

    def passes(self) -> list[list[Depth]]:
        """The depth positions grouped by loop pass: one group per repeat of each stage."""
        out, i = [], 0
        for stage in self.recursion.stages:
            for _ in range(stage.repeats):
                out.append(self.depths[i:i + len(stage.blocks)])
                i += len(stage.blocks)
        return out

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                      num_depths: int | None = None) -> torch.Tensor:
        """Final-normed hidden states [batch, t, hidden] after `num_depths` depth positions."""
        start = cache.length if cache is not None else 0
        x = self.embed(input_ids)
        done = 0
        for group in self.passes():
            group = group[: max(0, (num_depths if num_depths is not None else len(self.depths)) - done)]
            if not group:
                break
            x = self.run_depths(x, group, cache, start)
            done += len(group)
            if self.spec.loop_norm:
                x = self.loop_norm(x)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return x if self.spec.loop_norm else self.loop_norm(x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """LM head on final-normed hidden states."""
        return h @ self.w.get("lm_head.weight", self.w["embed.weight"]).T

    def to_device(self, device) -> ReferenceModel:
        self.w = {k: v.to(device) for k, v in self.w.items()}
        self.inv_freq = self.inv_freq.to(device)
        return self

    def exit_score_logit(self, h: torch.Tensor) -> torch.Tensor:
        return (h @ self.w["exit_gate.weight"].T + self.w["exit_gate.bias"])[..., 0]

    def exit_score(self, h: torch.Tensor) -> torch.Tensor | None:
        """The learned exit gate's probability (Ouro) on final-normed hidden states, [.., t]."""
        if not self.spec.exit_gate:
            return None
        return torch.sigmoid(h @ self.w["exit_gate.weight"].T + self.w["exit_gate.bias"])[..., 0]

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [batch, t, vocab] for every position."""
        return self.head(self.hidden_states(input_ids, cache))

    def new_cache(self) -> KVCache:
        return KVCache.empty(len(self.depths))


def load_reference(path, dtype: torch.dtype = torch.float32) -> ReferenceModel:
    from edgeloop.checkpoint import read_model_dir

    md = read_model_dir(path)
    return ReferenceModel(md.spec, md.recursion, md.tensors, dtype)


# ---------------------------------------------------------------------------------------------
# The reference as a backend of the generation engine (used by edgeloop.load on model dirs)


@dataclass(eq=False)
class ReferenceState:
    cache: KVCache
    host: bool = False

    @property
    def length(self) -> int:
        return self.cache.length


class ReferenceBackend:
    """The oracle behind the same step interface as the artifact drivers (rows run one by one)."""

    name = "reference"
    ragged_block = True  # one block call can mix rows of different token counts

    def __init__(self, model: ReferenceModel):
        self.model = model
        self.vocab_size = model.spec.vocab_size
        self.max_context = model.spec.max_position
        self.loops = model.recursion.loops
        self.host_loop = len(model.recursion.stages) == 1

    def new_state(self, *, host: bool = False) -> ReferenceState:
        return ReferenceState(self.model.new_cache(), host)

    def reserve(self, streams: int) -> None:
        pass

    def prepare(self, *, host: bool = False) -> None:
        """Nothing to load lazily: every function is ready after load."""

    def release(self, state: ReferenceState) -> None:
        state.cache = self.model.new_cache()

    @torch.no_grad()
    def step(self, rows):
        from edgeloop.runtimes.backend import RowOutput

        out = []
        for row in rows:
            ids = torch.from_numpy(np.asarray(row.tokens, dtype=np.int64).reshape(1, -1))
            if row.state.length + ids.shape[1] > self.max_context:
                from edgeloop.errors import EdgeloopError

                raise EdgeloopError(f"{row.state.length + ids.shape[1]} tokens exceed the model context of "
                                    f"{self.max_context}")
            logits = self.model(ids, row.state.cache)[0]
            out.append(RowOutput((logits if row.all_logits else logits[-1:]).float().numpy(), self.loops))
        return out

    def rewind(self, state: ReferenceState, length: int) -> None:
        state.cache.length = min(state.cache.length, max(0, length))
        state.cache.forget(state.cache.length)

    def forget(self, state: ReferenceState, start: int) -> None:
        state.cache.forget(start)

    @torch.no_grad()
    def kv_fill(self, rows) -> None:
        passes = self.model.passes()
        for r in rows:
            start = r.state.length if r.position is None else r.position
            x = torch.from_numpy(np.asarray(r.hidden, np.float32)).to(self.model.dtype)[None]
            for depth in passes[r.depth]:
                self.model.kv_of(x, depth, start, r.state.cache)

    def advance(self, state: ReferenceState, count: int) -> None:
        state.cache.length += int(count)

    @torch.no_grad()
    def embed(self, rows) -> list[np.ndarray]:
        return [self.model.embed(torch.from_numpy(np.asarray(r.tokens, np.int64)))[:].float().numpy() for r in rows]

    @torch.no_grad()
    def block(self, rows, *, complete: bool = False) -> list[np.ndarray]:
        passes = self.model.passes()
        out = []
        for r in rows:
            start = r.state.length if r.position is None else r.position
            x = torch.from_numpy(np.asarray(r.hidden, np.float32)).to(self.model.dtype)[None]
            x = self.model.run_depths(x, passes[r.depth], r.state.cache, start)
            if self.model.spec.loop_norm:
                x = self.model.loop_norm(x)
            out.append(x[0].float().numpy())
        return out

    @torch.no_grad()
    def head(self, hidden) -> list:
        from edgeloop.runtimes.backend import RowOutput

        out = []
        for h in hidden:
            x = torch.from_numpy(np.asarray(h, np.float32)).to(self.model.dtype)
            normed = x if self.model.spec.loop_norm else self.model.loop_norm(x)
            score = self.model.exit_score(normed)
            out.append(RowOutput(self.model.head(normed).float().numpy(), 0,
                                 None if score is None else score.float().numpy()))
        return out
