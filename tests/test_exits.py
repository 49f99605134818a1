"""Early exit at loop boundaries: policies, KV strategies, self-speculation, calibration, uptraining."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import edgeloop
from edgeloop.errors import EdgeloopError
from edgeloop.runtimes.exits import parse_policy
from conftest import BUNDLED, run_cli

PROMPT = [5, 17, 42, 99, 7, 3, 250]
NEW = 12


@pytest.fixture(scope="module")
def model_dir(converted):
    return converted("llama", loops=4, lora_rank=4)  # 4 layers -> K = 1, B = 4: three loop boundaries


@pytest.fixture(scope="module")
def models(model_dir, tmp_path_factory):
    """The reference and an artifact per backend, all of the same weights."""
    root = tmp_path_factory.mktemp("exits")
    out = {"reference": edgeloop.load(model_dir)}
    edgeloop.compile(model_dir, root / "ort")
    out["ort"] = edgeloop.load(root / "ort")
    try:
        import tvm  # noqa: F401

        edgeloop.compile(model_dir, root / "tvm", backend="tvm")
        out["tvm"] = edgeloop.load(root / "tvm")
    except ImportError:
        pass
    return out


def _mixed_threshold(ref) -> float:
    """A confidence threshold that makes these random-weight tokens leave at different depths, placed in
    the widest gap between observed top probabilities (so backends agreeing to 1e-4 decide alike)."""
    from edgeloop.runtimes.backend import BlockRow, Row

    b = ref.backend
    state = b.new_state(host=True)
    h = b.embed([Row(state, np.array(PROMPT + list(range(20, 40))))])[0]
    tops = []
    for r in range(b.loops - 1):
        h = b.block([BlockRow(state, h, r)])[0]
        logits = b.head([h])[0].logits.astype(np.float64)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        tops += list((p.max(-1) / p.sum(-1)))
    tops = np.sort(tops)
    mid = slice(len(tops) // 4, 3 * len(tops) // 4)
    gaps = np.diff(tops[mid])
    i = int(np.argmax(gaps)) + len(tops) // 4
    return float((tops[i] + tops[i + 1]) / 2)


def _run(model, policy, **kw):
    tokens = model.generate_tokens(PROMPT, max_new_tokens=NEW, ignore_eos=True, exit=policy, **kw)
    return tokens, list(model.last_stats.depths)


def test_exit_none_is_the_fused_graph(models):
    for name, model in models.items():
        full = model.generate_tokens(PROMPT, max_new_tokens=NEW, ignore_eos=True)
        assert _run(model, "none")[0] == full
        assert _run(model, "confidence:1.0")[0] == full  # a threshold never met: every pass, host loop
        assert model.last_stats.depths == [model.backend.loops] * NEW


def test_always_exiting_at_loop_one_equals_one_pass(models):
    """Exit after the first pass for every generated token == the model cut to one pass (an independent
    oracle: the reference's full-sequence forward over the first K depths)."""
    ref = models["reference"].backend.model
    seq = list(PROMPT)
    first = models["reference"].generate_tokens(PROMPT, max_new_tokens=1)
    seq += first
    with torch.no_grad():
        for _ in range(NEW - 1):
            h = ref.hidden_states(torch.tensor([seq]), num_depths=len(ref.passes()[0]))
            seq.append(int(ref.head(h)[0, -1].argmax()))
    expected = seq[len(PROMPT):]
    for name, model in models.items():
        for policy in ("depth:1", "confidence:0.000001"):
            tokens, depths = _run(model, policy)
            assert tokens == expected, (name, policy)
            assert depths == [model.backend.loops] + [1] * (NEW - 1)


@pytest.mark.parametrize("strategy", ["fill", "recursion"])
def test_backends_match_the_reference_with_exits(models, strategy):
    tau = _mixed_threshold(models["reference"])
    results = {}
    for name, model in models.items():
        model.kv_strategy = strategy
        results[name] = _run(model, f"confidence:{tau}")
        model.kv_strategy = "fill"
    ref_tokens, ref_depths = results["reference"]
    assert len(set(ref_depths[1:])) > 1, "the threshold should mix depths"
    for name, (tokens, depths) in results.items():
        assert (tokens, depths) == (ref_tokens, ref_depths), name


@pytest.mark.parametrize("strategy", ["fill", "recursion"])
def test_exit_logits_match_the_reference(models, strategy):
    """Step by step with the host loop: the logits at each exit agree to 1e-4 across backends."""
    from edgeloop.runtimes.exits import ExitPolicy, TokenExit
    from edgeloop.runtimes.stepping import StepRow, host_step

    tau = _mixed_threshold(models["reference"])
    runs = {}
    for name, model in models.items():
        b = model.backend
        state = b.new_state(host=True)
        outs = [host_step(b, [StepRow(state, np.array(PROMPT))], strategy=strategy)[0]]
        for t in range(20, 32):
            outs.append(host_step(b, [StepRow(state, np.array([t]), exit=TokenExit(ExitPolicy("confidence", tau)))],
                                  strategy=strategy)[0])
        runs[name] = outs
        b.release(state)
    for name, outs in runs.items():
        for o, r in zip(outs, runs["reference"]):
            assert o.depth == r.depth and np.abs(o.logits - r.logits).max() <= 1e-4, name


def test_policies_and_caps(models):
    ref = models["reference"]
    for policy in ("agreement:1", "agreement:2", "entropy:5.0", "kl:0.05", "depth:2", "depth:3"):
        tokens, depths = _run(ref, policy)
        assert len(tokens) == NEW and all(1 <= d <= ref.backend.loops for d in depths)
    assert _run(ref, "depth:2")[1][1:] == [2] * (NEW - 1)
    tokens, depths = _run(ref, "none", loops=2)  # --loops caps every token: the model cut to two loops
    assert depths == [2] * NEW and len(tokens) == NEW
    # scattered forced depths: a function of each token's first-boundary argmax, within [LO, HI]
    tokens, depths = _run(ref, "depth:1-3")
    assert set(depths[1:]) <= {1, 2, 3} and len(tokens) == NEW
    assert _run(ref, "depth:1-3") == (tokens, depths)


def test_scattered_depth_is_uniform_and_in_range():
    from edgeloop.runtimes.exits import scattered_depth

    picks = [scattered_depth(t, 1, 3) for t in range(30000)]
    assert set(picks) == {1, 2, 3} and abs(np.mean(picks) - 2.0) < 0.02
    assert str(parse_policy("depth:1-3", loops=4)) == "depth:1-3"


def test_self_speculation_equals_full_depth(models):
    for name, model in models.items():
        full = model.generate_tokens(PROMPT, max_new_tokens=NEW, ignore_eos=True)
        for policy in ("speculate:1x3", "speculate:2x4", "speculate:3x1"):
            tokens, _ = _run(model, policy)
            assert tokens == full, (name, policy)
            spec = model.last_stats.to_dict()["speculation"]
            assert spec["drafted"] >= 1 and 0 <= spec["acceptance"] <= 1
    # sampling keeps running (the rejection rule): seeded, reproducible
    ref = models["reference"]
    a = ref.generate_tokens(PROMPT, max_new_tokens=NEW, exit="speculate:2x3", temperature=0.8, seed=3, ignore_eos=True)
    b = ref.generate_tokens(PROMPT, max_new_tokens=NEW, exit="speculate:2x3", temperature=0.8, seed=3, ignore_eos=True)
    assert a == b and len(a) == NEW


def test_batch_with_exits_equals_one_by_one(models):
    tau = _mixed_threshold(models["reference"])
    for name, model in models.items():
        prompts = ["abc", "the first of many", "zz"]
        options = dict(max_new_tokens=8, ignore_eos=True, exit=f"confidence:{tau}")
        assert model.generate(prompts, **options) == [model.generate(p, **options) for p in prompts], name


@pytest.mark.parametrize("policy, needle", [("sometimes", "unknown exit policy"), ("confidence:1.5", "threshold"),
                                            ("confidence:x", "needs a number"), ("agreement:0", "must be in"),
                                            ("speculate:4x2", "draft depth"), ("depth:9", "must be in"),
                                            ("depth:3-2", "LO < HI"), ("depth:1-x", "LO-HI"),
                                            ("gate:0.5", "learned exit gate")])
def test_bad_policies(models, policy, needle):
    with pytest.raises(EdgeloopError, match=needle):
        models["reference"].generate("hi", exit=policy)


def test_cli_exit_and_calibrate(models, model_dir, tmp_path):
    art = tmp_path / "a"
    r = run_cli("compile", model_dir, "-o", art, "--exit", "depth:2")
    assert r.returncode == 0, r.stderr
    r = run_cli("run", art, "-p", "hello", "--max-new-tokens", "6", "--json")
    stats = json.loads(r.stdout)["stats"]
    assert r.returncode == 0 and stats["exit"] == "depth:2" and stats["depths"][1:] == [2] * 5
    r = run_cli("run", art, "-p", "hello", "--max-new-tokens", "6", "--exit", "none", "--json")
    assert json.loads(r.stdout)["stats"]["depths"] == [4] * 6
    short = tmp_path / "short.txt"
    short.write_text("too short")
    r = run_cli("calibrate", art, "--text", short, "--max-kl", "0.01")
    assert r.returncode == 2 and "at least 64" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("calibrate", art, "--text", BUNDLED / "heldout.txt", "--max-kl", "0.5", "--tokens", "300",
                "--policy", "confidence")
    assert r.returncode == 0, r.stderr
    info = json.loads(run_cli("inspect", art, "--json").stdout)
    assert info["exit"]["calibration"]["target"] == "mean KL <= 0.5"
    assert edgeloop.load(art).default_exit == info["exit"]["policy"]
    r = run_cli("calibrate", art, "--text", BUNDLED / "heldout.txt")
    assert r.returncode == 2 and "quality target" in r.stderr
    r = run_cli("compile", model_dir, "-o", tmp_path / "b", "--exit", "confidence:2")
    assert r.returncode == 2 and "threshold" in r.stderr and not (tmp_path / "b").exists()


def test_uptrain_lowers_the_loss_and_resumes(tmp_path):
    edgeloop.convert(BUNDLED, tmp_path / "r8", loops=4, lora_rank=8)
    text = (BUNDLED / "heldout.txt").read_text()
    (tmp_path / "train.txt").write_text(text[: len(text) // 2])
    (tmp_path / "eval.txt").write_text(text[len(text) // 2:])
    from edgeloop.uptrain import uptrain

    common = dict(batch=4, seq=64, eval_tokens=512, heldout=str(tmp_path / "eval.txt"), checkpoint_every=3,
                  exit_gate=True)
    result = uptrain(tmp_path / "r8", [tmp_path / "train.txt"], tmp_path / "out", steps=6, **common)
    assert result.loss_last < result.loss_first
    assert all(a < b for a, b in zip(result.perplexity_after, result.perplexity_before))
    report = json.loads((tmp_path / "out" / "uptrain.json").read_text())
    assert report["result"]["perplexity_after"] == result.perplexity_after
    model = edgeloop.load(tmp_path / "out")
    assert model.backend.model.spec.exit_gate
    assert len(model.generate_tokens([5, 6], max_new_tokens=3, exit="gate:0.5", ignore_eos=True)) == 3
    # resume: a run stopped after 3 steps continues from its checkpoint to the same result as one run
    import edgeloop.uptrain as up

    calls = {"n": 0}
    original = up.distill_loss

    def stop_after_three(*a, **k):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return original(*a, **k)

    up.distill_loss = stop_after_three
    try:
        with pytest.raises(KeyboardInterrupt):
            uptrain(tmp_path / "r8", [tmp_path / "train.txt"], tmp_path / "out2", steps=6, **common)
    finally:
        up.distill_loss = original
    assert (tmp_path / ".out2.uptrain-checkpoint" / "state.pt").is_file()
    resumed = uptrain(tmp_path / "r8", [tmp_path / "train.txt"], tmp_path / "out2", steps=6, resume=True,
                      save_dtype="float16", **common)
    assert resumed.loss_last == pytest.approx(result.loss_last, rel=1e-4)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out2" / "model.safetensors"), "np") as f:  # stored half size, read as float32
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert edgeloop.load(tmp_path / "out2").logits([5, 6]).dtype == np.float32
    r = run_cli("uptrain", tmp_path / "r8", "--data", tmp_path / "missing.txt", "-o", tmp_path / "x")
    assert r.returncode == 2 and "not found" in r.stderr
    r = run_cli("uptrain", tmp_path / "r8", "--data", tmp_path / "train.txt", "-o", tmp_path / "x", "--lr", "-1")
    assert r.returncode == 2 and "--lr" in r.stderr


SHIPPED = BUNDLED.parent / "kjv-tiny-loop"


def test_shipped_uptrained_model(tmp_path):
    """examples/kjv-tiny-loop: its loop boundaries are usable exits (loop 3 within 4%, loop 2 within 8% of
    full depth on held-out text), it finds its teacher through a relative path, and compile reports its
    size against that checkpoint."""
    import torch

    from edgeloop.checkpoint import read_model_dir
    from edgeloop.reference import ReferenceModel
    from edgeloop.uptrain import UptrainOptions, _teacher_dir, _tokens, per_loop_perplexity

    md = read_model_dir(SHIPPED)
    assert _teacher_dir(md, UptrainOptions()).resolve() == BUNDLED.resolve()
    ids = _tokens([BUNDLED / "heldout.txt"], edgeloop.load(SHIPPED).tokenizer)[:1024]
    student = ReferenceModel(md.spec, md.recursion, md.tensors)
    loops = per_loop_perplexity(student, student, ids, torch.device("cpu"))[:-1]
    assert loops[2] <= 1.04 * loops[3] and loops[1] <= 1.08 * loops[3] and loops[0] > loops[3]
    r = run_cli("compile", SHIPPED, "-o", tmp_path / "a", "--json")
    summary = json.loads(r.stdout)
    assert r.returncode == 0 and summary["original_checkpoint_bytes"] == (BUNDLED / "model.safetensors").stat().st_size
