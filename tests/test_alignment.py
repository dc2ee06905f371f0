"""FedDA pieces: the adversarial step, the ring relay, and what a site sends."""

import numpy as np
import pytest
import torch
from torch import nn

from medflare.algorithms.alignment import (AdversarialSegmentationTrainer, FeatureDiscriminator, adversarial_weight,
                                           discriminator_loss, fooling_loss)
from medflare.segmentation.networks import FeatureUNet
from medflare.algorithms.relay import encoder_part, relay_assignments
from toys import square_dataset


def test_discriminator_learns_to_separate_shifted_features():
    torch.manual_seed(0)
    disc = FeatureDiscriminator(2, 8, hidden=16)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    source = lambda: torch.randn(16, 8, 8, 8)          # noqa: E731
    target = lambda: torch.randn(16, 8, 8, 8) + 1.0    # noqa: E731  (mean-shifted "other modality")
    _, acc_before = discriminator_loss(disc, source(), target())
    for _ in range(100):
        loss, _ = discriminator_loss(disc, source(), target())
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, acc_after = discriminator_loss(disc, source(), target())
    assert acc_after > 0.95 and acc_after > acc_before + 0.2


def test_encoder_update_lowers_discriminator_accuracy():
    """Toy problem: a linear 'encoder' maps source data away from the target distribution; alternating updates
    (as in the trainer) make a fresh-trained discriminator much less able to tell the two apart."""
    torch.manual_seed(0)
    encoder = nn.Conv2d(4, 4, 1)
    with torch.no_grad():
        encoder.bias.fill_(2.0)
    disc = FeatureDiscriminator(2, 4, hidden=8)
    d_opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    e_opt = torch.optim.Adam(encoder.parameters(), lr=1e-2)
    data = lambda: torch.randn(32, 4, 8, 8)  # noqa: E731
    target = lambda: torch.randn(32, 4, 8, 8)  # noqa: E731

    def trained_disc_accuracy():
        probe = FeatureDiscriminator(2, 4, hidden=8)
        opt = torch.optim.Adam(probe.parameters(), lr=1e-3)
        for _ in range(60):
            loss, _ = discriminator_loss(probe, encoder(data()).detach(), target())
            opt.zero_grad()
            loss.backward()
            opt.step()
        return discriminator_loss(probe, encoder(data()).detach(), target())[1]

    before = trained_disc_accuracy()
    for _ in range(300):
        d_loss, _ = discriminator_loss(disc, encoder(data()).detach(), target())
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        e_opt.zero_grad()
        fooling_loss(disc, encoder(data())).backward()
        e_opt.step()
    after = trained_disc_accuracy()
    assert before > 0.9 and after < before - 0.2


def test_adversarial_trainer_trains_and_keeps_discriminator_state():
    torch.manual_seed(0)
    net = FeatureUNet(out_channels=2, channels=(8, 16), strides=(2,))
    trainer = AdversarialSegmentationTrainer(net, torch.device("cpu"), adv_weight=0.1, disc_hidden=8, lr=1e-2)
    with pytest.raises(RuntimeError, match="set_target"):
        trainer.fit(square_dataset(8), 1, 4)
    trainer.set_target(net.state_dict())
    before = {k: v.clone() for k, v in trainer.discriminator.state_dict().items()}
    result = trainer.fit(square_dataset(8), 2, 4)
    assert {"seg", "adv", "disc", "disc_acc", "loss"} <= set(result.losses)
    assert any(not torch.equal(before[k], v) for k, v in trainer.discriminator.state_dict().items())
    # the target encoder is frozen and unchanged by training
    assert all(not p.requires_grad for p in trainer.target_encoder.parameters())
    state = trainer.state_dict()
    other = AdversarialSegmentationTrainer(FeatureUNet(out_channels=2, channels=(8, 16), strides=(2,)),
                                           torch.device("cpu"), disc_hidden=8)
    other.load_state_dict(state)
    for k, v in other.discriminator.state_dict().items():
        torch.testing.assert_close(v, trainer.discriminator.state_dict()[k])
    with pytest.raises(ValueError, match="lack"):
        trainer.set_target({})


def test_adversarial_weight_warmup():
    assert adversarial_weight(0, 0.01, 2) == 0.0
    assert adversarial_weight(1, 0.01, 2) == pytest.approx(0.005)
    assert adversarial_weight(5, 0.01, 2) == pytest.approx(0.01)
    assert adversarial_weight(0, 0.01, 0) == pytest.approx(0.01)


def test_each_site_receives_its_ring_neighbours_previous_encoder():
    prev = {s: {"w": np.full(2, i)} for i, s in enumerate(["site-1", "site-2", "site-3"])}
    assert relay_assignments(["site-1", "site-2", "site-3"], prev) == {
        "site-1": "site-3", "site-2": "site-1", "site-3": "site-2"}
    # first round: nothing to relay
    assert relay_assignments(["site-1", "site-2"], {}) == {"site-1": None, "site-2": None}
    # the neighbour missed the previous round: the next earlier site in the ring stands in
    del prev["site-1"]
    assert relay_assignments(["site-1", "site-2", "site-3"], prev)["site-2"] == "site-3"
    assert relay_assignments(["site-1"], {"site-1": {}}) == {"site-1": None}


def test_encoder_part_selects_only_encoder_weights():
    net = FeatureUNet()
    weights = {k: v.numpy() for k, v in net.state_dict().items()}
    enc = encoder_part(weights, net.encoder_keys())
    assert set(enc) == net.encoder_keys() and len(enc) < len(weights)
    with pytest.raises(KeyError):
        encoder_part({}, net.encoder_keys())


def test_relay_state_is_part_of_the_resume_checkpoint(monkeypatch):
    """FLARE 2.9 keeps no controller snapshots; the encoders to relay travel in medflare's resume checkpoint."""
    from nvflare.app_common.abstract.model import ModelLearnableKey

    from medflare.flare.workflows import RingRelayScatterAndGather

    ctl = RingRelayScatterAndGather(min_clients=2, num_rounds=3)
    ctl._global_weights = {ModelLearnableKey.WEIGHTS: {"w": np.zeros(2)}, ModelLearnableKey.META: {}}
    ctl._current_round, ctl._summary, ctl.shareable_gen = 1, None, None
    ctl._encoders = {"site-1": {"w": np.ones(2)}}
    state = ctl.resume_state()
    assert state.next_round == 2 and list(state.relay_encoders) == ["site-1"]
    resumed = RingRelayScatterAndGather(min_clients=2, num_rounds=3)
    resumed._encoders = {}
    base = RingRelayScatterAndGather.__mro__[1]
    monkeypatch.setattr(base, "restore_resume_state", lambda self, st, ctx: None)  # tested in test_resume.py
    resumed.restore_resume_state(state, None)
    np.testing.assert_array_equal(resumed._encoders["site-1"]["w"], np.ones(2))
