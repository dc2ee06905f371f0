"""GSAM step and the sharpness probe (medflare.algorithms.sam)."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from medflare.algorithms.sam import GSAM, LogitAdjustedCE, fedism_plus_rho, sharpness


class Quadratic(nn.Module):
    """L(w) = 0.5 w^T A w (the batch is ignored)."""

    def __init__(self, w0, A):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
        self.register_buffer("A", torch.tensor(A, dtype=torch.float64))

    def loss(self):
        return 0.5 * self.w @ self.A @ self.w


def expected_gsam(w, A, rho, alpha, lr):
    g = A @ w
    e = rho * g / (np.linalg.norm(g) + 1e-12)
    gp = A @ (w + e)
    g_perp = g - (g @ gp) / (gp @ gp) * gp
    return w - lr * (gp - alpha * g_perp)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5])
def test_gsam_step_on_a_quadratic_matches_the_formula(alpha):
    w0, A = np.array([1.0, -2.0]), np.array([[3.0, 0.5], [0.5, 1.0]])
    model = Quadratic(w0, A)
    opt = GSAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.3, alpha=alpha)
    loss, loss_p = opt.step(model, model.loss)
    assert loss == pytest.approx(0.5 * w0 @ A @ w0)
    assert loss_p > loss
    np.testing.assert_allclose(model.w.detach().numpy(), expected_gsam(w0, A, 0.3, alpha, 0.1), rtol=1e-10)


def test_gsam_with_rho_zero_is_the_base_step():
    w0, A = np.array([1.0, -2.0]), np.eye(2)
    model = Quadratic(w0, A)
    GSAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.0).step(model, model.loss)
    np.testing.assert_allclose(model.w.detach().numpy(), w0 - 0.1 * w0)


def test_gsam_second_pass_does_not_touch_batchnorm_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    reference = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    reference.load_state_dict(model.state_dict())
    reference.train()
    reference(x)  # one forward pass: the statistics GSAM's first pass must produce
    opt = GSAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.0), rho=0.5)
    opt.step(model, lambda: nn.functional.cross_entropy(model(x), y))
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)
    assert int(model[1].num_batches_tracked) == 1


class Scaled(nn.Module):
    """logits = k * (x @ W): the larger k, the sharper the loss around W."""

    def __init__(self, k, W):
        super().__init__()
        self.k = k
        self.W = nn.Parameter(torch.tensor(W, dtype=torch.float32))

    def forward(self, x):
        return self.k * x @ self.W


def _data(n=64, seed=0):
    rs = np.random.RandomState(seed)
    x = rs.normal(size=(n, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    return TensorDataset(torch.as_tensor(x), torch.as_tensor(y))


def test_sharpness_is_zero_for_a_flat_loss():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.zeros(2))

        def forward(self, x):  # the same logits for every parameter value that keeps b[0] == b[1]
            return torch.zeros(x.shape[0], 2) + (self.b - self.b.detach())

    result = sharpness(Flat(), _data(), rho=0.05, device=torch.device("cpu"))
    assert result["sharpness"] == pytest.approx(0.0, abs=1e-8)
    assert result["loss"] == pytest.approx(np.log(2), rel=1e-5)


def test_sharpness_grows_with_curvature_and_rho_and_restores_weights():
    W = np.random.RandomState(1).normal(size=(3, 2)) * 0.3
    data = _data()
    flat = Scaled(1.0, W)
    sharp = Scaled(10.0, W)
    s_flat = sharpness(flat, data, rho=0.05, device=torch.device("cpu"))["sharpness"]
    s_sharp = sharpness(sharp, data, rho=0.05, device=torch.device("cpu"))["sharpness"]
    assert s_sharp > 10 * s_flat > 0
    assert sharpness(flat, data, rho=0.2, device=torch.device("cpu"))["sharpness"] > s_flat
    np.testing.assert_array_equal(flat.W.detach().numpy(), W.astype(np.float32))
    assert flat.W.grad is None


def test_sharpness_matches_first_order_estimate():
    # for small rho, L(w + rho g/|g|) - L(w) ~ rho * |grad of the mean loss|
    W = np.random.RandomState(2).normal(size=(3, 2))
    data = _data()
    model = Scaled(1.0, W)
    out = sharpness(model, data, rho=1e-3, device=torch.device("cpu"))
    assert out["sharpness"] == pytest.approx(1e-3 * out["grad_norm"] / len(data), rel=0.05)


def test_logit_adjusted_ce_and_rho_schedule():
    loss = LogitAdjustedCE([1, 3])
    logits = torch.zeros(1, 2)
    # CE of log-priors (log .25, log .75) for class 0 = -log(.25)
    assert float(loss(logits, torch.tensor([0]))) == pytest.approx(-np.log(0.25), rel=1e-5)
    assert torch.isfinite(LogitAdjustedCE([0, 5])(torch.zeros(2, 2), torch.tensor([1, 1])))
    assert fedism_plus_rho(0.05, 0, 4) == pytest.approx(0.05 * 0.5)
    assert fedism_plus_rho(0.05, 3, 4) == pytest.approx(0.05)
