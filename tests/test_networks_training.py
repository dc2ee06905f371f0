import pytest
import torch
from monai.networks.nets import UNet

from medflare.segmentation.networks import FeatureUNet
from medflare.networks import build_model
from medflare.flare.persistors import CheckpointError, check_finite_state
from medflare.segmentation.training import SegmentationTrainer, fedprox_term
from toys import square_dataset


def test_feature_unet_exposes_bottleneck_2d_and_3d():
    net = FeatureUNet(channels=(8, 16, 32), strides=(2, 2))
    x = torch.randn(2, 1, 32, 32)
    logits, feats = net.forward_with_features(x)
    assert logits.shape == (2, 3, 32, 32) and feats.shape == (2, 32, 8, 8)
    assert feats.requires_grad
    torch.testing.assert_close(net.encode(x), feats)
    torch.testing.assert_close(net(x), logits)
    net3 = FeatureUNet(spatial_dims=3, channels=(4, 8), strides=(2,))
    assert net3.encode(torch.randn(1, 1, 16, 16, 16)).shape == (1, 8, 8, 8, 8)


def test_encoder_keys_are_the_down_path():
    net = FeatureUNet()
    keys = net.encoder_keys()
    assert keys < set(net.state_dict())
    assert "model.0.conv.unit0.conv.weight" in keys  # first down block
    assert not any(k.startswith("model.2.") for k in keys)  # last up block
    # encoder keys determine the bottleneck features: changing a decoder weight leaves them unchanged
    x = torch.randn(1, 1, 64, 64)
    before = net.encode(x).detach().clone()
    with torch.no_grad():
        net.state_dict()["model.2.0.conv.weight"].add_(1.0)
    torch.testing.assert_close(net.encode(x), before)


def test_checkpoints_load_into_plain_monai_unet():
    net = build_model("unet", channels=(8, 16), strides=(2,))
    plain = UNet(2, 1, 3, channels=(8, 16), strides=(2,), num_res_units=1, norm="instance")
    plain.load_state_dict(net.state_dict())
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet-xyz")


def test_trainer_lowers_the_loss():
    torch.manual_seed(0)
    net = FeatureUNet(out_channels=2, channels=(8, 16), strides=(2,))
    trainer = SegmentationTrainer(net, torch.device("cpu"), lr=1e-2)
    ds = square_dataset()
    first = trainer.fit(ds, epochs=1, batch_size=8)
    last = trainer.fit(ds, epochs=5, batch_size=8)
    assert first.steps == 2 and last.steps == 10 and last.epochs == 5
    assert last.losses["loss"] < first.losses["loss"]


def test_trainer_honours_stop_request():
    net = FeatureUNet(out_channels=2, channels=(8, 16), strides=(2,))
    result = SegmentationTrainer(net, torch.device("cpu")).fit(square_dataset(), 3, 4, should_stop=lambda: True)
    assert result.aborted and result.steps == 0


def test_fedprox_term_and_pull_towards_global():
    net = FeatureUNet(out_channels=2, channels=(8, 16), strides=(2,))
    glob = {k: v.detach().clone() for k, v in net.named_parameters()}
    assert float(fedprox_term(net, glob).detach()) == 0.0
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    n = next(net.parameters()).numel()
    assert float(fedprox_term(net, glob).detach()) == pytest.approx(0.5 * n)
    # with a huge mu, local training stays much closer to the global weights than without
    drift = {}
    for mu in (0.0, 100.0):
        torch.manual_seed(0)
        model = FeatureUNet(out_channels=2, channels=(8, 16), strides=(2,))
        start = {k: v.detach().clone() for k, v in model.named_parameters()}
        SegmentationTrainer(model, torch.device("cpu"), lr=1e-2, fedprox_mu=mu).fit(square_dataset(), 2, 4)
        drift[mu] = float(fedprox_term(model, start).detach())
    assert drift[100.0] < 0.5 * drift[0.0]
    with pytest.raises(ValueError):
        SegmentationTrainer(net, torch.device("cpu"), fedprox_mu=-1)


def test_trainer_refuses_nan_loss():
    net = FeatureUNet(out_channels=2, channels=(8, 16), strides=(2,))
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        SegmentationTrainer(net, torch.device("cpu")).fit(square_dataset(4), 1, 4)


def test_persistor_refuses_non_finite_checkpoint():
    check_finite_state({"w": torch.ones(3), "n": torch.tensor(3)})
    with pytest.raises(CheckpointError, match="'w'"):
        check_finite_state({"w": torch.tensor([1.0, float("inf")])})
