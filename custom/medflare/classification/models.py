"""Classifiers: a small CNN that learns the synthetic benchmark, and MONAI DenseNet-121 / ResNet-18 options.

A flatten + linear head stayed at chance on the synthetic task (the lesion can be anywhere); the global max-pool
head of :class:`TinyCNN` makes the classifier a translation-invariant lesion detector.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch
from monai.networks.blocks import Convolution
from torch import nn


class TinyCNN(nn.Module):
    """Conv-BN-ReLU blocks (MONAI ``Convolution``) + global max pooling + linear head.

    Args:
        in_channels: image channels.
        num_classes: output classes.
        channels: feature channels of each block.
        strides: stride of each block.
        spatial_dims: 2 or 3.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 4, channels: Sequence[int] = (16, 32, 64, 64),
                 strides: Sequence[int] = (1, 2, 1, 2), spatial_dims: int = 2) -> None:
        super().__init__()
        if len(channels) != len(strides):
            raise ValueError("channels and strides must have the same length")
        layers, cin = [], in_channels
        for cout, stride in zip(channels, strides):
            layers.append(Convolution(spatial_dims, cin, cout, strides=stride, kernel_size=3, act="RELU",
                                      norm="BATCH"))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return self.head(torch.amax(f, dim=tuple(range(2, f.ndim))))


def densenet121(in_channels: int = 1, num_classes: int = 4, spatial_dims: int = 2, **kwargs) -> nn.Module:
    """MONAI DenseNet-121 (randomly initialised)."""
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes, **kwargs)


def resnet18(in_channels: int = 1, num_classes: int = 4, spatial_dims: int = 2, **kwargs) -> nn.Module:
    """MONAI ResNet-18 (randomly initialised)."""
    from monai.networks.nets import resnet18 as _resnet18

    return _resnet18(spatial_dims=spatial_dims, n_input_channels=in_channels, num_classes=num_classes, **kwargs)


CLASSIFIER_REGISTRY: Dict[str, Callable[..., nn.Module]] = {
    "tiny_cnn": TinyCNN,
    "densenet121": densenet121,
    "resnet18": resnet18,
}
