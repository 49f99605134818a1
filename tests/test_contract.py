"""The artifact contract: round trip, schema, versions, and drivers that read names from it only."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import edgeloop
from edgeloop.errors import EdgeloopError
from edgeloop.runtimes import contract as C

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifacts(converted, tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    md = converted("llama", loops=2, lora_rank=4)
    out = {}
    for name, options in (("unrolled", dict(layout="unrolled")), ("loop", dict(layout="loop")),
                          ("int4", dict(quant="int4", quantize_embeddings=True))):
        edgeloop.compile(md, root / name, **options)
        out[name] = root / name
    try:
        import tvm  # noqa: F401

        edgeloop.compile(md, root / "tvm", backend="tvm")
        out["tvm"] = root / "tvm"
    except ImportError:
        pass
    return out


def test_round_trip(artifacts):
    for path in artifacts.values():
        raw = (path / C.MANIFEST).read_bytes()
        contract = C.parse(raw)
        assert C.serialize(contract) == raw  # what the compiler wrote is exactly what it reads back
        assert contract.manifest_sha256 == C.manifest_digest(raw)


def test_schema_file_is_current_and_validates_manifests(artifacts):
    schema = json.loads((REPO / "runtimes" / "schema" / "artifact.schema.json").read_text())
    assert schema == json.loads(json.dumps(C.json_schema())), "regenerate: python -m edgeloop.runtimes.contract --write"
    jsonschema = pytest.importorskip("jsonschema")
    for path in artifacts.values():
        jsonschema.validate(json.loads((path / C.MANIFEST).read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        bad = json.loads((artifacts["unrolled"] / C.MANIFEST).read_text())
        bad["kv"]["kv_heads"] = "two"
        jsonschema.validate(bad, schema)


def test_versions(artifacts):
    raw = (artifacts["unrolled"] / C.MANIFEST).read_text()
    for version, message in ((1, "compiled by an older edgeloop"), (99, "needs a newer edgeloop")):
        edited = raw.replace(f'"version": {C.VERSION}', f'"version": {version}', 1).encode()
        with pytest.raises(EdgeloopError, match=message):
            C.parse(edited)


def test_every_written_field_is_read(artifacts):
    """inspect shows every section a driver does not read, so nothing in the manifest is write-only."""
    info = edgeloop.inspection.inspect_path(artifacts["unrolled"]) if hasattr(edgeloop, "inspection") else None
    from edgeloop.inspection import inspect_path

    info = inspect_path(artifacts["unrolled"])
    for key in ("loop", "kv_cache", "onnxruntime", "entry_points", "options", "compiled_by", "graph"):
        assert key in info, key


def _names(contract) -> set[str]:
    return {t.name for e in contract.entry_points.values() for t in e.inputs + e.outputs}


def test_drivers_take_names_from_the_contract(artifacts):
    """No driver spells a tensor, file or function name of an artifact: they look them up by role and
    entry point (the contract's vocabulary, which some names happen to repeat)."""
    names = set()
    for path in artifacts.values():
        names |= _names(C.load(path))
        names |= {e.symbol for e in C.load(path).entry_points.values()}
        names |= set(C.load(path).files)
    names -= set(C.ROLES) | {"forward", "decode", "prologue", "block", "kv_fill", "epilogue", "create_kv_cache",
                             "create_step_kv_cache"}
    assert {"model.onnx", "weights.onnx.data", "past_key.d0", "logit_positions", "kv_pool_key.k0"} & names
    for driver in ("ort.py", "tvm.py"):
        source = (REPO / "runtimes" / driver).read_text()
        literals = set(re.findall(r'"([^"\n]+)"', source)) | set(re.findall(r"'([^'\n]+)'", source))
        assert not (literals & names), (driver, sorted(literals & names))


def test_renamed_graph_inputs_still_run(artifacts, tmp_path):
    """An artifact whose graph inputs carry other names (and a contract saying so) runs unchanged."""
    import shutil

    import onnx

    art = shutil.copytree(artifacts["loop"], tmp_path / "renamed")
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    mapping = {i.name: f"x_{i.name}" for i in model.graph.input}
    for value in list(model.graph.input):
        value.name = mapping[value.name]
    for node in _all_nodes(model.graph):
        node.input[:] = [mapping.get(n, n) for n in node.input]
    onnx.save(model, str(art / "model.onnx"))
    from edgeloop.fileio import sha256_file

    data = json.loads((art / C.MANIFEST).read_text())
    for t in data["entry_points"]["forward"]["inputs"]:
        t["name"] = mapping[t["name"]]
    data["files"]["model.onnx"] = {"sha256": sha256_file(art / "model.onnx"), "bytes": (art / "model.onnx").stat().st_size}
    data["manifest_sha256"] = "0" * 64
    raw = (json.dumps(data, indent=2) + "\n").encode()
    raw = raw.replace(b"0" * 64, C.manifest_digest(raw).encode(), 1)
    (art / C.MANIFEST).write_bytes(raw)
    ids = [5, 6, 7, 8]
    assert abs(edgeloop.load(art).logits(ids) - edgeloop.load(artifacts["loop"]).logits(ids)).max() < 1e-6


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == attr.GRAPH:
                yield from _all_nodes(attr.g)


def test_contract_describes_the_entry_points(artifacts):
    c = C.load(artifacts["unrolled"])
    assert set(c.entry_points) == {"forward", "prologue", "block", "block_dense", "kv_fill", "epilogue"}
    assert c.loop.host_loop and c.loop.loops == 2 and c.kv.kind == "host" and c.kv.inplace
    block = c.entry("block")
    roles = {t.role for t in block.inputs}
    assert {"hidden", "depth", "past_len", "slot", "kv_pool_key", "kv_pool_value", "kv_valid"} <= roles
    # the dense variant (every earlier position present at the row's depth) needs no validity mask
    assert {t.role for t in c.entry("block_dense").inputs} == roles - {"kv_valid"}
    if "tvm" in artifacts:
        t = C.load(artifacts["tvm"])
        assert t.kv.kind == "paged" and {"forward", "decode", "block", "kv_fill", "create_step_kv_cache"} \
            <= set(t.entry_points)
