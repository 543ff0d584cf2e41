"""Which torch device to run on: the user's choice, checked, or with "auto" the best one this machine has."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tinyllm.errors import TinyLLMError


class DeviceError(TinyLLMError):
    """An unknown device name, or a device this machine does not have."""


def _available(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return torch.backends.mps.is_available()
    return kind == "cpu"


def detect_device(requested: str = "auto", *, prefer: Sequence[str] = ("cuda", "mps")) -> torch.device:
    """`requested` ("cpu", "cuda", "cuda:N", "mps"), checked; "auto": the first of `prefer` this machine has,
    else the CPU.

    Raises:
        DeviceError: the name is not a device, or this machine lacks it.
    """
    if requested == "auto":
        return torch.device(next((kind for kind in prefer if _available(kind)), "cpu"))
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise DeviceError(f"unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type in ("cuda", "mps") and not _available(device.type):
        raise DeviceError(
            f"device {requested} requested but {device.type.upper()} is not available here; use auto or cpu"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device {requested} requested but this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device {requested!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device
