"""Small custom nets shared by tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PadNet(nn.Module):
    """Two convs with an ``F.pad`` between them: on the channels (``channel_pad``) or spatially. Input 1x3x8x8."""

    def __init__(self, channel_pad: bool = True) -> None:
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 6, 3), nn.Linear(6, 2)
        self.pad = (0, 0, 0, 0, 1, 1) if channel_pad else (1, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.pad(F.relu(self.c1(x)), self.pad)
        return self.fc(self.c2(y if y.shape[1] == 4 else y[:, :4]).mean((2, 3)))
