"""CompileOptions: every `edgeloop compile` flag, one field each."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from edgeloop.errors import EdgeloopError

TARGETS = {
    "onnxruntime": ("cpu", "cuda", "mobile"),
    "tvm": ("cpu", "cuda", "android-cpu", "android-opencl", "ios-cpu", "ios-metal", "webgpu"),
}
LAYOUTS = ("auto", "loop", "unrolled")
# The measured-faster layout per backend (docs/benchmarks.md): ORT runs the unrolled graph with
# in-place GroupQueryAttention 1.3x faster than the Loop; TVM has its own recursion form.
DEFAULT_LAYOUT = {"onnxruntime": "unrolled", "tvm": "loop"}
QUANTS = ("none", "int8", "int4")
# int8 LoRA: each depth's A and B as 8-bit MatMulNBits blocks (unrolled ORT graphs only).
LORA_DTYPES = ("float32", "float16", "int8")


@dataclass
class CompileOptions:
    backend: str = "onnxruntime"
    target: str = "cpu"
    layout: str = "auto"  # loop: the shared block once inside a Loop; unrolled: one copy per depth
    quant: str = "none"
    block_size: int = 32
    symmetric: bool = True  # measured on the bundled model: symmetric + scale search beats asymmetric (KL, size)
    quantize_embeddings: bool = False
    keep_float: list[str] = field(default_factory=list)
    lora_dtype: str = "float32"  # float32 | float16 | int8 storage of the per-depth LoRA
    scale_search: bool = True  # int4: search per-block scales (better than round-to-nearest)
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations (fastest on CPU), 0 = fp32 compute
    calibration_text: str | None = None  # held-out text for the quality report (default: see onnx_quant)
    optimize: bool = True  # apply portable ORT graph optimizations offline
    tune_trials: int = 0  # TVM: optional offline tuning
    debug_dump: str | None = None  # a directory: the graph after every pipeline pass (outside the artifact)
    exit: str | None = None  # the artifact's default early-exit policy (runtimes/exits.py)
    arch: list[str] = field(default_factory=list)  # TVM CUDA: sm_XX device code is built for (default sm_80, sm_90)
    dtype: str = "float32"  # TVM CUDA: float16 weights, activations and KV cache (float32 accumulation)

    def validate(self) -> None:
        for name in ("block_size", "accuracy_level", "tune_trials"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise EdgeloopError(f"--{name.replace('_', '-')} must be an integer, got {value!r}")
        if self.backend not in TARGETS:
            raise EdgeloopError(f"unknown backend {self.backend!r}; choose one of {', '.join(TARGETS)}")
        if self.target not in TARGETS[self.backend]:
            raise EdgeloopError(f"--target {self.target} is not available for {self.backend}; "
                                f"choose one of {', '.join(TARGETS[self.backend])}")
        if self.layout not in LAYOUTS:
            raise EdgeloopError(f"unknown --layout {self.layout!r}; choose auto, loop or unrolled")
        if self.layout == "auto":
            self.layout = DEFAULT_LAYOUT[self.backend]
        if self.quant not in QUANTS:
            raise EdgeloopError(f"unknown --quant {self.quant!r}; choose one of {', '.join(QUANTS)}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise EdgeloopError(f"--block-size must be 16, 32, 64, 128 or 256, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise EdgeloopError(f"--accuracy-level must be 0 to 4, got {self.accuracy_level}")
        if self.lora_dtype not in LORA_DTYPES:
            raise EdgeloopError(f"--lora-dtype must be one of {', '.join(LORA_DTYPES)}, got {self.lora_dtype}")
        if self.lora_dtype == "int8" and (self.backend != "onnxruntime" or self.layout != "unrolled"
                                          or self.target == "cuda"):
            # Int8 LoRA runs as MatMulNBits, which needs its weight as an initializer: the Loop body
            # gathers each depth's LoRA at run time, and the CUDA graph is float16.
            raise EdgeloopError("--lora-dtype int8 needs --backend onnxruntime --layout unrolled and a cpu or "
                                "mobile target; use --lora-dtype float16 otherwise")

        if self.dtype not in ("float32", "float16"):
            raise EdgeloopError(f"--dtype must be float32 or float16, got {self.dtype}")
        if self.dtype == "float16" and (self.backend, self.target) != ("tvm", "cuda"):
            raise EdgeloopError("--dtype float16 is for --backend tvm --target cuda (ONNX Runtime's cuda target is "
                                "float16 already; CPU artifacts stay float32)")
        if self.arch and (self.backend, self.target) != ("tvm", "cuda"):
            raise EdgeloopError("--arch selects CUDA architectures for --backend tvm --target cuda; drop it otherwise")

    @property
    def quantizes(self) -> bool:
        """Whether the graph goes through the quantization rewrite (shared weights or LoRA)."""
        return self.quant != "none" or self.lora_dtype == "int8"

    def to_dict(self) -> dict:
        return asdict(self)
