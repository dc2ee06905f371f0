"""Provenance records: built from a job's configs and the persistor's events, saved in checkpoints that FLARE and
plain torch still load, and read back with clear errors for checkpoints without one."""

import json

import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_opt.pt.model_persistence_format_manager import PTModelPersistenceFormatManager

from medflare.artefacts import provenance as prov
from medflare.artefacts.trained_model import load_checkpoint

from trained_models import segmentation_persistor, write_checkpoint

SERVER_CONFIG = {
    "num_rounds": 20,
    "workflows": [{"id": "sag", "path": "medflare.flare.workflows.MetricsScatterAndGather",
                   "args": {"num_rounds": "{num_rounds}", "min_clients": 3}}],
    "components": [{"id": "aggregator", "path": "medflare.flare.aggregators.WeightedAggregator", "args": {}},
                   {"id": "persistor", "path": "medflare.flare.persistors.ModelPersistor", "args": {}}],
}
CLIENT_CONFIG = {"executors": [{"tasks": ["train"], "executor": {"path": "medflare.flare.executors.SegmentationExecutor",
                                                                  "args": {"fedprox_mu": 0.01}}}]}
CROSS_SITE = {"site-1": {"SRV_FL_global_model.pt": {"dice": 0.7, "dice_organ": 0.8},
                         "SRV_best_FL_global_model.pt": {"dice": 0.6}, "site-2": {"dice": 0.4}},
              "site-2": {"SRV_FL_global_model.pt": {"dice": 0.9}, "site-2": {"dice": 0.95}}}


def test_method_record_resolves_the_job_configs():
    method = prov.method_record(SERVER_CONFIG, CLIENT_CONFIG)
    assert method["executor"] == {"path": "medflare.flare.executors.SegmentationExecutor", "args": {"fedprox_mu": 0.01}}
    assert method["workflow"]["args"]["num_rounds"] == 20  # the "{num_rounds}" placeholder, resolved
    assert method["aggregator"]["path"] == "medflare.flare.aggregators.WeightedAggregator"
    assert "shareable_generator" not in method and prov.method_record(SERVER_CONFIG, None)["executor"] == {}


def test_cross_site_record_names_the_models():
    cross = prov.cross_site_record(CROSS_SITE, "global", "dice")
    assert cross["matrix"] == {"global": {"site-1": 0.7, "site-2": 0.9}, "best_global": {"site-1": 0.6},
                               "site-2": {"site-1": 0.4, "site-2": 0.95}}
    assert cross["metrics"] == {"site-1": {"dice": 0.7, "dice_organ": 0.8}, "site-2": {"dice": 0.9}}
    table = prov.cross_site_table(cross)
    assert table[2] == "| model | site-1 | site-2 |" and table[4] == "| global | 0.700 | 0.900 |"
    assert table[5] == "| best_global | 0.600 |  |"
    assert prov.cross_site_table(None) == ["No cross-site evaluation was recorded for this model."]


def _training_result(site: str, n: int, dice: float):
    dxo = DXO(DataKind.WEIGHTS, data={})
    dxo.set_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, n)
    dxo.set_meta_prop(MetaKey.INITIAL_METRICS, {"dice": dice})
    dxo.set_meta_prop("medflare_report", {"modality": "t1", "test_dice": dice - 0.1})
    result = dxo.to_shareable()
    result.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    return result


def test_persistor_records_sites_rounds_and_cross_site(tmp_path):
    persistor = segmentation_persistor({"spatial_size": (32, 32), "class_names": ["bg", "organ", "lesion"]})
    ctx = FLContext()
    ctx.set_prop(AppConstants.CURRENT_ROUND, 4, private=True, sticky=False)
    for site, n, dice in (("site-1", 160, 0.7), ("site-2", 120, 0.8)):
        ctx.set_prop(AppConstants.TRAINING_RESULT, _training_result(site, n, dice), private=True, sticky=False)
        persistor.handle_event(AppEventType.BEFORE_CONTRIBUTION_ACCEPT, ctx)
    for site, by_owner in CROSS_SITE.items():
        for owner, metrics in by_owner.items():
            ctx.set_prop(AppConstants.DATA_CLIENT, site, private=True, sticky=False)
            ctx.set_prop(AppConstants.MODEL_OWNER, owner, private=True, sticky=False)
            ctx.set_prop(AppConstants.VALIDATION_RESULT, DXO(DataKind.METRICS, data=metrics).to_shareable(),
                         private=True, sticky=False)
            persistor.handle_event(AppEventType.VALIDATION_RESULT_RECEIVED, ctx)
    path = write_checkpoint(str(tmp_path / "FL_global_model.pt"), persistor, rounds=5)

    record = load_checkpoint(path).provenance
    assert record["task"] == "segmentation" and record["checkpoint"] == {"model": "global", "rounds_completed": 5}
    assert record["model"] == {"name": "unet", "spatial_dims": 2, "in_channels": 1, "out_channels": 3}
    assert record["preprocessing"]["spatial_size"] == [32, 32] and record["preprocessing"]["intensity"] == "minmax"
    assert record["preprocessing"]["class_names"] == ["bg", "organ", "lesion"]
    assert record["sites"]["site-1"] == {"n_samples": 160, "round": 4,
                                         "metrics": {"dice": 0.7, "modality": "t1", "test_dice": pytest.approx(0.6)}}
    assert record["cross_site"]["matrix"]["global"] == {"site-1": 0.7, "site-2": 0.9}
    assert "torch" in record["versions"]
    text = "\n".join(prov.summary_lines(record))
    assert "site-1 (160), site-2 (120)" in text and "| global | 0.700 | 0.900 |" in text


def test_checkpoint_stays_loadable_by_flare_and_torch(tmp_path):
    persistor = segmentation_persistor()
    path = write_checkpoint(str(tmp_path / "FL_global_model.pt"), persistor)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # plain types only
    assert prov.PROVENANCE_KEY in checkpoint
    learnable = PTModelPersistenceFormatManager(checkpoint).to_model_learnable(None)  # FLARE's own reading
    assert set(learnable["weights"]) == set(persistor.model.state_dict())
    from monai.networks.nets import UNet

    UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(16, 32, 64), strides=(2, 2),
         num_res_units=1, norm="instance").load_state_dict(checkpoint["model"])
    json.dumps(checkpoint[prov.PROVENANCE_KEY])


def test_best_model_event_records_the_rounds_of_the_evaluated_model(tmp_path):
    persistor = segmentation_persistor()
    persistor.persistence_manager = PTModelPersistenceFormatManager(dict(persistor.model.state_dict()))
    ctx = FLContext()
    ctx.set_prop(AppConstants.CURRENT_ROUND, 7, private=True, sticky=False)
    persistor._best_ckpt_save_path = str(tmp_path / "best_FL_global_model.pt")
    persistor.handle_event(AppEventType.GLOBAL_BEST_MODEL_AVAILABLE, ctx)
    record = torch.load(persistor._best_ckpt_save_path, weights_only=True)[prov.PROVENANCE_KEY]
    assert record["checkpoint"] == {"model": "best_global", "rounds_completed": 7}


def test_old_or_incomplete_records_are_refused_with_the_file_named():
    with pytest.raises(prov.ProvenanceError, match="old.pt has no medflare provenance record"):
        prov.read_provenance({"model": {}}, "old.pt")
    with pytest.raises(prov.ProvenanceError, match="new.pt: provenance record of an unknown version"):
        prov.read_provenance({prov.PROVENANCE_KEY: {"version": 99}}, "new.pt")
    with pytest.raises(prov.ProvenanceError, match="x.pt: provenance record has no preprocessing"):
        prov.read_provenance({prov.PROVENANCE_KEY: {"version": 1, "model": {"name": "unet"}}}, "x.pt")
