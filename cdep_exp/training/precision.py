"""Mixed precision of the training step (`trainer.precision`)."""
from __future__ import annotations

import contextlib

import torch

from cdep_exp.training.settings import PRECISIONS


class Precision:
    """Mixed precision of the training step: "32" (off), "bf16" (torch.autocast to bfloat16,
    CPU and CUDA) or "16" (float16 autocast with a gradient scaler, CUDA only). Losses and the
    penalty are taken in float32; evaluation stays float32. Raises ValueError for an unknown
    precision or float16 without CUDA."""

    def __init__(self, precision: str | int = "32", device: torch.device = torch.device("cpu")) -> None:
        precision = str(precision)
        if precision not in PRECISIONS:
            raise ValueError(f"trainer.precision={precision!r} must be one of {', '.join(PRECISIONS)}")
        if precision == "16" and device.type != "cuda":
            raise ValueError("trainer.precision=16 needs a CUDA device (float16 with a gradient scaler); "
                             "use trainer.precision=bf16 on CPU")
        self.device_type = device.type
        self.dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()
