"""A module with one op for each Neural Engine rule (mobile_targets/neural_engine.py), for the
Core ML and Core AI census tests: a dilated convolution, a gather, and a sine computed in fp32
whatever the module's own precision."""

from __future__ import annotations

import torch


class RuleProbe(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dilated = torch.nn.Conv2d(2, 2, 3, dilation=2, padding=2)
        self.register_buffer("rows", torch.tensor([2, 0, 1]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        picked = torch.index_select(self.dilated(x), 2, self.rows)
        return torch.sin(picked.float()).to(picked.dtype) * 2.0
