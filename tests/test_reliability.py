"""Reliability and security: hostile or careless input gets one clear line, loses nothing, opens nothing
outside the artifact, never prints garbage. One test (or parametrized group) per class of problem."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgeloop
from edgeloop.errors import EdgeloopError
from edgeloop.presets import make_hf_checkpoint
from conftest import BUNDLED, run_cli


def clean_failure(r, *needles):
    """Exit 2, exactly one line on stderr starting with 'error:', no traceback, nothing on stdout."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(converted):
    return converted("llama", loops=2, lora_rank=4)


@pytest.fixture(scope="module")
def artifact(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "art"
    edgeloop.compile(model_dir, out)
    return out


def _rewrite_manifest(path: Path, edit) -> None:
    """Edit a manifest and write it back *with a valid digest*: what a careful attacker does."""
    from edgeloop.runtimes.contract import MANIFEST, manifest_digest

    data = json.loads((path / MANIFEST).read_text())
    edit(data)
    data["manifest_sha256"] = "0" * 64
    raw = (json.dumps(data, indent=2) + "\n").encode()
    raw = raw.replace(b'"manifest_sha256": "' + b"0" * 64 + b'"',
                      b'"manifest_sha256": "' + manifest_digest(raw).encode() + b'"')
    (path / MANIFEST).write_bytes(raw)


def _refresh_checksum(path: Path, name: str) -> None:
    from edgeloop.fileio import sha256_file

    def edit(d):
        d["files"][name] = {"sha256": sha256_file(path / name), "bytes": (path / name).stat().st_size}

    _rewrite_manifest(path, edit)


# ---------------------------------------------------------------------------------------------
# 1. an artifact that compiles must run: every layout x target x quantization on odd head sizes


ODD = {  # head_dim 4, 8, 12, 24, 40 (GroupQueryAttention needs 8 / 16 multiples)
    4: dict(hidden_size=24, num_attention_heads=6, num_key_value_heads=2),
    8: dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3),
    12: dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2),
    24: dict(hidden_size=48, num_attention_heads=2, num_key_value_heads=1),
    40: dict(hidden_size=80, num_attention_heads=2, num_key_value_heads=2),
}


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    out = {}
    for hd, dims in ODD.items():
        cfg = dict(model_type="llama", vocab_size=300, intermediate_size=64, num_hidden_layers=2,
                   max_position_embeddings=128, bos_token_id=1, eos_token_id=2, **dims)
        edgeloop.convert(make_hf_checkpoint(cfg, root / f"hf{hd}"), root / f"m{hd}", loops=2, lora_rank=4)
        out[hd] = root / f"m{hd}"
    return out


@pytest.mark.parametrize("hd", sorted(ODD))
def test_every_compile_combination_runs_on_odd_head_dims(odd_models, tmp_path, hd):
    ref = edgeloop.load(odd_models[hd])
    ids = list(range(5, 17))
    expected = ref.logits(ids)
    combos = [("unrolled", "cpu", "none"), ("loop", "cpu", "none"), ("unrolled", "mobile", "none"),
              ("unrolled", "cpu", "int4"), ("loop", "cpu", "int8")]
    for layout, target, quant in combos:
        out = tmp_path / f"{layout}-{target}-{quant}"
        edgeloop.compile(odd_models[hd], out, layout=layout, target=target, quant=quant)
        model = edgeloop.load(out)
        got = model.logits(ids)
        if quant == "none":
            assert np.abs(got - expected).max() <= 1e-4, (layout, target)
        else:  # random weights: quantized logits track the float ones
            assert np.isfinite(got).all() and np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.9
        assert len(model.generate_tokens(ids[:3], max_new_tokens=3, ignore_eos=True)) == 3


def test_odd_head_dim_uses_gqa_only_where_it_runs(odd_models, tmp_path):
    for hd, inplace in ((4, False), (8, True), (12, False), (24, True)):
        c = edgeloop.compile(odd_models[hd], tmp_path / f"u{hd}", layout="unrolled")
        assert c.kv.inplace is inplace
        ops = c.graph["ops"]
        assert ("GroupQueryAttention" in ops) is inplace


# ---------------------------------------------------------------------------------------------
# 2. never destroy the user's input


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("how", ["same", "dotdot", "inside", "parent"])
def test_output_never_overwrites_input(hf_checkpoint, model_dir, tmp_path, how):
    hf = shutil.copytree(hf_checkpoint("llama"), tmp_path / "hf")
    md = shutil.copytree(model_dir, tmp_path / "md")
    before = (_tree(hf), _tree(md))
    out_for = {"same": lambda p: p, "dotdot": lambda p: p / ".." / p.name, "inside": lambda p: p / "sub",
               "parent": lambda p: p.parent}
    r = run_cli("convert", hf, "-o", out_for[how](hf), "--loops", "2", "--force")
    clean_failure(r, "input")
    r = run_cli("compile", md, "-o", out_for[how](md), "--force")
    clean_failure(r, "input")
    r = run_cli("export-merged", md, "-o", out_for[how](md), "--force")
    clean_failure(r, "input")
    assert (_tree(hf), _tree(md)) == before
    assert not [p.name for p in tmp_path.iterdir() if ".old-" in p.name or ".tmp-" in p.name]


def test_output_through_a_symlink_to_the_input_is_refused(model_dir, tmp_path):
    md = shutil.copytree(model_dir, tmp_path / "md")
    (tmp_path / "link").symlink_to(md)
    clean_failure(run_cli("compile", md, "-o", tmp_path / "link", "--force"), "input")
    assert (md / "config.json").is_file()


# ---------------------------------------------------------------------------------------------
# 3. an artifact is confined to its directory


@pytest.mark.parametrize("where", ["absolute", "dotdot", "hidden", "nested"])
def test_manifest_paths_outside_the_artifact_are_refused(artifact, tmp_path, where):
    art = shutil.copytree(artifact, tmp_path / "a")
    secret = tmp_path / "secret.onnx"
    secret.write_bytes(b"not yours")
    name = {"absolute": str(secret), "dotdot": "../secret.onnx", "hidden": ".hidden.onnx",
            "nested": "sub/model.onnx"}[where]

    def edit(d):
        d["entry_points"]["forward"]["symbol"] = name
        d["files"][name] = {"sha256": "0" * 64, "bytes": 9}

    _rewrite_manifest(art, edit)
    line = clean_failure(run_cli("run", art, "--prompt", "hi"), "edgeloop.json")
    assert "secret" not in line or where in ("absolute", "dotdot")  # named as written, never opened


def test_symlinked_artifact_file_is_refused(artifact, tmp_path):
    art = shutil.copytree(artifact, tmp_path / "a")
    outside = tmp_path / "outside.data"
    shutil.move(art / "weights.onnx.data", outside)
    (art / "weights.onnx.data").symlink_to(outside)
    clean_failure(run_cli("run", art, "--prompt", "hi"), "symbolic link")


def test_tvm_library_outside_the_artifact_is_never_loaded(converted, tmp_path):
    pytest.importorskip("tvm")
    art = tmp_path / "t"
    edgeloop.compile(converted("llama", loops=2, lora_rank=4), art, backend="tvm")
    marker = tmp_path / "constructor_ran"
    evil = tmp_path / "evil.c"
    evil.write_text(f'#include <stdio.h>\n__attribute__((constructor)) static void f(void) '
                    f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    so = tmp_path / "evil.so"
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler to build the probe library")
    subprocess.run(["gcc", "-shared", "-fPIC", str(evil), "-o", str(so)], check=True)

    def edit(d):
        d["tvm"]["library"] = str(so)
        d["files"][str(so)] = {"sha256": "0" * 64, "bytes": so.stat().st_size}

    _rewrite_manifest(art, edit)
    clean_failure(run_cli("run", art, "--prompt", "hi"), "edgeloop.json")
    assert not marker.exists()


def test_shard_index_outside_the_checkpoint_is_refused(hf_checkpoint, tmp_path):
    ck = shutil.copytree(hf_checkpoint("llama"), tmp_path / "ck")
    shutil.move(ck / "model.safetensors", tmp_path / "shard.safetensors")
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../shard.safetensors"}}))
    clean_failure(run_cli("convert", ck, "-o", tmp_path / "out", "--loops", "2"), "not a plain file name")
    for bad in ([["x", "y"]], {"x": 3}):
        (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": bad}))
        clean_failure(run_cli("convert", ck, "-o", tmp_path / "out", "--loops", "2"), "weight_map")


# ---------------------------------------------------------------------------------------------
# 4. the manifest itself is verified


def test_manifest_edits_are_caught(artifact, tmp_path):
    art = shutil.copytree(artifact, tmp_path / "a")
    manifest = art / "edgeloop.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"loops": 2', '"loops": 1', 1))  # no digest recomputed
    clean_failure(run_cli("run", art, "--prompt", "hi"), "modified")
    manifest.write_text(text)
    _rewrite_manifest(art, lambda d: d["recursion"].update(loops=1))  # digest recomputed: still inconsistent
    clean_failure(run_cli("run", art, "--prompt", "hi"), "disagree")


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d.update(files={}), "lists no files"),
    (lambda d: d.pop("files"), "files"),
    (lambda d: d["kv"].update(kv_heads="4"), "kv.kv_heads"),
    (lambda d: d["model"].update(vocab_size=3.5), "model.vocab_size"),
    (lambda d: d["entry_points"]["forward"].update(inputs=7), "entry_points"),
    (lambda d: d["files"].pop("weights.onnx.data"), "weights.onnx.data"),
    (lambda d: d["model"].update(rms_norm_eps=float("nan")), ""),
    (lambda d: d["model"].update(norm_eps=-1.0), "norm_eps"),
])
def test_schema_and_completeness(artifact, tmp_path, edit, needle):
    art = shutil.copytree(artifact, tmp_path / "a")
    _rewrite_manifest(art, edit)
    clean_failure(run_cli("run", art, "--prompt", "hi"), needle)


def test_old_manifest_version(artifact, tmp_path):
    art = shutil.copytree(artifact, tmp_path / "a")
    _rewrite_manifest(art, lambda d: d.update(version=1))
    clean_failure(run_cli("run", art, "--prompt", "hi"), "compiled by an older edgeloop", "compile it again")
    clean_failure(run_cli("inspect", art), "older edgeloop")


def test_missing_or_unreadable_listed_file_names_the_artifact(artifact, tmp_path):
    art = shutil.copytree(artifact, tmp_path / "a")
    (art / "weights.onnx.data").unlink()
    clean_failure(run_cli("run", art, "--prompt", "hi"), "weights.onnx.data", "missing")


# ---------------------------------------------------------------------------------------------
# 5. NaN and Inf: refused at convert / compile, and at run time


@pytest.mark.parametrize("key, value, needle", [
    ("rope_theta", 0.0, "rope_theta"), ("rms_norm_eps", float("nan"), "norm_eps"), ("rms_norm_eps", -1e-5, "norm_eps"),
    ("rope_scaling", {"rope_type": "linear", "factor": 0.0}, "factor"), ("hidden_size", 0, "hidden_size"),
    ("max_position_embeddings", -4, "max_position"), ("rope_parameters.rope_theta", 0.0, "rope_theta"),
    ("rope_parameters", {"rope_type": "linear", "factor": float("inf"), "rope_theta": 1e4}, "factor"),
])
def test_bad_config_values(hf_checkpoint, tmp_path, key, value, needle):
    ck = shutil.copytree(hf_checkpoint("llama"), tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    if key == "rope_scaling":  # a legacy-style config: no rope_parameters next to it
        cfg.pop("rope_parameters", None)
    if "." in key:
        outer, inner = key.split(".")
        cfg[outer][inner] = value
    else:
        cfg[key] = value
    (ck / "config.json").write_text(json.dumps(cfg))
    clean_failure(run_cli("convert", ck, "-o", tmp_path / "out", "--loops", "2"), needle)
    clean_failure(run_cli("compile", ck, "-o", tmp_path / "out"), needle)
    assert not (tmp_path / "out").exists()


def _poison(path: Path, value: float) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    name = next(n for n in tensors if "layers.0" in n or n.startswith("blocks.0"))
    tensors[name] = tensors[name].copy()
    tensors[name].flat[3] = value
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_non_finite_weights(hf_checkpoint, model_dir, tmp_path):
    ck = shutil.copytree(hf_checkpoint("llama"), tmp_path / "ck")
    _poison(ck, float("nan"))
    clean_failure(run_cli("convert", ck, "-o", tmp_path / "out", "--loops", "2"), "NaN or Inf")
    md = shutil.copytree(model_dir, tmp_path / "md")
    _poison(md, float("inf"))
    clean_failure(run_cli("compile", md, "-o", tmp_path / "out"), "NaN or Inf")


def test_runtime_refuses_non_finite_logits(model_dir):
    model = edgeloop.load(model_dir)
    model.backend.model.w["final_norm.weight"][0] = float("nan")
    with pytest.raises(EdgeloopError, match="non-finite logits"):
        model.generate_tokens([5, 6], max_new_tokens=2)
    with pytest.raises(EdgeloopError, match="non-finite logits"):
        model.logits([5, 6])


# ---------------------------------------------------------------------------------------------
# 6. sampling options, 7. dtypes, 8. token ids


@pytest.mark.parametrize("options, needle", [
    (dict(repetition_penalty=float("nan")), "repetition_penalty"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=5e-324), "too small"), (dict(seed=-1), "seed"), (dict(seed=2 ** 64), "seed"),
    (dict(top_k=True), "top_k"), (dict(top_p=float("nan")), "top_p"), (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(stop=[3]), "stop"), (dict(temperature="hot"), "temperature"),
])
def test_sampling_options_validated_in_one_place(artifact, options, needle):
    model = edgeloop.load(artifact)
    with pytest.raises(EdgeloopError, match=needle):
        model.generate("hi", **options)


def test_integer_tensors_in_a_float_checkpoint(hf_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    ck = shutil.copytree(hf_checkpoint("llama"), tmp_path / "ck")
    tensors = load_file(str(ck / "model.safetensors"))
    name = next(n for n in tensors if n.endswith("q_proj.weight"))
    for dtype in (np.int8, np.bool_):
        tensors[name] = (tensors[name] > 0).astype(dtype)
        save_file(tensors, str(ck / "model.safetensors"), metadata={"format": "pt"})
        clean_failure(run_cli("convert", ck, "-o", tmp_path / "out", "--loops", "2"), name)


@pytest.mark.parametrize("ids, needle", [([-1], r"\[0, 320\)"), ([320], r"\[0, 320\)"), ([[1, 2], [3, 4]], "flat"),
                                         ([1.5], "flat"), ("abc", "flat"), ([True], "flat")])
def test_api_token_ids(artifact, ids, needle):
    model = edgeloop.load(artifact)
    with pytest.raises(EdgeloopError, match=needle):
        model.generate_tokens(ids, max_new_tokens=2)
    with pytest.raises(EdgeloopError, match=needle):
        model.logits(ids)


# ---------------------------------------------------------------------------------------------
# 9. --truncate keeps a useful prompt and says what it dropped


def test_truncate_keeps_half_the_context_and_reports(artifact):
    model = edgeloop.load(artifact)
    text = model.generate("x" * 700, max_new_tokens=100_000, truncate=True, ignore_eos=True)
    s = model.last_stats
    assert s.prompt_tokens >= model.backend.max_context // 2 and s.dropped_prompt_tokens == 700 - s.prompt_tokens
    assert s.finish_reason == "context" and isinstance(text, str)
    r = run_cli("run", artifact, "--prompt", "y" * 700, "--truncate", "--max-new-tokens", "4")
    assert r.returncode == 0 and "kept its last" in r.stderr


# ---------------------------------------------------------------------------------------------
# 10. malformed checkpoint files


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _grow_tokenizer(ck: Path, extra: int) -> None:
    """A tokenizer with more tokens than the model's embedding has rows."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(ck / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(f"<extra_{i}>", special=True) for i in range(extra)])
    tok.save(str(ck / "tokenizer.json"))


@pytest.mark.parametrize("damage, needle", [
    (lambda ck: _edit_json(ck / "config.json", lambda d: d.update(model_type=["llama"])), "model_type"),
    (lambda ck: (ck / "tokenizer_config.json").write_bytes(b"\xff\xfe{}"), "tokenizer_config.json"),
    (lambda ck: (ck / "tokenizer_config.json").write_text("[1, 2]"), "tokenizer_config.json"),
    (lambda ck: _grow_tokenizer(ck, 100), "vocabulary"),
    (lambda ck: _edit_json(ck / "generation_config.json", lambda d: d.update(bos_token_id=10_000)), "bos_token_id"),
    (lambda ck: _edit_json(ck / "generation_config.json", lambda d: d.update(top_p="high")), "top_p"),
    (lambda ck: (ck / "tokenizer.json").write_text("{not json"), "tokenizer.json"),
])
def test_malformed_checkpoint_files(hf_checkpoint, tmp_path, damage, needle):
    ck = shutil.copytree(hf_checkpoint("llama"), tmp_path / "ck")
    if not (ck / "tokenizer_config.json").exists():
        (ck / "tokenizer_config.json").write_text("{}")
    if not (ck / "generation_config.json").exists():
        (ck / "generation_config.json").write_text("{}")
    damage(ck)
    clean_failure(run_cli("convert", ck, "-o", tmp_path / "out", "--loops", "2"), needle)
    clean_failure(run_cli("compile", ck, "-o", tmp_path / "out2"), needle)


def test_generation_config_nulls_mean_unset(hf_checkpoint, tmp_path):
    ck = shutil.copytree(hf_checkpoint("llama"), tmp_path / "ck")
    (ck / "generation_config.json").write_text(json.dumps({"top_p": None, "temperature": None, "do_sample": True}))
    edgeloop.convert(ck, tmp_path / "out", loops=2)
    assert edgeloop.load(tmp_path / "out").generate_tokens([5], max_new_tokens=2, seed=1)


# ---------------------------------------------------------------------------------------------
# 11. runtime options


def test_runtime_option_errors(artifact, tmp_path):
    clean_failure(run_cli("run", artifact, "--prompt", "caf\udce9"), "UTF-8")
    binary = tmp_path / "b.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    text = tmp_path / "t.txt"
    text.write_text("in the beginning " * 20)
    clean_failure(run_cli("perplexity", artifact, "-f", binary), "not UTF-8")
    clean_failure(run_cli("perplexity", artifact, "-f", text, "--window", "0"), "--window")
    for flags, needle in ((["--rounds", "0"], "--rounds"), (["--contexts", "0"], "--contexts"),
                          (["--contexts", "-5"], "--contexts"), (["--prefill-tokens", "0"], "--prefill-tokens"),
                          (["--plot", "/proc/x/plot.png"], "--plot"), (["--batch", "0"], "--batch"),
                          (["--rounds", "many"], "--rounds")):
        clean_failure(run_cli("bench", artifact, *flags), needle)
    clean_failure(run_cli("run", artifact, "--prompt"), "--prompt")
    clean_failure(run_cli("run", artifact, "--prompt", "hi", "--bogus"), "--bogus")
    clean_failure(run_cli("compile", artifact, "-o", tmp_path / "x", "--block-size", "big"), "--block-size")


def test_chat_stdin_not_utf8(artifact):
    r = subprocess.run([sys.executable, "-m", "edgeloop", "chat", str(artifact)], input=b"caf\xe9\n",
                       capture_output=True, timeout=300)
    r.stderr = r.stderr.decode()
    line = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode == 2 and line and "UTF-8" in line[0] and "Traceback" not in r.stderr


def test_calibration_text_binary(model_dir, tmp_path):
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"\x00\xff" * 100)
    clean_failure(run_cli("compile", model_dir, "-o", tmp_path / "a", "--quant", "int8", "--calibration-text", binary),
                  "calibration")
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------------------------------------
# 12. unwritable outputs, 14. concurrent writers, 15. stale temporaries, 16. umask


def test_unwritable_outputs(model_dir, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    clean_failure(run_cli("compile", model_dir, "-o", "/proc/x"), "/proc/x")
    clean_failure(run_cli("compile", model_dir, "-o", f / "sub"), "not a directory")
    r = subprocess.run([sys.executable, "-m", "edgeloop", "compile", str(model_dir), "-o", ".", "--force"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    clean_failure(r, "current directory")
    assert f.read_text() == "x"


def test_concurrent_force_writers_all_finish_cleanly(model_dir, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "edgeloop", "compile", str(model_dir), "-o", str(out), "--force",
                               "--no-optimize"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
             for _ in range(3)]
    results = [(p.wait(timeout=600), p.stderr.read().decode()) for p in procs]
    for code, err in results:
        assert code in (0, 2) and "Traceback" not in err, err
    assert any(code == 0 for code, _ in results)
    edgeloop.load(out)  # complete and verified
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_temporaries_are_cleaned(model_dir, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.tmp-{dead}-abc"
    stale.mkdir()
    (stale / "half").write_text("x")
    (tmp_path / f".out.old-{dead}-def").write_text("old file")
    keep = tmp_path / ".out.tmp-notapid"
    keep.mkdir()
    edgeloop.compile(model_dir, tmp_path / "out")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".out.tmp-notapid", "out"]
    (tmp_path / "file").write_text("x")
    edgeloop.compile(model_dir, tmp_path / "file", overwrite=True)  # --force over a file leaves nothing behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-notapid", "file", "out"]


def test_output_follows_umask(model_dir, tmp_path):
    code = ("import os, edgeloop; os.umask(0o027); "
            f"edgeloop.compile({str(model_dir)!r}, {str(tmp_path / 'out')!r}, optimize=False); "
            f"edgeloop.convert({str(BUNDLED)!r}, {str(tmp_path / 'md')!r}, loops=2, lora_rank='4')")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    for out in ("out", "md"):
        assert stat.S_IMODE((tmp_path / out).stat().st_mode) == 0o750
        # every file too, including the ones safetensors writes 0600
        assert {stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / out).iterdir()} == {0o640}, out


# ---------------------------------------------------------------------------------------------
# 13. corrupt TVM artifacts, 17. small things


@pytest.mark.parametrize("damaged, how", [("params.bin", "flip"), ("params.bin", "truncate"), ("model.so", "header"),
                                          ("model.so", "truncate")])
def test_corrupt_tvm_files_with_recomputed_checksums(converted, tmp_path, damaged, how):
    """Damaged files whose checksums were recomputed (so the manifest check passes). A library is native
    code: edgeloop catches a damaged one where the loader can tell (header, size); altered machine code
    cannot be told from code, which is why artifacts must come from a trusted compile."""
    pytest.importorskip("tvm")
    art = tmp_path / "t"
    edgeloop.compile(converted("llama", loops=2, lora_rank=4), art, backend="tvm")
    data = bytearray((art / damaged).read_bytes())
    if how == "flip":
        for i in range(64, len(data), max(1, len(data) // 50)):
            data[i] ^= 0x5A
    elif how == "header":
        data[:64] = bytes(64)
    else:
        data = data[: len(data) // 2]
    (art / damaged).write_bytes(bytes(data))
    _refresh_checksum(art, damaged)
    r = run_cli("run", art, "--prompt", "hi", "--max-new-tokens", "2")
    if r.returncode != 0:
        clean_failure(r)
    else:  # garbage weights may still run: then the output is text, never NaN
        assert "nan" not in r.stdout.lower()


def test_prompt_not_printed_before_failure(artifact):
    r = run_cli("run", artifact, "--prompt", "z" * 700)
    clean_failure(r, "--truncate")
    assert r.stdout == ""


def test_small_block_size_warns_and_shrinks(odd_models, tmp_path):
    c = edgeloop.compile(odd_models[8], tmp_path / "a", quant="int8", block_size=256)
    assert any("exceeds the input size" in n for n in c.quantization["notes"])
    fp32 = edgeloop.compile(odd_models[8], tmp_path / "b")
    size = lambda c: sum(f.bytes for f in c.files.values())  # noqa: E731
    assert size(c) < 1.2 * size(fp32)
    r = run_cli("compile", odd_models[8], "-o", tmp_path / "c", "--quant", "int8", "--block-size", "256")
    assert r.returncode == 0 and "note:" in r.stderr


def test_tvm_compile_summary(converted, tmp_path):
    pytest.importorskip("tvm")
    r = run_cli("compile", converted("llama", loops=2, lora_rank=4), "-o", tmp_path / "t", "--backend", "tvm")
    assert r.returncode == 0 and "None" not in r.stdout and "kernels" in r.stdout
