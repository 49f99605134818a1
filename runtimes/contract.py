"""The artifact contract: what a compiled edgeloop artifact promises the runtimes that load it.

One typed, versioned description (dataclasses) written by the compiler as `edgeloop.json` and
read by every driver (Python ONNX Runtime and TVM drivers, the native C++ runtime) — they
find entry points, tensor names, dtypes, shapes, the KV-cache layout and the loop state here
and nowhere else. The same dataclasses give the JSON Schema (`schema/artifact.schema.json`)
that the native runtime validates against; `python -m edgeloop.runtimes.contract` prints it.

Loading checks, in order, before anything else is opened:
1. the manifest is JSON of this format and *this* version (an older one: compile again);
2. the manifest's own digest (`manifest_sha256`: sha256 of the file with that value zeroed);
3. the schema (types, required fields; one line naming the field on error);
4. consistency: every file an entry point or section names is a plain name inside the
   artifact and is listed in `files` with its size and sha256; the loop state agrees with the
   recursion; the KV layout covers every depth once.
Then the checksums of the listed files are verified (`verify_files`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgeloop.errors import EdgeloopError
from edgeloop.fileio import confined_file, sha256_file
from edgeloop.spec import ModelSpec, Recursion, Stage

FORMAT = "edgeloop-artifact"
VERSION = 2
MANIFEST = "edgeloop.json"
SCHEMA_FILE = Path(__file__).with_name("schema") / "artifact.schema.json"
_DIGEST_FIELD = "manifest_sha256"
_DIGEST_RE = re.compile(rb'"manifest_sha256": "([0-9a-f]{64})"')
_ZERO_DIGEST = b"0" * 64

DType = Literal["float32", "float16", "int64", "int32", "uint8", "bool", "object", "shape", "tuple"]

# What a runtime binds to a tensor, whatever the backend calls it. Drivers look names up by role.
ROLES = (
    "input_ids",  # token ids of the new tokens [batch, seq] (ONNX) or [tokens] (TVM, rows concatenated)
    "past_len",  # tokens already in each row's cache [batch]
    "loops",  # loop passes to run (fused ONNX graphs), a scalar
    "logit_positions",  # which new positions of each row get logits [batch, n] (ONNX) / [n] (TVM)
    "logits",  # [batch, n, vocab] / [n, vocab]
    "past_key", "past_value", "present_key", "present_value",  # host KV buffers (kv = entry id)
    "hidden",  # hidden states between host-driven entry points
    "depth",  # per-row repeat index of the looped stage (host-driven block step)
    "positions",  # per-token positions (RoPE) given by the host (TVM block step)
    "slot",  # per-row KV pool slot of the block step
    "kv_valid",  # per-row mask of the cached positions a row may attend to (block step)
    "kv_pool_key", "kv_pool_value",  # the block step's KV pools (kv = block position)
    "new_key", "new_value",  # K/V of the new tokens the host writes into its pools
    "exit_score",  # a learned exit gate's probability per position (when the model has one)
    "kv_cache", "kv_config", "params",  # TVM objects: the paged cache, its creation shape, the weights
)


_STRICT = {"extra": "forbid"}  # pydantic: an unknown field is an error, not silently ignored


@dataclass(frozen=True)
class TensorSpec:
    __pydantic_config__ = _STRICT
    name: str
    role: str
    dtype: DType
    shape: tuple[int | str, ...] = ()  # symbolic dims are names ("batch", "seq", "capacity")
    kv: str | None = None  # the KV entry (host buffers) or block position (pools) it belongs to


@dataclass(frozen=True)
class EntryPoint:
    """A callable unit: an ONNX model file, or a function of the TVM library."""

    __pydantic_config__ = _STRICT
    symbol: str  # ONNX: the .onnx file; TVM: the function name
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def named(self, role: str, kv: str | None = None, *, output: bool = False) -> str:
        """The tensor name bound to `role` (and KV entry)."""
        for t in self.outputs if output else self.inputs:
            if t.role == role and t.kv == kv:
                return t.name
        raise EdgeloopError(f"{self.symbol} has no {'output' if output else 'input'} with role {role!r}"
                            + (f" for {kv}" if kv else "") + "; it was compiled by another edgeloop: compile it again")

    def has(self, role: str, *, output: bool = False) -> bool:
        return any(t.role == role for t in (self.outputs if output else self.inputs))


@dataclass(frozen=True)
class KVEntry:
    """One host-owned buffer pair (ONNX): the depth positions it holds (several when stacked)."""

    __pydantic_config__ = _STRICT
    id: str
    depths: tuple[int, ...]


@dataclass(frozen=True)
class KVLayout:
    """The KV cache: one slot per (block position, depth) of every sequence."""

    __pydantic_config__ = _STRICT
    kind: Literal["host", "paged"]  # host: the driver owns numpy buffers; paged: the backend's paged cache
    dtype: DType
    kv_heads: int
    head_dim: int
    num_depths: int  # slots per sequence and token position
    max_context: int
    entries: tuple[KVEntry, ...] = ()  # host buffers of the fused graph
    stacked: bool = False  # an entry stacks the repeats of one block position [rows, R, kvh, cap, hd]
    inplace: bool = False  # the fused graph writes the new K/V into the bound buffers itself
    capacity_chunk: int = 256  # host buffers grow by this many positions
    page_size: int = 0  # paged
    prefill_chunk: int = 0  # paged: the most tokens one call may carry


@dataclass(frozen=True)
class LoopState:
    """How the depth positions loop: what the host needs to drive the loop or cap it."""

    __pydantic_config__ = _STRICT
    loops: int  # B: passes of the looped stage at full depth
    blocks_per_loop: int  # K
    sharing: str
    stages: tuple[Stage, ...]
    num_depths: int
    host_loop: bool  # prologue / block / epilogue entry points present (one looped stage)
    loop_norm: bool = False  # the final norm is applied after every pass and fed to the next (Ouro)


@dataclass(frozen=True)
class TokenizerSection:
    __pydantic_config__ = _STRICT
    file: str | None  # tokenizer.json, or None (logits only)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    add_bos: bool
    bos_token: str | None = None  # the strings chat templates use
    eos_token: str | None = None
    chat_template: str | None = None  # a .jinja file of the artifact


@dataclass(frozen=True)
class GenerationDefaults:
    """The model's own sampling defaults (generation_config.json), validated at compile time."""

    __pydantic_config__ = _STRICT
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class OnnxSection:
    __pydantic_config__ = _STRICT
    data_files: tuple[str, ...]  # external-data files the entry points read (ORT opens them itself)
    execution_provider: str
    offline_optimization: str
    opset: int
    ort_models: dict[str, str] = field(default_factory=dict)  # entry point -> ORT-format file (mobile)
    required_operators: str | None = None


@dataclass(frozen=True)
class CudaCode:
    """CUDA device code shipped in the library: a fatbin per architecture (nvcc at compile time), or the
    source for NVRTC at load."""

    __pydantic_config__ = _STRICT
    archs: tuple[str, ...]
    device_code: Literal["fatbin", "source"]
    ptx: tuple[str, ...] = ()
    note: str | None = None
    fatbin_entries: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class TvmSection:
    __pydantic_config__ = _STRICT
    library: str
    params: str
    param_names: tuple[str, ...]
    device: str  # TVM device kind the library runs on: cpu, cuda, opencl, metal, webgpu
    target: dict[str, Any]
    token_dtype: DType = "int32"
    device_sources: tuple[str, ...] = ()
    cuda: CudaCode | None = None


@dataclass(frozen=True)
class ExitSection:
    """The early-exit policy a run uses unless it asks for another, and how it was chosen."""

    __pydantic_config__ = _STRICT
    policy: str  # "confidence:0.93", "gate:0.6", ... (runtimes/exits.py)
    kv_strategy: str = "fill"  # what the depths a token skipped hold: fill | recursion
    calibration: dict[str, Any] | None = None  # target, text, mean KL, top-1, perplexity, mean loops


@dataclass(frozen=True)
class FileEntry:
    __pydantic_config__ = _STRICT
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Contract:
    __pydantic_config__ = _STRICT
    format: Literal["edgeloop-artifact"]
    version: int
    edgeloop_version: str
    backend: Literal["onnxruntime", "tvm"]
    target: str
    layout: str
    model: ModelSpec
    recursion: Recursion
    loop: LoopState
    kv: KVLayout
    entry_points: dict[str, EntryPoint]
    tokenizer: TokenizerSection
    generation: GenerationDefaults
    files: dict[str, FileEntry]
    onnx: OnnxSection | None = None
    tvm: TvmSection | None = None
    quantization: dict[str, Any] | None = None  # what was quantized and how (inspect)
    quality: dict[str, Any] | None = None  # measured against fp32 (inspect)
    graph: dict[str, Any] | None = None  # node / kernel statistics (inspect)
    kernels: tuple[str, ...] = ()  # TVM kernels (inspect, tests)
    options: dict[str, Any] | None = None  # the compile options (inspect, reproducibility)
    exit: ExitSection | None = None  # the default early-exit policy (compile --exit, or edgeloop calibrate)
    manifest_sha256: str = ""

    # -- reading helpers ---------------------------------------------------------------------

    def entry(self, name: str) -> EntryPoint:
        if name not in self.entry_points:
            raise EdgeloopError(f"this artifact has no {name!r} entry point (it has {', '.join(self.entry_points)}); "
                                "compile it again with this edgeloop")
        return self.entry_points[name]

    def referenced_files(self) -> list[tuple[str, str]]:
        """(file name, what names it) for every file a runtime opens."""
        out = []
        if self.backend == "onnxruntime":
            out += [(e.symbol, f"entry point {n}") for n, e in self.entry_points.items()]
        if self.onnx:
            out += [(f, "onnx.data_files") for f in self.onnx.data_files]
            out += [(f, f"onnx.ort_models.{n}") for n, f in self.onnx.ort_models.items()]
            if self.onnx.required_operators:
                out.append((self.onnx.required_operators, "onnx.required_operators"))
        if self.tvm:
            out += [(self.tvm.library, "tvm.library"), (self.tvm.params, "tvm.params")]
            out += [(f, "tvm.device_sources") for f in self.tvm.device_sources]
        if self.tokenizer.file:
            out.append((self.tokenizer.file, "tokenizer.file"))
        if self.tokenizer.chat_template:
            out.append((self.tokenizer.chat_template, "tokenizer.chat_template"))
        return out

    def to_dict(self) -> dict:
        return _plain(asdict(self))


# ---------------------------------------------------------------------------------------------
# validation


def _adapter():
    from pydantic import TypeAdapter

    global _ADAPTER
    if _ADAPTER is None:
        _ADAPTER = TypeAdapter(Contract)
    return _ADAPTER


_ADAPTER = None


def json_schema() -> dict:
    schema = _adapter().json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://edgeloop.dev/schema/artifact-v{VERSION}.json"
    schema["title"] = f"edgeloop artifact manifest, version {VERSION}"
    return schema


def _one_line(error) -> str:
    """A pydantic ValidationError as one line naming the first bad field."""
    first = error.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-")) or "(top level)"
    got = first.get("input")
    got = "" if isinstance(got, (dict, list)) else f" (got {json.dumps(got, default=str)[:60]})"
    return f"field {loc}: {first['msg'].lower()}{got}"


def manifest_digest(raw: bytes) -> str:
    """sha256 of the manifest bytes with the digest's own value replaced by zeros."""
    return hashlib.sha256(_DIGEST_RE.sub(b'"manifest_sha256": "' + _ZERO_DIGEST + b'"', raw, count=1)).hexdigest()


def parse(raw: bytes, where: str = MANIFEST) -> Contract:
    """Bytes of an edgeloop.json -> a validated Contract, or one clear EdgeloopError."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise EdgeloopError(f"{where} is not valid JSON; the artifact is corrupt, compile it again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise EdgeloopError(f"{where} is not an edgeloop artifact manifest")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise EdgeloopError(f"{where} has no valid format version; the artifact is corrupt, compile it again")
    if version < VERSION:
        raise EdgeloopError(f"{where} was compiled by an older edgeloop (artifact format {version}, this edgeloop "
                            f"reads {VERSION}): compile it again")
    if version > VERSION:
        raise EdgeloopError(f"{where} needs a newer edgeloop (artifact format {version}, this edgeloop reads "
                            f"{VERSION}); upgrade edgeloop")
    found = _DIGEST_RE.findall(raw)
    if len(found) != 1:
        raise EdgeloopError(f"{where} has no manifest digest; the artifact is corrupt, compile it again")
    if manifest_digest(raw) != found[0].decode():
        raise EdgeloopError(f"{where} was modified after compilation (its digest does not match); compile the "
                            "artifact again")
    from pydantic import ValidationError

    try:
        contract = _adapter().validate_json(raw, strict=True)
    except ValidationError as e:
        raise EdgeloopError(f"{where} does not match the artifact schema: {_one_line(e)}") from None
    except (TypeError, ValueError) as e:  # raised by the model description's own checks
        raise EdgeloopError(f"{where} has an invalid model description: {e}") from None
    _check_consistency(contract, where)
    return contract


def _check_consistency(c: Contract, where: str) -> None:
    if c.backend == "onnxruntime" and c.onnx is None or c.backend == "tvm" and c.tvm is None:
        raise EdgeloopError(f"{where} lacks its {c.backend} section; the artifact is corrupt, compile it again")
    if not c.files:
        raise EdgeloopError(f"{where} lists no files, so nothing could be verified; compile the artifact again")
    rec, loop = c.recursion, c.loop
    if (loop.loops, loop.stages, loop.num_depths) != (rec.loops, rec.stages, rec.num_depths) \
            or c.kv.num_depths != rec.num_depths or rec.num_depths != c.model.num_layers:
        raise EdgeloopError(f"{where}: the loop state, KV layout and recursion disagree (loops {loop.loops} vs "
                            f"{rec.loops}); the manifest was edited, compile the artifact again")
    if c.kv.kind == "host":
        covered = sorted(d for e in c.kv.entries for d in e.depths)
        if covered != list(range(rec.num_depths)):
            raise EdgeloopError(f"{where}: the KV entries do not cover every depth once; compile the artifact again")
    vocab = c.model.vocab_size
    ids = [c.tokenizer.bos_token_id, *c.tokenizer.eos_token_ids]
    if any(i is not None and not 0 <= i < vocab for i in ids):
        raise EdgeloopError(f"{where}: a BOS/EOS token id is outside the vocabulary of {vocab}")
    for name, what in c.referenced_files():
        if name not in c.files:
            raise EdgeloopError(f"{where}: {what} names {name!r}, which the manifest's files do not list; the "
                                "artifact is corrupt, compile it again")
    for name, entry in c.files.items():
        if not re.fullmatch(r"[0-9a-f]{64}", entry.sha256) or entry.bytes < 0:
            raise EdgeloopError(f"{where}: files.{name} has an invalid checksum or size")


def load(path: Path) -> Contract:
    """Read, check and return the contract of the artifact directory `path` (no other file opened)."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise EdgeloopError(f"{path} has no {MANIFEST}; it is not a compiled edgeloop artifact")
    try:
        raw = manifest.read_bytes()
    except OSError as e:
        raise EdgeloopError(f"cannot read {manifest}: {e.strerror}") from None
    contract = parse(raw, str(manifest))
    for name, what in contract.referenced_files():
        confined_file(path, name, f"{manifest} ({what})")
    for name in contract.files:
        confined_file(path, name, f"{manifest} (files)")
    return contract


def verify_files(path: Path, contract: Contract) -> None:
    """Every listed file exists with its recorded size and sha256 (names already confined by `load`)."""
    for name, info in contract.files.items():
        f = confined_file(Path(path), name, f"{path / MANIFEST} (files)")
        if not f.is_file():
            raise EdgeloopError(f"artifact file {name} is missing from {path}; compile the artifact again")
        size = f.stat().st_size
        if size != info.bytes:
            raise EdgeloopError(f"artifact file {name} has {size} bytes, the manifest says {info.bytes}: it is "
                                "truncated or modified; compile the artifact again")
        try:
            digest = sha256_file(f)
        except OSError as e:
            raise EdgeloopError(f"cannot read artifact file {name}: {e.strerror}") from None
        if digest != info.sha256:
            raise EdgeloopError(f"checksum mismatch for {name} in {path}: the file was modified or corrupted; "
                                "compile the artifact again")


# ---------------------------------------------------------------------------------------------
# writing


def _plain(value):
    """asdict output -> JSON-ready values (tuples as lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def serialize(contract: Contract) -> bytes:
    """The manifest bytes with a correct digest (written last, covering everything before it)."""
    data = contract.to_dict()
    data[_DIGEST_FIELD] = _ZERO_DIGEST.decode()
    raw = (json.dumps(data, indent=2, allow_nan=False) + "\n").encode("utf-8")
    digest = manifest_digest(raw).encode()
    return raw.replace(b'"manifest_sha256": "' + _ZERO_DIGEST + b'"', b'"manifest_sha256": "' + digest + b'"', 1)


def main() -> None:  # python -m edgeloop.runtimes.contract [--write]
    import sys

    text = json.dumps(json_schema(), indent=2) + "\n"
    if "--write" in sys.argv:
        SCHEMA_FILE.parent.mkdir(exist_ok=True)
        SCHEMA_FILE.write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
