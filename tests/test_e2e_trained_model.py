"""End to end on the built-in benchmark: a FedAvg run in the FLARE simulator leaves self-describing checkpoints;
medflare's inference on a site's test list reproduces that site's cross-site Dice; the exported MONAI bundle, run by
MONAI's runner, gives the same label maps; a site's local model exports too."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from medflare.segmentation.synthetic import SyntheticSegConfig
from medflare.segmentation.synthetic import ensure_site_dataset
from medflare.artefacts.bundle import export_bundle, verify_bundle
from medflare.artefacts.inference.inputs import segmentation_cases
from medflare.artefacts.inference.segmentation import Segmenter, segment_cases
from medflare.artefacts.trained_model import available_models, load_trained_model

from flare_runs import REPO, error_lines, prepare_job, run_simulator
from test_bundle import bundle_agreement

SITES = ["site-1", "site-2", "site-3"]
SYNTHETIC = {"n_train": 24, "n_val": 8, "n_test": 8}


def _run(name, tmp_path):
    """Run a 2-round copy of ``jobs/<name>`` on the small benchmark; its workspace and server run folder."""
    job = prepare_job(name, str(tmp_path), num_rounds=2, client_args={"synthetic": SYNTHETIC})
    ws = str(tmp_path / "ws")
    proc = run_simulator(job, ws, n_clients=3)
    assert proc.returncode == 0, open(ws + ".out").read()[-3000:]
    assert not error_lines(ws), error_lines(ws)[:10]
    return ws, os.path.join(ws, "server", "simulate_job")


@pytest.mark.slow
def test_trained_model_is_described_reused_and_exported(tmp_path):
    ws, run_dir = _run("fedavg", tmp_path)

    # provenance of both server checkpoints
    assert available_models(run_dir) == ["global", "best_global", *SITES]
    final, best = load_trained_model(ws, "global"), load_trained_model(ws, "best_global")
    record = final.provenance
    assert record["job"]["name"] == "fedavg" and record["checkpoint"] == {"model": "global", "rounds_completed": 2}
    assert record["method"]["executor"]["path"] == "medflare.flare.executors.SegmentationExecutor"
    assert record["method"]["aggregator"]["path"] == "medflare.flare.aggregators.WeightedAggregator"
    assert record["preprocessing"]["spatial_size"] == [64, 64] and record["preprocessing"]["intensity"] == "minmax"
    assert {s: v["n_samples"] for s, v in record["sites"].items()} == {s: 24 for s in SITES}
    assert sorted(record["cross_site"]["matrix"]) == ["best_global", "global", *SITES]
    assert best.provenance["checkpoint"]["model"] == "best_global"
    assert 1 <= best.provenance["checkpoint"]["rounds_completed"] <= 2

    # medflare's inference on site-1's test list: the training-resolution Dice is the cross-site number
    with open(os.path.join(run_dir, "cross_site_val", "cross_val_results.json")) as f:
        cross_site = json.load(f)["site-1"]["SRV_FL_global_model.pt"]
    from jobspec import SEGMENTATION_BENCHMARK

    datalist = ensure_site_dataset(SyntheticSegConfig(**{**SEGMENTATION_BENCHMARK, **SYNTHETIC}), 0).datalist
    segmenter = Segmenter(final, torch.device("cpu"))
    cases = segmentation_cases(datalist, key="test")
    start = time.time()
    segment_cases(segmenter, cases, str(tmp_path / "medflare_labelled"))
    per_case = (time.time() - start) / len(cases)
    summary = segmenter.summary()
    print(f"site-1 test Dice: inference {summary['dice']['dice']:.6f} (native {summary['native_dice']['dice']:.6f}),"
          f" cross-site evaluation {cross_site['dice']:.6f}; {per_case:.3f} s per case on CPU")
    assert summary["dice"]["dice"] == pytest.approx(cross_site["dice"], abs=1e-6)
    assert summary["dice"]["dice_wm"] == pytest.approx(cross_site["dice_wm"], abs=1e-6)

    # the MONAI bundle of the global model, run by MONAI's runner, against medflare's inference
    bundle = export_bundle(final, str(tmp_path / "bundle"))
    assert verify_bundle(bundle)["net_in_out"] == "ok"
    agreement = bundle_agreement(bundle, final, cases, tmp_path)
    print(f"voxel agreement, MONAI bundle vs medflare inference, {len(cases)} site-1 test images: {agreement:.6f}")
    assert agreement >= 0.999

    # a site's local model, kept by cross-site evaluation, exports the same way, with the command a user runs (in
    # its own process: the kept model is read through FLARE's serialiser, whose registry other tests change)
    out = str(tmp_path / "bundle_site2")
    cmd = [sys.executable, os.path.join(REPO, "tools", "export_bundle.py"), ws, out, "--model", "site-2"]
    export = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stderr[-3000:]
    assert os.path.isfile(os.path.join(out, "models", "model.pt"))
    assert "model `site-2`" in open(os.path.join(out, "docs", "README.md")).read()


@pytest.mark.slow
def test_personal_models_are_deployed_named_and_reused(tmp_path):
    """Ditto in the simulator: each site's personal model is the site's model of cross-site evaluation and of
    ``--model site-1``; it equals the personal model the site keeps, and inference with it reproduces the site's
    in-site Dice; the run summary names it as the model the site deploys."""
    ws, run_dir = _run("ditto", tmp_path)

    # the kept model is read through FLARE's serialiser, whose registry other tests change: in its own process
    state_file = os.path.join(ws, "site-1", "simulate_job", "app_site-1", "medflare_client_state.pt")
    check = (
        "import sys, json, torch; sys.path.insert(0, 'custom')\n"
        "from medflare.artefacts.trained_model import load_trained_model\n"
        f"personal = load_trained_model({ws!r}, 'site-1'); kept = torch.load({state_file!r}, weights_only=True)"
        "['personal_weights']\n"
        f"glob = load_trained_model({ws!r}, 'global').state_dict()\n"
        "print(json.dumps({'equal': all(torch.equal(v, kept[k].to(v.dtype)) for k, v in personal.state_dict().items()),"
        " 'differs_from_global': any(not torch.equal(v, glob[k]) for k, v in personal.state_dict().items())}))\n")
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"equal": True, "differs_from_global": True}

    with open(os.path.join(run_dir, "metrics", "metrics_summary.json")) as f:
        summary = json.load(f)
    assert summary["deployed"] == {s: "personal" for s in SITES}
    deployed = summary["test"]["deployed"]["sites"]
    assert {s: v["model"] for s, v in deployed.items()} == {s: s for s in SITES}
    in_site = summary["cross_site"]["matrix"]["site-1"]["site-1"]
    assert deployed["site-1"]["dice"] == in_site
    report = subprocess.run([sys.executable, os.path.join(REPO, "tools", "report.py"), ws], capture_output=True,
                            text=True, timeout=120)
    assert f"- site-1: its personal model, {in_site:.3f}" in report.stdout, report.stdout[-2000:]

    from jobspec import SEGMENTATION_BENCHMARK

    datalist = ensure_site_dataset(SyntheticSegConfig(**{**SEGMENTATION_BENCHMARK, **SYNTHETIC}), 0).datalist
    out = str(tmp_path / "personal_labelled")
    cmd = [sys.executable, os.path.join(REPO, "tools", "segment.py"), ws, datalist, "--key", "test", "--out", out,
           "--model", "site-1"]
    seg = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert seg.returncode == 0, seg.stderr[-3000:]
    assert f"labelled cases: {in_site:.4f} at the training resolution" in seg.stdout, seg.stdout[-2000:]
