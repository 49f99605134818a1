"""Ouro (natively looped checkpoints with a learned exit gate): the reference against hand-checkable
properties, every backend against the reference, the gate as an exit policy, bad checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import edgeloop
from edgeloop.presets import OURO_TINY, make_ouro_checkpoint
from edgeloop.runtimes.exits import ExitPolicy, TokenExit
from conftest import run_cli

IDS = [5, 17, 42, 99, 7, 3, 250, 11]
L, T = OURO_TINY["num_hidden_layers"], OURO_TINY["total_ut_steps"]


@pytest.fixture(scope="module")
def ouro(tmp_path_factory):
    root = tmp_path_factory.mktemp("ouro")
    # a gate bias that makes the random gate fire at various steps under a 0.5 threshold
    make_ouro_checkpoint(root / "hf", gate_bias=-0.5)
    edgeloop.convert(root / "hf", root / "md")
    return root


def _oracle_step(tensors: dict, x: np.ndarray, keys: list) -> np.ndarray:
    """One Ouro step in plain numpy: L Llama-like layers with sandwich norms, then the final norm;
    appends each layer's roped K (its KV slot) to `keys`."""
    cfg = OURO_TINY
    heads, hd, eps = cfg["num_attention_heads"], cfg["head_dim"], cfg["rms_norm_eps"]
    t = x.shape[0]
    inv = 1.0 / cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    ang = np.outer(np.arange(t), inv)
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))

    def rms(v, w):
        return v / np.sqrt((v ** 2).mean(-1, keepdims=True) + eps) * w

    def rope(v):  # [t, heads, hd]
        rot = np.concatenate([-v[..., hd // 2:], v[..., :hd // 2]], -1)
        return v * cos[:, None] + rot * sin[:, None]

    def silu(v):
        return v / (1 + np.exp(-v))

    for i in range(L):
        p = f"model.layers.{i}."
        w = lambda n: tensors[p + n]  # noqa: E731
        h = rms(x, w("input_layernorm.weight"))
        q = rope((h @ w("self_attn.q_proj.weight").T).reshape(t, heads, hd))
        k = rope((h @ w("self_attn.k_proj.weight").T).reshape(t, heads, hd))
        v = (h @ w("self_attn.v_proj.weight").T).reshape(t, heads, hd)
        keys.append(k)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        attn = np.einsum("hqk,khd->qhd", pr, v).reshape(t, heads * hd) @ w("self_attn.o_proj.weight").T
        x = x + rms(attn, w("input_layernorm_2.weight"))
        h2 = rms(x, w("post_attention_layernorm.weight"))
        mlp = (silu(h2 @ w("mlp.gate_proj.weight").T) * (h2 @ w("mlp.up_proj.weight").T)) @ w("mlp.down_proj.weight").T
        x = x + rms(mlp, w("post_attention_layernorm_2.weight"))
    return rms(x, tensors["model.norm.weight"])


def test_reference_matches_a_plain_sandwich_stack_and_fills_slot_s_l(ouro):
    from safetensors.numpy import load_file

    tensors = {k: v.astype(np.float64) for k, v in load_file(str(ouro / "hf" / "model.safetensors")).items()}
    ref = edgeloop.load(ouro / "hf").backend
    x = tensors["model.embed_tokens.weight"][IDS]
    keys: list = []
    states = []
    for _ in range(T):
        x = _oracle_step(tensors, x, keys)
        states.append(x)
    model = ref.model
    with torch.no_grad():
        one = model.hidden_states(torch.tensor([IDS]), num_depths=L)[0].numpy()  # one step (already normed)
        cache = model.new_cache()
        full = model.hidden_states(torch.tensor([IDS]), cache)[0].numpy()
    assert np.abs(one - states[0]).max() < 1e-4
    assert np.abs(full - states[-1]).max() < 1e-4
    for s in range(T):  # step s, layer l writes slot s * L + l
        for layer in range(L):
            cached = cache.keys[s * L + layer][0].numpy().transpose(1, 0, 2)  # [t, heads, hd]
            assert np.abs(cached - keys[s * L + layer]).max() < 1e-4, (s, layer)
    # the gate reads the normed state of every step: sigmoid(w . h + b)
    gate = 1 / (1 + np.exp(-(states[1] @ tensors["model.early_exit_gate.weight"].T + tensors["model.early_exit_gate.bias"])))
    assert np.abs(model.exit_score(torch.tensor(states[1], dtype=torch.float32)).numpy() - gate[:, 0]).max() < 1e-5


def test_gate_rule_picks_the_papers_step():
    """t* = min{t : sum_{k<=t} lambda_k prod_{j<k} (1 - lambda_j) >= q}, else the last step."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        lam = rng.uniform(0, 1, T)
        q = float(rng.uniform(0.05, 1.0))
        cdf, survive, expected = 0.0, 1.0, T
        for t in range(T - 1):
            cdf += lam[t] * survive
            survive *= 1 - lam[t]
            if cdf >= q:
                expected = t + 1
                break
        memory = TokenExit(ExitPolicy("gate", q))
        got = next((t + 1 for t in range(T - 1) if memory.decide(t + 1, np.zeros(4), lam[t])), T)
        assert got == expected
    memory = TokenExit(ExitPolicy("gate", 1.0))
    assert not any(memory.decide(t + 1, np.zeros(4), 0.999) for t in range(T - 1))


def test_threshold_one_runs_every_step(ouro):
    ref = edgeloop.load(ouro / "hf")  # early_exit_threshold 1.0: the checkpoint's own rule
    ref.generate_tokens(IDS, max_new_tokens=6, ignore_eos=True)
    assert ref.last_stats.depths == [T] * 6 and ref.default_exit == "none"


@pytest.fixture(scope="module")
def backends(ouro):
    out = {"reference": edgeloop.load(ouro / "md")}
    for name, options in (("ort-unrolled", {}), ("ort-loop", {"layout": "loop"})):
        edgeloop.compile(ouro / "md", ouro / name, **options)
        out[name] = edgeloop.load(ouro / name)
    try:
        import tvm  # noqa: F401

        edgeloop.compile(ouro / "md", ouro / "tvm", backend="tvm")
        out["tvm"] = edgeloop.load(ouro / "tvm")
    except ImportError:
        pass
    return out


def test_every_backend_matches_the_reference_with_and_without_the_gate(backends):
    ref = backends["reference"]
    expected = ref.logits(IDS)
    for policy in ("none", "gate:0.5", "gate:0.3"):
        want = ref.generate_tokens(IDS[:4], max_new_tokens=10, ignore_eos=True, exit=policy)
        depths = ref.last_stats.depths
        if policy != "none":
            assert len(set(depths[1:])) > 1, "the gate should send tokens out at different steps"
        for name, model in backends.items():
            assert np.abs(model.logits(IDS) - expected).max() <= 1e-4, name
            assert model.generate_tokens(IDS[:4], max_new_tokens=10, ignore_eos=True, exit=policy) == want, name
            assert model.last_stats.depths == depths, (name, policy)
    capped = ref.generate_tokens(IDS[:4], max_new_tokens=5, ignore_eos=True, loops=2)
    assert ref.last_stats.depths == [2] * 5 and len(capped) == 5


def test_int4_matches_the_dequantized_reference(ouro, tmp_path):
    from edgeloop.checkpoint import read_model_dir
    from edgeloop.compiler import quant_pack as qp
    from edgeloop.reference import ReferenceBackend, ReferenceModel
    from edgeloop.runtimes.model import Model

    edgeloop.compile(ouro / "md", tmp_path / "int4", quant="int4", accuracy_level=0)
    md = read_model_dir(ouro / "md")
    tensors = dict(md.tensors)
    linears = set(md.spec.linear_shapes())
    for name, w in md.tensors.items():
        parts = name.split(".")
        if parts[0] == "blocks" and len(parts) == 4 and parts[2] in linears and parts[3] == "weight":
            tensors[name] = qp.dequantize_blocks(qp.quantize_blocks(w.T, bits=4, block_size=32, symmetric=True,
                                                                     search=True)).T
    ref = Model(ReferenceBackend(ReferenceModel(md.spec, md.recursion, tensors)), ouro / "md", {})
    art = edgeloop.load(tmp_path / "int4")
    assert np.abs(art.logits(IDS) - ref.logits(IDS)).max() <= 1e-4
    assert art.generate_tokens(IDS[:4], max_new_tokens=8, ignore_eos=True) == \
        ref.generate_tokens(IDS[:4], max_new_tokens=8, ignore_eos=True)
    # the gate runs on the int4 artifact (its decisions sit on cumulative probabilities that int4's 1e-5
    # differences may tip at a threshold; the float backends are checked decision for decision above)
    art.generate_tokens(IDS[:4], max_new_tokens=8, ignore_eos=True, exit="gate:0.5")
    assert len(art.last_stats.depths) == 8 and min(art.last_stats.depths[1:]) < T


def test_inspect_and_cli(ouro, backends):
    info = json.loads(run_cli("inspect", ouro / "ort-unrolled", "--json").stdout)
    assert info["loops"] == T and info["natively_looped"]["stored_layers"] == L and "exit_gate" in info
    r = run_cli("run", ouro / "ort-unrolled", "-p", "hello", "--max-new-tokens", "6", "--exit", "gate:0.5", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["stats"]["exit"] == "gate:0.5"


@pytest.mark.parametrize("edit, needle", [
    ("drop_gate", "early_exit_gate"), ("steps_zero", "total_ut_steps"), ("steps_str", "total_ut_steps"),
    ("unknown_key", "looping key"), ("threshold", "early_exit_threshold"), ("loops_option", "already looped"),
])
def test_bad_ouro_checkpoints(ouro, tmp_path, edit, needle):
    ck = shutil.copytree(ouro / "hf", tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    extra = []
    if edit == "drop_gate":
        from safetensors.numpy import load_file, save_file

        t = load_file(str(ck / "model.safetensors"))
        del t["model.early_exit_gate.weight"]
        save_file(t, str(ck / "model.safetensors"))
    elif edit == "steps_zero":
        cfg["total_ut_steps"] = 0
    elif edit == "steps_str":
        cfg["total_ut_steps"] = "4"
    elif edit == "unknown_key":
        cfg["ut_step_schedule"] = [1, 2]
    elif edit == "threshold":
        cfg["early_exit_threshold"] = 1.5
    else:
        extra = ["--loops", "2"]
    (ck / "config.json").write_text(json.dumps(cfg))
    r = run_cli("convert", ck, "-o", tmp_path / "out", *extra)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
