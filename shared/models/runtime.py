"""Device selection and mixed precision, in one place for every model entry point.

On CUDA the models run under bf16 autocast (weights stay fp32, so training and
checkpoints are unaffected); on the CPU they run in plain fp32, because CPU bf16
matmuls are slow on most machines and change numerics for no gain.
"""
from __future__ import annotations

import contextlib
import re
from typing import ContextManager

import torch

_CUDA_INDEX = re.compile(r"^cuda:(\d+)$")


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """Turn ``auto | cpu | cuda | cuda:N`` into a device, or raise ValueError saying why not."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if not isinstance(spec, str):
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N (got {spec!r})")
    name = spec.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or _CUDA_INDEX.match(name):
        if not torch.cuda.is_available():
            raise ValueError(f"device '{spec}': CUDA is not available on this machine")
        match = _CUDA_INDEX.match(name)
        if match and int(match.group(1)) >= torch.cuda.device_count():
            raise ValueError(f"device '{spec}': only {torch.cuda.device_count()} CUDA device(s) present")
        return torch.device(name)
    raise ValueError(f"device: expected auto, cpu, cuda or cuda:N (got {spec!r})")


def autocast(device: str | torch.device) -> ContextManager:
    """bf16 autocast on CUDA, a no-op elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
