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


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters (modest scale, so fp32 outputs stay O(1..10))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(0.3 + 0.4 * torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.rand(n, generator=g) - 0.1)
    return model.eval()


class Coupled(nn.Module):
    """Two convs added (option-B style residual), a depthwise conv after them, and a concat."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c = nn.Conv2d(8, 6, 3, padding=1)
        self.d = nn.Conv2d(3, 4, 3, padding=1)
        self.e = nn.Conv2d(10, 5, 1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.dw(F.relu(self.bn_a(self.a(x)) + self.b(x))))
        z = torch.cat([F.relu(self.c(y)), F.relu(self.d(x))], 1)
        return self.fc(F.relu(self.e(z)).mean((2, 3)))
