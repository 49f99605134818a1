"""Small file helpers: JSON with clear errors, atomic output directories, checksums, confinement.

Every directory edgeloop writes (a converted model, an artifact, an exported checkpoint) goes
through `atomic_output_dir`: it is built in a temporary sibling and renamed into place at the
end, so a crash never leaves half an output, and it is refused when it would overwrite one of
the command's inputs (`-o IN`, `-o IN/..`, `-o IN/sub`) whatever `--force` says.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
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
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise EdgeloopError(f"{path} is not valid JSON ({str(e).splitlines()[0][:120]}); the file is corrupt, "
                            "regenerate it") from None
    except OSError as e:
        raise EdgeloopError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise EdgeloopError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data


def write_json(path: Path, data: dict) -> None:
    # allow_nan=False: a NaN that reached a manifest is a bug, never something to write as text
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n", encoding="utf-8")


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file, or one clear line (missing, unreadable, binary)."""
    path = Path(path)
    if not path.is_file():
        raise EdgeloopError(f"{what} not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EdgeloopError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgeloopError(f"{what} {path} is not UTF-8 text (byte {e.start}); pass a text file") from None
    if "\x00" in text:
        raise EdgeloopError(f"{what} {path} looks binary (it contains NUL bytes); pass a text file")
    return text


def require_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise EdgeloopError(f"{what} not found: {path}")
    if not path.is_dir():
        raise EdgeloopError(f"{what} must be a directory: {path}")
    return path


# ---------------------------------------------------------------------------------------------
# confinement: names read from manifests and indexes


def confined_file(root: Path, name, what: str) -> Path:
    """`root / name` for a plain relative file name that stays inside `root`, else one clear error.

    Used for every path a manifest, index or config names: absolute paths, `..`, separators,
    hidden names and symlinks are refused before anything is opened.
    """
    if not isinstance(name, str) or not name or name in (".", ".."):
        raise EdgeloopError(f"{what} names an invalid file {name!r}; it must be a plain file name inside {root}")
    if "/" in name or "\\" in name or "\x00" in name or name.startswith(".") or os.path.isabs(name):
        raise EdgeloopError(f"{what} names {name!r}, which is not a plain file name inside {root}; refusing to "
                            "open it")
    path = Path(root) / name
    if path.is_symlink():
        raise EdgeloopError(f"{what} names {name!r}, a symbolic link; refusing to follow it out of {root}")
    real_root = os.path.realpath(root)
    if os.path.dirname(os.path.realpath(path)) != real_root:
        raise EdgeloopError(f"{what} names {name!r}, which resolves outside {root}; refusing to open it")
    return path


# ---------------------------------------------------------------------------------------------
# atomic outputs


_TMP_TAG, _OLD_TAG = ".tmp-", ".old-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale_temporaries(target: Path) -> list[str]:
    """Remove `.NAME.tmp-PID-*` / `.NAME.old-PID-*` siblings left by edgeloop runs that died (SIGKILL,
    power loss): only our own naming, only when that process no longer exists."""
    removed = []
    parent = target.parent
    if not parent.is_dir():
        return removed
    for tag in (_TMP_TAG, _OLD_TAG):
        prefix = f".{target.name}{tag}"
        for entry in parent.glob(f"{glob_escape(prefix)}*"):
            pid_text = entry.name[len(prefix):].split("-", 1)[0]
            if pid_text.isdigit() and not _pid_alive(int(pid_text)):
                _remove(entry)
                removed.append(entry.name)
    return removed


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in text)


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output(target: Path, inputs: tuple[Path, ...] = ()) -> Path:
    """The resolved output path, or one clear error when writing it would destroy an input,
    the current directory or a filesystem root, or cannot work at all."""
    if str(target) in ("", "."):
        raise EdgeloopError("refusing to write the output into the current directory itself; name a new directory")
    resolved = Path(os.path.realpath(target))
    if resolved == Path(resolved.anchor):
        raise EdgeloopError(f"refusing to write the output over the filesystem root {target}")
    if _within(Path(os.getcwd()).resolve(), resolved):
        raise EdgeloopError(f"output {target} is the current directory or contains it; refusing to replace it")
    for src in inputs:
        src = Path(os.path.realpath(src))
        if _within(resolved, src) or _within(src, resolved):
            where = ("is" if resolved == src else "lies inside" if _within(resolved, src) else "contains")
            raise EdgeloopError(f"output {target} {where} the input {src}; choose an output outside the input "
                                "(--force never overwrites an input)")
    parent = resolved.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise EdgeloopError(f"cannot create {target}: {probe} is a file, not a directory")
    if resolved.exists() and not resolved.is_dir():
        if resolved.is_symlink() or not resolved.is_file():
            raise EdgeloopError(f"output {target} exists and is not a directory or regular file; refusing to replace it")
    return resolved


@contextlib.contextmanager
def _parent_lock(parent: Path):
    """Serialize edgeloop writers that finish into the same directory (concurrent `--force` runs)."""
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output_dir(target: Path, *, overwrite: bool = False, inputs: tuple[Path, ...] = ()):
    """Yield a fresh temporary directory that becomes `target` only if the block succeeds.

    The temporary directory sits next to the target (same filesystem, so the final rename is
    atomic) and is removed on any error: a failed or interrupted run never leaves a half
    written output behind. `inputs` are never overwritten, whatever `overwrite` says. Writers
    that finish into the same parent take turns (a lock on the parent directory), so concurrent
    `--force` runs each complete and the last one wins.
    """
    given = Path(target)
    target = check_output(given, tuple(Path(p) for p in inputs))
    if target.exists() and not overwrite:
        raise EdgeloopError(f"output {given} already exists; choose another path or pass --force")
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o777)
        clean_stale_temporaries(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP_TAG}{os.getpid()}-", dir=target.parent))
    except OSError as e:
        raise EdgeloopError(f"cannot create {given}: {e.strerror or e}") from None
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs follow the user's umask
    try:
        yield tmp
        # some writers (safetensors, tempfile) create 0600 files: outputs follow the umask, like the directory
        mode = 0o666 & ~_umask()
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                os.chmod(f, mode)
        with _parent_lock(target.parent):
            if target.exists() or target.is_symlink():
                if not overwrite:
                    raise EdgeloopError(f"output {given} appeared while writing it; pass --force to replace it")
                old = target.with_name(f".{target.name}{_OLD_TAG}{os.getpid()}-{os.urandom(3).hex()}")
                target.rename(old)
                tmp.rename(target)
                _remove(old)
            else:
                tmp.rename(target)
    except OSError as e:
        _remove(tmp)
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EXDEV, errno.ENOTDIR):
            raise EdgeloopError(f"cannot write {given}: {e.strerror}") from None
        raise
    except BaseException:
        _remove(tmp)
        raise


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
