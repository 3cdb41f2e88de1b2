"""Will one training step fit in memory? An estimate checked before a run starts.

Why by hand: neither PyTorch nor Opacus says what a step will need before running it, and a
step that does not fit fails late and badly: on a GPU with an out-of-memory error after the
data is tokenized, on a CPU by the kernel's OOM killer (no error at all) or by swapping. On
the CPU, with dropout (the default), the attention scores of every layer are kept for the
backward pass (``B * n_head *
T^2`` floats several times over), so the default model at ``model.block_size=2048`` and
batch 32 needs about 35 GB for one step, 32 GB of it attention scores (1024: about 10 GB).
So ``safelm train`` estimates the peak bytes one step allocates and refuses, before the data
is read and before anything is written, a configuration whose estimate exceeds the memory
available (exit 2 naming ``model.block_size`` and ``train.batch_size``).

The estimate is an empirical model of the peak allocated memory of a Transformer training
step (forward, backward, AdamW step), linear in the quantities that drive it::

    peak = c0 + c1 * P + rows * (c2 * L*T*d + c3 * L*H*T^2 + c4 * T*V [LM] + c5 * T*d)

with P the parameters, rows the physical batch, L layers, d width, H heads, T the block size
and V the vocabulary. The T^2 term is there only where attention keeps its score matrices:
PyTorch's CPU attention does with dropout > 0 (its math path), and not with dropout 0 (its
flash kernel); CUDA's flash / memory-efficient kernels do not keep them either (the T^2 term
is dropped on CUDA: an assumption, not measured, as no GPU was available). The coefficients
were fitted to peaks measured by :func:`peak_allocated` (glibc's bytes in use after every aten
operation) for small shapes, and checked on held-out larger ones: ``benchmarks/
bench_memory.py`` prints estimate / measured for a grid (table in benchmarks/README.md);
``tests/test_preflight.py`` checks a few shapes against a measured peak.

What it assumes: fp32 activations (under ``train.precision=bf16`` the estimate is of fp32,
an upper bound); one process holding the whole batch (under torchrun, where each rank takes a
share of the batch, that is the ranks' activations together, not one GPU's); the Transformer
(the LSTM baseline is not estimated: no check). Under DP the physical batch is
the Poisson batch's expected size plus three standard deviations (or
``privacy.max_physical_batch_size`` when smaller); Opacus' hooks / functorch / ew modes add
each row's copy of the trainable gradients, formed as the activations are freed (the larger
of the two counts; measured for hooks, assumed for functorch and ew).

It is a refusal of what cannot fit, not a promise that the rest will: the resident size adds
the allocator's fragmentation to the allocated peak (x1.1-1.5 measured), and other processes
take memory too. ``train.memory_check=false`` skips the check.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import memory
from .config import Config
from .errors import UserError

# The training state, not fitted (see bench_memory.py's fit): 4 bytes for every weight, 12
# more per trainable one (its gradient and AdamW's two moments), and twice the largest
# trainable tensor once more (a tied weight's two gradient contributions being summed,
# AdamW's per-tensor temporaries): measured 1,242 MB for a 52.8M-parameter LM whose
# 50,257 x 768 embedding is tied to its head, against 1,188 MB from this rule.
WEIGHT_BYTES, TRAINABLE_BYTES, LARGEST_COPIES = 4, 12, 2
# Fitted coefficients (bytes): constant, per row: L*T*d, L*H*T^2, T*V (LM), T*d. Keys: (DP
# kind, attention keeps its scores). From `benchmarks/bench_memory.py --fit`.
COEFFICIENTS: dict[tuple[str, bool], tuple[float, ...]] = {
    ("bk", False): (29210000.0, 73.06, 0.0, 12.98, 52.5),
    ("bk", True): (31280000.0, 55.28, 15.76, 16.54, 36.75),
    ("plain", False): (33810000.0, 52.32, 0.0, 11.33, 56.06),
    ("plain", True): (30210000.0, 68.81, 15.07, 13.54, 20.03),
}
PER_SAMPLE_GRAD_MODES = ("hooks", "functorch", "ew")  # keep a gradient copy per row
GRAD_SAMPLE_BYTES = 4.0  # per row and trainable parameter in those modes


@dataclass
class StepMemory:
    """The estimated peak of one training step and what it is made of (bytes)."""

    total: float
    state: float  # weights, gradients, optimizer state, fixed overhead
    activations: float  # what the physical batch keeps for the backward pass
    rows: int  # the physical batch the estimate is for
    attention: float  # the part of ``activations`` in attention score matrices


def physical_rows(cfg: Config) -> int:
    """The rows one forward/backward pass processes: the batch, or under DP the Poisson
    batch's expected size plus three standard deviations, capped by
    ``privacy.max_physical_batch_size``."""
    b = cfg.train.batch_size
    if not cfg.privacy.enabled:
        return b
    rows = math.ceil(b + 3 * math.sqrt(b))
    cap = cfg.privacy.max_physical_batch_size
    return min(rows, cap) if cap else rows


def keeps_attention_scores(cfg: Config, device: torch.device) -> bool:
    """Whether PyTorch's attention keeps [B, H, T, T] scores for the backward pass: on the
    CPU with dropout (the math path; measured), not on CUDA (fused kernels; assumed)."""
    return device.type != "cuda" and cfg.model.dropout > 0


def count_parameters(cfg: Config) -> tuple[int, int, int]:
    """(all, trainable, largest trainable tensor) elements of the model ``cfg`` builds,
    counted on a model built on the ``meta`` device: exact (LoRA and tying included), and
    nothing is allocated. A classifier whose classes are not resolved yet counts two."""
    from .model import build_model
    model_cfg = dataclasses.replace(cfg.model, num_classes=max(cfg.model.num_classes, 2))
    with torch.device("meta"):
        model = build_model(model_cfg, cfg.train.task)
    params = list(model.parameters())  # tied weights once
    trainable = [p.numel() for p in params if p.requires_grad]
    return sum(p.numel() for p in params), sum(trainable), max(trainable, default=0)


def state_bytes(cfg: Config, counts: tuple[int, int, int] | None = None) -> float:
    """Weights, gradients and optimizer state of ``cfg``'s model (see WEIGHT_BYTES);
    ``counts``: :func:`count_parameters`' result when the caller has it."""
    total, trainable, largest = counts or count_parameters(cfg)
    return WEIGHT_BYTES * total + TRAINABLE_BYTES * trainable + LARGEST_COPIES * 4 * largest


def estimate(cfg: Config, device: torch.device | str = "cpu") -> StepMemory | None:
    """The estimated peak bytes of one training step of ``cfg`` on ``device``; None for a
    model it does not cover (the LSTM)."""
    device = torch.device(device)
    m = cfg.model
    if m.arch != "transformer":
        return None
    mode = "plain"
    if cfg.privacy.enabled:
        chosen = cfg.privacy.grad_sample_mode  # auto is bk for the Transformer
        mode = "bk" if chosen in ("auto", "bk") else chosen
    scores = keeps_attention_scores(cfg, device)
    # Opacus' hooks / functorch / ew keep what plain training keeps, or a gradient per row
    c = COEFFICIENTS[("bk" if mode == "bk" else "plain", scores)]
    counts = count_parameters(cfg)
    trainable = counts[1]
    rows = physical_rows(cfg)
    L, d, H, T, V = m.n_layer, m.d_model, m.n_head, m.block_size, m.vocab_size
    lm = cfg.train.task == "lm"
    attention = rows * c[2] * L * H * T * T
    activations = rows * (c[1] * L * T * d + c[3] * T * V * lm + c[4] * T * d) + attention
    state = c[0] + state_bytes(cfg, counts)
    if mode in PER_SAMPLE_GRAD_MODES:
        # the per-row gradients form during the backward pass as the activations are freed:
        # the peak is the larger of the two (measured: their sum overestimates by up to 1.4x)
        activations = max(activations, rows * trainable * GRAD_SAMPLE_BYTES)
    return StepMemory(state + activations, state, activations, rows, attention)


def available_memory(device: torch.device | str = "cpu") -> tuple[int, str] | None:
    """(bytes, what) a new allocation can use on ``device``: CUDA's free memory, or the
    kernel's MemAvailable bounded by the cgroup's limit; None when it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {torch.cuda.get_device_name(device)}"
    avail = None
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            line = next(x for x in f if x.startswith("MemAvailable:"))
        avail = int(line.split()[1]) * 1024
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        with contextlib.suppress(OSError, ValueError):
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 2**60:
                room = int(limit) - int(Path(usage_file).read_text())
                avail = room if avail is None else min(avail, room)
            break
    return (avail, "available in RAM") if avail is not None else None


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def check_fits(cfg: Config, device: torch.device | str = "cpu") -> StepMemory | None:
    """Refuse (UserError) a configuration whose estimated step peak exceeds the memory
    available on ``device``; returns the estimate (None: not estimated or not checked)."""
    if not cfg.train.memory_check:
        return None
    est = estimate(cfg, device)
    room = available_memory(device)
    if est is None or room is None:
        return est
    if est.total <= room[0]:
        if torch.device(device).type == "cpu" and est.total * memory.RESIDENT_FACTOR > room[0]:
            # tight: the kept heap's holes (safelm/memory.py) could push it over
            memory.keep_defaults(f"the step's estimated {_gb(est.total)} is close to the "
                                 f"{_gb(room[0])} {room[1]}")
            print(f"memory: {memory.declined()}: glibc frees memory between steps (slower "
                  "steps, less resident memory)", file=sys.stderr)
        else:
            memory.keep_defaults(None)
        return est
    m, t = cfg.model, cfg.train
    parts = f"activations {_gb(est.activations)}"
    if est.attention > 0.3 * est.activations:
        parts += f", of which attention scores {_gb(est.attention)}, growing with the square " \
                 "of model.block_size"
    dp = " (under DP, privacy.max_physical_batch_size splits a batch)" \
        if cfg.privacy.enabled and not cfg.privacy.max_physical_batch_size else ""
    raise UserError(
        f"one training step with model.block_size={m.block_size} and train.batch_size="
        f"{t.batch_size} needs about {_gb(est.total)} ({parts}), more than the {_gb(room[0])} "
        f"{room[1]}; lower model.block_size or train.batch_size{dp}, or set "
        "train.memory_check=false to try anyway")


def glibc_allocated():
    """glibc's bytes in use (heap chunks + mmap-ed chunks), or None off glibc >= 2.33."""

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = MallInfo2

    def allocated() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd
    return allocated


class Peak:
    """The result of :func:`peak_allocated`: ``bytes`` above the state at entry."""

    bytes: int = 0


@contextlib.contextmanager
def peak_allocated() -> Iterator[Peak]:
    """Measure the most CPU memory allocated at once inside the block, above the state at
    entry: glibc's bytes in use read after every aten operation (the CPU counterpart of
    ``torch.cuda.max_memory_allocated``). Raises RuntimeError off glibc."""
    from .privacy.internals import dispatch_mode  # the one home of torch's private names
    allocated = glibc_allocated()
    if allocated is None:
        raise RuntimeError("peak_allocated needs glibc >= 2.33 (mallinfo2)")
    base = allocated()
    top = [base]

    class AfterEachOp(dispatch_mode()):  # type: ignore[misc]
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            top[0] = max(top[0], allocated())
            return out

    result = Peak()
    try:
        with AfterEachOp():
            yield result
    finally:
        result.bytes = top[0] - base

