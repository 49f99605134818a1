"""Shared fixtures: tiny random Hugging Face checkpoints, built once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "examples" / "kjv-tiny"


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """hf_checkpoint(preset) -> path of a tiny random HF checkpoint (cached per session)."""
    from edgeloop.presets import make_hf_checkpoint

    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("hf")

    def make(preset: str) -> Path:
        if preset not in cache:
            cache[preset] = make_hf_checkpoint(preset, root / preset)
        return cache[preset]

    return make


@pytest.fixture(scope="session")
def converted(tmp_path_factory, hf_checkpoint):
    """converted(preset, **options) -> path of an edgeloop model dir (cached per options)."""
    import edgeloop

    cache: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("models")

    def make(preset: str, **options) -> Path:
        key = (preset, tuple(sorted(options.items())))
        if key not in cache:
            out = root / f"{preset}-{len(cache)}"
            edgeloop.convert(hf_checkpoint(preset), out, **options)
            cache[key] = out
        return cache[key]

    return make


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeloop", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def hf_logits(path: Path, ids):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(ids).reshape(1, -1)).logits[0].numpy()


def stepwise_logits(model, ids, prefill: int = 8):
    """Prefill `prefill` tokens (logits of each), then one decode step per remaining token."""
    from edgeloop.runtimes.backend import Row
    import numpy as np

    backend = model.backend
    state = backend.new_state()
    parts = [backend.step([Row(state, np.asarray(ids[:prefill]), all_logits=True)])[0].logits]
    parts += [backend.step([Row(state, np.asarray(ids[i:i + 1]))])[0].logits for i in range(prefill, len(ids))]
    backend.release(state)
    return np.concatenate(parts)
