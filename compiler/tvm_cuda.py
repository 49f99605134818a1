"""Self-contained CUDA artifacts: device code compiled to a fatbin at compile time and shipped in model.tar.

What TVM 0.27 does by itself: its CUDA codegen emits CUDA C++ and, on a machine without the CUDA
runtime library (this one, and any build box without a driver), wraps it in a placeholder module
of kind "cuda" whose saved bytes are ``[fmt]["cuda"][function table][source]``. The runtime that
loads it compiles the source at load time through the global ``tvm_callback_cuda_compile``, which
needs nvcc or NVRTC there, and TVM's own callback also needs the TVM compiler library.

What we do (when nvcc is found): compile that source with nvcc into one fatbin holding a cubin per
requested architecture plus PTX of the newest one (so later GPUs can JIT it), and export the
library with our own `fpack_imports`: the packed import blob (``__tvm_ffi__library_bin``, the
bytes ``runtime.ModulePackImportsToTensor`` gives) is rewritten so that the cuda entry reads
``[fmt]["fatbin"][same function table][fatbin]``, and assembled into devc.o with ``.incbin``.
The runtime's CUDA module hands such bytes straight to ``cuModuleLoadData``: no compiler of any
kind at load time. Without nvcc the source ships as before and the runtime compiles it with
NVRTC (`runtimes/tvm.py` registers the callback); the manifest says which (``cuda.device_code``).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from edgeloop.errors import EdgeloopError

FATBIN_MAGIC = 0xBA55ED50
ENTRY_KINDS = {1: "ptx", 2: "elf"}
NVCC_FLAGS = ["--fatbin", "-O3", "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
              "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
              "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]  # TVM's nvcc flags, without --use_fast_math
LIBRARY_SYMBOL = "__tvm_ffi__library_bin"


def find_nvcc() -> str | None:
    """nvcc on PATH, else under CUDA_HOME / CUDA_PATH / /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def gencode_flags(archs: tuple[str, ...]) -> list[str]:
    """A cubin per architecture, plus PTX of the newest for GPUs newer than all of them."""
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch[3:]},code={arch}"]
    newest = archs[-1][3:]
    return flags + ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]


def compile_fatbin(source: str, archs: tuple[str, ...], nvcc: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "model.cu", Path(tmp) / "model.fatbin"
        src.write_text(source)
        r = subprocess.run([nvcc, *NVCC_FLAGS, *gencode_flags(archs), "-o", str(out), str(src)],
                           capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            raise EdgeloopError(f"nvcc could not compile the CUDA kernels: {r.stderr.strip()[-500:]}")
        return out.read_bytes()


def fatbin_entries(data: bytes) -> list[dict]:
    """The entries of a fatbin: [{"kind": "elf" | "ptx", "arch": "sm_90", "bytes": n}], from its
    headers (a 16-byte file header, then per entry: kind u16, header size u32 at 4, payload size
    u64 at 8, architecture u32 at 28). A cubin also gets "elf_arch", read from its ELF e_flags
    (bits 8-15 in the CUDA 12+ ABI 0x41, bits 0-7 before)."""
    magic, _version, header, size = struct.unpack_from("<IHHQ", data, 0)
    if magic != FATBIN_MAGIC:
        raise EdgeloopError("not a CUDA fatbin (bad magic number)")
    entries, pos, end = [], header, header + size
    while pos + 32 <= min(end, len(data)):
        kind, = struct.unpack_from("<H", data, pos)
        entry_header, payload = struct.unpack_from("<IQ", data, pos + 4)
        arch, = struct.unpack_from("<I", data, pos + 28)
        entry = {"kind": ENTRY_KINDS.get(kind, str(kind)), "arch": f"sm_{arch}", "bytes": payload}
        body = pos + entry_header
        if entry["kind"] == "elf" and data[body:body + 4] == b"\x7fELF":  # the cubin's own e_flags agree
            flags, = struct.unpack_from("<I", data, body + 0x30)
            entry["elf_arch"] = f"sm_{(flags >> 8) & 0xFF if data[body + 7] == 0x41 else flags & 0xFF}"
        entries.append(entry)
        pos = body + payload
    return entries


def _cuda_module(executable):
    """The (single) imported module of kind "cuda" under the executable, or None."""
    stack, seen = [executable.mod], set()
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if module.kind == "cuda":
            return module
        stack.extend(module.imports)
    return None


def _u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def _str(b: bytes) -> bytes:
    return _u64(len(b)) + b


def _read(blob: bytes, pos: int) -> tuple[bytes, int]:
    n, = struct.unpack_from("<Q", blob, pos)
    return blob[pos + 8:pos + 8 + n], pos + 8 + n


def _with_fatbin(entry: bytes, source: bytes, fatbin: bytes) -> bytes:
    """The saved bytes of a "cuda" module [fmt][function table][code] with code := fatbin."""
    fmt, pos = _read(entry, 0)
    code_at = len(entry) - len(source) - 8
    if fmt != b"cuda" or code_at < pos or entry[code_at + 8:] != source \
            or struct.unpack_from("<Q", entry, code_at)[0] != len(source):
        raise EdgeloopError(f"the built CUDA module holds {fmt.decode(errors='replace')!r}, not CUDA source (a TVM "
                            "that ignores TVM_COMPILE_FORCE_FALLBACK?); cannot ship a fatbin for --arch")
    return _str(b"fatbin") + entry[pos:code_at] + _str(fatbin)


def repack_blob(blob: bytes, source: bytes, fatbin: bytes) -> bytes:
    """Rewrite the packed-imports blob ([u64 size][import tree: 2 u64 vectors][per module: kind, bytes;
    the host library as the bare kind "_lib"]) so that its cuda module carries `fatbin`."""
    pos = 8
    for _ in range(2):  # the import tree's row pointers and child indices
        n, = struct.unpack_from("<Q", blob, pos)
        pos += 8 + 8 * n
    out, replaced = [blob[8:pos]], False
    while pos < len(blob):
        kind, after = _read(blob, pos)
        if kind == b"_lib":
            out.append(blob[pos:after])
            pos = after
            continue
        data, end = _read(blob, after)
        if kind == b"cuda":
            data, replaced = _with_fatbin(data, source, fatbin), True
        out.append(_str(kind) + _str(data))
        pos = end
    if not replaced:
        raise EdgeloopError("the build has no CUDA module to compile")
    body = b"".join(out)
    return _u64(len(body)) + body


def _assemble(blob_path: Path, out: Path) -> None:
    """devc.o: the blob under LIBRARY_SYMBOL, with the host C compiler's assembler (.incbin)."""
    asm = out.with_suffix(".S")
    asm.write_text(f""".section .rodata
.globl {LIBRARY_SYMBOL}
.type {LIBRARY_SYMBOL}, @object
.p2align 4
{LIBRARY_SYMBOL}:
.incbin "{blob_path}"
.size {LIBRARY_SYMBOL}, . - {LIBRARY_SYMBOL}
.section .note.GNU-stack,"",@progbits
""")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise EdgeloopError("no C compiler to assemble the device-code object; install gcc or set CC")
    r = subprocess.run([cc, "-c", str(asm), "-o", str(out)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise EdgeloopError(f"could not assemble the device-code object: {r.stderr.strip()[-300:]}")


def export_with_fatbin(executable, path: Path, archs: tuple[str, ...], nvcc: str) -> list[dict]:
    """Export `executable` to `path` (a .tar) with its CUDA kernels as a fatbin; returns its entries."""
    import tvm_ffi

    cuda = _cuda_module(executable)
    if cuda is None:
        raise EdgeloopError("the build has no CUDA module to compile")
    source = cuda.inspect_source()
    fatbin = compile_fatbin(source, archs, nvcc)

    def pack(mod, _is_system_lib, prefix, workspace):
        blob = bytes(tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy().tobytes())
        blob_path = Path(workspace) / f"{prefix}devc.bin"
        blob_path.write_bytes(repack_blob(blob, source.encode(), fatbin))
        obj = Path(workspace) / f"{prefix}devc.o"
        _assemble(blob_path, obj)
        return str(obj)

    executable.export_library(str(path), fpack_imports=pack)
    return fatbin_entries(fatbin)


def _elf_symbol_bytes(obj: bytes, name: str) -> bytes:
    """The bytes from symbol `name` to the end of its section, in a little-endian ELF64 object."""
    shoff, = struct.unpack_from("<Q", obj, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", obj, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", obj, shoff + i * shentsize) for i in range(shnum)]
    for sec in sections:
        if sec[1] != 2:  # SHT_SYMTAB: (name, type, flags, addr, offset, size, link, info, align, entsize)
            continue
        strtab = sections[sec[6]]
        for off in range(sec[4], sec[4] + sec[5], 24):
            st_name, _info, _other, shndx, value, _size = struct.unpack_from("<IBBHQQ", obj, off)
            start = strtab[4] + st_name
            if obj[start:obj.index(b"\0", start)] == name.encode():
                target = sections[shndx]
                return obj[target[4] + value:target[4] + target[5]]
    raise EdgeloopError(f"{name} not found in the device-code object")


def read_device_code(library: Path) -> dict:
    """What a CUDA model.tar ships: {"format": "fatbin", "entries": [...]} or {"format": "cuda"} (source)."""
    import tarfile

    with tarfile.open(library) as tar:
        name = next(m for m in tar.getnames() if m.endswith("devc.o"))
        obj = tar.extractfile(name).read()
    blob = _elf_symbol_bytes(obj, LIBRARY_SYMBOL)
    size, = struct.unpack_from("<Q", blob, 0)
    blob = blob[:8 + size]
    pos = 8
    for _ in range(2):
        n, = struct.unpack_from("<Q", blob, pos)
        pos += 8 + 8 * n
    while pos < len(blob):
        kind, pos = _read(blob, pos)
        if kind == b"_lib":
            continue
        data, pos = _read(blob, pos)
        if kind != b"cuda":
            continue
        fmt, _ = _read(data, 0)
        if fmt != b"fatbin":
            return {"format": fmt.decode()}
        start = data.find(struct.pack("<I", FATBIN_MAGIC))  # the code: the entry's last field
        while start >= 8 and struct.unpack_from("<Q", data, start - 8)[0] != len(data) - start:
            start = data.find(struct.pack("<I", FATBIN_MAGIC), start + 1)
        if start < 8:
            raise EdgeloopError(f"{library}: the CUDA module says fatbin but holds none")
        return {"format": "fatbin", "entries": fatbin_entries(data[start:])}
    raise EdgeloopError(f"{library} has no CUDA module")
