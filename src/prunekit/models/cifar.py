"""Reference networks for structured pruning, for 1×28×28 (MNIST) and 3×32×32 (CIFAR) inputs.

* :func:`resnet20`, :func:`resnet56` — He et al. 2016, CIFAR variant (3 stages of 16/32/64 channels,
  ``n`` basic blocks each), with 1×1-conv + BN projection shortcuts where the shape changes.
* :class:`VGGBN` — VGG-style stack of 3×3 conv + BN + ReLU with max-pooling, global average pooling
  and a linear classifier (``width`` scales the channels).
* :class:`MobileNetV2` — Sandler et al. 2018 style inverted residuals (1×1 expand, 3×3 depthwise,
  1×1 project, residual when shapes match), sized for small images.
* :class:`DenseNet` — Huang et al. 2017, DenseNet-BC style (concatenation followed by batch norm).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images."""

    def __init__(
        self, depth: int = 20, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10
    ):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(input_shape[0], 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers: list[nn.Module] = []
        cin = 16
        for stage, cout in enumerate((16, 32, 64)):
            for block in range(n):
                layers.append(BasicBlock(cin, cout, 2 if stage > 0 and block == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet20(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10) -> CifarResNet:
    """ResNet-20 (0.27M parameters)."""
    return CifarResNet(20, input_shape, num_classes)


def resnet56(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10) -> CifarResNet:
    """ResNet-56 (0.85M parameters)."""
    return CifarResNet(56, input_shape, num_classes)


class VGGBN(nn.Module):
    """VGG-style network with batch norm; ``cfg`` lists channels and ``"M"`` for max-pooling."""

    DEFAULT: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M")

    def __init__(
        self,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        cfg: Sequence[int | str] = DEFAULT,
        width: float = 1.0,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        cin = input_shape[0]
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                cout = max(1, int(int(item) * width))
                layers += [
                    nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(),
                ]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_residual else self.block(x)


class MobileNetV2(nn.Module):
    """MobileNetV2-style network for small images (``width`` scales the channels)."""

    # (expansion, channels, repeats, stride)
    DEFAULT: tuple[tuple[int, int, int, int], ...] = (
        (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 3, 2), (6, 96, 2, 1), (6, 160, 2, 2),
    )  # fmt: skip

    def __init__(
        self,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        width: float = 1.0,
        cfg: Sequence[tuple[int, int, int, int]] = DEFAULT,
        last_channels: int = 640,
    ):
        super().__init__()
        c = max(8, int(32 * width))
        layers: list[nn.Module] = [
            nn.Conv2d(input_shape[0], c, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU6(),
        ]
        for t, channels, repeats, stride in cfg:
            cout = max(8, int(channels * width))
            for i in range(repeats):
                layers.append(InvertedResidual(c, cout, stride if i == 0 else 1, t))
                c = cout
        last = max(8, int(last_channels * width))
        layers += [nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class DenseLayer(nn.Module):
    """BN-ReLU-conv1×1 (bottleneck) then BN-ReLU-conv3×3 producing ``growth`` new channels, which are
    concatenated to the input."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.bn1(x)))
        y = self.conv2(F.relu(self.bn2(y)))
        return torch.cat([x, y], 1)


class DenseNet(nn.Module):
    """DenseNet-BC style network (Huang et al. 2017): every layer's input is the concatenation of all
    earlier feature maps of its block and is batch-normalised first — concatenation followed by batch
    norm everywhere, the pattern whose channel offsets structured pruning must get right."""

    def __init__(
        self,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        growth: int = 12,
        layers: Sequence[int] = (4, 4, 4),
    ):
        super().__init__()
        c = 2 * growth
        blocks: list[nn.Module] = [nn.Conv2d(input_shape[0], c, 3, 1, 1, bias=False)]
        for i, n in enumerate(layers):
            for _ in range(n):
                blocks.append(DenseLayer(c, growth))
                c += growth
            if i < len(layers) - 1:  # transition: BN-ReLU-conv1×1 halving the channels, avg-pool
                blocks += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False)]
                blocks.append(nn.AvgPool2d(2))
                c //= 2
        blocks += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))
