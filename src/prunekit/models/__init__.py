"""Reference architectures used by the benchmarks, in a registry."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from prunekit.models.cifar import VGGBN, CifarResNet, DenseNet, MobileNetV2, resnet20, resnet56
from prunekit.models.lenet import LeNet5Caffe, LeNet300100

_MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet300_100": LeNet300100,
    "lenet5_caffe": LeNet5Caffe,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "vgg_bn": VGGBN,
    "mobilenet_v2": MobileNetV2,
    "densenet": DenseNet,
}


def available_models() -> list[str]:
    """Registered model names."""
    return sorted(_MODELS)


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, **kwargs: Any
) -> nn.Module:
    """Instantiate a registered model for inputs of ``input_shape`` (without the batch dimension)."""
    try:
        factory = _MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; available: {', '.join(available_models())}"
        ) from None
    return factory(input_shape=tuple(input_shape), num_classes=num_classes, **kwargs)


__all__ = [
    "VGGBN",
    "CifarResNet",
    "DenseNet",
    "LeNet5Caffe",
    "LeNet300100",
    "MobileNetV2",
    "available_models",
    "build_model",
    "resnet20",
    "resnet56",
]
