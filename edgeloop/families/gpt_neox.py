"""GPT-NeoX / Pythia: LayerNorm with bias, parallel residual, partial rotary, fused per-head qkv.

HF stores query_key_value rows grouped per head as [head, (q, k, v), head_dim]; conversion
splits them into plain q, k, v so the lowerings see the same layout as every other family.
"""

from functools import partial

import numpy as np

from edgeloop.families.common import Source, WeightMap, activation_name, check_dims, require, rope_settings
from edgeloop.spec import ModelSpec

MODEL_TYPES = ("gpt_neox",)


def spec_from_config(config: dict) -> ModelSpec:
    hidden = int(require(config, "hidden_size"))
    heads = int(require(config, "num_attention_heads"))
    theta, scaling, partial_factor = rope_settings(config)
    head_dim = hidden // heads
    spec = ModelSpec(
        family="gpt_neox",
        vocab_size=int(require(config, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(require(config, "intermediate_size")),
        num_layers=int(require(config, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        max_position=int(require(config, "max_position_embeddings", default=2048)),
        norm="layer",
        norm_eps=float(require(config, "layer_norm_eps", default=1e-5)),
        activation=activation_name(require(config, "hidden_act", default="gelu")),
        gated_mlp=False,
        qkv_bias=bool(config.get("attention_bias", True)),
        o_bias=bool(config.get("attention_bias", True)),
        mlp_bias=True,
        parallel_residual=bool(config.get("use_parallel_residual", True)),
        rope_theta=theta,
        rotary_dim=int(head_dim * partial_factor),
        rope_scaling=scaling,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
    check_dims(config, spec)
    return spec


def _split_qkv(w, *, part: int, heads: int, head_dim: int):
    """Rows [head, 3, head_dim, ...] -> the q (0), k (1) or v (2) rows [head * head_dim, ...]."""
    w = w.reshape(heads, 3, head_dim, *w.shape[1:])
    return w[:, part].reshape(heads * head_dim, *w.shape[3:])


def _merge_qkv(q, k, v, *, heads: int, head_dim: int):
    """Inverse of _split_qkv: q, k, v rows back into [head, (q, k, v), head_dim, ...]."""
    parts = [w.reshape(heads, 1, head_dim, *w.shape[1:]) for w in (q, k, v)]
    return np.concatenate(parts, axis=1).reshape(3 * heads * head_dim, *q.shape[1:])


def weight_map(spec: ModelSpec) -> WeightMap:
    p = "gpt_neox.layers.{i}."
    qkv = p + "attention.query_key_value."
    layer = {
        "input_norm.weight": Source((p + "input_layernorm.weight",)),
        "input_norm.bias": Source((p + "input_layernorm.bias",)),
        "post_norm.weight": Source((p + "post_attention_layernorm.weight",)),
        "post_norm.bias": Source((p + "post_attention_layernorm.bias",)),
        "o.weight": Source((p + "attention.dense.weight",)),
        "up.weight": Source((p + "mlp.dense_h_to_4h.weight",)),
        "up.bias": Source((p + "mlp.dense_h_to_4h.bias",)),
        "down.weight": Source((p + "mlp.dense_4h_to_h.weight",)),
        "down.bias": Source((p + "mlp.dense_4h_to_h.bias",)),
    }
    for part, name in enumerate("qkv"):
        split = partial(_split_qkv, part=part, heads=spec.num_heads, head_dim=spec.head_dim)
        layer[f"{name}.weight"] = Source((qkv + "weight",), split)
        if spec.qkv_bias:
            layer[f"{name}.bias"] = Source((qkv + "bias",), split)
    if spec.o_bias:
        layer["o.bias"] = Source((p + "attention.dense.bias",))
    glob = {
        "embed.weight": Source(("gpt_neox.embed_in.weight",)),
        "final_norm.weight": Source(("gpt_neox.final_layer_norm.weight",)),
        "final_norm.bias": Source(("gpt_neox.final_layer_norm.bias",)),
    }
    if not spec.tie_embeddings:
        glob["lm_head.weight"] = Source(("embed_out.weight",))
    merge = partial(_merge_qkv, heads=spec.num_heads, head_dim=spec.head_dim)
    merges = {qkv + "weight": merge, qkv + "bias": merge}
    return WeightMap(glob, layer, ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias"), merges)
