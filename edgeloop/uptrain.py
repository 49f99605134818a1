"""`edgeloop uptrain`: distill the original checkpoint into the recursive model, at every loop boundary.

The student is the recursive model itself (the PyTorch reference, its LoRA factors and per-depth
norm weights trainable; the shared block too with --train-shared). The teacher is the original
checkpoint the model was converted from (recorded at convert time, or --teacher). Each batch of
token windows runs the student's loop one pass at a time; after every pass r the shared final
norm and LM head read the hidden state, and the loss is

    sum_r  w_r * KL(teacher || student at boundary r)      w_r = 1 at the last pass, --exit-loss before

so every boundary becomes a usable exit (the RRT paper's weighted intermediate losses). With
--exit-gate a small gate Linear(hidden -> 1) learns, at each boundary, whether the student's
prediction there already matches the teacher's (binary cross-entropy on that agreement); the
`gate` exit policy then reads it (runtimes/exits.py).

Seeded; resumable (a checkpoint next to the output every --checkpoint-every steps, --resume to
continue); held-out perplexity per loop before and after, printed and stored in the output model
dir (`uptrain.json`). The output is a normal edgeloop model dir: every backend compiles it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from edgeloop.errors import EdgeloopError
from edgeloop.fileio import atomic_output_dir, check_output, read_text

REPORT = "uptrain.json"


@dataclass
class UptrainOptions:
    steps: int = 200
    lr: float = 1e-3
    batch: int = 8
    seq: int = 128
    exit_loss: float = 1.0  # weight of the intermediate boundaries (the last one weighs 1)
    train_shared: bool = False
    exit_gate: bool = False
    gate_loss: float = 0.1
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    checkpoint_every: int = 100
    resume: bool = False
    teacher: str | None = None
    heldout: str | None = None
    eval_tokens: int = 4096
    save_dtype: str = "float32"  # float16 halves the model dir (what the bundled examples/kjv-tiny-loop uses)

    def validate(self) -> None:
        for name in ("steps", "batch", "seq", "checkpoint_every", "eval_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EdgeloopError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name, high in (("lr", 1.0), ("exit_loss", 100.0), ("gate_loss", 100.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0 <= value <= high or (name == "lr" and value == 0):
                raise EdgeloopError(f"--{name.replace('_', '-')} must be a number in "
                                    f"{'(0' if name == 'lr' else '[0'}, {high:g}], got {value!r}")
        if self.save_dtype not in ("float32", "float16"):
            raise EdgeloopError(f"--save-dtype must be float32 or float16, got {self.save_dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise EdgeloopError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if not 0 <= self.seed < 2 ** 63:
            raise EdgeloopError(f"--seed must be in [0, 2^63), got {self.seed}")


@dataclass
class UptrainResult:
    path: Path
    steps: int
    seconds: float
    tokens_per_s: float
    loss_first: float
    loss_last: float
    perplexity_before: list[float]
    perplexity_after: list[float]
    teacher_perplexity: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


def _device(choice: str):
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise EdgeloopError("--device cuda: torch sees no CUDA device here")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def _teacher_dir(md, options: UptrainOptions) -> Path:
    from edgeloop.checkpoint import original_checkpoint

    path = Path(options.teacher) if options.teacher else original_checkpoint(md.path, md.source)
    if path is None:
        raise EdgeloopError(f"the model dir does not know where its original checkpoint is (recorded: "
                            f"{md.source.get('path')!r}); pass --teacher HF_DIR")
    if not (path / "config.json").is_file():
        raise EdgeloopError(f"--teacher {path}: no config.json (a Hugging Face checkpoint directory is expected)")
    return path


def _tokens(files: list[Path], tokenizer) -> np.ndarray:
    ids: list[int] = []
    for f in files:
        ids += tokenizer.encode(read_text(Path(f), "training text"))
    return np.asarray(ids, np.int64)


def uptrain(model_dir: str | Path, data: list[str | Path], out: str | Path, options: UptrainOptions | None = None, *,
            overwrite: bool = False, progress: bool = False, **kwargs) -> UptrainResult:
    import torch

    from edgeloop.checkpoint import read_hf_checkpoint, read_model_dir, vanilla_recursion, write_model_dir
    from edgeloop.reference import ReferenceModel
    from edgeloop.runtimes.tokenizer import Tokenizer, resolve_tokenizer

    options = options or UptrainOptions(**kwargs)
    options.validate()
    model_dir, out = Path(model_dir), Path(out)
    if not data:
        raise EdgeloopError("--data: give at least one training text file")
    check_output(out, (model_dir, *map(Path, data)))
    md = read_model_dir(model_dir)
    if md.recursion.loops < 2 or len(md.recursion.stages) != 1:
        raise EdgeloopError("uptrain trains a recursive model with one looped stage (CYCLE sharing, --loops >= 2)")
    teacher_dir = _teacher_dir(md, options)
    section, _ = resolve_tokenizer(model_dir, md.generation, md.spec.vocab_size)
    tokenizer = Tokenizer(model_dir, section)
    train_ids = _tokens([Path(f) for f in data], tokenizer)
    if len(train_ids) < options.seq + 1:
        raise EdgeloopError(f"the training text has {len(train_ids)} tokens; --seq {options.seq} needs more")
    heldout = Path(options.heldout) if options.heldout else model_dir / "heldout.txt"
    eval_ids = _tokens([heldout], tokenizer)[:options.eval_tokens] if heldout.is_file() else train_ids[-2048:]
    notes = [] if heldout.is_file() else ["no held-out text: the per-loop perplexity is measured on the end of "
                                          "the training text"]

    device = _device(options.device)
    torch.manual_seed(options.seed)
    ck = read_hf_checkpoint(teacher_dir)
    if ck.spec.num_layers != md.spec.num_layers or ck.spec.vocab_size != md.spec.vocab_size:
        raise EdgeloopError(f"--teacher {teacher_dir} does not match the model (layers {ck.spec.num_layers} vs "
                            f"{md.spec.num_layers})")
    teacher_tensors = dict(ck.globals)
    for i, layer in enumerate(ck.layers):
        teacher_tensors.update({f"blocks.{i}.{k}": v for k, v in layer.items()})
    teacher = ReferenceModel(ck.spec, vanilla_recursion(ck.spec), teacher_tensors).to_device(device)
    spec = replace(md.spec, exit_gate=True) if options.exit_gate else md.spec
    tensors = dict(md.tensors)
    if options.exit_gate and "exit_gate.weight" not in tensors:
        tensors["exit_gate.weight"] = np.zeros((1, spec.hidden_size), np.float32)
        tensors["exit_gate.bias"] = np.zeros((1,), np.float32)
    student = ReferenceModel(spec, md.recursion, tensors).to_device(device)
    params = _trainable(student, options)
    if not params:
        raise EdgeloopError("nothing to train: the model has no LoRA (rank 0) and no per-depth norms; convert with "
                            "--lora-rank N or pass --train-shared")
    opt = torch.optim.AdamW(params.values(), lr=options.lr, weight_decay=0.0)
    ckpt_dir = out.with_name(f".{out.name}.uptrain-checkpoint")
    start_step, losses = 0, []
    rng = np.random.default_rng(options.seed)  # the windows of every step, restored by --resume
    if options.resume:
        start_step, losses = _load_checkpoint(ckpt_dir, params, opt, device, rng)
    before = per_loop_perplexity(student, teacher, eval_ids, device)

    from tqdm import tqdm

    bar = tqdm(total=options.steps, initial=start_step, desc="uptrain", unit="step", disable=not progress)
    t0, trained_tokens = time.perf_counter(), 0
    for step in range(start_step, options.steps):
        starts = rng.integers(0, len(train_ids) - options.seq, size=options.batch)
        batch = torch.from_numpy(np.stack([train_ids[s:s + options.seq] for s in starts])).to(device)
        for group in opt.param_groups:  # a function of the step alone, so --resume needs no scheduler state
            group["lr"] = learning_rate(step, options)
        loss = distill_loss(student, teacher, batch, options)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        losses.append(loss.item())
        trained_tokens += batch.numel()
        bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{trained_tokens / (time.perf_counter() - t0):.0f}")
        bar.update(1)
        if (step + 1) % options.checkpoint_every == 0 and step + 1 < options.steps:
            _save_checkpoint(ckpt_dir, step + 1, losses, params, opt, rng)
    bar.close()
    seconds = time.perf_counter() - t0
    after = per_loop_perplexity(student, teacher, eval_ids, device)
    teacher_ppl = after.pop()
    before.pop()
    result = UptrainResult(out, options.steps, round(seconds, 2), round(trained_tokens / max(seconds, 1e-9), 1),
                           round(losses[0], 5) if losses else float("nan"), round(losses[-1], 5) if losses else
                           float("nan"), before, after, teacher_ppl, notes)
    final = {k: v.detach().float().cpu().numpy() for k, v in student.w.items()}
    with atomic_output_dir(out, overwrite=overwrite, inputs=(model_dir, teacher_dir)) as tmp:
        write_model_dir(tmp, spec, md.recursion, final, generation=md.generation,
                        source={**md.source, "uptrained_from": str(model_dir.resolve()),
                                "teacher": str(teacher_dir.resolve())}, tokenizer_from=model_dir,
                        dtype=np.dtype(options.save_dtype))
        for extra in ("hf_config.json", "heldout.txt"):
            if (model_dir / extra).is_file():
                shutil.copy2(model_dir / extra, tmp / extra)
        (tmp / REPORT).write_text(json.dumps({"options": asdict(options), "result": result.to_dict(),
                                              "loss_curve": losses[:: max(1, len(losses) // 50)]}, indent=1))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return result


def _trainable(student, options: UptrainOptions) -> dict:
    """LoRA factors, per-depth norm weights and biases, the exit gate, and the shared block with
    --train-shared."""
    vectors = {f"blocks.{u}.{n}" for u in range(student.recursion.num_blocks) for n in student.spec.vector_shapes()}
    out = {}
    for name, t in student.w.items():
        lora = ".lora." in name
        per_depth = name in vectors and student.recursion.per_depth_vectors
        shared = options.train_shared and name.startswith("blocks.") and not lora
        if lora or per_depth or shared or name.startswith("exit_gate."):
            t.requires_grad_(True)
            out[name] = t
    return out


def _boundaries(model, ids):
    """Hidden states after every pass (final-normed: what the head and the gate read)."""
    x = model.embed(ids)
    out = []
    for group in model.passes():
        x = model.run_depths(x, group, None, 0)
        if model.spec.loop_norm:
            x = model.loop_norm(x)
        out.append(x if model.spec.loop_norm else model.loop_norm(x))
    return out


def learning_rate(step: int, options: UptrainOptions) -> float:
    """Linear warm-up over the first 5% of the steps, then cosine decay to a tenth of --lr."""
    warmup = max(1, options.steps // 20)
    if step < warmup:
        return options.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, options.steps - warmup)
    return options.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def distill_loss(student, teacher, ids, options: UptrainOptions):
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        target = F.log_softmax(teacher(ids).float(), dim=-1)
        target_top = target.argmax(-1)
    loss = 0.0
    boundaries = _boundaries(student, ids)
    for r, h in enumerate(boundaries):
        logp = F.log_softmax(student.head(h).float(), dim=-1)
        kl = (target.exp() * (target - logp)).sum(-1).mean()
        loss = loss + (1.0 if r == len(boundaries) - 1 else options.exit_loss) * kl
        if options.exit_gate and r < len(boundaries) - 1:
            agree = (logp.argmax(-1) == target_top).float()
            gate = student.exit_score_logit(h)
            loss = loss + options.gate_loss * F.binary_cross_entropy_with_logits(gate, agree)
    return loss


def per_loop_perplexity(student, teacher, ids: np.ndarray, device, window: int = 256) -> list[float]:
    """Held-out perplexity of the student at every loop boundary, and the teacher's (last)."""
    import torch
    import torch.nn.functional as F

    nll = np.zeros(student.recursion.loops + 1)
    count = 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.from_numpy(ids[start:start + window + 1]).to(device)[None]
            if chunk.shape[1] < 2:
                break
            x, y = chunk[:, :-1], chunk[0, 1:]
            for r, h in enumerate(_boundaries(student, x)):
                logp = F.log_softmax(student.head(h)[0].float(), -1)
                nll[r] -= float(logp[torch.arange(len(y)), y].sum())
            logp = F.log_softmax(teacher(x)[0].float(), -1)
            nll[-1] -= float(logp[torch.arange(len(y)), y].sum())
            count += len(y)
    return [round(math.exp(v / count), 4) for v in nll]


def _save_checkpoint(path: Path, step: int, losses: list[float], params: dict, opt, rng) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"step": step, "losses": losses, "params": {k: v.detach().cpu() for k, v in params.items()},
                "optimizer": opt.state_dict()}, tmp / "state.pt")
    (tmp / "rng.json").write_text(json.dumps(rng.bit_generator.state))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def _load_checkpoint(path: Path, params: dict, opt, device, rng) -> tuple[int, list[float]]:
    import torch

    state_file = path / "state.pt"
    if not state_file.is_file():
        raise EdgeloopError(f"--resume: no checkpoint at {path} (one is written every --checkpoint-every steps)")
    state = torch.load(state_file, map_location=device, weights_only=True)
    missing = set(params) - set(state["params"])
    if missing:
        raise EdgeloopError(f"--resume: the checkpoint at {path} does not match these options (no {sorted(missing)[0]})")
    with torch.no_grad():
        for name, value in state["params"].items():
            if name in params:
                params[name].copy_(value.to(device))
    opt.load_state_dict(state["optimizer"])
    rng.bit_generator.state = json.loads((path / "rng.json").read_text())
    return int(state["step"]), list(state["losses"])
