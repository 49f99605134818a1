"""Gemma (1): GeGLU, (1 + w) RMSNorm, sqrt(hidden) embedding scale, tied embeddings, MQA.

The (1 + w) norm is folded into the stored weight at conversion, so every backend runs a
plain RMSNorm.
"""

import math

from edgeloop.families.common import (WeightMap, activation_name, check_dims, llama_style_globals,
                                      llama_style_layer_map, llama_style_spec_kwargs)
from edgeloop.spec import ModelSpec

MODEL_TYPES = ("gemma",)


def _plus_one(w):
    return w + 1.0


def _minus_one(w):
    return w - 1.0


def spec_from_config(config: dict) -> ModelSpec:
    kw = llama_style_spec_kwargs(config)
    # Gemma checkpoints name the MLP activation `hidden_activation` (older) or `hidden_act`.
    kw["activation"] = activation_name(config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh")
    kw["tie_embeddings"] = bool(config.get("tie_word_embeddings", True))
    bias = bool(config.get("attention_bias", False))
    spec = ModelSpec(family="gemma", embed_scale=math.sqrt(kw["hidden_size"]), qkv_bias=bias, o_bias=bias, **kw)
    check_dims(config, spec)
    return spec


def weight_map(spec: ModelSpec) -> WeightMap:
    norm = dict(norm_transform=_plus_one, norm_inverse=_minus_one)
    return WeightMap(llama_style_globals(spec, **norm), llama_style_layer_map(spec, **norm), ("rotary_emb.inv_freq",))
