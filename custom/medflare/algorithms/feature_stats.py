"""Per-class feature statistics of a site, and alignment of a site's features to the other sites' statistics.

FedDA's claim is adversarial learning *among* sites. When only weights travel, a site's discriminator only ever
sees features of its own images, so it cannot compare one site's feature distribution with another's. The
``"stats"`` design shares, besides the weights, a low-dimensional summary of each site's encoder features: for every
class (tissue), the mean and the variance of the bottleneck feature vectors at the locations of that class
(``num_classes x channels`` means and as many variances; 2 x 4 x 64 = 512 numbers per site for the default brain
model). A site then trains a local *site discriminator* on its own feature vectors (its own index) and on vectors
drawn from the other sites' class-conditional Gaussians (their indices), and its encoder learns to confuse that
discriminator. Images, labels and feature maps never leave a site.

This module holds the pure parts: the statistics (:func:`class_feature_sums`, :class:`FeatureStatistics`), the
virtual samples (:func:`sample_peer_features`) and the trainer (:class:`StatisticsAlignmentTrainer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..segmentation.training import SegmentationTrainer
from .alignment import confusion_loss

VARIANCE_FLOOR = 1e-4
MOMENT_SCALE_FLOOR = 1e-2


def location_classes(labels: torch.Tensor, feature_shape: Sequence[int], num_classes: int,
                     purity: float = 0.5) -> torch.Tensor:
    """The class of every feature-map location: the label class covering more than ``purity`` of the image region
    the location pools, or -1 where none does.

    Args:
        labels: ``(B, 1, *spatial)`` integer label maps.
        feature_shape: spatial shape of the feature map (each dimension divides the label's).
        num_classes: classes including background.
        purity: smallest fraction of a class in a location's region.

    Returns:
        ``(B, *feature_shape)`` long tensor.
    """
    onehot = F.one_hot(labels[:, 0].long(), num_classes).movedim(-1, 1).float()
    pool = F.adaptive_avg_pool2d if labels.ndim == 4 else F.adaptive_avg_pool3d
    fractions = pool(onehot, tuple(feature_shape))
    best, cls = fractions.max(dim=1)
    return torch.where(best > purity, cls, torch.full_like(cls, -1))


def flatten_locations(features: torch.Tensor, classes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Feature vectors ``(N, C)`` and classes ``(N,)`` of every location that has a class."""
    vectors = features.movedim(1, -1).reshape(-1, features.shape[1])
    flat = classes.reshape(-1)
    keep = flat >= 0
    return vectors[keep], flat[keep]


def class_feature_sums(vectors: torch.Tensor, classes: torch.Tensor, num_classes: int) -> Tuple[torch.Tensor, ...]:
    """Per-class count ``(K,)``, sum ``(K, C)`` and sum of squares ``(K, C)`` of feature vectors."""
    onehot = F.one_hot(classes, num_classes).to(vectors.dtype)
    return onehot.sum(dim=0), onehot.T @ vectors, onehot.T @ (vectors ** 2)


@dataclass
class FeatureStatistics:
    """Class-conditional mean and variance of a site's feature vectors.

    Attributes:
        mean: ``(num_classes, channels)``.
        var: ``(num_classes, channels)``, at least :data:`VARIANCE_FLOOR`.
        count: ``(num_classes,)`` locations behind each class's figures (0: the class was never seen).
    """

    mean: np.ndarray
    var: np.ndarray
    count: np.ndarray

    @classmethod
    def from_sums(cls, count: torch.Tensor, total: torch.Tensor, squares: torch.Tensor) -> "FeatureStatistics":
        n = count.clamp_min(1.0).unsqueeze(1)
        mean = total / n
        var = (squares / n - mean ** 2).clamp_min(VARIANCE_FLOOR)
        return cls(mean.cpu().numpy().astype(np.float32), var.cpu().numpy().astype(np.float32),
                   count.cpu().numpy().astype(np.float32))

    def to_report(self) -> Dict[str, list]:
        """Plain lists (what the site sends: ``2 x num_classes x channels + num_classes`` numbers)."""
        return {"mean": self.mean.tolist(), "var": self.var.tolist(), "count": self.count.tolist()}

    @classmethod
    def from_report(cls, report: Mapping[str, Any], source: str = "a site") -> "FeatureStatistics":
        """Rebuild statistics a site sent, refusing malformed or non-finite ones (naming ``source``)."""
        try:
            mean = np.asarray(report["mean"], dtype=np.float32)
            var = np.asarray(report["var"], dtype=np.float32)
            count = np.asarray(report["count"], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"feature statistics of {source} are malformed: {e}") from None
        if mean.ndim != 2 or var.shape != mean.shape or count.shape != (mean.shape[0],):
            raise ValueError(f"feature statistics of {source} have inconsistent shapes {mean.shape}, {var.shape}, "
                             f"{count.shape}")
        if not (np.isfinite(mean).all() and np.isfinite(var).all() and np.isfinite(count).all()):
            raise ValueError(f"feature statistics of {source} contain NaN or infinite values")
        if (var < 0).any() or (count < 0).any():
            raise ValueError(f"feature statistics of {source} have negative variances or counts")
        return cls(mean, np.maximum(var, VARIANCE_FLOOR), count)


@torch.no_grad()
def site_feature_statistics(model: nn.Module, dataset: Any, num_classes: int, device: torch.device,
                            batch_size: int = 32) -> FeatureStatistics:
    """Class-conditional statistics of ``model``'s bottleneck features over every image of ``dataset``."""
    was_training = model.training
    model.eval()
    sums = None
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False):
        features = model.encode(batch["image"].to(device))
        classes = location_classes(batch["label"].to(device), features.shape[2:], num_classes)
        part = class_feature_sums(*flatten_locations(features, classes), num_classes)
        sums = part if sums is None else tuple(a + b for a, b in zip(sums, part))
    model.train(was_training)
    return FeatureStatistics.from_sums(*sums)


def sample_peer_features(peers: Mapping[int, FeatureStatistics], classes: torch.Tensor,
                         generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Virtual feature vectors of the other sites, one per own location and peer: for each class in ``classes``
    a draw from that peer's Gaussian of the class. Classes a peer never saw are left out.

    Returns:
        vectors ``(M, C)``, their classes ``(M,)`` and their site indices ``(M,)``.
    """
    vectors, out_classes, sites = [], [], []
    for index, stats in sorted(peers.items()):
        seen = torch.as_tensor(stats.count, device=classes.device)[classes] > 0
        cls = classes[seen]
        if cls.numel() == 0:
            continue
        mean = torch.as_tensor(stats.mean, device=classes.device)[cls]
        std = torch.as_tensor(stats.var, device=classes.device)[cls].sqrt()
        noise = torch.randn(mean.shape, generator=generator).to(mean.device)
        vectors.append(mean + std * noise)
        out_classes.append(cls)
        sites.append(torch.full_like(cls, index))
    if not vectors:
        empty = torch.empty(0, dtype=torch.long, device=classes.device)
        return torch.empty(0, 0, device=classes.device), empty, empty
    return torch.cat(vectors), torch.cat(out_classes), torch.cat(sites)


class SiteDiscriminator(nn.Module):
    """Which site a feature vector comes from, given its class: an MLP on ``[vector, one-hot class]``.

    Args:
        channels: feature channels.
        num_classes: classes (the one-hot part of the input).
        n_sites: sites of the federation (output logits).
        hidden: hidden units (0: a linear classifier).
    """

    def __init__(self, channels: int, num_classes: int, n_sites: int, hidden: int = 64) -> None:
        super().__init__()
        self.num_classes = num_classes
        width = channels + num_classes
        self.net = nn.Linear(width, n_sites) if hidden == 0 else nn.Sequential(
            nn.Linear(width, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, n_sites))

    def forward(self, vectors: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([vectors, F.one_hot(classes, self.num_classes).to(vectors.dtype)], dim=1))


def moment_matching_loss(vectors: torch.Tensor, classes: torch.Tensor, peers: Mapping[int, FeatureStatistics],
                         num_classes: int) -> torch.Tensor:
    """Squared distance between this batch's class means and the peers' (count-weighted) class means, in units of
    the peers' standard deviation, averaged over the classes present in both and the channels."""
    count, total, _ = class_feature_sums(vectors, classes, num_classes)
    batch_mean = total / count.clamp_min(1.0).unsqueeze(1)
    weights = torch.stack([torch.as_tensor(p.count, device=vectors.device) for p in peers.values()])  # (P, K)
    means = torch.stack([torch.as_tensor(p.mean, device=vectors.device) for p in peers.values()])    # (P, K, C)
    vars_ = torch.stack([torch.as_tensor(p.var, device=vectors.device) for p in peers.values()])
    w = weights / weights.sum(dim=0, keepdim=True).clamp_min(1.0)
    peer_mean = (w.unsqueeze(2) * means).sum(dim=0)
    peer_var = (w.unsqueeze(2) * vars_).sum(dim=0).clamp_min(VARIANCE_FLOOR)
    present = (count > 0) & (weights.sum(dim=0) > 0)
    if not present.any():
        return vectors.sum() * 0.0
    # the scale floor keeps channels that barely vary at the peers from dominating (and from diverging)
    gap = (batch_mean - peer_mean.to(vectors.dtype)) / (peer_var + MOMENT_SCALE_FLOOR).sqrt().to(vectors.dtype)
    return (gap[present] ** 2).mean()


ALIGNMENTS = ("adversarial", "moments")


class StatisticsAlignmentTrainer(SegmentationTrainer):
    """:class:`SegmentationTrainer` that aligns its bottleneck features with the other sites' (see the module
    docstring). Per batch:

    1. discriminator step: cross-entropy of :class:`SiteDiscriminator` on (detached) own location vectors labelled
       with this site's index and on virtual vectors of every peer labelled with the peer's index;
    2. model step: ``DiceCE + weight * CE(D(own vectors), uniform)`` (the discriminator frozen).

    ``alignment="moments"`` replaces the adversarial game by direct moment matching: ``DiceCE + weight *``
    :func:`moment_matching_loss` (no discriminator is trained). Without peer statistics (the first round) it trains
    like :class:`SegmentationTrainer`.

    Args:
        model: a :class:`~medflare.segmentation.networks.FeatureUNet`.
        device: training device.
        site_index: this site's index among ``n_sites``.
        n_sites: sites of the federation.
        num_classes: label classes including background.
        adv_weight: weight of the confusion loss after warm-up.
        disc_lr: Adam learning rate of the discriminator.
        disc_hidden: hidden units of the discriminator (0: linear).
        max_locations: own location vectors used per batch (a random subset; bounds the discriminator's cost).
        alignment: ``"adversarial"`` (site discriminator and confusion) or ``"moments"`` (moment matching).
        **kwargs: :class:`SegmentationTrainer` arguments.
    """

    def __init__(self, model: nn.Module, device: torch.device, site_index: int, n_sites: int, num_classes: int,
                 adv_weight: float = 0.1, disc_lr: float = 1e-3, disc_hidden: int = 64, max_locations: int = 512,
                 alignment: str = "adversarial", **kwargs: Any) -> None:
        if alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
        self.alignment = alignment
        if not hasattr(model, "forward_with_features"):
            raise TypeError("feature alignment needs a model with forward_with_features (e.g. FeatureUNet)")
        if not 0 <= site_index < n_sites:
            raise ValueError(f"site index {site_index} is outside the federation's {n_sites} sites")
        super().__init__(model, device, **kwargs)
        self.site_index, self.n_sites, self.num_classes = site_index, n_sites, num_classes
        self.current_weight = adv_weight
        self.max_locations = max_locations
        self.discriminator = SiteDiscriminator(model.feature_channels, num_classes, n_sites, disc_hidden).to(device)
        self.disc_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=disc_lr, betas=(0.5, 0.99))
        self.peers: Dict[int, FeatureStatistics] = {}
        self.generator = torch.Generator().manual_seed(site_index)

    def set_peer_statistics(self, peers: Mapping[int, FeatureStatistics]) -> None:
        """The other sites' statistics (by site index) to align with; this site's own entry is ignored."""
        self.peers = {int(k): v for k, v in peers.items() if int(k) != self.site_index}

    def training_step(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
        logits, features = self.model.forward_with_features(images)
        terms = {"seg": self.loss_fn(logits, labels)}
        if not self.peers:
            return self.optimise(terms)
        classes = location_classes(labels, features.shape[2:], self.num_classes)
        vectors, cls = flatten_locations(features, classes)
        if len(cls) > self.max_locations:
            pick = torch.randperm(len(cls), generator=self.generator)[:self.max_locations].to(cls.device)
            vectors, cls = vectors[pick], cls[pick]
        if len(cls) == 0:
            return self.optimise(terms)
        if self.alignment == "moments":
            if self.current_weight > 0:
                terms["adv"] = self.current_weight * moment_matching_loss(vectors, cls, self.peers, self.num_classes)
            return self.optimise(terms)
        # 1) discriminator: own vectors (own index) against the peers' virtual vectors (their indices)
        virtual, v_cls, v_site = sample_peer_features(self.peers, cls, self.generator)
        own_site = torch.full_like(cls, self.site_index)
        self.discriminator.requires_grad_(True)
        d_in = torch.cat([vectors.detach(), virtual.to(vectors.dtype)]) if len(v_cls) else vectors.detach()
        d_logits = self.discriminator(d_in, torch.cat([cls, v_cls]))
        d_target = torch.cat([own_site, v_site])
        d_loss = F.cross_entropy(d_logits, d_target)
        self.disc_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        self.disc_optimizer.step()
        with torch.no_grad():
            own_acc = float((d_logits[:len(cls)].argmax(dim=1) == own_site).float().mean())
        # 2) model: segmentation plus confusion of the (frozen) discriminator on own vectors
        self.discriminator.requires_grad_(False)
        if self.current_weight > 0:
            terms["adv"] = self.current_weight * confusion_loss(self.discriminator(vectors, cls))
        out = self.optimise(terms)
        out["disc"] = float(d_loss.detach())
        out["disc_acc"] = own_acc
        return out

    def state_dict(self) -> Dict[str, Any]:
        """What must survive a restart: the discriminator, its optimiser and the peers' statistics."""
        return {"discriminator": self.discriminator.state_dict(), "disc_optimizer": self.disc_optimizer.state_dict(),
                "peers": {k: v.to_report() for k, v in self.peers.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        self.peers = {int(k): FeatureStatistics.from_report(v, f"site {k}") for k, v in state.get("peers", {}).items()}

