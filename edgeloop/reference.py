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
    """One (k, v) pair per depth position, each [batch, kv_heads, seen, head_dim]."""

    layers: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    length: int = 0

    @classmethod
    def empty(cls, num_depths: int) -> KVCache:
        return cls([None] * num_depths, 0)

    def update(self, d: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        old = self.layers[d]
        if old is not None:
            k, v = torch.cat([old[0], k], dim=2), torch.cat([old[1], v], dim=2)
        self.layers[d] = (k, v)
        return k, v


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
        if cache is not None:
            k, v = cache.update(depth.index, k, v)
        rep = s.num_heads // s.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(s.head_dim)  # (b, h, t, seen)
        qpos = torch.arange(start, start + t)[:, None]
        kpos = torch.arange(k.shape[2])[None, :]
        allowed = kpos <= qpos
        if s.sliding_window:
            allowed &= kpos > qpos - s.sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v
        out = out.transpose(1, 2).reshape(bsz, t, s.q_size)
        return self._linear(out, depth, "o")

    def _mlp(self, x: torch.Tensor, depth: Depth) -> torch.Tensor:
        if self.spec.gated_mlp:
            h = self._act(self._linear(x, depth, "gate")) * self._linear(x, depth, "up")
        else:
            h = self._act(self._linear(x, depth, "up"))
        return self._linear(h, depth, "down")

    def _layer(self, x, depth: Depth, cache, start, cos, sin):
        h1 = self._norm(x, self._vec(depth, "input_norm.weight"), self._vec(depth, "input_norm.bias"))
        attn = self._attention(h1, depth, cache, start, cos, sin)
        if self.spec.parallel_residual:
            h2 = self._norm(x, self._vec(depth, "post_norm.weight"), self._vec(depth, "post_norm.bias"))
            return x + attn + self._mlp(h2, depth)
        x = x + attn
        h2 = self._norm(x, self._vec(depth, "post_norm.weight"), self._vec(depth, "post_norm.bias"))
        return x + self._mlp(h2, depth)

    # -- entry points ----------------------------------------------------------------------

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                      num_depths: int | None = None) -> torch.Tensor:
        """Final-normed hidden states [batch, t, hidden] after `num_depths` depth positions."""
        start = cache.length if cache is not None else 0
        t = input_ids.shape[1]
        x = self.w["embed.weight"][input_ids] * self.spec.embed_scale
        freqs = torch.arange(start, start + t, dtype=torch.float64)[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        for depth in self.depths[:num_depths]:
            x = self._layer(x, depth, cache, start, cos, sin)
        if cache is not None:
            cache.length += t
        return self._norm(x, self.w["final_norm.weight"], self.w.get("final_norm.bias"))

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [batch, t, vocab] for every position."""
        head = self.w.get("lm_head.weight", self.w["embed.weight"])
        return self.hidden_states(input_ids, cache) @ head.T

    def new_cache(self) -> KVCache:
        return KVCache.empty(len(self.depths))


def load_reference(path, dtype: torch.dtype = torch.float32) -> ReferenceModel:
    from edgeloop.checkpoint import read_model_dir

    md = read_model_dir(path)
    return ReferenceModel(md.spec, md.recursion, md.tensors, dtype)


# ---------------------------------------------------------------------------------------------
# The reference as a backend of the generation engine (used by edgeloop.load on model dirs)


@dataclass
class ReferenceState:
    cache: KVCache

    @property
    def length(self) -> int:
        return self.cache.length


class ReferenceBackend:
    name = "reference"

    def __init__(self, model: ReferenceModel):
        self.model = model
        self.vocab_size = model.spec.vocab_size
        self.max_context = model.spec.max_position

    def new_state(self) -> ReferenceState:
        return ReferenceState(self.model.new_cache())

    @torch.no_grad()
    def step(self, state: ReferenceState, tokens: np.ndarray, *, all_logits: bool = False) -> np.ndarray:
        ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64).reshape(1, -1))
        logits = self.model(ids, state.cache)[0]
        return (logits if all_logits else logits[-1:]).float().numpy()

    def rewind(self, state: ReferenceState, length: int) -> None:
        cache = state.cache
        cache.layers = [None if kv is None or length == 0 else (kv[0][:, :, :length], kv[1][:, :, :length])
                        for kv in cache.layers]
        cache.length = min(cache.length, length)
