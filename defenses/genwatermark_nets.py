"""GenWatermark's generator G and detector D (Ma et al., 2023; defenses/genwatermark.py, docs/genwatermark.md): their
own module so that importing the defense does not import torch (bench/lazy.py)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Generator(nn.Module):
    """G: x in [-1, 1] -> bounded residual. Four 3x3 convs (3 -> c -> c -> c -> 3), LeakyReLU(0.2), with a
    half-resolution branch (avg-pool 2, two 3x3 convs, nearest upsample) added before the last conv so G can also
    place low-frequency structure; output tanh(.) * bound. Not the paper's (unpublished) architecture."""

    def __init__(self, channels: int, bound: float) -> None:
        super().__init__()
        c = channels
        self.bound = bound
        self.inp = nn.Conv2d(3, c, 3, padding=1)
        self.mid = nn.Conv2d(c, c, 3, padding=1)
        self.low = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(c, c, 3, padding=1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(c, c, 3, padding=1), nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2))
        self.fuse = nn.Conv2d(c, c, 3, padding=1)
        self.out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.inp(x), 0.2)
        h = F.leaky_relu(self.mid(h), 0.2)
        h = h + self.low(h) if h.shape[-1] % 2 == 0 and h.shape[-2] % 2 == 0 else h
        h = F.leaky_relu(self.fuse(h), 0.2)
        return torch.tanh(self.out(h)) * self.bound


class Detector(nn.Module):
    """D: x in [-1, 1] -> one logit. Four 3x3 conv blocks (3 -> c -> 2c -> 2c -> 4c, strides 1, 2, 2, 2,
    LeakyReLU(0.2)), global average and max pooling concatenated, a linear layer. Fully convolutional, so any
    resolution. Not the paper's (unpublished) architecture."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels
        self.body = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), nn.LeakyReLU(0.2))
        self.head = nn.Linear(8 * c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.head(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)).squeeze(1)
