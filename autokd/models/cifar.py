"""The CIFAR model family of the distillation literature (CRD and torchdistill conventions).

Every model takes ``num_classes`` and ``in_channels`` and ends with adaptive average pooling,
so any input of at least 8x8 works (32x32 is the design size). Stage names are stable because
feature taps address them by module path: ResNets and WRNs name their stages ``layer1..3``
(WRNs end with the BN ``bn``), VGG ``block0..4``, MobileNetV2 ``stages`` + ``conv2``, ShuffleNets
``layer1..3`` (+ ``conv2`` for V2).

Published parameter counts (10 classes for ResNet, 100 for the others as in CRD tables):
ResNet-20 0.27M, ResNet-56 0.86M, ResNet-110 1.7M, ResNet-32x4 7.4M, WRN-40-2 2.2M, VGG-13 9.5M,
MobileNetV2 (width 0.5) 0.8M, ShuffleNetV1 0.9M, ShuffleNetV2 1.3M.

References: He et al., "Deep Residual Learning for Image Recognition" (CIFAR ResNets, 6n+2);
Zagoruyko & Komodakis, "Wide Residual Networks"; Sandler et al., "MobileNetV2"; Zhang et al.,
"ShuffleNet"; Ma et al., "ShuffleNet V2"; Tian et al., "Contrastive Representation
Distillation" (the x4 widths, the half-width MobileNetV2 and the VGG variants with BN).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True):
    layers: List[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        # Projection shortcut (1x1 conv + BN) whenever the shape changes, as in CRD's CIFAR ResNets.
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet with depth 6n+2: a 3x3 stem, three stages of n basic blocks (strides 1, 2, 2)."""

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int, in_channels: int):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet: expected depth 6n+2 >= 8, got {depth}")
        n = (depth - 2) // 6
        stem, w1, w2, w3 = widths
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.layer1 = self._stage(stem, w1, n, 1)
        self.layer2 = self._stage(w1, w2, n, 2)
        self.layer3 = self._stage(w2, w3, n, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)
        _init_weights(self)

    @staticmethod
    def _stage(cin: int, cout: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            *[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]
        )

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))  # [N, w3, H/4, W/4]
        return self.fc(torch.flatten(self.pool(x), 1))


# -------------------------------------------------------------------------------------- WRN


class WideBlock(nn.Module):
    """Pre-activation block (BN-ReLU-conv twice); the shortcut sees the activated input when
    the shape changes, as in the WRN paper."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.project = (
            nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x):
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return out + (self.project(a) if self.project is not None else x)


class WideResNet(nn.Module):
    """WRN-d-k: depth d = 6n+4, widths 16k/32k/64k, final BN-ReLU before pooling."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN: expected depth 6n+4 >= 10, got {depth}")
        n = (depth - 4) // 6
        w = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.layer1 = nn.Sequential(
            *[WideBlock(w[0] if i == 0 else w[1], w[1], 1) for i in range(n)]
        )
        self.layer2 = nn.Sequential(
            *[WideBlock(w[1] if i == 0 else w[2], w[2], 2 if i == 0 else 1) for i in range(n)]
        )
        self.layer3 = nn.Sequential(
            *[WideBlock(w[2] if i == 0 else w[3], w[3], 2 if i == 0 else 1) for i in range(n)]
        )
        self.bn = nn.BatchNorm2d(w[3])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w[3], num_classes)
        _init_weights(self)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))  # [N, 64k, H/4, W/4]
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(self.pool(x), 1))


# -------------------------------------------------------------------------------------- VGG


class CifarVGG(nn.Module):
    """VGG with BN: five blocks of 3x3 conv-BN-ReLU; 2x2 max pooling after the first three
    (the fourth too when the input is at least 64 pixels high), then global average pooling and
    one linear layer."""

    def __init__(self, cfg: Sequence[Sequence[int]], num_classes: int, in_channels: int):
        super().__init__()
        blocks = []
        cin = in_channels
        for widths in cfg:
            layers: List[nn.Module] = []
            for cout in widths:
                layers += list(_conv_bn(cin, cout, 3))
                cin = cout
            blocks.append(nn.Sequential(*layers))
        self.block0, self.block1, self.block2, self.block3, self.block4 = blocks
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x):
        x = F.max_pool2d(self.block0(x), 2)
        x = F.max_pool2d(self.block1(x), 2)
        x = F.max_pool2d(self.block2(x), 2)
        x = self.block3(x)
        if x.shape[-2] >= 8:
            x = F.max_pool2d(x, 2)
        x = self.block4(x)  # [N, 512, H/8, W/8] on 32x32
        return self.fc(torch.flatten(self.pool(x), 1))


# ------------------------------------------------------------------------------ MobileNetV2


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: List[nn.Module] = []
        if expand != 1:
            layers += list(_conv_bn(cin, hidden, 1))
        layers += list(_conv_bn(hidden, hidden, 3, stride, groups=hidden))
        layers += list(_conv_bn(hidden, cout, 1, relu=False))
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.body(x)
        return x + out if self.residual else out


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs at width multiplier ``width`` (CRD's student uses 0.5).

    Stem stride 2 then the paper's seven stages (t, c, n, s), with the stride of the second
    stage set to 1 for small images; the last 1x1 conv keeps 1280 channels for width <= 1.
    """

    SETTINGS = [
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]

    def __init__(self, num_classes: int, in_channels: int, width: float = 0.5):
        super().__init__()
        cin = int(32 * width)
        self.conv1 = _conv_bn(in_channels, cin, 3, stride=2)
        stages = []
        for t, c, n, s in self.SETTINGS:
            cout = int(c * width)
            blocks = []
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = _conv_bn(cin, last, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)
        _init_weights(self)

    def forward(self, x):
        x = self.conv2(self.stages(self.conv1(x)))  # [N, 1280, H/16, W/16]
        return self.fc(torch.flatten(self.pool(x), 1))


# ----------------------------------------------------------------------------- ShuffleNets


def _channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Unit(nn.Module):
    """Grouped 1x1 -> shuffle -> depthwise 3x3 -> grouped 1x1; on stride 2 the shortcut is a
    3x3 average pool concatenated with the branch (the branch makes up the missing channels)."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        branch_out = cout - cin if stride == 2 else cout
        mid = branch_out // 4  # the bottleneck is a quarter of what the branch outputs
        # The first unit after the 24-channel stem has too few input channels to group.
        g1 = 1 if cin == 24 else groups
        self.groups = g1
        self.conv1 = _conv_bn(cin, mid, 1, groups=g1)
        self.conv2 = _conv_bn(mid, mid, 3, stride, groups=mid, relu=False)
        self.conv3 = _conv_bn(mid, branch_out, 1, groups=groups, relu=False)

    def forward(self, x):
        out = self.conv3(self.conv2(_channel_shuffle(self.conv1(x), self.groups)))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        widths=(240, 480, 960),
        depths=(4, 8, 4),
        groups: int = 3,
    ):
        super().__init__()
        self.conv1 = _conv_bn(in_channels, 24, 1)
        cin = 24
        stages = []
        for cout, n in zip(widths, depths):
            units = []
            for i in range(n):
                units.append(ShuffleV1Unit(cin, cout, 2 if i == 0 else 1, groups))
                cin = cout
            stages.append(nn.Sequential(*units))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))  # [N, 960, H/8, W/8]
        return self.fc(torch.flatten(self.pool(x), 1))


class ShuffleV2Unit(nn.Module):
    """Stride 1: split channels in half, transform one half, concat, shuffle.
    Stride 2: both paths see the whole input and each produces half of the output."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        half = cout // 2
        branch_in = cin if stride == 2 else cin // 2
        self.branch = nn.Sequential(
            _conv_bn(branch_in, half, 1),
            _conv_bn(half, half, 3, stride, groups=half, relu=False),
            _conv_bn(half, half, 1),
        )
        if stride == 2:
            self.shortcut = nn.Sequential(
                _conv_bn(cin, cin, 3, stride, groups=cin, relu=False),
                _conv_bn(cin, half, 1),
            )

    def forward(self, x):
        if self.stride == 2:
            out = torch.cat([self.shortcut(x), self.branch(x)], 1)
        else:
            keep, work = x.chunk(2, dim=1)
            out = torch.cat([keep, self.branch(work)], 1)
        return _channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        widths=(116, 232, 464),
        depths=(4, 8, 4),
        last: int = 1024,
    ):
        super().__init__()
        self.conv1 = _conv_bn(in_channels, 24, 3)
        cin = 24
        stages = []
        for cout, n in zip(widths, depths):
            units = []
            for i in range(n):
                units.append(ShuffleV2Unit(cin, cout, 2 if i == 0 else 1))
                cin = cout
            stages.append(nn.Sequential(*units))
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = _conv_bn(cin, last, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)
        _init_weights(self)

    def forward(self, x):
        x = self.conv2(self.layer3(self.layer2(self.layer1(self.conv1(x)))))  # [N, 1024, H/8, W/8]
        return self.fc(torch.flatten(self.pool(x), 1))
