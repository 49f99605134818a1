"""Ouro (ByteDance LoopLM, `model_type: "ouro"`): a Llama-like stack looped `total_ut_steps` times.

What differs from Llama (docs/ouro.md has the sources):
- "sandwich" norms: each sublayer's output is RMS-normed before its residual add
  (`input_layernorm_2` after attention, `post_attention_layernorm_2` after the MLP);
- the final norm closes every loop step and its output is the next step's input;
- one KV slot per (step, layer): slot s * L + l, as every looped edgeloop model;
- a learned exit gate `early_exit_gate` (Linear hidden -> 1, with bias) reads the normed state at
  every step; the cumulative exit probability against `early_exit_threshold` decides the exit.
The checkpoint is read as a recursive model with K = num_hidden_layers, B = total_ut_steps and no
LoRA (`ModelSpec.native_loops`).
"""

from edgeloop.errors import EdgeloopError
from edgeloop.families.common import (Source, WeightMap, check_dims, llama_style_globals, llama_style_layer_map,
                                      llama_style_spec_kwargs)
from edgeloop.spec import ModelSpec

MODEL_TYPES = ("ouro",)

# looping keys of Ouro configs that edgeloop reads; any other looping-looking key is refused (unknown semantics)
LOOP_KEYS = ("total_ut_steps", "early_exit_threshold", "early_exit_step")
_LOOPING_WORDS = ("ut_step", "exit", "loop", "recur", "ponder")


def spec_from_config(config: dict) -> ModelSpec:
    unknown = [k for k in config if any(w in k.lower() for w in _LOOPING_WORDS) and k not in LOOP_KEYS]
    if unknown:
        raise EdgeloopError(f"config.json has looping key {unknown[0]!r}, which edgeloop does not know for Ouro "
                            f"(it reads {', '.join(LOOP_KEYS)})")
    steps = config.get("total_ut_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise EdgeloopError(f"config.json: total_ut_steps must be a positive integer, got {steps!r}")
    threshold = config.get("early_exit_threshold", 1.0)
    if threshold is None:
        threshold = 1.0
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise EdgeloopError(f"config.json: early_exit_threshold must be in (0, 1], got {threshold!r}")
    if config.get("early_exit_step") is not None:
        raise EdgeloopError("config.json sets early_exit_step (a fixed exit step); run with --exit depth:N instead "
                            "and remove the key")
    if config.get("use_sliding_window"):
        raise EdgeloopError("config.json: Ouro with use_sliding_window is not supported")
    kw = llama_style_spec_kwargs(config)
    layers = kw.pop("num_layers")
    spec = ModelSpec(family="ouro", num_layers=layers * steps, native_loops=steps, sandwich_norms=True,
                     loop_norm=True, exit_gate=True, exit_threshold=float(threshold), **kw)
    check_dims(config, spec)
    return spec


def weight_map(spec: ModelSpec) -> WeightMap:
    p = "model.layers.{i}."
    layer = llama_style_layer_map(spec)
    layer["attn_out_norm.weight"] = Source((p + "input_layernorm_2.weight",))
    layer["mlp_out_norm.weight"] = Source((p + "post_attention_layernorm_2.weight",))
    globals_ = llama_style_globals(spec)
    globals_["exit_gate.weight"] = Source(("model.early_exit_gate.weight",))
    globals_["exit_gate.bias"] = Source(("model.early_exit_gate.bias",))
    return WeightMap(globals_, layer, ("rotary_emb.inv_freq",))
