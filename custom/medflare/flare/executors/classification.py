"""FLARE Executor for federated classification under quality shift: one training path, many reports.

Per ``train`` task of round t the site:

1. loads the received global model ``w^t`` (and reads its meta: its own aggregation weight of the last round),
2. measures on its *training* set what the server rules need (see :data:`REPORTED_SCALARS`): the loss and
   balanced accuracy of ``w^t`` (q-FedAvg, AFL, FairFed), the sharpness ``S_i = L_i(w^t + eps) - L_i(w^t)`` with
   ``eps = rho_t g / ||g||`` (FedISM), the loss of its own previous local model (FedGA) and the balanced accuracy of
   FedCE's minus model ``(w^t - c_i w_i^t) / (1 - c_i)``,
3. evaluates ``w^t`` on its held-out split (balanced accuracy, accuracy, macro AUC: the *initial metrics* that drive
   model selection and the server's fairness report) and, if it holds them, on the global clean and corrupted test
   sets,
4. trains ``local_epochs`` with logit-adjusted CE, by Adam or by GSAM (``rho_t = rho``, or FedISM+'s
   ``rho * ((t+1)/R)^p`` when ``rho_schedule_p`` is set),
5. returns the new weights, its sample count and the report.

What leaves the site: model weights, the sample count, and the scalars listed in :data:`REPORTED_SCALARS`.
Images and labels never do. The last local model (and its round) and the optimiser state are kept in
``<app dir>/medflare_cls_client_state.pt`` so a restarted worker can still report FedGA/FedCE statistics.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from nvflare.apis.dxo import DXO
from nvflare.apis.fl_context import FLContext

from ...algorithms import fairness as fr
from ... import keys
from ...classification.data import ClsSiteData, load_cls_site_data, synthetic_config
from ...classification.training import ClassificationTrainer, evaluate_classifier
from ...keys import SITE_WEIGHT_KEY
from ...networks import build_model
from ...algorithms.sam import fedism_plus_rho, sharpness
from .base import SiteExecutor, load_weights

ALL_REPORTS = ("sharpness", "prev_local", "minus_model")
# scalars sent in meta["medflare_report"], besides the held-out metrics of w^t (initial metrics: bacc, acc, auc, loss)
REPORTED_SCALARS = ("quality", "n_train", "n_val", keys.LOSS_GLOBAL, keys.BACC_GLOBAL_TRAIN, "rho", keys.SHARPNESS,
                    keys.LOSS_PREV_LOCAL, keys.PREV_LOCAL_ROUND, keys.FEDCE_MINUS_SCORE, "n_test", "test_bacc",
                    "test_auc", "test_clean_bacc",
                    "test_clean_auc", "test_corrupted_bacc", "test_corrupted_auc", "bacc_local", "train_seconds",
                    "probe_seconds", "train_loss")


class ClassificationExecutor(SiteExecutor):
    """Local training and evaluation of a classifier at one site, reporting every fairness statistic.

    Args:
        model: ``{"name": "tiny_cnn", **constructor kwargs}``; ``in_channels`` and ``num_classes`` default to the
            settings below. Must match the server persistor's ``model``.
        num_classes: classes.
        in_channels: image channels.
        spatial_size: image size of real data (synthetic data has the benchmark's size).
        synthetic: settings of the built-in benchmark (see :func:`medflare.classification.data.synthetic_config`).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        local_epochs: local epochs per round.
        batch_size: training batch size.
        optimizer: ``"adam"`` (baselines) or ``"gsam"`` (FedISM, FedISM+).
        reset_optimizer: a fresh optimiser every round (the FedISM authors' choice); ``false`` keeps Adam's
            moments across rounds. Every fairness job uses the same setting, so methods compare fairly.
        rho: GSAM radius, also the sharpness probe's radius.
        gsam_alpha: GSAM decomposition coefficient.
        rho_schedule_p: FedISM+'s exponent p of ``rho_t = rho ((t+1)/R)^p``; ``null`` keeps rho constant.
        tau: logit-adjustment temperature (0 = plain CE).
        reports: optional statistics to compute: ``"sharpness"``, ``"prev_local"`` (FedGA), ``"minus_model"``
            (FedCE); the loss and balanced accuracy of the global model are always reported.
        global_test_sites: sites that evaluate the global test sets (``null``: every site that has them).
        eval_batch_size: evaluation batch size.
        seed: seed of shuffling and initialisation at this site.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        num_threads: CPU threads for torch; 0 (default): ``$MEDFLARE_NUM_THREADS`` or 1 (see
            :func:`medflare.flare.executors.base.configure_torch`).
        tb_writer_id: id of the client's ``TBWriter`` component ("" disables TensorBoard).
        send_weight_differences: send ``WEIGHT_DIFF`` results instead of ``WEIGHTS`` (for FLARE's percentile and
            SVT privacy filters; see :class:`~medflare.flare.executors.base.SiteExecutor`).
        evaluate_local_model: report ``bacc_local``, the trained local model's validation balanced accuracy (see
            :class:`~medflare.flare.executors.base.SiteExecutor`).
    """

    state_file = "medflare_cls_client_state.pt"
    key_metric = "bacc"

    def __init__(self, model: Optional[Dict[str, Any]] = None, num_classes: int = 4, in_channels: int = 1,
                 spatial_size: Sequence[int] = (64, 64), synthetic: Optional[Dict[str, Any]] = None,
                 lr: float = 1e-3, weight_decay: float = 5e-4, local_epochs: int = 1, batch_size: int = 32,
                 optimizer: str = "adam", reset_optimizer: bool = False, rho: float = 0.05, gsam_alpha: float = 0.1,
                 rho_schedule_p: Optional[float] = None, tau: float = 1.0, reports: Sequence[str] = ALL_REPORTS,
                 global_test_sites: Optional[Sequence[str]] = None, eval_batch_size: int = 128, seed: int = 0,
                 device: str = "auto", num_threads: int = 0, tb_writer_id: str = "tb_writer",
                 send_weight_differences: bool = False, evaluate_local_model: bool = True) -> None:
        super().__init__(tb_writer_id, send_weight_differences, evaluate_local_model)
        unknown = set(reports) - set(ALL_REPORTS)
        if unknown:
            raise ValueError(f"unknown reports {sorted(unknown)}; known: {list(ALL_REPORTS)}")
        if optimizer not in ("adam", "gsam"):
            raise ValueError(f"optimizer must be 'adam' or 'gsam', got {optimizer!r}")
        model = dict(model or {})
        self.model_name = model.pop("name", "tiny_cnn")
        self.model_args = {"in_channels": in_channels, "num_classes": num_classes, **model}
        self.num_classes, self.in_channels, self.spatial_size = num_classes, in_channels, tuple(spatial_size)
        self.synthetic = synthetic_config(synthetic)
        self.lr, self.weight_decay, self.local_epochs, self.batch_size = lr, weight_decay, local_epochs, batch_size
        self.reset_optimizer = reset_optimizer
        self.optimizer_kind, self.rho, self.gsam_alpha, self.rho_schedule_p = optimizer, rho, gsam_alpha, rho_schedule_p
        self.tau, self.reports = tau, set(reports)
        self.global_test_sites = set(global_test_sites) if global_test_sites is not None else None
        self.eval_batch_size, self.seed = eval_batch_size, seed
        self.device_name, self.num_threads = device, num_threads
        self.data: Optional[ClsSiteData] = None
        self.scratch: Optional[torch.nn.Module] = None
        self.trainer: Optional[ClassificationTrainer] = None
        self._probe_seconds = 0.0

    # ------------------------------------------------------------------ template hooks
    def load_data(self, fl_ctx: FLContext) -> None:
        start = time.time()
        with_test = self.global_test_sites is None or self.site in self.global_test_sites
        self.data = load_cls_site_data(self.site, self._local_dir, self.synthetic, self.num_classes,
                                       self.in_channels, self.spatial_size, with_global_test=with_test)
        self.log_info(fl_ctx, f"site '{self.site}' data from {self.data.source}: {len(self.data.train)} training, "
                              f"{len(self.data.val)} validation images, quality '{self.data.quality}', class counts "
                              f"{self.data.class_counts}, global test sets {sorted(self.data.global_test)} "
                              f"(loaded in {time.time() - start:.1f}s)")
        for note in self.data.warnings:
            self.log_warning(fl_ctx, note)

    def create_trainer(self, model: torch.nn.Module, device: torch.device) -> ClassificationTrainer:
        return ClassificationTrainer(model, device, self.data.class_counts, lr=self.lr, weight_decay=self.weight_decay,
                                     optimizer=self.optimizer_kind, rho=self.rho, gsam_alpha=self.gsam_alpha,
                                     tau=self.tau, reset_optimizer=self.reset_optimizer)

    state_keys = SiteExecutor.state_keys + ("local_round",)

    def state_dict(self) -> Dict[str, Any]:
        """Adds the round of the local model."""
        return {**super().state_dict(), "local_round": self.local_round}

    def load_state(self, state: Dict[str, Any]) -> str:
        super().load_state(state)
        self.local_round = int(state["local_round"])
        return f"local model of round {self.local_round}"

    # ------------------------------------------------------------------ statistics
    def _validation_metrics(self) -> Dict[str, float]:
        """Cross-site evaluation: the site's test split (validation when it has none, flagged)."""
        on_test = self.data.test is not None
        return {**self.evaluate(self.data.test if on_test else self.data.val), "on_test_split": float(on_test)}

    def evaluate(self, dataset, model: Optional[torch.nn.Module] = None) -> Dict[str, float]:
        metrics = evaluate_classifier(model or self.model, dataset, self.device, self.eval_batch_size)
        metrics.pop("n_images", None)
        return metrics

    def current_rho(self, round_num: int, num_rounds: Optional[int]) -> float:
        if self.rho_schedule_p is None or not num_rounds:
            return float(self.rho)
        return fedism_plus_rho(self.rho, round_num, int(num_rounds), self.rho_schedule_p)

    def global_model_report(self, global_weights: Dict[str, Any], meta: Dict[str, Any], round_num: int,
                            rho: float) -> Dict[str, Any]:
        """Statistics of the received global model (and of the previous local model) on the training set."""
        train = self.data.train
        on_train = self.evaluate(train)
        report: Dict[str, Any] = {keys.LOSS_GLOBAL: on_train["loss"], keys.BACC_GLOBAL_TRAIN: on_train["bacc"],
                                  "rho": rho}
        if "sharpness" in self.reports:
            probe = sharpness(self.model, train, rho, self.device, self.eval_batch_size)
            report[keys.SHARPNESS] = probe["sharpness"]
        previous = self.local_weights if self.local_round == round_num - 1 else None
        if previous is not None and self.reports & {"prev_local", "minus_model"}:
            if self.scratch is None:
                self.scratch = build_model(self.model_name, **self.model_args).to(self.device)
            if "prev_local" in self.reports:
                load_weights(self.scratch, previous, "previous local model")
                report[keys.LOSS_PREV_LOCAL] = self.evaluate(train, self.scratch)["loss"]
                report[keys.PREV_LOCAL_ROUND] = self.local_round
            coef = meta.get(SITE_WEIGHT_KEY)  # this site's weight in the last aggregation (the server sends no other)
            if "minus_model" in self.reports and coef is not None and 0.0 < float(coef) < 1.0:
                load_weights(self.scratch, fr.minus_model(global_weights, previous, float(coef)), "minus model")
                report[keys.FEDCE_MINUS_SCORE] = self.evaluate(train, self.scratch)["bacc"]
        if self.data.test is not None:
            metrics = self.evaluate(self.data.test)
            report["n_test"] = len(self.data.test)
            report.update({f"test_{k}": metrics[k] for k in ("bacc", "auc") if k in metrics})
        for name, dataset in self.data.global_test.items():
            metrics = self.evaluate(dataset)
            report[f"test_{name}_bacc"] = metrics["bacc"]
            if "auc" in metrics:
                report[f"test_{name}_auc"] = metrics["auc"]
        return report

    def assess_global_model(self, dxo: DXO, global_weights: Dict[str, Any], round_num: int,
                            num_rounds: Optional[int], fl_ctx: FLContext) -> Tuple[Dict[str, float], Dict[str, Any]]:
        """Held-out metrics (model selection) and the statistics of :meth:`global_model_report`."""
        start = time.time()
        global_metrics = self.evaluate(self.data.val)
        report = self.global_model_report(global_weights, dict(dxo.meta or {}), round_num,
                                          self.current_rho(round_num, num_rounds))
        self._probe_seconds = time.time() - start
        self.log_info(fl_ctx, f"round {round_num}/{num_rounds}: global model on '{self.site}': "
                      + " ".join(f"{k}={v:.4f}" for k, v in global_metrics.items())
                      + " | " + " ".join(f"{k}={v:.4g}" for k, v in report.items()))
        return global_metrics, report

    def before_training(self, dxo: DXO, round_num: int, num_rounds: Optional[int], fl_ctx: FLContext) -> None:
        self.trainer.set_rho(self.current_rho(round_num, num_rounds))

    def local_metrics(self) -> Dict[str, float]:
        return self.evaluate(self.data.val)

    def trained_report(self, report: Dict[str, Any], local_metrics: Dict[str, float], losses: Dict[str, float],
                       seconds: float) -> Dict[str, Any]:
        return {**report, "quality": self.data.quality, "n_train": len(self.data.train), "n_val": len(self.data.val),
                **({"bacc_local": local_metrics["bacc"]} if local_metrics else {}), "train_seconds": round(seconds, 2),
                "probe_seconds": round(self._probe_seconds, 2), "train_loss": losses.get("loss", 0.0)}
