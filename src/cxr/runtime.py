"""Where and how the computation runs, decided once and passed down: the device, the
mixed-precision policy, seeding and RNG state, and the distributed process group."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from cxr.errors import ConfigError

DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N"


def resolve_device(device: str | torch.device = "auto", *, local_rank: int = 0) -> torch.device:
    """The one device rule of cxr: ``auto`` is CUDA when present, else the CPU; a named
    device must exist; a bare ``cuda`` under torchrun is this process's local GPU.

    Raises :class:`ConfigError` for a name torch does not know or a CUDA device that is not
    there, before any work starts.
    """
    if isinstance(device, torch.device):
        return device
    name = str(device).strip()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {device!r} ({DEVICE_HELP})") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} was asked for but no CUDA device is available")
        if resolved.index is None:
            return torch.device("cuda", local_rank)
        count = torch.cuda.device_count()
        if resolved.index >= count:
            raise ConfigError(
                f"--device {name} was asked for but this machine has {count} CUDA device(s)"
                f" (cuda:0 to cuda:{count - 1})"
            )
    return resolved


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX).

    Where it does, oneDNN runs DenseNet121's training step about twice as fast under bf16
    autocast (``benchmarks/cpu_precision.py``); where it does not, bf16 is emulated and slower
    than float32, so autocast stays off.
    """
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(cpu, name)()) for name in checks if hasattr(cpu, name))
    except RuntimeError:  # pragma: no cover - a torch build without the probes
        return False


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Whether this GPU computes bfloat16 in hardware: compute capability 8.0 (Ampere) and up.

    Not ``torch.cuda.is_bf16_supported()``: in current torch it also says yes where bf16 is
    only emulated (T4, V100), where it is slower than fp16 with a GradScaler.
    """
    return torch.cuda.get_device_capability(device) >= (8, 0)


def mixed_precision(requested: bool, device: torch.device) -> tuple[bool, torch.dtype]:
    """``(enabled, dtype)`` for ``torch.autocast``: bf16 where the hardware computes it, else
    fp16 (with a GradScaler) on CUDA, else off."""
    if not requested:
        return False, torch.float32
    if device.type == "cuda":
        return True, torch.bfloat16 if cuda_has_native_bf16(device) else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return True, torch.bfloat16
    return False, torch.float32


def precision_name(enabled: bool, dtype: torch.dtype) -> str:
    """What ``run.json`` and the training line call the precision in use."""
    return f"{str(dtype).removeprefix('torch.')} autocast" if enabled else "float32"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- distributed


@dataclass
class Distributed:
    """This process's place in a torchrun job (one process, rank 0, without torchrun).

    ``backend`` is the process group's (``nccl``, ``gloo``) when the process joined one:
    every process torchrun starts does, even the only one of ``--nproc_per_node=1``, which
    then trains through DistributedDataParallel like each of N would (how a single GPU
    checks the NCCL path, ``tests/test_gpu.py``).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.backend is not None or self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, value) -> list:
        """Every rank's ``value``, in rank order (a list of one without distribution)."""
        if not self.enabled:
            return [value]
        gathered = [None] * self.world_size
        torch_dist.all_gather_object(gathered, value)
        return gathered

    def sync_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's BatchNorm running statistics.

        DDP broadcasts buffers at the start of each forward, but each rank then updates its
        own running statistics with its own batch; without this, ranks would validate slightly
        different models and the gathered predictions would not be those of the saved weights.
        """
        if not self.enabled:
            return
        for buffer in model.buffers():
            torch_dist.broadcast(buffer.data, src=0)


def world_size() -> int:
    """How many processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# What torchrun (and any env:// launcher) sets for each process it starts.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether a launcher such as torchrun started this process (it describes the process
    group in the environment, even for a group of one)."""
    return all(name in os.environ for name in LAUNCHER_VARIABLES)


def setup_distributed(device_name: str) -> Distributed:
    """Join the process group torchrun describes in the environment (no-op without torchrun).

    NCCL on CUDA (``auto`` or ``cuda``), else gloo. ``torchrun --nproc_per_node=1`` joins a
    group of one: training then runs through DDP and its NCCL calls on a single GPU.
    """
    if world_size() <= 1 and not launched_by_torchrun():
        return Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return Distributed(
        rank=torch_dist.get_rank(),
        world_size=torch_dist.get_world_size(),
        local_rank=local_rank,
        backend=str(torch_dist.get_backend()),
    )


# How long the other ranks wait while rank 0 prepares the run (split, image check): a full
# check of 112,120 NIH PNGs takes longer than NCCL's default 10-minute collective timeout.
SETUP_WAIT = timedelta(hours=24)


def setup_wait_group() -> torch_dist.ProcessGroup:
    """A CPU (gloo) group for the one wait while rank 0 prepares the run, with a timeout of
    :data:`SETUP_WAIT`; training's own collectives keep the default timeout, which is what
    catches a rank that hangs in training. Every rank must call it."""
    return torch_dist.new_group(backend="gloo", timeout=SETUP_WAIT)


def teardown_distributed() -> None:
    """Wait for every rank, then leave the process group (no-op without one)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()
