"""Input-level intensity augmentation for cross-modality training: random global intensity non-linearities (GIN).

A modality shift is, to a first approximation, a different mapping from tissue to intensity (T1: white matter
bright; T2: CSF bright). :class:`RandomIntensityNetwork` draws, for every batch, a shallow network of random
convolutions and leaky ReLUs and passes each image through it: shapes and edges survive, the tissue-to-intensity
mapping is scrambled (orderings may flip). Blended with the original image by a random weight and brought back to
the image's own intensity scale, the result trains a model to rely on anatomy rather than on one modality's
contrast (Ouyang et al., "Causality-inspired single-source domain generalization for medical image segmentation",
IEEE TMI 2022, describe the idea; this is an independent implementation).

Nothing leaves a site: the augmentation is local and sends no statistic.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class RandomIntensityNetwork:
    """Random shallow convolutional intensity transform of a batch of images ``(B, C, *spatial)``.

    Args:
        n_layers: random convolutions (each followed by a leaky ReLU except the last).
        hidden: channels between the random convolutions.
        kernel_size: kernel of the first convolution (later ones are 1x1, so the transform stays local: it changes
            intensities and fine texture, not anatomy).
        prob: probability that a batch is augmented at all.
        generator: random source (seeded for reproducible training).
    """

    def __init__(self, n_layers: int = 3, hidden: int = 4, kernel_size: int = 3, prob: float = 0.5,
                 generator: Optional[torch.Generator] = None) -> None:
        if n_layers < 1 or hidden < 1 or kernel_size % 2 != 1:
            raise ValueError("n_layers and hidden must be >= 1 and kernel_size odd")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.n_layers, self.hidden, self.kernel_size, self.prob = n_layers, hidden, kernel_size, prob
        self.generator = generator or torch.Generator().manual_seed(0)

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.prob < 1.0 and float(torch.rand(1, generator=self.generator)) >= self.prob:
            return images
        batch, channels, *spatial = images.shape
        dims = len(spatial)
        conv = F.conv2d if dims == 2 else F.conv3d
        x = images
        cin = channels
        for layer in range(self.n_layers):
            cout = channels if layer == self.n_layers - 1 else self.hidden
            k = self.kernel_size if layer == 0 else 1
            weight = self._rand(cout, cin, *([k] * dims)).to(images) / (cin * k ** dims) ** 0.5
            bias = 0.1 * self._rand(cout).to(images)
            x = conv(x, weight, bias, padding=k // 2)
            if layer < self.n_layers - 1:
                x = F.leaky_relu(x, 0.2)
            cin = cout
        alpha = torch.rand(batch, *([1] * (dims + 1)), generator=self.generator).to(images)
        mixed = alpha * x + (1.0 - alpha) * images
        return rescale_like(mixed, images)


def rescale_like(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Each image min-max scaled to the range of its ``reference`` image (the loader's intensity scale)."""
    flat, ref = images.flatten(1), reference.flatten(1)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    r_lo, r_hi = ref.min(dim=1, keepdim=True).values, ref.max(dim=1, keepdim=True).values
    out = (flat - lo) / (hi - lo).clamp_min(1e-6) * (r_hi - r_lo) + r_lo
    return out.view_as(images)


INTENSITY_AUGMENTATIONS = ("none", "gin")


def make_intensity_augmentation(name: str, seed: int = 0, prob: float = 0.5) -> Optional[RandomIntensityNetwork]:
    """``"none"`` (``None``) or ``"gin"`` (:class:`RandomIntensityNetwork` with ``prob``)."""
    if name == "none":
        return None
    if name == "gin":
        return RandomIntensityNetwork(prob=prob, generator=torch.Generator().manual_seed(seed))
    raise ValueError(f"intensity_augmentation must be one of {INTENSITY_AUGMENTATIONS}, got {name!r}")
