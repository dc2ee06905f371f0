"""Adversarial feature alignment (FedDA's local objective), in plain PyTorch. Two designs:

**Domain-adversarial alignment among sites** (:class:`DomainAdversarialTrainer`, FedDA's default). The model carries
a domain head (:class:`~medflare.segmentation.networks.DomainHeadUNet`) that predicts from pooled bottleneck features
which site an image came from. Each site trains the head towards its own index on its own (detached) features; the
server averages the head with the rest of the model, and the average of these one-class updates is a step of a K-way
site classifier over everybody's features, although no feature leaves a site. The encoder, in turn, is trained to
confuse the *received* (frozen) head: cross-entropy of its prediction against the uniform distribution. Once the encoder
wins, one site's features cannot be told apart from another's: the modalities are aligned among sites. Per step:
``L = DiceCE + lambda_t * CE(head_received(f), uniform)`` for the model; the head's own loss
``CE(head(f.detach()), site)`` is accumulated and applied once per round (see :class:`DomainAdversarialTrainer`).

**Alignment to a target encoder** (:class:`AdversarialSegmentationTrainer`, the reconstruction of the paper's
summary; mode ``"target"``). A site's *source* features are its local encoder's bottleneck features of a local batch;
*target* features are the same batch encoded by a frozen reference encoder: the received global encoder (FedDA-joint) or
a peer site's encoder from the previous round (FedDA-cyclic). A local, patch-level discriminator learns to tell them
apart, and the encoder learns to make its features indistinguishable from the target's, so that features become
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

from ..segmentation.networks import FeatureUNet
from ..segmentation.training import SegmentationTrainer, TrainResult, make_optimizer


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
        model: a :class:`~medflare.segmentation.networks.FeatureUNet`.
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
        self.current_weight = adv_weight  # the executor sets each round's value (warm-up ramp)
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
        pred = model.domain_logits(model.encode(batch["image"].to(device))).argmax(dim=1)
        hits += int((pred == domain_index).sum())
        total += pred.numel()
    model.train(was_training)
    return hits / max(total, 1)


class DomainAdversarialTrainer(SegmentationTrainer):
    """:class:`SegmentationTrainer` with domain-adversarial alignment among sites (see the module docstring).

    The domain head learns by *federated gradient descent*: during a round the site only accumulates the head's
    gradient (cross-entropy towards its own index, on detached features, at the received head); at the end of the
    round it takes one step ``head -= head_lr * mean gradient``. Every site steps from the same received head, so the
    server's average of the sites' heads is exactly one gradient step of the K-way classifier on all sites'
    features, which no site could compute alone. (Ordinary local SGD on one class per site would let every site's
    head drift to "always my site", and their average predicts one site for everything.) At the end of the round the
    site also sets the model's ``domain_mean``/``domain_var`` to its training features' statistics.

    Args:
        model: a :class:`~medflare.segmentation.networks.DomainHeadUNet`.
        device: training device.
        domain_index: this site's index among the ``model.n_domains`` sites.
        adv_weight: weight of the encoder's confusion loss once warm-up is over.
        head_lr: step size of the head's round step.
        **kwargs: :class:`SegmentationTrainer` arguments.
    """

    def __init__(self, model: nn.Module, device: torch.device, domain_index: int, adv_weight: float = 0.1,
                 head_lr: float = 0.1, **kwargs: Any) -> None:
        if not hasattr(model, "domain_head"):
            raise TypeError("domain-adversarial alignment needs a model with a domain head (model name "
                            "'unet_domain')")
        if not 0 <= domain_index < model.n_domains:
            raise ValueError(f"domain index {domain_index} is outside the model's {model.n_domains} domains")
        self.domain_index = domain_index
        self.head_lr = head_lr
        self.current_weight = adv_weight  # the executor sets each round's value (warm-up ramp)
        self.received_head: Optional[nn.Module] = None
        self._pooled: list = []
        self._head_steps = 0
        super().__init__(model, device, **kwargs)

    def new_optimizer(self) -> torch.optim.Optimizer:
        """The model's optimiser, without the domain head (it takes one gradient step per round instead)."""
        head = {id(p) for p in self.model.domain_head.parameters()}
        params = [p for p in self.model.parameters() if id(p) not in head]
        return make_optimizer(params, self.optimizer_name, self.lr, self.weight_decay)

    def start_round(self) -> None:
        """Freeze a copy of the received head for the encoder's confusion loss and clear the head's gradient."""
        super().start_round()
        head = copy.deepcopy(self.model.domain_head)
        for p in head.parameters():
            p.requires_grad_(False)
        self.received_head = head
        self.model.domain_head.zero_grad(set_to_none=True)
        self._pooled, self._head_steps = [], 0

    def training_step(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
        if self.received_head is None:
            self.start_round()
        logits, features = self.model.forward_with_features(images)
        target = torch.full((images.shape[0],), self.domain_index, dtype=torch.long, device=images.device)
        self._pooled.append(self.model.pool(features).detach())
        head_logits = self.model.domain_logits(features.detach())
        terms = {"seg": self.loss_fn(logits, labels), "head": F.cross_entropy(head_logits, target)}
        if self.current_weight > 0:
            terms["adv"] = self.current_weight * confusion_loss(self.model.domain_logits(features, self.received_head))
        out = self.optimise(terms)  # the head is not in the optimiser: its gradient accumulates over the round
        self._head_steps += 1
        out["head_acc"] = float((head_logits.argmax(dim=1) == target).float().mean())
        return out

    def fit(self, *args: Any, **kwargs: Any) -> TrainResult:
        result = super().fit(*args, **kwargs)
        if not result.aborted and self._head_steps:
            with torch.no_grad():
                for p in self.model.domain_head.parameters():
                    if p.grad is not None:
                        p -= self.head_lr * p.grad / self._head_steps
                pooled = torch.cat(self._pooled)
                self.model.domain_mean.copy_(pooled.mean(dim=0))
                self.model.domain_var.copy_(pooled.var(dim=0, unbiased=False))
            self.model.domain_head.zero_grad(set_to_none=True)
        self.received_head = None
        return result
