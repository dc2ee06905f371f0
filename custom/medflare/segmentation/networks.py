"""Segmentation networks whose encoder (bottleneck) features can be reached, as feature alignment needs.

:class:`FeatureUNet` *is* a MONAI :class:`~monai.networks.nets.UNet` (same parameters, same ``state_dict`` keys, so
its checkpoints load into a plain MONAI UNet) with three additions: :meth:`FeatureUNet.forward_with_features`
returns the logits together with the bottleneck feature map, :meth:`FeatureUNet.encode` returns only the features
(skipping the decoder), and :meth:`FeatureUNet.encoder_keys` names the encoder's entries of the ``state_dict``.

:data:`SEGMENTATION_REGISTRY` names them for :func:`medflare.networks.build_model`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets import UNet
from torch import nn


class _EncoderDone(Exception):
    """Raised by :meth:`FeatureUNet.encode` to stop the forward pass once the bottleneck has run."""


class FeatureUNet(UNet):
    """MONAI UNet exposing its bottleneck features.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: number of classes (background included).
        channels: feature channels per level, e.g. ``(16, 32, 64)``.
        strides: downsampling strides between levels (one fewer than ``channels``).
        num_res_units: residual units per block.
        norm: normalisation layer: a MONAI name (``"instance"``, ``"batch"``...) or a name and its arguments
            (``["instance", {"affine": true}]``); instance norm keeps no running statistics, which suits FL.
        dropout: dropout probability.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 3,
                 channels: Sequence[int] = (16, 32, 64), strides: Sequence[int] = (2, 2), num_res_units: int = 1,
                 norm: Any = "instance", dropout: float = 0.0) -> None:
        norm = tuple(norm) if isinstance(norm, list) else norm
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                         channels=tuple(channels), strides=tuple(strides), num_res_units=num_res_units, norm=norm,
                         dropout=dropout)
        self.feature_channels = int(channels[-1])
        # module *names*, not references: assigning a module attribute would register it twice in the state_dict
        self._encoder_names: List[str] = self._encoder_module_names()

    def _encoder_module_names(self) -> List[str]:
        """Walk MONAI's nested ``Sequential(down, SkipConnection(...), up)``: down blocks, then the bottom layer."""
        names, prefix, node = [], "model", self.model
        while True:
            names.append(f"{prefix}.0")
            sub = node[1].submodule
            if isinstance(sub, nn.Sequential) and len(sub) == 3 and isinstance(sub[1], SkipConnection):
                prefix, node = f"{prefix}.1.submodule", sub
            else:
                return names + [f"{prefix}.1.submodule"]

    @property
    def _bottleneck(self) -> nn.Module:
        return self.get_submodule(self._encoder_names[-1])

    def forward_with_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits and bottleneck features ``(B, channels[-1], *reduced)``; both keep their autograd graph."""
        captured: Dict[str, torch.Tensor] = {}
        handle = self._bottleneck.register_forward_hook(lambda _m, _i, out: captured.__setitem__("f", out))
        try:
            logits = self(x)
        finally:
            handle.remove()
        return logits, captured["f"]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Bottleneck features only; the decoder is not run."""
        captured: Dict[str, torch.Tensor] = {}

        def stop(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            captured["f"] = out
            raise _EncoderDone

        handle = self._bottleneck.register_forward_hook(stop)
        try:
            self(x)
        except _EncoderDone:
            pass
        finally:
            handle.remove()
        return captured["f"]

    def private_module_names(self) -> List[str]:
        """Modules a site can keep as its own head (:func:`head_keys`): the last up-sampling block."""
        return ["model.2"]

    def encoder_keys(self) -> Set[str]:
        """``state_dict`` keys of the encoder path (down blocks and bottleneck)."""
        return {f"{name}.{k}" for name in self._encoder_names for k in self.get_submodule(name).state_dict()}


class DomainHeadUNet(FeatureUNet):
    """:class:`FeatureUNet` plus a *domain head*: a linear classifier that predicts which of ``n_domains`` sites an
    image came from, from the per-channel mean and standard deviation of its bottleneck features (FedDA's federated
    domain discriminator; see :mod:`medflare.algorithms.alignment`).

    The pooled features are standardised with the buffers ``domain_mean`` and ``domain_var``: each site sets them
    to the statistics of its own training features every round, and FedAvg averages them like any weight (as it does
    BatchNorm's running statistics), so the head sees features on the federation's common scale.

    The head is created after the UNet, so with the same seed the UNet part starts from the same weights as a plain
    ``FeatureUNet``; the ``state_dict`` adds ``domain_head.*``, ``domain_mean`` and ``domain_var``, and ``forward``
    is the UNet's.

    Args:
        n_domains: number of sites (classes of the domain head).
        **kwargs: :class:`FeatureUNet` arguments.
    """

    domain_eps = 1e-2  # variance floor: features that barely vary are not blown up to the scale of the others
    domain_clip = 5.0  # features that drifted during a round stay in a range the head was trained on

    def __init__(self, n_domains: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if n_domains < 2:
            raise ValueError(f"n_domains must be >= 2, got {n_domains}")
        self.n_domains = n_domains
        width = 2 * self.feature_channels
        self.domain_head = nn.Linear(width, n_domains)
        self.register_buffer("domain_mean", torch.zeros(width))
        self.register_buffer("domain_var", torch.ones(width))

    @staticmethod
    def pool(features: torch.Tensor) -> torch.Tensor:
        """Per-channel mean and standard deviation of a feature map ``(B, C, *spatial)``: ``(B, 2C)``."""
        flat = features.flatten(2)
        mean = flat.mean(dim=2)
        std = torch.sqrt(((flat - mean.unsqueeze(2)) ** 2).mean(dim=2) + 1e-6)  # finite gradient for flat maps
        return torch.cat([mean, std], dim=1)

    def standardise(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features on the federation's scale (see the class docstring)."""
        scale = torch.sqrt(self.domain_var.clamp_min(0.0) + self.domain_eps)
        return torch.clamp((pooled - self.domain_mean) / scale, -self.domain_clip, self.domain_clip)

    def domain_logits(self, features: torch.Tensor, head: Optional[nn.Module] = None) -> torch.Tensor:
        """Domain logits of a bottleneck feature map, by this model's head or another (e.g. a frozen copy)."""
        return (head or self.domain_head)(self.standardise(self.pool(features)))


class CalibratedUNet(FeatureUNet):
    """:class:`FeatureUNet` with FedLC's two calibration modules (see :mod:`medflare.algorithms.personalization`), both
    kept at the site with the output head:

    - ``feature_gate``: one value per bottleneck channel; the bottleneck features are multiplied by
      ``2 * sigmoid(gate)`` (1 at initialisation).
    - ``calibration``: a 3x3 convolution, PReLU and a 1x1 convolution from the image and the UNet's class
      probabilities to a correction added to the logits (zero at initialisation).

    At initialisation the network computes exactly what the plain UNet with the same seed does; its UNet entries of
    the ``state_dict`` have the same names.

    Args:
        calibration_channels: hidden channels of the prediction calibration.
        **kwargs: :class:`FeatureUNet` arguments.
    """

    def __init__(self, calibration_channels: int = 8, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        dims = kwargs.get("spatial_dims", 2)
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        in_ch, out_ch = kwargs.get("in_channels", 1), kwargs.get("out_channels", 3)
        self.feature_gate = nn.Parameter(torch.zeros(self.feature_channels))
        self.calibration = nn.Sequential(conv(in_ch + out_ch, calibration_channels, 3, padding=1), nn.PReLU(),
                                         conv(calibration_channels, out_ch, 1))
        nn.init.zeros_(self.calibration[2].weight)
        nn.init.zeros_(self.calibration[2].bias)
        self._bottleneck.register_forward_hook(self._gate)

    def _gate(self, _m: nn.Module, _i: Any, out: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (out.ndim - 2)
        return out * (2.0 * torch.sigmoid(self.feature_gate)).view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return logits + self.calibration(torch.cat([x, torch.softmax(logits, 1)], 1))

    def private_module_names(self) -> List[str]:
        return super().private_module_names() + ["feature_gate", "calibration"]


def head_keys(model: nn.Module) -> Set[str]:
    """``state_dict`` keys of a UNet's output head (the last up-sampling block, which maps the top features to the
    classes) and of any calibration modules (:class:`CalibratedUNet`); empty for a model without them."""
    names = model.private_module_names() if hasattr(model, "private_module_names") else []
    state = model.state_dict()
    return {k for k in state if any(k == n or k.startswith(n + ".") for n in names)}


def norm_layer_keys(model: nn.Module, statistics_only: bool = False, first_only: bool = False) -> Set[str]:
    """``state_dict`` keys of the model's normalisation layers (batch, instance, group and layer norm; found by
    module type, since MONAI's names do not say ``bn``): all their entries, only their running statistics, or only
    those of the first normalisation layer in module order."""
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    stats = ("running_mean", "running_var", "num_batches_tracked")
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, norms)
              and (not statistics_only or any(k in stats for k in module.state_dict()))
              and module.state_dict()]
    if first_only:
        layers = layers[:1]
    return {f"{name}.{key}" for name, module in layers for key in module.state_dict()
            if not statistics_only or key in stats}


SEGMENTATION_REGISTRY: Dict[str, Callable[..., nn.Module]] = {"unet": FeatureUNet, "unet_domain": DomainHeadUNet,
                                                             "unet_calibrated": CalibratedUNet}
"""The segmentation networks by the name a job, a checkpoint or a command line gives them."""
