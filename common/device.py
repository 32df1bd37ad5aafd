"""The torch device of a command's --device flag (model sample, eval checkpoint, eval watch): chosen and checked
in one place, so a device this machine does not have is one line, never a traceback from deep inside torch."""
from __future__ import annotations

import ctypes
import platform

from .errors import UsageError

# glibc's mallopt parameters (malloc.h), and the largest mmap threshold it accepts on 64-bit (HEAP_MAX_SIZE / 2)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 * 2**20
TRIM_THRESHOLD = 2**30


def torch_device(name: str | None) -> str:
    """`name`, or cuda when torch sees a GPU, else cpu. A device torch cannot use here (a CPU-only torch asked for
    cuda, cuda:7 on a one-GPU node, a typo) is a usage error naming --device."""
    import torch  # here, not at import: the commands' --help and argument errors stay fast
    device = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, ValueError, AssertionError) as exc:  # torch's kinds for a bad or absent device
        raise UsageError(f"--device {device} is not usable here: {str(exc).splitlines()[0]}") from None
    return device


def reuse_freed_cpu_memory() -> bool:
    """Have glibc's malloc keep freed blocks under 32 MiB for reuse. A training step on the CPU frees and allocates
    the same tens of MiB every update (a chunk of logits, the gradients); by default glibc returns blocks that
    large to the kernel and the next update page-faults them in again: about 28,000 faults per update of the tiny
    recipe, a share of its time that changed from process to process with malloc's history (docs/benchmarks.md).
    The CUDA caching allocator does the same for GPU tensors. Process-wide; False where the C library is not
    glibc (nothing changed)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # A fixed mmap threshold also stops glibc adjusting it from the sizes freed, which made one process fault on
    # every update and the next not at all.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
