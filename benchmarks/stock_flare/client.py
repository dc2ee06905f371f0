"""Stock FLARE's way of running the segmentation benchmark: a Client API training script for ``FedAvgRecipe``.

It does the work of a medflare segmentation site (the same data, network, trainer and settings; the received global
model evaluated on the validation and test splits every round) through FLARE's own client stack, so
``benchmarks/overhead.py`` can set medflare's executors and controllers beside stock FLARE on the same work.
It needs ``custom/`` on ``PYTHONPATH`` (the benchmark sets it) for the data and the network.
"""

from __future__ import annotations

import argparse

import nvflare.client as flare
import torch

from medflare.data import ImageSpec, resolve_site_config
from medflare.segmentation.synthetic import SyntheticSegConfig
from medflare.segmentation.data import load_site_data
from medflare.segmentation.metrics import evaluate_segmentation
from medflare.networks import build_model
from medflare.segmentation.training import SegmentationTrainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    flare.init()
    site = flare.get_site_name()
    syn = SyntheticSegConfig(modalities=["t1", "t2", "ct"], seed=args.seed)
    data = load_site_data(resolve_site_config(site, None, syn.modalities), ImageSpec(spatial_size=(64, 64)), syn)
    device = torch.device("cpu")
    torch.manual_seed(args.seed)
    model = build_model("unet", spatial_dims=2)
    trainer = SegmentationTrainer(model, device, lr=args.lr, optimizer="sgd", reset_optimizer=True)
    while flare.is_running():
        received = flare.receive()
        if flare.is_submit_model():
            flare.send(flare.FLModel(params=model.state_dict()))
            continue
        model.load_state_dict({k: torch.as_tensor(v) for k, v in received.params.items()})
        val = evaluate_segmentation(model, data.val, 3, device)["dice"]
        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics={"dice": val}))
            continue
        test = evaluate_segmentation(model, data.test, 3, device)["dice"]
        trainer.fit(data.train, 1, 16, seed=args.seed * 1000 + received.current_round)
        flare.send(flare.FLModel(params=model.state_dict(), metrics={"dice": val, "test_dice": test},
                                 meta={"NUM_STEPS_CURRENT_ROUND": len(data.train)}))


if __name__ == "__main__":
    main()
