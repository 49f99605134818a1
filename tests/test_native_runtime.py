"""The native runtime (runtimes/native, C API include/edgeloop.h) against the Python runtime.

On the bundled model (examples/kjv-tiny, 4 loops, LoRA rank 8) compiled for TVM CPU:
- edgeloop-cli's greedy and seeded sampled tokens (temperature 0.8, top_p 0.9, seed 1) for 64
  tokens, and its text, equal the Python runtime's (`edgeloop.load(artifact)`);
- with early exit (depth:2, confidence, entropy, kl, agreement) the tokens and each token's loop
  passes equal Python's `last_stats.depths`; also on a tiny random Ouro model, whose learned exit
  gate comes out of the epilogue with the logits (gate:T);
- edgeloop_native_tests: the sampler's golden sequences (tests/test_sampler.py), SHA-256, the
  JSON-Schema validator, and the C API on bad input (missing or corrupt artifacts, checksum and
  version mismatches, files outside the artifact, prompts beyond the context, invalid options)
  returning the documented status codes with a message;
- the same test binary under AddressSanitizer + UndefinedBehaviorSanitizer with leak detection.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from test_native_build import (
    bundled_artifact,
    check_schema_is_current,
    locked,
    native_build,
    shared_dir,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PROMPT = "And God said unto Moses"
N = 64


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return native_build(tmp_path_factory, "edgeloop-cli", "edgeloop_native_tests")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return bundled_artifact(tmp_path_factory)


@pytest.fixture(scope="module")
def python_model(artifact):
    import edgeloop

    return edgeloop.load(artifact)


def cli(build, artifact, *args, check=True):
    r = subprocess.run([str(build / "edgeloop-cli"), str(artifact), "-p", PROMPT, *map(str, args)], capture_output=True,
                       text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def cli_json(build, artifact, *args):
    return json.loads(cli(build, artifact, "-n", N, "--ignore-eos", "--json", *args).stdout)


def python_run(model, **options):
    ids = model.tokenizer.encode(PROMPT)
    tokens = model.generate_tokens(ids, max_new_tokens=N, ignore_eos=True, **options)
    depths = list(model.last_stats.depths)
    text = model.generate(PROMPT, max_new_tokens=N, ignore_eos=True, **options)
    return tokens, depths, text


def test_greedy_and_sampled_tokens_equal_python(build, artifact, python_model):
    for flags, options in [((), {}), (("--temp", 0.8, "--top-p", 0.9, "--seed", 1),
                                      dict(temperature=0.8, top_p=0.9, seed=1))]:
        native = cli_json(build, artifact, *flags)
        tokens, depths, text = python_run(python_model, **options)
        assert native["tokens"] == tokens, options
        assert native["text"] == text
        assert native["depths"] == depths == [4] * N
        assert native["prompt_tokens"] == len(python_model.tokenizer.encode(PROMPT))


@pytest.mark.parametrize("policy", ["depth:2", "depth:1-3", "confidence:0.5", "entropy:2", "kl:0.05", "agreement:1"])
def test_early_exit_tokens_and_depths_equal_python(build, artifact, python_model, policy):
    native = cli_json(build, artifact, "--exit", policy)
    tokens, depths, text = python_run(python_model, exit=policy)
    assert native["tokens"] == tokens
    assert native["depths"] == depths
    assert native["text"] == text
    assert native["exit"] == policy
    if policy == "depth:2":
        assert depths == [4] + [2] * (N - 1)  # the prompt runs every pass
    if policy == "depth:1-3":  # forced depths scattered by each token's first-boundary argmax
        assert set(depths[1:]) <= {1, 2, 3} and len(set(depths[1:])) > 1


def test_exit_gate_model_equals_python(build, tmp_path_factory):
    """A random-weight Ouro checkpoint (exit gate, norm after every pass) compiled for TVM CPU: the
    epilogue returns (logits, exit_score) and gate:T decides on the cumulative exit probability."""
    import edgeloop
    from edgeloop.presets import make_ouro_checkpoint

    check_schema_is_current()
    art = shared_dir(tmp_path_factory) / "ouro-tvm"
    with locked(tmp_path_factory, "ouro"):
        if not (art / "edgeloop.json").exists():
            checkpoint = make_ouro_checkpoint(shared_dir(tmp_path_factory) / "ouro-hf")
            edgeloop.compile(checkpoint, art, backend="tvm", overwrite=True)
    model = edgeloop.load(art)
    prompt = "hello world, this is"
    for policy in ("gate:0.5", "gate:0.3", "confidence:0.02"):
        r = subprocess.run([str(build / "edgeloop-cli"), str(art), "-p", prompt, "-n", "32", "--ignore-eos", "--json",
                            "--exit", policy], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        native = json.loads(r.stdout)
        tokens = model.generate_tokens(model.tokenizer.encode(prompt), max_new_tokens=32, ignore_eos=True, exit=policy)
        assert native["tokens"] == tokens, policy
        assert native["depths"] == model.last_stats.depths, policy
        assert min(native["depths"][1:]) < 4, policy  # the policy did exit early


def test_cli_streams_text_and_reports_timings(build, artifact, python_model):
    r = cli(build, artifact, "-n", 24, "--ignore-eos")
    assert r.stdout == python_model.generate(PROMPT, max_new_tokens=24, ignore_eos=True) + "\n"
    for part in ("load", "time to first token", "tok/s", "peak RSS"):
        assert part in r.stderr
    bad = cli(build, artifact, "--temp", "nan", check=False)
    assert bad.returncode == 1 and "temperature" in bad.stderr and "EL_ERR_INVALID_ARGUMENT" in bad.stderr
    missing = subprocess.run([str(build / "edgeloop-cli"), str(artifact / "nope"), "-p", "x"], capture_output=True,
                             text=True)
    assert missing.returncode == 1 and "EL_ERR_IO" in missing.stderr


def test_stop_strings_match_python(build, artifact, python_model):
    native = cli_json(build, artifact, "--stop", "LORD", "--stop", "people")
    text = python_model.generate(PROMPT, max_new_tokens=N, ignore_eos=True, stop=["LORD", "people"])
    assert native["text"] == text and native["finish_reason"] == python_model.last_stats.finish_reason == "stop"


def test_sampler_golden_sequences_in_cxx(build):
    from test_sampler import GOLDEN, LOGITS

    r = subprocess.run([str(build / "edgeloop_native_tests"), "sampler"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    table = json.loads(subprocess.run([str(build / "edgeloop_native_tests"), "--dump-golden"], capture_output=True,
                                      text=True, check=True).stdout)
    assert table.pop("_logits") == [float(x) for x in LOGITS]  # the C++ copy of the logits is Python's
    defaults = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    assert set(table) == set(GOLDEN)
    for name, (options, expected) in GOLDEN.items():
        cxx = table[name]
        assert cxx.pop("expected") == expected, name
        assert cxx == {**defaults, **options}, name


def test_units_and_c_api_on_bad_input(build, artifact, tmp_path):
    r = subprocess.run([str(build / "edgeloop_native_tests"), "all", str(artifact), str(tmp_path)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " 0 failed" in r.stdout


def test_sanitizers_address_undefined_leaks(tmp_path_factory, artifact, tmp_path):
    build = native_build(tmp_path_factory, "edgeloop_native_tests", sanitize=True)
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:halt_on_error=1",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
    r = subprocess.run([str(build / "edgeloop_native_tests"), "all", str(artifact), str(tmp_path)], capture_output=True,
                       text=True, env=env, timeout=600)
    report = r.stdout[-3000:] + r.stderr[-6000:]
    assert r.returncode == 0, report
    assert "ERROR: AddressSanitizer" not in r.stderr and "LeakSanitizer" not in r.stderr, report
    assert "runtime error:" not in r.stderr, report
