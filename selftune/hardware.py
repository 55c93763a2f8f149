"""The machine selftune runs on: what it is, and whether bfloat16 is the fast dtype on it."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from pydantic import BaseModel

__all__ = ["Hardware", "bfloat16_is_fast", "current_hardware"]


class Hardware(BaseModel):
    """A machine, as recorded beside timings that depend on it."""

    cpu: str
    cores: int
    memory_gib: float
    torch_threads: int
    cpu_capability: str  # the vector instructions torch uses here: AVX2, AVX512, ...
    accelerator: str | None = None  # CUDA device name; None on a CPU-only machine


def bfloat16_is_fast() -> bool:
    """Whether bfloat16 matmuls beat float32 on this CPU.

    With AVX-512, oneDNN's bf16 kernels run generation and LoRA steps about 2x faster than
    float32; on an AVX2-only CPU bf16 is emulated and a long prompt prefills about 5x slower
    (``benchmarks/dtype.py``, docs/performance.md).
    """
    import torch

    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def current_hardware() -> Hardware:
    import torch

    return Hardware(
        cpu=_cpu_name(),
        cores=os.cpu_count() or 1,
        memory_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        torch_threads=torch.get_num_threads(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        accelerator=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    )
