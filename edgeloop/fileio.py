"""Small file helpers: JSON with clear errors, atomic output directories, checksums."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from edgeloop.errors import EdgeloopError


def read_json(path: Path, what: str = "file") -> dict:
    path = Path(path)
    if not path.is_file():
        raise EdgeloopError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgeloopError(f"{path} is not valid JSON ({e}); the file is corrupt, regenerate it") from None
    if not isinstance(data, dict):
        raise EdgeloopError(f"{path} must hold a JSON object")
    return data


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def require_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise EdgeloopError(f"{what} not found: {path}")
    if not path.is_dir():
        raise EdgeloopError(f"{what} must be a directory: {path}")
    return path


@contextlib.contextmanager
def atomic_output_dir(target: Path, *, overwrite: bool = False):
    """Yield a fresh temporary directory that becomes `target` only if the block succeeds.

    The temporary directory sits next to the target (same filesystem, so the final rename is
    atomic) and is removed on any error: a failed or interrupted run never leaves a half
    written output behind.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise EdgeloopError(f"output {target} already exists; choose another path or pass --force")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
