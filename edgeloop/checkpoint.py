"""Checkpoint I/O: Hugging Face model dirs in, edgeloop model dirs in and out.

No `transformers` here: configs are JSON, weights are safetensors (single file or sharded
with an index), tokenizers are copied as files. Tensors are returned as float32 numpy arrays
named the edgeloop way (see `ModelSpec.linear_shapes` / `vector_shapes` / `global_shapes`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeloop.errors import EdgeloopError
from edgeloop.families import family_for_model_type, get_family
from edgeloop.fileio import read_json, require_dir, write_json
from edgeloop.spec import ModelSpec, Recursion, Stage

FORMAT = "edgeloop-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


@dataclass
class HFCheckpoint:
    """A vanilla checkpoint in edgeloop names: globals plus one dict of tensors per layer."""

    path: Path
    config: dict
    spec: ModelSpec
    globals: dict[str, np.ndarray]
    layers: list[dict[str, np.ndarray]]


# ---------------------------------------------------------------------------------------------
# safetensors reading


def _open_safetensors(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="np")
    except (SafetensorError, OSError, ValueError) as e:
        raise EdgeloopError(f"cannot read {path}: {e}; the file is corrupt or truncated, re-download or re-save it") from None


FLOAT_DTYPES = ("F32", "F16", "BF16")


def _read_tensor(handle, name: str, path: Path) -> np.ndarray:
    from safetensors import SafetensorError

    dtype = handle.get_slice(name).get_dtype()
    if dtype not in FLOAT_DTYPES:
        raise EdgeloopError(f"tensor {name} in {path} is {dtype}; edgeloop reads float32, float16 and bfloat16 "
                            "checkpoints (quantized or integer weights are not supported: de-quantize them first)")
    try:
        t = handle.get_tensor(name)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        # numpy has no bfloat16: fall back to reading the raw bits through a typed slice.
        if "bf16" in str(e).lower() or "bfloat16" in str(e).lower():
            return _read_bf16(path, name)
        raise EdgeloopError(f"cannot read tensor {name} from {path}: {e}; the file is corrupt or truncated") from None
    return np.asarray(t, dtype=np.float32)


def _read_bf16(path: Path, name: str) -> np.ndarray:
    import json
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        info = header[name]
        begin, end = info["data_offsets"]
        f.seek(8 + n + begin)
        raw = np.frombuffer(f.read(end - begin), dtype=np.uint16)
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


def read_safetensors(files: list[Path], *, check_finite: bool = True) -> dict[str, np.ndarray]:
    out = {}
    for path in files:
        handle = _open_safetensors(path)
        with handle as h:
            for name in h.keys():
                out[name] = _read_tensor(h, name, path)
                if check_finite and not np.isfinite(out[name]).all():
                    raise EdgeloopError(f"tensor {name} in {path} holds NaN or Inf values; the checkpoint is "
                                        "broken (such a model can only produce NaN logits)")
    return out


def hf_weight_files(path: Path) -> list[Path]:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        from edgeloop.fileio import confined_file

        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise EdgeloopError(f"{index}: weight_map must map tensor names to shard file names")
        shards = sorted(set(weight_map.values()))
        files = [confined_file(path, s, str(index)) for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if not shards or missing:
            raise EdgeloopError(f"{index} lists missing shards {', '.join(missing) or '(none listed)'}; download every shard")
        return files
    if any(path.glob("*.bin")) or any(path.glob("*.pth")):
        raise EdgeloopError(f"{path} has PyTorch .bin weights only; re-save it with safetensors "
                            "(model.save_pretrained(dir, safe_serialization=True))")
    raise EdgeloopError(f"no model.safetensors or model.safetensors.index.json in {path}")


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints


def read_hf_spec(path: Path) -> tuple[dict, ModelSpec]:
    path = require_dir(Path(path), "checkpoint directory")
    config = read_json(path / "config.json", "config.json of the checkpoint")
    if config.get("format") == FORMAT:
        raise EdgeloopError(f"{path} is already an edgeloop model dir; convert takes a Hugging Face checkpoint "
                            "(compile or run this one directly)")
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise EdgeloopError(f"config.json in {path}: model_type must be a string, got {model_type!r}")
    family = family_for_model_type(model_type)
    try:
        spec = get_family(family).spec_from_config(config)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
        raise EdgeloopError(f"inconsistent config.json in {path}: {e}") from None
    return config, spec


def read_hf_checkpoint(path: Path) -> HFCheckpoint:
    path = Path(path)
    config, spec = read_hf_spec(path)
    raw = read_safetensors(hf_weight_files(path))
    wmap = get_family(spec.family).weight_map(spec)
    used: set[str] = set()

    def fetch(source, layer=None):
        names = [n.format(i=layer) for n in source.names]
        missing = [n for n in names if n not in raw]
        if missing:
            raise EdgeloopError(f"checkpoint {path} is missing tensor {missing[0]}; it does not match its config.json")
        used.update(names)
        arrays = [raw[n] for n in names]
        return source.transform(*arrays) if source.transform else arrays[0]

    globals_ = {name: fetch(src) for name, src in wmap.globals.items()}
    layers = [{name: fetch(src, i) for name, src in wmap.layer.items()} for i in range(spec.stored_layers)]
    if spec.tie_embeddings:
        used.add("lm_head.weight")  # some tied checkpoints store a copy; the embedding wins
    unused = [n for n in raw if n not in used and not n.endswith(wmap.ignore_suffixes)]
    if unused:
        import warnings

        warnings.warn(f"ignoring {len(unused)} unused tensors in {path} (first: {unused[0]})", stacklevel=2)
    _check_shapes(spec, globals_, layers, path)
    return HFCheckpoint(path, config, spec, globals_, layers)


def _check_shapes(spec: ModelSpec, globals_: dict, layers: list[dict], path: Path) -> None:
    expected = dict(spec.global_shapes())
    for name, shape in expected.items():
        if globals_[name].shape != tuple(shape):
            raise EdgeloopError(f"shape mismatch in {path}: {name} is {globals_[name].shape}, config.json implies {tuple(shape)}")
    lin = spec.linear_shapes()
    vec = spec.vector_shapes()
    for i, layer in enumerate(layers):
        for name, arr in layer.items():
            base = name.rsplit(".", 1)[0]
            want = lin[base] if name.endswith(".weight") and base in lin else (vec[name],)
            if arr.shape != tuple(want):
                raise EdgeloopError(f"shape mismatch in {path}: layer {i} {name} is {arr.shape}, "
                                    f"config.json implies {tuple(want)}")


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files (JSON ones validated first: a broken file fails here, not at run time)."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            if name.endswith(".json"):
                read_json(Path(src) / name, name)
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def generation_defaults(path: Path, config: dict) -> dict:
    """BOS/EOS and sampling defaults from generation_config.json, falling back to config.json."""
    gen = {}
    gpath = Path(path) / "generation_config.json"
    if gpath.is_file():
        gen = read_json(gpath, "generation_config.json")
    out = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = gen.get(key, config.get(key))
        if value is not None:
            out[key] = value
    for key in ("temperature", "top_k", "top_p", "repetition_penalty", "do_sample", "max_new_tokens"):
        if gen.get(key) is not None:  # null means unset, as in transformers
            out[key] = gen[key]
    from edgeloop.runtimes.sampling import generation_defaults_from

    generation_defaults_from(out)  # wrong types or ranges: one clear error now
    return out


# ---------------------------------------------------------------------------------------------
# edgeloop model dirs


@dataclass
class ModelDir:
    """A converted (recursive) model: description, tensors and where the tokenizer lives."""

    path: Path
    spec: ModelSpec
    recursion: Recursion
    tensors: dict[str, np.ndarray]
    generation: dict
    source: dict


def vanilla_recursion(spec: ModelSpec) -> Recursion:
    """The checkpoint's own structure: L layers once, or — natively looped (Ouro) — its layers looped
    native_loops times, one KV slot per (loop, layer), no LoRA."""
    layers = tuple(range(spec.stored_layers))
    if spec.native_loops > 1:
        return Recursion(sharing="cycle", loops=spec.native_loops, init="lower",
                         stages=(Stage(layers, spec.native_loops),), lora_ranks={}, per_depth_vectors=False,
                         source_layers=layers)
    return Recursion(sharing="none", loops=1, init="lower", stages=(Stage(layers, 1),),
                     lora_ranks={}, per_depth_vectors=False, source_layers=layers)


def read_model_config(path: Path) -> dict:
    path = require_dir(Path(path), "model directory")
    config = read_json(path / "config.json", "config.json")
    if config.get("format") != FORMAT:
        raise EdgeloopError(f"{path} is not an edgeloop model directory (convert it first: edgeloop convert {path} -o OUT)")
    if config.get("version", 0) > FORMAT_VERSION:
        raise EdgeloopError(f"{path} was written by a newer edgeloop (format {config['version']}); upgrade edgeloop")
    return config


def is_model_dir(path: Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return read_json(cfg).get("format") == FORMAT
    except EdgeloopError:
        return False


def read_model_dir(path: Path) -> ModelDir:
    path = Path(path)
    config = read_model_config(path)
    try:
        spec = ModelSpec.from_dict(config["model"])
        recursion = Recursion.from_dict(config["recursion"])
    except (KeyError, TypeError) as e:
        raise EdgeloopError(f"{path}/config.json is incomplete ({e}); re-run edgeloop convert") from None
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise EdgeloopError(f"{weights} not found; the model directory is incomplete, re-run edgeloop convert")
    tensors = read_safetensors([weights], check_finite=False)
    return ModelDir(path, spec, recursion, tensors, config.get("generation", {}), config.get("source", {}))


def original_checkpoint(model_dir: Path, source: dict) -> Path | None:
    """The HF checkpoint a model dir was converted from, if it is still there (a relative path is
    relative to the model dir, as in the bundled examples/kjv-tiny-loop)."""
    recorded = source.get("path")
    if not recorded:
        return None
    path = Path(recorded)
    if not path.is_absolute():
        path = Path(model_dir) / path
    return path if (path / "config.json").is_file() else None


def write_model_dir(out: Path, spec: ModelSpec, recursion: Recursion, tensors: dict[str, np.ndarray],
                    *, generation: dict, source: dict, tokenizer_from: Path | None,
                    dtype: np.dtype = np.dtype(np.float32)) -> None:
    """Write into `out`, which must be a fresh (temporary) directory. Tensors are stored as `dtype`
    (float32, or float16 to halve the directory; read back as float32)."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=dtype) for k, v in tensors.items()}, str(out / WEIGHTS_FILE),
              metadata={"format": FORMAT})
    write_json(out / "config.json", {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": spec.to_dict(),
        "recursion": recursion.to_dict(),
        "generation": generation,
        "source": source,
    })
    if tokenizer_from is not None:
        copy_tokenizer_files(tokenizer_from, out)
