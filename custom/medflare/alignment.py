"""Adversarial feature alignment (FedDA's local objective), in plain PyTorch. Two designs:

**Domain-adversarial alignment among sites** (:class:`DomainAdversarialTrainer`, FedDA's default). The model carries
a domain head (:class:`~medflare.networks.DomainHeadUNet`) that predicts from pooled bottleneck features which site
an image came from. Each site trains the head towards its own index on its own (detached) features; the server
averages the head with the rest of the model, and the average of these one-class updates is a step of a K-way site
classifier over everybody's features, although no feature leaves a site. The encoder, in turn, is trained to
confuse the *received* (frozen) head: cross-entropy of its prediction against the uniform distribution. Once the
encoder wins, one site's features cannot be told apart from another's: the modalities are aligned among sites.
Per step: ``L = DiceCE + CE(head(f.detach()), site) + lambda_t * CE(head_received(f), uniform)``.

**Alignment to a target encoder** (:class:`AdversarialSegmentationTrainer`, the reconstruction of the paper's
summary; mode ``"target"``). A site's *source* features are its local encoder's bottleneck features of a local batch; *target* features are the
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


def confusion_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` against the uniform distribution over classes (minimal when the prediction is
    uniform, i.e. the classifier cannot tell the classes apart)."""
    return -F.log_softmax(logits, dim=1).mean()


@torch.no_grad()
def domain_accuracy(model: nn.Module, dataset: Any, domain_index: int, device: torch.device,
                    batch_size: int = 32) -> float:
    """Fraction of ``dataset``'s images whose domain-head prediction is ``domain_index`` (this site)."""
    was_training = model.training
    model.eval()
    hits = total = 0
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False):
        features = model.encode(batch["image"].to(device))
        pred = model.domain_head(model.pool(features)).argmax(dim=1)
        hits += int((pred == domain_index).sum())
        total += pred.numel()
    model.train(was_training)
    return hits / max(total, 1)


class DomainAdversarialTrainer(SegmentationTrainer):
    """:class:`SegmentationTrainer` with domain-adversarial alignment among sites (see the module docstring).

    Args:
        model: a :class:`~medflare.networks.DomainHeadUNet`.
        device: training device.
        domain_index: this site's index among the ``model.n_domains`` sites.
        adv_weight: weight of the encoder's confusion loss once warm-up is over.
        **kwargs: :class:`SegmentationTrainer` arguments.
    """

    def __init__(self, model: nn.Module, device: torch.device, domain_index: int, adv_weight: float = 0.1,
                 **kwargs: Any) -> None:
        if not hasattr(model, "domain_head"):
            raise TypeError("domain-adversarial alignment needs a model with a domain head (model name "
                            "'unet_domain')")
        if not 0 <= domain_index < model.n_domains:
            raise ValueError(f"domain index {domain_index} is outside the model's {model.n_domains} domains")
        super().__init__(model, device, **kwargs)
        self.domain_index = domain_index
        self.adv_weight = adv_weight
        self.current_weight = adv_weight
        self.received_head: Optional[nn.Module] = None

    def start_round(self) -> None:
        """Freeze a copy of the received domain head: the encoder confuses the federation's head, not the one
        this site is fitting to its own features during the round."""
        super().start_round()
        head = copy.deepcopy(self.model.domain_head)
        for p in head.parameters():
            p.requires_grad_(False)
        self.received_head = head

    def training_step(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
        if self.received_head is None:
            self.start_round()
        logits, features = self.model.forward_with_features(images)
        pooled = self.model.pool(features)
        target = torch.full((images.shape[0],), self.domain_index, dtype=torch.long, device=images.device)
        head_logits = self.model.domain_head(pooled.detach())
        terms = {"seg": self.loss_fn(logits, labels), "head": F.cross_entropy(head_logits, target)}
        if self.current_weight > 0:
            terms["adv"] = self.current_weight * confusion_loss(self.received_head(pooled))
        out = self.optimise(terms)
        out["head_acc"] = float((head_logits.argmax(dim=1) == target).float().mean())
        return out
