"""Adversarial feature alignment (FedDA's local objective), in plain PyTorch.

A site's *source* features are its local encoder's bottleneck features of a local batch; *target* features are the
same batch encoded by a frozen reference encoder: the received global encoder (FedDA-joint) or a peer site's encoder
from the previous round (FedDA-cyclic). A local, patch-level discriminator learns to tell them apart, and the
encoder learns to make its features indistinguishable from the target's, so that features become
modality-invariant. Updates alternate GAN-style per batch:

1. discriminator step: ``L_D = BCE(D(f_target), 1) + BCE(D(f_source), 0)`` on detached features;
2. segmenter step: ``L = DiceCE(seg, y) + lambda_t * BCE(D(f_source), 1)`` with the discriminator frozen.

``lambda_t`` ramps linearly from 0 to ``adv_weight`` over the first ``warmup_rounds`` rounds
(:func:`adversarial_weight`), so alignment starts once the global features mean something.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .networks import FeatureUNet
from .training import SegmentationTrainer


class FeatureDiscriminator(nn.Module):
    """Fully convolutional patch discriminator on feature maps: one logit per patch.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the feature map (the encoder's last level).
        hidden: channels of the hidden layers.
        n_layers: strided 4x4 convolutions (each halves the feature map, down to a minimum of 1).
    """

    def __init__(self, spatial_dims: int, in_channels: int, hidden: int = 64, n_layers: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        layers, cin = [], in_channels
        for i in range(n_layers):
            cout = hidden * (2 ** i)
            layers += [conv(cin, cout, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            cin = cout
        layers.append(conv(cin, 1, kernel_size=3, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def discriminator_loss(disc: nn.Module, source: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """BCE loss of ``disc`` for target = 1, source = 0, and its patch accuracy (for monitoring)."""
    logit_t, logit_s = disc(target), disc(source)
    loss = F.binary_cross_entropy_with_logits(logit_t, torch.ones_like(logit_t)) + \
        F.binary_cross_entropy_with_logits(logit_s, torch.zeros_like(logit_s))
    with torch.no_grad():
        acc = 0.5 * ((logit_t > 0).float().mean() + (logit_s < 0).float().mean())
    return loss, float(acc)


def fooling_loss(disc: nn.Module, source: torch.Tensor) -> torch.Tensor:
    """Encoder's adversarial loss: make the discriminator call source features target (label 1)."""
    logit = disc(source)
    return F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))


def adversarial_weight(round_num: int, adv_weight: float, warmup_rounds: int) -> float:
    """``adv_weight`` ramped linearly over rounds ``0..warmup_rounds`` (round 0 gets 0 when warming up)."""
    if warmup_rounds <= 0:
        return adv_weight
    return adv_weight * min(1.0, round_num / warmup_rounds)


class AdversarialSegmentationTrainer(SegmentationTrainer):
    """:class:`SegmentationTrainer` plus adversarial alignment of the bottleneck features to a target encoder.

    Args:
        model: a :class:`~medflare.networks.FeatureUNet`.
        device: training device.
        adv_weight: weight of the fooling loss once warm-up is over.
        disc_lr: Adam learning rate of the discriminator (betas 0.9, 0.99).
        disc_hidden: hidden channels of the discriminator.
        **kwargs: :class:`SegmentationTrainer` arguments (``lr``, ``fedprox_mu``...).
    """

    def __init__(self, model: FeatureUNet, device: torch.device, adv_weight: float = 0.01, disc_lr: float = 1e-4,
                 disc_hidden: int = 64, **kwargs: Any) -> None:
        if not hasattr(model, "forward_with_features"):
            raise TypeError("adversarial alignment needs a model with forward_with_features (e.g. FeatureUNet)")
        super().__init__(model, device, **kwargs)
        self.discriminator = FeatureDiscriminator(model.dimensions, model.feature_channels, disc_hidden).to(device)
        self.disc_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=disc_lr, betas=(0.9, 0.99))
        self.adv_weight = adv_weight
        self.current_weight = adv_weight
        self.target_encoder: Optional[FeatureUNet] = None

    def set_target(self, weights: Dict[str, torch.Tensor]) -> None:
        """Use a frozen copy of the model with ``weights`` (at least the encoder's) as the target encoder."""
        target = copy.deepcopy(self.model)
        missing = target.encoder_keys() - set(weights)
        if missing:
            raise ValueError(f"target encoder weights lack {sorted(missing)[:5]}")
        state = target.state_dict()
        for k, v in weights.items():
            if k in state:
                state[k].copy_(torch.as_tensor(v).to(state[k].dtype))
        target.eval()
        for p in target.parameters():
            p.requires_grad_(False)
        self.target_encoder = target

    def training_step(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
        if self.target_encoder is None:
            raise RuntimeError("set_target() must be called before adversarial training")
        logits, source = self.model.forward_with_features(images)
        with torch.no_grad():
            target = self.target_encoder.encode(images)
        # 1) discriminator step on detached features
        self.discriminator.requires_grad_(True)
        d_loss, d_acc = discriminator_loss(self.discriminator, source.detach(), target)
        self.disc_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        self.disc_optimizer.step()
        # 2) segmenter step with the discriminator frozen
        self.discriminator.requires_grad_(False)
        terms = {"seg": self.loss_fn(logits, labels)}
        if self.current_weight > 0:
            terms["adv"] = self.current_weight * fooling_loss(self.discriminator, source)
        out = self.optimise(terms)
        out["disc"] = float(d_loss.detach())
        out["disc_acc"] = d_acc
        return out

    def state_dict(self) -> Dict[str, Any]:
        """What must survive a restart: the discriminator and its optimiser."""
        return {"discriminator": self.discriminator.state_dict(), "disc_optimizer": self.disc_optimizer.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        self.disc_optimizer.load_state_dict(state["disc_optimizer"])
