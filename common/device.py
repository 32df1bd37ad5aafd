"""The torch device of a command's --device flag (model sample, eval checkpoint, eval watch): chosen and checked
in one place, so a device this machine does not have is one line, never a traceback from deep inside torch."""
from __future__ import annotations

from .errors import UsageError


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
