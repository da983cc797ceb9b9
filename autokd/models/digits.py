"""Small CNNs sized for the embedded default data set (8x8 one-channel digits).

The teacher is a few tens of thousands of parameters; the student is about thirty times
smaller and, alone, clearly weaker: the pair leaves room for distillation to show. Both work
on any input of at least 8x8 (adaptive pooling at the end) and expose a ``features`` stage
whose output [N, C, H/2, W/2] is the default tap.
"""

from __future__ import annotations

import torch
from torch import nn

from autokd.models.cifar import _conv_bn, _init_weights


class DigitsTeacher(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(in_channels, width, 3), _conv_bn(width, width, 3))
        self.down = nn.MaxPool2d(2)
        self.features = nn.Sequential(
            _conv_bn(width, 2 * width, 3), _conv_bn(2 * width, 2 * width, 3)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)
        _init_weights(self)

    def forward(self, x):
        x = self.features(self.down(self.stem(x)))  # [N, 2w, H/2, W/2]
        return self.fc(torch.flatten(self.pool(x), 1))


class DigitsStudent(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 8):
        super().__init__()
        self.stem = _conv_bn(in_channels, width, 3)
        self.down = nn.MaxPool2d(2)
        self.features = _conv_bn(width, 2 * width, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)
        _init_weights(self)

    def forward(self, x):
        x = self.features(self.down(self.stem(x)))  # [N, 2w, H/2, W/2]
        return self.fc(torch.flatten(self.pool(x), 1))
