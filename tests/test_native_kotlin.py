"""The Kotlin binding (runtimes/native/bindings/kotlin) compiled with kotlinc and run on this JVM.

Builds libedgeloop_jni, compiles the binding and its test program (bindings/kotlin/test) and runs
it on the bundled TVM artifact: streaming, cancellation, stop strings, errors as
EdgeloopException; its greedy, sampled and early-exit (depth:2) text, tokens and depths must
equal the Python runtime's. Skipped without kotlinc / java (Debian: `apt-get install kotlin
default-jdk-headless`) unless EDGELOOP_REQUIRE_NATIVE=1.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from test_native_build import (
    NATIVE,
    bundled_artifact,
    locked,
    native_build,
    shared_dir,
    skip_or_fail,
)

PROMPT = "And God said unto Moses"


@pytest.fixture(scope="module")
def kotlin_jar(tmp_path_factory):
    if not shutil.which("kotlinc") or not shutil.which("java"):
        skip_or_fail("kotlinc or java not found (apt-get install kotlin default-jdk-headless)")
    jar = shared_dir(tmp_path_factory) / "edgeloop-kotlin-test.jar"
    with locked(tmp_path_factory, "kotlin"):
        if not jar.exists():
            sources = [NATIVE / "bindings" / "kotlin" / "src" / "dev" / "edgeloop" / "Edgeloop.kt",
                       NATIVE / "bindings" / "kotlin" / "test" / "EdgeloopTest.kt"]
            r = subprocess.run(["kotlinc", *map(str, sources), "-include-runtime", "-d", str(jar)], capture_output=True,
                               text=True, timeout=600)
            assert r.returncode == 0 and jar.exists(), r.stdout + r.stderr
    return jar


def test_kotlin_binding_on_the_jvm(tmp_path_factory, kotlin_jar):
    build = native_build(tmp_path_factory, "edgeloop_jni")
    if not (build / "libedgeloop_jni.so").exists():
        skip_or_fail("libedgeloop_jni was not built (no JDK headers found by CMake)")
    artifact = bundled_artifact(tmp_path_factory)
    r = subprocess.run(["java", f"-Djava.library.path={build}", "-cp", str(kotlin_jar),
                        "dev.edgeloop.test.EdgeloopTestKt", str(artifact), PROMPT], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[-1].startswith("ok ")
    cases = {c["case"]: c for c in map(json.loads, lines[:-1])}

    import edgeloop

    model = edgeloop.load(artifact)
    ids = model.tokenizer.encode(PROMPT)
    for case, options in [("greedy", {}), ("sampled", dict(temperature=0.8, top_p=0.9, seed=1)),
                          ("depth2", dict(exit="depth:2"))]:
        options = dict(max_new_tokens=64, ignore_eos=True, **options)
        assert cases[case]["tokens"] == model.generate_tokens(ids, **options), case
        assert cases[case]["depths"] == model.last_stats.depths, case
        assert cases[case]["text"] == model.generate(PROMPT, **options), case
