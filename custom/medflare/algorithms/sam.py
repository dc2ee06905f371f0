"""Sharpness-aware local training (GSAM) and the sharpness probe of FedISM (plain PyTorch, no FLARE).

- :class:`GSAM`: one GSAM step (Zhuang et al., ICLR'22) around any base optimiser, as FFL4MIA uses it:
  ``g = grad L(w)``, ``e = rho g / ||g||``, ``g_p = grad L(w + e)``, ``g_perp = g - (<g, g_p> / ||g_p||^2) g_p``,
  and the base optimiser steps from ``w`` with the gradient ``g_p - alpha * g_perp``. ``alpha = 0`` is SAM.
  BatchNorm running statistics are not updated by the second (perturbed) forward pass.
- :class:`LogitAdjustedCE`: cross-entropy of ``logits + tau * log(prior)`` with the site's class prior.
- :func:`sharpness`: ``S = L(w + eps) - L(w)`` with ``eps = rho * g / ||g||``, ``g`` the gradient of the summed
  loss over the whole dataset, in eval mode (FedISM's server statistic, computed at the site).
- :func:`fedism_plus_rho`: FedISM+'s schedule ``rho_t = rho * ((t + 1) / R) ** p``.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

_NORM_EPS = 1e-12


def fedism_plus_rho(rho: float, round_num: int, num_rounds: int, p: float = 0.5) -> float:
    """FedISM+ perturbation radius of round ``round_num`` (0-based) out of ``num_rounds``."""
    if num_rounds <= 0:
        raise ValueError("num_rounds must be positive")
    return float(rho * ((round_num + 1) / num_rounds) ** p)


def _bn_modules(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class _FrozenBNStats:
    """Context that restores BatchNorm running statistics (and counters) on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [m for m in _bn_modules(model) if m.track_running_stats]

    def __enter__(self) -> "_FrozenBNStats":
        self.saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                      for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for m, (mean, var, n) in zip(self.modules, self.saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(n)


def _global_norm(tensors: Iterable[Optional[torch.Tensor]]) -> torch.Tensor:
    norms = [t.norm(2) for t in tensors if t is not None]
    if not norms:
        return torch.zeros(())
    return torch.norm(torch.stack(norms), 2)


class GSAM:
    """GSAM wrapper around a base optimiser (e.g. Adam) of ``params``.

    Args:
        params: the parameters the base optimiser updates (in the same order).
        base_optimizer: the optimiser that takes the final step.
        rho: perturbation radius (0 turns the step into a plain base-optimiser step on ``g``).
        alpha: weight of the removed perpendicular component (0 = SAM).
    """

    def __init__(self, params: Iterable[nn.Parameter], base_optimizer: torch.optim.Optimizer, rho: float = 0.05,
                 alpha: float = 0.1) -> None:
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        self.params = [p for p in params if p.requires_grad]
        self.base_optimizer = base_optimizer
        self.rho, self.alpha = float(rho), float(alpha)

    def step(self, model: nn.Module, loss_closure: Callable[[], torch.Tensor]) -> Tuple[float, float]:
        """One GSAM step; ``loss_closure()`` runs the forward pass on the current batch and returns the loss.

        Returns:
            (loss at w, loss at w + e).
        """
        self.base_optimizer.zero_grad(set_to_none=True)
        loss = loss_closure()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {float(loss)}")
        loss.backward()
        grads = [p.grad.detach().clone() if p.grad is not None else None for p in self.params]
        if self.rho == 0:
            self.base_optimizer.step()
            return float(loss.detach()), float(loss.detach())
        g_norm = _global_norm(grads)
        scale = self.rho / (float(g_norm) + _NORM_EPS)
        eps = [g * scale if g is not None else None for g in grads]
        with torch.no_grad():
            for p, e in zip(self.params, eps):
                if e is not None:
                    p.add_(e)
        self.base_optimizer.zero_grad(set_to_none=True)
        with _FrozenBNStats(model):
            loss_p = loss_closure()
            loss_p.backward()
        with torch.no_grad():
            gp = [p.grad.detach().clone() if p.grad is not None else None for p in self.params]
            dot = sum(float(torch.sum(g * q)) for g, q in zip(grads, gp) if g is not None and q is not None)
            gp_sq = sum(float(torch.sum(q * q)) for q in gp if q is not None)
            proj = dot / (gp_sq + _NORM_EPS)
            for p, e, g, q in zip(self.params, eps, grads, gp):
                if e is not None:
                    p.sub_(e)
                if q is None:
                    continue
                g_perp = (g - proj * q) if g is not None else torch.zeros_like(q)
                p.grad = q - self.alpha * g_perp
        self.base_optimizer.step()
        return float(loss.detach()), float(loss_p.detach())


class LogitAdjustedCE(nn.Module):
    """Cross-entropy of ``logits + tau * log(prior)``, ``prior`` = the site's class frequencies (Menon et al.).

    A class absent from the site gets prior 1e-12 instead of 0 (no infinities).
    """

    def __init__(self, class_counts: Sequence[float], tau: float = 1.0) -> None:
        super().__init__()
        counts = torch.as_tensor(np.asarray(class_counts, dtype=np.float64), dtype=torch.float32)
        if counts.ndim != 1 or counts.sum() <= 0:
            raise ValueError(f"class_counts must be a non-empty vector with a positive sum, got {class_counts}")
        prior = (counts / counts.sum()).clamp_min(1e-12)
        self.register_buffer("log_prior", tau * torch.log(prior))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits + self.log_prior.to(logits.device), target)


def _batches(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def _xy(batch, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        return batch["image"].to(device), batch["label"].to(device).long().view(-1)
    x, y = batch
    return x.to(device), y.to(device).long().view(-1)


def sharpness(model: nn.Module, dataset: Dataset, rho: float, device: torch.device, batch_size: int = 64,
              loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
              ) -> Dict[str, float]:
    """Sharpness of ``model`` on ``dataset``: ``S = max(L(w + eps) - L(w), 1e-10)``.

    ``L`` is the mean loss (plain CE by default) in eval mode; ``eps = rho * g / (||g|| + 1e-12)`` with ``g`` the
    gradient of the *summed* loss over the whole dataset (only its direction matters). The model's weights and mode
    are restored afterwards.

    Returns:
        ``{"loss": L(w), "loss_perturbed": L(w + eps), "sharpness": S, "grad_norm": ||g||}``.
    """
    loss_fn = loss_fn or (lambda logits, y: nn.functional.cross_entropy(logits, y, reduction="sum"))
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    total, n = 0.0, 0
    for batch in _batches(dataset, batch_size):
        x, y = _xy(batch, device)
        loss = loss_fn(model(x), y)
        loss.backward()
        total += float(loss.detach())
        n += y.shape[0]
    if n == 0:
        raise ValueError("cannot measure sharpness on an empty dataset")
    grads = [p.grad.detach().clone() if p.grad is not None else None for p in params]
    for p in params:
        p.grad = None
    g_norm = float(_global_norm(grads))
    scale = rho / (g_norm + _NORM_EPS)
    total_p = 0.0
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p.add_(g * scale)
        try:
            for batch in _batches(dataset, batch_size):
                x, y = _xy(batch, device)
                total_p += float(loss_fn(model(x), y))
        finally:
            for p, old in zip(params, saved):
                p.copy_(old)
    model.train(was_training)
    loss_w, loss_p = total / n, total_p / n
    return {"loss": loss_w, "loss_perturbed": loss_p, "sharpness": max(loss_p - loss_w, 1e-10), "grad_norm": g_norm}
