"""What a checkpoint knows about itself: the model, the preprocessing, the job and how it was trained.

The server's persistor (:class:`medflare.flare.persistors.ModelPersistor`) writes a *provenance record* under
:data:`PROVENANCE_KEY` next to the weights of every checkpoint it saves (``{"model": state_dict, "meta_props": ...,
"medflare_provenance": {...}}``); FLARE keeps unknown top-level keys of a checkpoint, and its own loading reads only
``"model"``. The record holds plain JSON types only, so ``torch.load(..., weights_only=True)`` reads it.

Record fields (version :data:`PROVENANCE_VERSION`):

- ``task``: ``"segmentation"`` or ``"classification"``.
- ``model``: ``{"name": ..., **constructor arguments}`` (see :func:`medflare.networks.build_model`), and ``seed``.
- ``preprocessing``: the site loader's settings (segmentation: the :class:`~medflare.data.ImageSpec` fields plus
  ``class_names`` and ``eval_roi_size``; classification: ``num_classes``, ``in_channels``, ``spatial_size``).
- ``job``: ``{"name", "id"}``; ``method``: the executor, workflow, aggregator and shareable generator of the job,
  each ``{"path", "args"}``.
- ``checkpoint``: ``{"model": "global" | "best_global" | <site>, "rounds_completed": int}``.
- ``sites``: per site, ``{"n_samples", "round", "metrics"}`` from its last accepted training result (``metrics``:
  what it measured on the global model it received that round, and its report).
- ``cross_site``: ``{"key_metric", "model", "matrix": {model: {site: value}}, "metrics": {site: {...}}}`` once
  cross-site evaluation has run (``metrics``: every number of this checkpoint's model per site).
- ``versions``: of torch, MONAI and NVFlare at the server.

This module is pure (no FLARE): it builds, reads and formats records.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Mapping, Optional, Sequence

PROVENANCE_KEY = "medflare_provenance"
PROVENANCE_VERSION = 1

# CrossSiteModelEval's names of the server's models, and the checkpoint files they come from
SERVER_MODELS = {"global": ("SRV_FL_global_model.pt", "FL_global_model.pt"),
                 "best_global": ("SRV_best_FL_global_model.pt", "best_FL_global_model.pt")}
METHOD_COMPONENTS = ("aggregator", "shareable_generator")


class ProvenanceError(ValueError):
    """A checkpoint has no (or an unusable) provenance record; the message names the file."""


def plain(value: Any) -> Any:
    """``value`` as plain JSON types (tuples become lists), so the record loads with ``weights_only=True``."""
    return json.loads(json.dumps(value, default=str))


def resolve_placeholders(value: Any, variables: Mapping[str, Any]) -> Any:
    """Replace FLARE config placeholders such as ``"{num_rounds}"`` by the config's top-level values."""
    if isinstance(value, str):
        match = re.fullmatch(r"\{(\w+)\}", value)
        return variables.get(match.group(1), value) if match else value
    if isinstance(value, dict):
        return {k: resolve_placeholders(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_placeholders(v, variables) for v in value]
    return value


def _component(entry: Mapping[str, Any], variables: Mapping[str, Any]) -> Dict[str, Any]:
    return {"path": entry.get("path") or entry.get("name", ""),
            "args": resolve_placeholders(dict(entry.get("args") or {}), variables)}


def executor_entry(client_config: Mapping[str, Any]) -> Dict[str, Any]:
    """``{"path", "args"}`` of the (first) executor of a FLARE client config; empty when there is none."""
    for item in client_config.get("executors") or []:
        if isinstance(item.get("executor"), dict):
            return _component(item["executor"], client_config)
    return {}


def method_record(server_config: Mapping[str, Any], client_config: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The job's training method: its executor, first workflow, aggregator and shareable generator.

    Args:
        server_config: the job's ``config_fed_server.json``.
        client_config: the job's ``config_fed_client.json`` (``None`` when the server does not hold it).
    """
    record: Dict[str, Any] = {"executor": executor_entry(client_config or {})}
    workflows = server_config.get("workflows") or []
    if workflows:
        record["workflow"] = _component(workflows[0], server_config)
    components = {c.get("id"): c for c in server_config.get("components") or []}
    for name in METHOD_COMPONENTS:
        if name in components:
            record[name] = _component(components[name], server_config)
    return plain(record)


def read_job(run_dir: str) -> Dict[str, Any]:
    """The job's name (from ``meta.json``) and id (the run folder's name) of a server run folder."""
    run_id = os.path.basename(os.path.normpath(run_dir))
    name = None
    meta = os.path.join(run_dir, "meta.json")
    if os.path.isfile(meta):
        with open(meta) as f:
            name = json.load(f).get("name")
    return {"name": name or run_id, "id": run_id}


def read_config(app_dir: str, name: str) -> Optional[Dict[str, Any]]:
    """``<app_dir>/config/<name>`` as a dict, or ``None`` when absent."""
    path = os.path.join(app_dir, "config", name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def executor_preprocessing(executor: Any) -> Dict[str, Any]:
    """The preprocessing settings an executor's site loader applies, read from the executor object.

    Args:
        executor: a :class:`~medflare.flare.executors.SegmentationExecutor` (has ``spec``, an ``ImageSpec``) or a
            :class:`~medflare.flare.executors.ClassificationExecutor` (has ``num_classes``, ``in_channels``,
            ``spatial_size``).
    """
    spec = getattr(executor, "spec", None)
    if spec is not None:
        from dataclasses import asdict

        return plain({"task": "segmentation", **asdict(spec), "class_names": list(executor.class_names),
                      "eval_roi_size": executor.eval_roi_size})
    return plain({"task": "classification", "num_classes": executor.num_classes,
                  "in_channels": executor.in_channels, "spatial_size": executor.spatial_size,
                  "intensity": "zscore"})


def cross_site_record(results: Mapping[str, Mapping[str, Mapping[str, Any]]], model: str,
                      key_metric: str) -> Dict[str, Any]:
    """Cross-site evaluation seen from one checkpoint.

    Args:
        results: ``{data site: {model owner: metrics}}`` as FLARE's ``ValidationJsonGenerator`` collects them
            (owners ``SRV_FL_global_model.pt``, ``SRV_best_FL_global_model.pt`` or a site name).
        model: ``"global"``, ``"best_global"`` or a site name: the checkpoint this record goes into.
        key_metric: the metric of the matrix (``"dice"``, ``"bacc"``).
    """
    owner_names = {srv: name for name, (srv, _) in SERVER_MODELS.items()}
    matrix: Dict[str, Dict[str, float]] = {}
    mine: Dict[str, Dict[str, Any]] = {}
    for site, by_owner in sorted(results.items()):
        for owner, metrics in by_owner.items():
            name = owner_names.get(owner, owner)
            if isinstance(metrics, Mapping) and key_metric in metrics:
                matrix.setdefault(name, {})[site] = float(metrics[key_metric])
            if name == model:
                mine[site] = dict(metrics)
    return plain({"key_metric": key_metric, "model": model, "matrix": matrix, "metrics": mine})


def build_record(task: str, model: Mapping[str, Any], seed: int, preprocessing: Optional[Mapping[str, Any]],
                 job: Mapping[str, Any], method: Mapping[str, Any], checkpoint_model: str, rounds_completed: int,
                 sites: Mapping[str, Any], cross_site: Optional[Mapping[str, Any]] = None,
                 versions: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """Assemble a provenance record (see the module docstring for the fields)."""
    return plain({"version": PROVENANCE_VERSION, "task": task, "model": dict(model), "seed": seed,
                  "preprocessing": dict(preprocessing) if preprocessing else None, "job": dict(job),
                  "method": dict(method), "checkpoint": {"model": checkpoint_model,
                                                         "rounds_completed": int(rounds_completed)},
                  "sites": dict(sites), "cross_site": dict(cross_site) if cross_site else None,
                  "versions": dict(versions or {})})


def library_versions() -> Dict[str, str]:
    """Versions of the libraries a checkpoint's user needs to know about."""
    versions = {}
    for name in ("torch", "monai", "nvflare", "numpy"):
        try:
            versions[name] = str(__import__(name).__version__)
        except Exception:  # a library that is not installed is simply not recorded
            continue
    return versions


def read_provenance(checkpoint: Any, source: str) -> Dict[str, Any]:
    """The provenance record of a loaded checkpoint.

    Args:
        checkpoint: what ``torch.load`` returned for the file.
        source: the file, for messages.

    Raises:
        ProvenanceError: the checkpoint has no record (written before medflare recorded provenance, or by other
            code), or the record lacks the model or preprocessing settings.
    """
    record = checkpoint.get(PROVENANCE_KEY) if isinstance(checkpoint, Mapping) else None
    if record is None:
        raise ProvenanceError(
            f"{source} has no medflare provenance record: it was written before checkpoints described themselves "
            "(or by other code), so the model arguments and preprocessing are unknown. Re-run the job with the "
            "current medflare, or resume it from this checkpoint (persistor argument source_ckpt_file_full_name) "
            "for one round, to get a self-describing checkpoint.")
    if not isinstance(record, Mapping) or int(record.get("version", 0)) > PROVENANCE_VERSION:
        raise ProvenanceError(f"{source}: provenance record of an unknown version; update medflare to read it")
    if not record.get("model"):
        raise ProvenanceError(f"{source}: provenance record has no model arguments")
    if not record.get("preprocessing"):
        raise ProvenanceError(f"{source}: provenance record has no preprocessing settings (the server did not hold "
                              "the job's client config; give the persistor a 'preprocessing' argument)")
    return dict(record)


def summary_lines(record: Mapping[str, Any]) -> Sequence[str]:
    """Markdown lines describing a record: the job, method, data and training, then the cross-site table."""
    ckpt = record.get("checkpoint", {})
    job = record.get("job", {})
    method = record.get("method", {})
    lines = [f"- job: `{job.get('name', '?')}` (run `{job.get('id', '?')}`), model `{ckpt.get('model', '?')}` "
             f"after {ckpt.get('rounds_completed', '?')} rounds",
             f"- network: `{json.dumps(record.get('model'))}` (initial weights seed {record.get('seed')})",
             f"- preprocessing: `{json.dumps(record.get('preprocessing'))}`"]
    for part in ("executor", "workflow", "aggregator", "shareable_generator"):
        if method.get(part):
            lines.append(f"- {part}: `{method[part]['path']}` with `{json.dumps(method[part]['args'])}`")
    sites = record.get("sites") or {}
    if sites:
        lines.append("- sites (training samples): " + ", ".join(
            f"{s} ({info.get('n_samples', '?')})" for s, info in sorted(sites.items())))
    lines += ["", *cross_site_table(record.get("cross_site"))]
    versions = record.get("versions") or {}
    if versions:
        lines += ["", "Trained with " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + "."]
    return lines


def cross_site_table(cross: Optional[Mapping[str, Any]]) -> Sequence[str]:
    """Markdown table of the cross-site matrix (rows: models, columns: sites); a note when there is none."""
    if not cross or not cross.get("matrix"):
        return ["No cross-site evaluation was recorded for this model."]
    matrix = cross["matrix"]
    sites = sorted({s for row in matrix.values() for s in row})
    lines = [f"Cross-site {cross['key_metric']} (rows: models, columns: the sites' test data; this checkpoint is "
             f"`{cross['model']}`):", "", "| model | " + " | ".join(sites) + " |",
             "|---|" + "---|" * len(sites)]
    order = [m for m in SERVER_MODELS if m in matrix] + sorted(m for m in matrix if m not in SERVER_MODELS)
    for model in order:
        cells = [f"{matrix[model][s]:.3f}" if s in matrix[model] else "" for s in sites]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines
