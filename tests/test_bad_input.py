"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing left behind."""

import json
import shutil

import pytest

from conftest import run_cli


def _assert_clean_failure(result, out_parent, needle):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and needle in result.stderr.replace("\n", " "), result.stderr
    leftovers = [p.name for p in out_parent.iterdir() if p.name.startswith((".out", "out"))]
    assert leftovers == []


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_dir(tmp_path):
    r = run_cli("convert", tmp_path / "nope", "-o", tmp_path / "out", "--loops", "2")
    _assert_clean_failure(r, tmp_path, "not found")


def test_missing_weights(tmp_path, hf_checkpoint):
    ck = _copy(hf_checkpoint("llama"), tmp_path / "ck")
    (ck / "model.safetensors").unlink()
    r = run_cli("convert", ck, "-o", tmp_path / "out", "--loops", "2")
    _assert_clean_failure(r, tmp_path, "no model.safetensors")


def test_unknown_model_type(tmp_path, hf_checkpoint):
    ck = _copy(hf_checkpoint("llama"), tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (ck / "config.json").write_text(json.dumps(cfg))
    r = run_cli("convert", ck, "-o", tmp_path / "out", "--loops", "2")
    _assert_clean_failure(r, tmp_path, "unsupported model_type 'mamba'")


def test_loops_not_dividing_layers(tmp_path, hf_checkpoint):
    r = run_cli("convert", hf_checkpoint("llama"), "-o", tmp_path / "out", "--loops", "3")
    _assert_clean_failure(r, tmp_path, "valid loop counts: 2, 4")


def test_inconsistent_config(tmp_path, hf_checkpoint):
    ck = _copy(hf_checkpoint("llama"), tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["intermediate_size"] = 96  # weights are 128 wide
    (ck / "config.json").write_text(json.dumps(cfg))
    r = run_cli("convert", ck, "-o", tmp_path / "out", "--loops", "2")
    _assert_clean_failure(r, tmp_path, "shape mismatch")


def test_heads_not_dividing(tmp_path, hf_checkpoint):
    ck = _copy(hf_checkpoint("llama"), tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["num_key_value_heads"] = 3
    (ck / "config.json").write_text(json.dumps(cfg))
    r = run_cli("convert", ck, "-o", tmp_path / "out", "--loops", "2")
    _assert_clean_failure(r, tmp_path, "inconsistent config")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tmp_path, hf_checkpoint, damage):
    ck = _copy(hf_checkpoint("llama"), tmp_path / "ck")
    weights = ck / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x10\x00" + data[2:200])
    r = run_cli("convert", ck, "-o", tmp_path / "out", "--loops", "2")
    _assert_clean_failure(r, tmp_path, "corrupt or truncated")


def test_bad_rank(tmp_path, hf_checkpoint):
    r = run_cli("convert", hf_checkpoint("llama"), "-o", tmp_path / "out", "--loops", "2", "--lora-rank", "lots")
    _assert_clean_failure(r, tmp_path, "LoRA rank must be")


def test_existing_output_is_not_touched(tmp_path, hf_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_cli("convert", hf_checkpoint("llama"), "-o", out, "--loops", "2")
    assert r.returncode == 2 and "already exists" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_model_dir_missing_weights_on_load(tmp_path, converted):
    md = _copy(converted("llama", loops=2), tmp_path / "md")
    (md / "model.safetensors").unlink()
    r = run_cli("run", md, "--prompt", "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "incomplete" in r.stderr


def test_inspect_model_dir_and_artifact(converted, tmp_path):
    import edgeloop

    model_dir = converted("llama", loops=2, lora_rank=8)
    r = run_cli("inspect", model_dir, "--json")
    info = json.loads(r.stdout)
    assert r.returncode == 0 and info["loops"] == 2 and info["unique_blocks"] == 2
    assert info["params"]["lora"] == 2 * 2 * 8 * sum(o + i for o, i in [(64, 64), (32, 64), (32, 64), (64, 64),
                                                                       (128, 64), (128, 64), (64, 128)])
    edgeloop.compile(model_dir, tmp_path / "art", layout="loop")
    r = run_cli("inspect", tmp_path / "art", "--json")
    info = json.loads(r.stdout)
    assert info["kind"] == "edgeloop artifact" and info["graph"]["loops"] == 1
    assert set(info["graph"]["bytes_by_kind"]) >= {"shared", "lora", "embedding"}
