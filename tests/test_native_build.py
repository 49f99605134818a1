"""Building runtimes/native for the tests, and checks of what the build exports.

`native_build(...)` configures and builds the CMake project once per test session (pytest-xdist
workers share one build directory under a file lock; a second request only re-runs the build
tool, which is a no-op when nothing changed). Every native test module uses it. Missing cmake, a
compiler or the libraries skip the tests, unless EDGELOOP_REQUIRE_NATIVE=1 (then they fail).

The tests here: edgeloop.h compiles as C99 and C++11 on its own, and libedgeloop exports the C API
and nothing else.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NATIVE = REPO / "runtimes" / "native"
REQUIRE = os.environ.get("EDGELOOP_REQUIRE_NATIVE") == "1"
PYTHON = REPO / ".venv" / "bin" / "python"


def skip_or_fail(reason: str):
    if REQUIRE:
        pytest.fail(f"{reason} (EDGELOOP_REQUIRE_NATIVE=1)")
    pytest.skip(reason)


def shared_dir(tmp_path_factory) -> Path:
    """A directory every xdist worker of this session sees (the session's base temp otherwise)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = root / "edgeloop-native-shared"
    path.mkdir(exist_ok=True)
    return path


class _Lock:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.file = open(self.path, "w")
        try:
            import fcntl

            fcntl.flock(self.file, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no sharing between workers, only slower
            pass
        return self

    def __exit__(self, *exc):
        self.file.close()


def locked(tmp_path_factory, name: str) -> _Lock:
    return _Lock(shared_dir(tmp_path_factory) / f".{name}.lock")


def native_build(tmp_path_factory, *targets: str, sanitize: bool = False, runtime: bool = True) -> Path:
    """Configure (once) and build `targets`; returns the build directory."""
    if shutil.which("cmake") is None:
        skip_or_fail("cmake not found")
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        skip_or_fail("no C++ compiler found")
    build = shared_dir(tmp_path_factory) / ("build-asan" if sanitize else "build")
    with locked(tmp_path_factory, "build-asan" if sanitize else "build"):
        if not (build / "CMakeCache.txt").exists():
            args = ["cmake", "-S", str(NATIVE), "-B", str(build)]
            if sanitize:  # -O0 without debug info: sanitized code compiles 2.5x faster than at -O1
                args += ["-DCMAKE_BUILD_TYPE=None", "-DCMAKE_CXX_FLAGS=-O0", "-DEDGELOOP_SANITIZE=ON",
                         "-DEDGELOOP_JNI=OFF"]
            else:
                args += ["-DCMAKE_BUILD_TYPE=Release"]
            if PYTHON.exists():
                args.append(f"-DEDGELOOP_PYTHON={PYTHON}")
            if os.environ.get("EDGELOOP_SCHEMA"):  # another schema file to embed (default: the repository's)
                args.append(f"-DEDGELOOP_SCHEMA={os.environ['EDGELOOP_SCHEMA']}")
            cfg = subprocess.run(args, capture_output=True, text=True)
            if cfg.returncode != 0:
                shutil.rmtree(build, ignore_errors=True)
                skip_or_fail("cannot configure runtimes/native (missing cmake >= 3.20, pkg-config, PCRE2, utf8proc or "
                             "nlohmann-json?): " + (cfg.stderr or cfg.stdout).strip()[-600:])
        cache = (build / "CMakeCache.txt").read_text()
        if runtime and not re.search(r"^TVM_RUNTIME_LIBRARY:FILEPATH=\S", cache, re.MULTILINE):
            skip_or_fail("the TVM runtime was not found (install apache-tvm in .venv, or set EDGELOOP_PYTHON)")
        out = subprocess.run(["cmake", "--build", str(build), "-j2", "--target", *targets], capture_output=True,
                             text=True)
        assert out.returncode == 0, "native build failed:\n" + (out.stdout + out.stderr)[-4000:]
    return build


def check_schema_is_current() -> None:
    """The library embeds runtimes/schema/artifact.schema.json: a file older than runtimes/contract.py
    would make it refuse every new artifact, so say that plainly instead of failing later."""
    import json

    from edgeloop.runtimes import contract

    if os.environ.get("EDGELOOP_SCHEMA"):
        return
    stored = json.loads(contract.SCHEMA_FILE.read_text())
    if stored != json.loads(json.dumps(contract.json_schema())):
        pytest.fail(f"{contract.SCHEMA_FILE} is out of date with runtimes/contract.py and the native runtime embeds "
                    "it: regenerate it (python -m edgeloop.runtimes.contract --write)")


def bundled_artifact(tmp_path_factory) -> Path:
    """The bundled model (examples/kjv-tiny) converted with 4 loops and LoRA rank 8, compiled for TVM
    CPU; made once per session and shared by the workers."""
    import edgeloop

    check_schema_is_current()
    root = shared_dir(tmp_path_factory)
    art = root / "kjv-tvm"
    with locked(tmp_path_factory, "artifact"):
        if not (art / "edgeloop.json").exists():
            try:
                import tvm  # noqa: F401
            except ImportError:
                skip_or_fail("the apache-tvm package is not installed (needed to compile the test artifact)")
            model = root / "kjv-r8"
            edgeloop.convert(REPO / "examples" / "kjv-tiny", model, loops=4, lora_rank=8, overwrite=True)
            edgeloop.compile(model, art, backend="tvm", overwrite=True)
    return art


# ---------------------------------------------------------------------------------------------


def test_header_compiles_alone_as_c_and_cxx(tmp_path):
    header = NATIVE / "include"
    src = tmp_path / "use.c"
    src.write_text('#include "edgeloop.h"\n'
                   "int main(void) {\n"
                   "    el_model_params p = el_model_default_params();\n"
                   "    el_generation_params g = el_generation_default_params(NULL);\n"
                   "    el_session_params s = el_session_default_params();\n"
                   "    (void)p; (void)g; (void)s;\n"
                   "    return el_last_error() == NULL;\n"
                   "}\n")
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cc or not cxx:
        skip_or_fail("no C/C++ compiler found")
    for compiler, std, lang in ((cc, "-std=c99", "c"), (cxx, "-std=c++11", "c++")):
        r = subprocess.run([compiler, std, "-x", lang, "-Wall", "-Wextra", "-Werror", "-pedantic", "-fsyntax-only",
                            f"-I{header}", str(src)], capture_output=True, text=True)
        assert r.returncode == 0, f"{lang}: {r.stderr}"


def test_shared_library_exports_only_the_c_api(tmp_path_factory):
    build = native_build(tmp_path_factory, "edgeloop")
    lib = build / "libedgeloop.so"
    if shutil.which("nm") is None:
        pytest.skip("nm not found")
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True).stdout
    names = {line.split()[-1] for line in out.splitlines() if line.strip()}
    names -= {"_init", "_fini", "_edata", "_end", "__bss_start"}
    assert names and all(n.startswith("el_") for n in names), sorted(n for n in names if not n.startswith("el_"))
    header = (NATIVE / "include" / "edgeloop.h").read_text()
    declared = set(re.findall(r"\b(el_[a-z_]+)\(", header))
    assert declared <= names, sorted(declared - names)
