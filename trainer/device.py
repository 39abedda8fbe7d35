"""Where training and evaluation run, and in which precision.

``train.device``: ``auto`` (CUDA when torch sees a GPU, else the CPU), ``cpu``, ``cuda`` or
``cuda:N``. ``train.amp``: ``off``, ``bf16`` or ``fp16`` autocast for the forward passes;
losses, softmax and LayerNorm stay fp32 (the loss functions and heads cast explicitly, and
autocast keeps softmax / layer_norm in fp32 on CUDA). fp16 uses a gradient scaler.
"""

from __future__ import annotations

import contextlib

import torch

AMP_MODES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """The device a config names; ``auto`` picks CUDA when present. A CUDA device that is
    not there is a clear error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"train.device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"train.device {name!r}: torch sees no CUDA GPU here (CPU-only torch "
                             "or no driver); use train.device=auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"train.device {name!r}: only {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"train.device {name!r} unsupported; use auto, cpu, cuda or cuda:N")
    return device


def autocast(device: torch.device, amp: str):
    """The autocast context for ``amp`` on ``device`` (a no-op when ``off``)."""
    if amp not in AMP_MODES:
        raise ValueError(f"train.amp {amp!r} unknown; choose one of {list(AMP_MODES)}")
    dtype = AMP_MODES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    if dtype is torch.float16 and device.type == "cpu":
        raise ValueError("train.amp fp16 needs a GPU; on the CPU use bf16 or off")
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 (its small range underflows gradients); None otherwise."""
    if amp == "fp16":
        return torch.amp.GradScaler(device.type)
    return None
