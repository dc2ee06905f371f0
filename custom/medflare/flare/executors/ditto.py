"""Ditto at a site: the federation's model trained as in FedAvg, plus a personal model of the site's own.

Each ``train`` task the site trains the received global model ``w`` as :class:`SegmentationExecutor` does and sends
it; then it trains its personal model ``v`` for ``personal_epochs`` epochs on its own data with
``ditto_lambda/2 * ||v - w||^2`` (:class:`medflare.algorithms.personalization.ProximalPersonalTrainer`). With
``local_norm`` (the ``ditto`` job) ``w`` is the global model with the site's own normalisation layers (FedBN's model).
The personal model never leaves the site except as the site's model in cross-site evaluation, where the site's policy
allows it (``share_local_model``); it is the model the site deploys, and it is kept in the client state file.

What leaves the site besides :class:`SegmentationExecutor`'s weights and scalars: ``personal_dice`` and
``test_personal_dice``, the personal model's validation and test Dice after the round.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from nvflare.apis.dxo import DXO
from nvflare.apis.fl_context import FLContext

from ...networks import build_model
from ...algorithms.personalization import ProximalPersonalTrainer
from .segmentation import SegmentationExecutor
from .support import load_weights, weights_to_numpy

DITTO_LAMBDA = 0.1
"""Ditto's default ``lambda`` (NVFlare's ``PTDittoHelper`` default; docs/personalization.md has the sweep)."""


class DittoExecutor(SegmentationExecutor):
    """:class:`SegmentationExecutor` with a personal model per site (Ditto; see the module docstring).

    Args:
        ditto_lambda: weight of the pull towards the global model (0: the personal model trains alone; very
            large: it stays at the global model).
        personal_epochs: epochs of personal training per round.
        **kwargs: :class:`SegmentationExecutor` arguments (the personal model uses the same network, optimiser
            and learning rate).
    """

    def __init__(self, ditto_lambda: float = DITTO_LAMBDA, personal_epochs: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if ditto_lambda < 0 or personal_epochs < 1:
            raise ValueError(f"ditto_lambda must be >= 0 and personal_epochs >= 1, got {ditto_lambda}, "
                             f"{personal_epochs}")
        if self.finetune_epochs:
            raise ValueError("Ditto trains its personal model every round; finetune_epochs does not apply")
        self.ditto_lambda, self.personal_epochs = float(ditto_lambda), int(personal_epochs)
        self.personal: Optional[ProximalPersonalTrainer] = None

    @property
    def keeps_personal_model(self) -> bool:
        return True

    def create_trainer(self, model: torch.nn.Module, device: torch.device):
        with torch.random.fork_rng(devices=[]):  # the global model's training sees the same random numbers as FedAvg
            personal_model = build_model(self.model_name, **self.model_args).to(device)
        self.personal = ProximalPersonalTrainer(personal_model, device, ditto_lambda=self.ditto_lambda,
                                                **self.trainer_args())
        return super().create_trainer(model, device)

    def before_training(self, dxo: DXO, round_num: int, num_rounds: Optional[int], fl_ctx: FLContext) -> None:
        super().before_training(dxo, round_num, num_rounds, fl_ctx)
        self.personal.set_lr(self.trainer.lr)

    def after_training(self, round_num: int, fl_ctx: FLContext) -> Dict[str, Any]:
        """Train the personal model towards this round's global model; report its Dice."""
        if self.personal_weights is None:  # first round: the personal model starts as the global one
            self.personal_weights = self._round_global
        load_weights(self.personal.model, self.personal_weights, f"site '{self.site}' personal model")
        self.personal.set_anchor({k: torch.as_tensor(v) for k, v in self._round_global.items()})
        self.personal.fit(self.data.train, self.personal_epochs, self.batch_size, seed=self.seed * 1000 + round_num)
        self.personal_weights = weights_to_numpy(self.personal.model)
        report = self.personal_report(self.personal.model)
        self.log_info(fl_ctx, f"round {round_num}: personal model dice {report['personal_dice']:.4f} (validation)")
        return report
