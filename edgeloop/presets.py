"""Tiny random checkpoints of every family, and real-model shapes for benchmarks.

`make_hf_checkpoint` writes a genuine Hugging Face checkpoint with `transformers`
(`save_pretrained`), so tests and benchmarks exercise the same reading code as real models.
Weights are perturbed away from the library's init (norm weights not all one, biases not all
zero) so that per-depth norms and biases matter and logits are far from uniform.
"""

from __future__ import annotations

from pathlib import Path

_TINY_COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    bos_token_id=1, eos_token_id=2)

TINY: dict[str, dict] = {
    "llama": dict(model_type="llama", **_TINY_COMMON, rms_norm_eps=1e-5),
    "llama3": dict(model_type="llama", **{**_TINY_COMMON, "num_hidden_layers": 6}, tie_word_embeddings=True,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                   rope_theta=500000.0),
    "mistral": dict(model_type="mistral", **_TINY_COMMON, sliding_window=4096),
    "qwen2": dict(model_type="qwen2", **_TINY_COMMON, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", **_TINY_COMMON, head_dim=32),
    "gemma": dict(model_type="gemma", **{**_TINY_COMMON, "num_key_value_heads": 1}, head_dim=32,
                  hidden_act="gelu_pytorch_tanh"),
    "gpt_neox": dict(model_type="gpt_neox", vocab_size=320, hidden_size=64, intermediate_size=256,
                     num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=512, rotary_pct=0.25,
                     use_parallel_residual=True, bos_token_id=1, eos_token_id=2),
    "gpt_neox_seq": dict(model_type="gpt_neox", vocab_size=320, hidden_size=64, intermediate_size=256,
                         num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=512, rotary_pct=0.5,
                         use_parallel_residual=False, bos_token_id=1, eos_token_id=2),
}

# Real architectures (weights random): for benchmarks and parameter-count checks.
REAL_SHAPES: dict[str, dict] = {
    "smollm-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                        max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=10000.0),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1000000.0),
    "tinyllama-1.1b": dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           max_position_embeddings=2048, tie_word_embeddings=False),
    "gemma-2b": dict(model_type="gemma", vocab_size=256000, hidden_size=2048, intermediate_size=16384,
                     num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
                     max_position_embeddings=8192, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True),
    "pythia-1b": dict(model_type="gpt_neox", vocab_size=50304, hidden_size=2048, intermediate_size=8192,
                      num_hidden_layers=16, num_attention_heads=8, max_position_embeddings=2048,
                      rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False),
}


# Ouro (remote code only, no transformers class): written directly with the real checkpoints' config
# keys and tensor names (docs/ouro.md). OURO_1_4B is the shape of ByteDance/Ouro-1.4B.
OURO_TINY = dict(model_type="ouro", architectures=["OuroForCausalLM"], vocab_size=320, hidden_size=64,
                 intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                 head_dim=16, hidden_act="silu", max_position_embeddings=512, rope_theta=1000000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=False, total_ut_steps=4, early_exit_threshold=1.0,
                 use_sliding_window=False, bos_token_id=0, eos_token_id=0)
OURO_1_4B = dict(OURO_TINY, vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=16, head_dim=128, max_position_embeddings=65536)


def make_ouro_checkpoint(path: str | Path, config: dict | None = None, *, seed: int = 0,
                         gate_bias: float = 0.0) -> Path:
    """A random-weight Ouro checkpoint: config.json, model.safetensors (Ouro's tensor names), a tokenizer."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    cfg = dict(OURO_TINY if config is None else config)
    rng = np.random.default_rng(seed)
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def mat(out, inp):
        return (rng.standard_normal((out, inp), dtype=np.float32) / np.sqrt(inp)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    tensors = {"model.embed_tokens.weight": mat(v, h), "model.norm.weight": norm(h), "lm_head.weight": mat(v, h),
               "model.early_exit_gate.weight": mat(1, h), "model.early_exit_gate.bias": np.array([gate_bias], np.float32)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({p + "self_attn.q_proj.weight": mat(q, h), p + "self_attn.k_proj.weight": mat(kv, h),
                        p + "self_attn.v_proj.weight": mat(kv, h), p + "self_attn.o_proj.weight": mat(h, q),
                        p + "mlp.gate_proj.weight": mat(f, h), p + "mlp.up_proj.weight": mat(f, h),
                        p + "mlp.down_proj.weight": mat(h, f)})
        for name in ("input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2"):
            tensors[p + name + ".weight"] = norm(h)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    write_byte_tokenizer(path, v, cfg.get("bos_token_id", 0), cfg.get("eos_token_id", 0))
    return path


def hf_config(config: dict):
    """A `transformers` config object for a preset dict."""
    import transformers

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    return transformers.AutoConfig.for_model(model_type, **cfg)


def make_hf_checkpoint(preset: str | dict, path: str | Path, *, seed: int = 0, scale: float = 1.0) -> Path:
    """Write a random checkpoint (config.json + model.safetensors + a byte-level tokenizer)."""
    import torch
    import transformers

    config = TINY[preset] if isinstance(preset, str) else preset
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(config), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, scale / p.shape[-1] ** 0.5, generator=gen)
            elif "norm" in name and "bias" not in name:
                base = 0.0 if config["model_type"] == "gemma" else 1.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.normal_(0.0, 0.05, generator=gen)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    write_byte_tokenizer(path, config["vocab_size"], config.get("bos_token_id", 1), config.get("eos_token_id", 2))
    return path


def write_byte_tokenizer(path: Path, vocab_size: int, bos_id: int, eos_id: int) -> None:
    """A tiny byte-level BPE tokenizer (no merges) so text round-trips through random models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = {"<unk>": 0, "<s>": bos_id, "</s>": eos_id}
    vocab = dict(specials)
    for ch in sorted(alphabet):
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    tok.save(str(path / "tokenizer.json"))
