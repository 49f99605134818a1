"""Pieces the family modules share: config reading and weight maps as data."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from edgeloop.errors import EdgeloopError


@dataclass(frozen=True)
class Source:
    """Where one edgeloop tensor comes from: HF tensor names ({i} = layer) and a numpy transform."""

    names: tuple[str, ...]
    transform: Callable[..., np.ndarray] | None = None
    inverse: Callable[[np.ndarray], np.ndarray] | None = None  # edgeloop -> HF, for export


@dataclass(frozen=True)
class WeightMap:
    """Target name -> Source, for tensors outside the layers and for one layer (with {i})."""

    globals: dict[str, Source]
    layer: dict[str, Source]
    ignore_suffixes: tuple[str, ...] = ()  # buffers some checkpoints carry (e.g. rotary inv_freq)
    # HF tensors that several edgeloop tensors were split from: HF name -> merge(*parts in map order)
    merges: dict[str, Callable[..., np.ndarray]] = field(default_factory=dict)


def to_hf(wmap: WeightMap, globals_: dict[str, np.ndarray], layers: list[dict[str, np.ndarray]]) -> dict:
    """The inverse of reading: edgeloop tensors of a vanilla model -> HF tensor names."""
    out: dict[str, np.ndarray] = {}
    scopes = [(wmap.globals, globals_, None)] + [(wmap.layer, layer, i) for i, layer in enumerate(layers)]
    for scope, tensors, i in scopes:
        by_source: dict[str, list[str]] = {}
        for target, src in scope.items():
            by_source.setdefault(src.names[0], []).append(target)
        for name, targets in by_source.items():
            src = scope[targets[0]]
            if len(targets) > 1:
                value = wmap.merges[name](*[tensors[t] for t in targets])
            elif src.transform is None:
                value = tensors[targets[0]]
            else:
                value = src.inverse(tensors[targets[0]])
            out[name.format(i=i)] = np.ascontiguousarray(value)
    return out


def require(config: dict, *names: str, default=None):
    """First present key among `names` (aliases), else `default`; error if no default."""
    for name in names:
        if config.get(name) is not None:
            return config[name]
    if default is None:
        raise EdgeloopError(f"config.json is missing {names[0]!r}; is this a complete Hugging Face checkpoint?")
    return default


def _rope_dict(config: dict, key: str) -> dict:
    value = config.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EdgeloopError(f"config.json: {key} must be an object, got {value!r}")
    return dict(value)


def rope_settings(config: dict) -> tuple[float, dict | None, float]:
    """(theta, scaling, partial_rotary_factor) from old (rope_theta/rope_scaling) and new (rope_parameters)
    keys. A checkpoint edited to hold both, with different values, is refused rather than guessed at."""
    params, legacy = _rope_dict(config, "rope_parameters"), _rope_dict(config, "rope_scaling")
    thetas = [v for v in (params.get("rope_theta"), config.get("rope_theta")) if v is not None]
    for value in thetas:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise EdgeloopError(f"config.json: rope_theta must be a finite number > 0, got {value!r}")
    if len(set(map(float, thetas))) > 1:
        raise EdgeloopError(f"config.json gives rope_theta twice with different values ({thetas[0]} in "
                            f"rope_parameters, {thetas[1]} at the top level); keep one")
    theta = float(thetas[0]) if thetas else 10000.0
    kinds = {name: d.get("rope_type", d.get("type", "default")) or "default"
             for name, d in (("rope_parameters", params), ("rope_scaling", legacy)) if d}
    scaled = {name: kind for name, kind in kinds.items() if kind != "default"}
    if len(scaled) > 1 and len(set(scaled.values())) > 1 or (scaled and len(kinds) > 1 and len(scaled) < len(kinds)):
        raise EdgeloopError(f"config.json gives the rope scaling twice ({', '.join(f'{k}: {v}' for k, v in kinds.items())});"
                            " keep one")
    merged = {**legacy, **params} if not scaled or "rope_parameters" in scaled else {**params, **legacy}
    partial = merged.get("partial_rotary_factor", config.get("partial_rotary_factor", config.get("rotary_pct", 1.0)))
    if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 < partial <= 1:
        raise EdgeloopError(f"config.json: partial_rotary_factor must be in (0, 1], got {partial!r}")
    kind = next(iter(scaled.values()), "default")
    if kind == "default":
        return theta, None, float(partial)
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in merged]
        if missing:
            raise EdgeloopError(f"llama3 rope scaling in config.json is missing {', '.join(missing)}")
        return theta, {"type": "llama3", **{k: merged[k] for k in keys}}, float(partial)
    if kind == "linear":
        if "factor" not in merged:
            raise EdgeloopError("linear rope scaling in config.json is missing factor")
        return theta, {"type": "linear", "factor": merged["factor"]}, float(partial)
    raise EdgeloopError(f"unsupported rope scaling {kind!r} in config.json; edgeloop supports llama3 and linear")


def check_dims(config: dict, spec) -> None:
    if spec.hidden_size <= 0 or spec.num_layers <= 0 or spec.vocab_size <= 0:
        raise EdgeloopError("inconsistent config.json: sizes must be positive")


def llama_style_layer_map(spec, *, norm_transform=None, norm_inverse=None) -> dict[str, Source]:
    """Layer tensors of the Llama layout (also Mistral, Qwen2/3, Gemma)."""
    p = "model.layers.{i}."
    m = {
        "input_norm.weight": Source((p + "input_layernorm.weight",), norm_transform, norm_inverse),
        "post_norm.weight": Source((p + "post_attention_layernorm.weight",), norm_transform, norm_inverse),
        "q.weight": Source((p + "self_attn.q_proj.weight",)),
        "k.weight": Source((p + "self_attn.k_proj.weight",)),
        "v.weight": Source((p + "self_attn.v_proj.weight",)),
        "o.weight": Source((p + "self_attn.o_proj.weight",)),
        "gate.weight": Source((p + "mlp.gate_proj.weight",)),
        "up.weight": Source((p + "mlp.up_proj.weight",)),
        "down.weight": Source((p + "mlp.down_proj.weight",)),
    }
    for name in ("q", "k", "v"):
        if spec.qkv_bias:
            m[f"{name}.bias"] = Source((p + f"self_attn.{name}_proj.bias",))
    if spec.o_bias:
        m["o.bias"] = Source((p + "self_attn.o_proj.bias",))
    if spec.mlp_bias:
        for name in ("gate", "up", "down"):
            m[f"{name}.bias"] = Source((p + f"mlp.{name}_proj.bias",))
    if spec.qk_norm:
        m["q_norm.weight"] = Source((p + "self_attn.q_norm.weight",), norm_transform, norm_inverse)
        m["k_norm.weight"] = Source((p + "self_attn.k_norm.weight",), norm_transform, norm_inverse)
    return m


def llama_style_globals(spec, *, norm_transform=None, norm_inverse=None) -> dict[str, Source]:
    g = {
        "embed.weight": Source(("model.embed_tokens.weight",)),
        "final_norm.weight": Source(("model.norm.weight",), norm_transform, norm_inverse),
    }
    if not spec.tie_embeddings:
        g["lm_head.weight"] = Source(("lm_head.weight",))
    return g


def llama_style_spec_kwargs(config: dict) -> dict:
    """ModelSpec fields every Llama-layout family reads the same way."""
    hidden = int(require(config, "hidden_size"))
    heads = int(require(config, "num_attention_heads"))
    theta, scaling, partial = rope_settings(config)
    head_dim = int(config.get("head_dim") or hidden // heads)
    return dict(
        vocab_size=int(require(config, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(require(config, "intermediate_size")),
        num_layers=int(require(config, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        max_position=int(require(config, "max_position_embeddings", default=2048)),
        norm="rms",
        norm_eps=float(require(config, "rms_norm_eps", default=1e-6)),
        activation=activation_name(require(config, "hidden_act", default="silu")),
        gated_mlp=True,
        rope_theta=theta,
        rotary_dim=int(head_dim * partial),
        rope_scaling=scaling,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


_ACT = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def activation_name(hf_name: str) -> str:
    if hf_name not in _ACT:
        raise EdgeloopError(f"unsupported activation {hf_name!r} in config.json; edgeloop supports {', '.join(_ACT)}")
    return _ACT[hf_name]
