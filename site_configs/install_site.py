#!/usr/bin/env python3
"""Install the medflare site templates into one FLARE participant's ``local/`` folder, with the site's own values.

Run by the admin of each site (hospital or server) on the machine that holds the site's startup kit, after
unpacking the kit (production) or after ``nvflare poc prepare`` (POC, which wipes ``local/``)::

    python site_configs/install_site.py KIT_DIR [--values FILE] [--set KEY=VALUE ...] [--dry-run]

``KIT_DIR`` is the participant folder that holds ``startup/`` and ``local/``. Whether it is a server or a client
kit, and the site's name, are read from ``startup/fed_server.json`` / ``startup/fed_client.json``.

Files written into ``KIT_DIR/local/`` (from ``site_configs/templates/``):

==========================  ======  ==============================================================================
file                        sites   content
==========================  ======  ==============================================================================
``medflare_site.json``      client  which data the site trains on (datalist + data root + modality, or synthetic)
``resources.json``          both    the kit's own ``resources.json.default`` with the template merged on top:
                                    GPUs (client), job storage (server; ``snapshot_storage`` is written but
                                    inert: FLARE 2.9 keeps no job snapshots), ``class_allow_list`` extended
                                    by ``allowed_classes`` (site-installed medflare), enforcement mode
``authorization.json``      both    who may submit jobs, who may ship code with a job (BYOC: nobody unless the
                                    values name roles in ``byoc_roles``), what the project admin may do here
``privacy.json``            client  result filters by privacy scope (what leaves the site)
``medflare_policy.json``    client  what medflare's executor may send besides the model: training curves, the
                                    local model for cross-site evaluation; weights or weight differences
``custom/medflare/``        both    only with ``install_code: true``: the site-installed copy of the code
==========================  ======  ==============================================================================

Values come from ``--values FILE`` (a JSON object of the keys below, or ``{"sites": {"<site>": {...}}}``, or
``{"defaults": {...}, "sites": {...}}``) and then ``--set KEY=VALUE`` (VALUE parsed as JSON when it parses, else
taken as a string). Unknown keys, keys that do not apply to the kit's kind, and values of the wrong type are
refused, and nothing is written.

Secure by default: no role may ship code (``byoc_roles: []``), the project admin has only the rights listed in
``project_admin_rights`` (no shell commands), training curves and local models stay at the site, and an allow-list
that admits every class (``allowed_classes: ["*"]``) or only warns (``class_list_enforcement_mode: "warn"``) is
refused unless ``accept_unchecked_classes: true`` says the site means it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TEMPLATES = os.path.join(HERE, "templates")
CODE_SOURCE = os.path.join(ROOT, "custom", "medflare")
PLACEHOLDER = re.compile(r"\{\{([A-Za-z0-9_.]+)\}\}")
ROLES = ("project_admin", "org_admin", "lead", "member")
PROJECT_ADMIN_RIGHTS = ("manage_job", "download_job", "view", "operate", "shell_commands")
DIFF_SCOPES = ("percentile-privacy", "svt-privacy")  # their filters act on WEIGHT_DIFF results only
RIGHT_EXPRESSION = re.compile(r"^(any|none|[on]:(site|submitter))$")


class InstallError(ValueError):
    """The values or the kit are not acceptable; nothing was written."""


# ---------------------------------------------------------------------------------------------- value schema
def _str(v: Any) -> bool:
    return isinstance(v, str) and v != ""


def _opt_str(v: Any) -> bool:
    return v is None or _str(v)


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(_str(x) for x in v)


def _roles(v: Any) -> bool:
    return isinstance(v, list) and all(x in ROLES for x in v)


def _rights(v: Any) -> bool:
    return isinstance(v, list) and all(x in PROJECT_ADMIN_RIGHTS for x in v)


def _opt_bool(v: Any) -> bool:
    return v is None or isinstance(v, bool)


def _one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda v: v in choices


def _exclude_vars(v: Any) -> bool:
    return isinstance(v, str) or _str_list(v) or v == []


@dataclass(frozen=True)
class Field:
    default: Any
    check: Callable[[Any], bool]
    expected: str
    kinds: Tuple[str, ...]
    help: str


FIELDS: Dict[str, Field] = {
    # --- data (medflare_site.json); either datalist (+ the keys after it) or synthetic_modality
    "datalist": Field(None, _opt_str, "path", ("client",),
                      "MONAI/Decathlon datalist JSON of this site (relative paths: relative to local/)"),
    "base_dir": Field(None, _opt_str, "path", ("client",),
                      "root that the datalist's image/label paths are relative to (default: the datalist's folder)"),
    "modality": Field(None, _opt_str, "string", ("client",), "imaging modality of this site (e.g. t1, ct)"),
    "train_key": Field("training", _str, "string", ("client",), "datalist key of the training cases"),
    "val_key": Field("validation", _str, "string", ("client",), "datalist key of the validation cases"),
    "cache": Field(True, _bool, "true/false", ("client",), "cache preprocessed images in memory"),
    "synthetic_modality": Field(None, _opt_str, "string", ("client",),
                                "use the built-in synthetic benchmark rendered in this modality instead of a datalist"),
    # --- resources.json
    "num_of_gpus": Field(0, _count, "integer >= 0", ("client",), "GPUs this site offers to jobs"),
    "mem_per_gpu_in_GiB": Field(0, _number, "number >= 0", ("client",), "memory per GPU offered to jobs"),
    "allowed_classes": Field(["medflare."], _str_list, "list of class paths or prefixes ending in '.'",
                             ("client", "server"),
                             "added to the kit's class_allow_list: what jobs WITHOUT shipped code may instantiate "
                             "([] refuses medflare jobs that rely on site-installed code)"),
    "class_list_enforcement_mode": Field("enforce", _one_of("enforce", "warn"), "enforce or warn",
                                         ("client", "server"), "refuse (enforce) or only log (warn) unlisted classes"),
    "accept_unchecked_classes": Field(False, _bool, "true/false", ("client", "server"),
                                      "needed for allowed_classes [\"*\"] or enforcement mode warn: both let jobs "
                                      "without shipped code run any class at this site"),
    "install_code": Field(False, _bool, "true/false", ("client", "server"),
                          "copy custom/medflare into local/custom/ (site-installed code; shadows shipped copies)"),
    "job_storage": Field(None, _opt_str, "path", ("server",),
                         "where the server keeps submitted jobs and results (default: what local/resources.json "
                         "already says, else the kit default /tmp/nvflare/jobs-storage)"),
    "snapshot_storage": Field(None, _opt_str, "path", ("server",),
                              "root_dir of the kit's snapshot_persistor (default: as for job_storage); inert in "
                              "FLARE 2.9, which keeps no job snapshots: a server crash ends the running job, which "
                              "is resumed from medflare_resume.pt with deploy/resume_job.py (docs/deployment.md "
                              "4.7)"),
    # --- authorization.json
    "submit_roles": Field(["project_admin", "lead"], _roles, f"list of roles from {list(ROLES)}",
                          ("client", "server"), "roles that may submit and clone jobs; checked by the server"),
    "byoc_roles": Field([], _roles, f"list of roles from {list(ROLES)}", ("client", "server"),
                        "roles whose jobs may ship code (app/custom) and so run any code here, allow-list or not; "
                        "checked by every site"),
    "project_admin_rights": Field(["manage_job", "download_job", "view", "operate"], _rights,
                                  f"list of rights from {list(PROJECT_ADMIN_RIGHTS)}", ("client", "server"),
                                  "what the project admin may do at this site besides submit_roles/byoc_roles "
                                  "(shell_commands: read files of the site's workspace)"),
    # --- privacy.json
    "privacy_scope": Field("medflare", _one_of("medflare", "exclude-vars", *DIFF_SCOPES),
                           "medflare, exclude-vars, percentile-privacy or svt-privacy", ("client",),
                           "privacy scope applied to jobs that do not name one in their meta.json"),
    "exclude_vars": Field([], _exclude_vars, "regex string or list of parameter names", ("client",),
                          "parameters the exclude-vars scope removes from results"),
    "percentile": Field(10, _number, "number in 0..100", ("client",), "percentile-privacy: percentile cutoff"),
    "percentile_gamma": Field(0.01, _number, "number > 0", ("client",), "percentile-privacy: clipping bound"),
    "svt_fraction": Field(0.1, _number, "number in 0..1", ("client",), "svt-privacy: fraction of entries shared"),
    "svt_epsilon": Field(0.1, _number, "number > 0", ("client",), "svt-privacy: privacy budget per result"),
    "svt_noise_var": Field(0.1, _number, "number > 0", ("client",), "svt-privacy: noise added to shared entries"),
    "svt_gamma": Field(1e-5, _number, "number > 0", ("client",), "svt-privacy: clipping bound"),
    # --- medflare_policy.json
    "share_training_curves": Field(False, _bool, "true/false", ("client",),
                                   "send per-epoch losses and local metrics to the server (TensorBoard stream; not "
                                   "covered by the result filters)"),
    "share_local_model": Field(False, _bool, "true/false", ("client",),
                               "send this site's un-averaged local model for cross-site evaluation (the server "
                               "passes it to every other site)"),
    "send_weight_differences": Field(None, _opt_bool, "true/false/null", ("client",),
                                     "send WEIGHT_DIFF results (needed by percentile-privacy and svt-privacy; null: "
                                     "true exactly when privacy_scope is one of them)"),
}


# ---------------------------------------------------------------------------------------------- the kit
@dataclass(frozen=True)
class Kit:
    path: str
    kind: str  # "server" or "client"
    name: str

    @property
    def local(self) -> str:
        return os.path.join(self.path, "local")


def read_kit(path: str) -> Kit:
    """Identify a provisioned FLARE participant folder (server or client)."""
    path = os.path.abspath(path)
    startup = os.path.join(path, "startup")
    server_cfg = os.path.join(startup, "fed_server.json")
    client_cfg = os.path.join(startup, "fed_client.json")
    if os.path.isfile(client_cfg):
        with open(client_cfg) as f:
            cfg = json.load(f)
        name = (cfg.get("client") or {}).get("fqsn") or os.path.basename(path)
        kind = "client"
    elif os.path.isfile(server_cfg):
        name = os.path.basename(path)
        kind = "server"
    else:
        raise InstallError(f"{path} is not a FLARE server or client startup kit "
                           "(no startup/fed_server.json or startup/fed_client.json)")
    if not os.path.isfile(os.path.join(path, "local", "resources.json.default")):
        raise InstallError(f"{path}/local/resources.json.default is missing; install into a kit made by "
                           "'nvflare provision' or 'nvflare poc prepare'")
    return Kit(path=path, kind=kind, name=name)


# ---------------------------------------------------------------------------------------------- values
def parse_assignment(text: str) -> Tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON when possible (``2``, ``true``, ``["lead"]``), else a string."""
    if "=" not in text:
        raise InstallError(f"--set expects KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def select_site_values(raw: Any, site: str, source: str) -> Dict[str, Any]:
    """The entry of ``site`` from a values file (plain, ``{"sites": ...}`` or ``{"defaults":..., "sites":...}``)."""
    if not isinstance(raw, dict):
        raise InstallError(f"{source}: expected a JSON object")
    if "sites" not in raw and "defaults" not in raw:
        return dict(raw)
    extra = set(raw) - {"sites", "defaults"}
    if extra:
        raise InstallError(f"{source}: unknown top-level keys {sorted(extra)} next to 'sites'/'defaults'")
    values = dict(raw.get("defaults") or {})
    sites = raw.get("sites") or {}
    if site not in sites and not raw.get("defaults"):
        raise InstallError(f"{source} has no values for site '{site}' (it lists {sorted(sites)})")
    values.update(sites.get(site) or {})
    return values


def resolve_values(kit: Kit, given: Dict[str, Any], source: str = "values") -> Dict[str, Any]:
    """Check ``given`` against :data:`FIELDS` for this kit's kind and fill in the defaults."""
    unknown = sorted(k for k in given if k not in FIELDS)
    if unknown:
        raise InstallError(f"{source}: unknown keys {unknown}; known keys: {sorted(FIELDS)}")
    wrong_kind = sorted(k for k in given if kit.kind not in FIELDS[k].kinds)
    if wrong_kind:
        raise InstallError(f"{source}: {wrong_kind} do not apply to the {kit.kind} kit '{kit.name}'")
    values = {}
    for key, field in FIELDS.items():
        if kit.kind not in field.kinds:
            continue
        value = given.get(key, copy.deepcopy(field.default))
        if not field.check(value):
            raise InstallError(f"{source}: '{key}' must be {field.expected}, got {value!r}")
        values[key] = value
    if kit.kind == "client":
        if values["datalist"] and values["synthetic_modality"]:
            raise InstallError(f"{source}: give either 'datalist' or 'synthetic_modality', not both")
        if not values["datalist"]:
            set_data = sorted(k for k in ("base_dir", "modality") if given.get(k) is not None)
            if set_data:
                raise InstallError(f"{source}: {set_data} need 'datalist'")
        if not 0 <= values["percentile"] <= 100 or values["percentile_gamma"] <= 0:
            raise InstallError(f"{source}: percentile must be in 0..100 and percentile_gamma > 0")
        if values["send_weight_differences"] is None:
            values["send_weight_differences"] = values["privacy_scope"] in DIFF_SCOPES
        elif values["privacy_scope"] in DIFF_SCOPES and not values["send_weight_differences"]:
            raise InstallError(f"{source}: privacy_scope {values['privacy_scope']!r} filters weight differences only; "
                               "with send_weight_differences false the site would send full weights that the filter "
                               "leaves untouched. Leave send_weight_differences out (or set it true)")
        if not 0 < values["svt_fraction"] <= 1 or min(values["svt_epsilon"], values["svt_noise_var"],
                                                       values["svt_gamma"]) <= 0:
            raise InstallError(f"{source}: svt_fraction must be in (0, 1] and svt_epsilon, svt_noise_var, svt_gamma "
                               "> 0")
    for prefix in values["allowed_classes"]:
        if prefix != "*" and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\.?", prefix):
            raise InstallError(f"{source}: allowed_classes entry {prefix!r} is not a class path or package prefix")
    unchecked = unchecked_class_settings(values)
    if unchecked and not values["accept_unchecked_classes"]:
        raise InstallError(f"{source}: {' and '.join(unchecked)} would let any job without shipped code instantiate "
                           "any Python class at this site (the class allow-list is what stops a job from running "
                           "arbitrary components); set accept_unchecked_classes: true if that is intended")
    return values


def unchecked_class_settings(values: Dict[str, Any]) -> List[str]:
    """The settings that switch the class allow-list off, in words (empty if it is enforced)."""
    out = []
    if "*" in values["allowed_classes"]:
        out.append('allowed_classes ["*"]')
    if values["class_list_enforcement_mode"] == "warn":
        out.append("class_list_enforcement_mode 'warn' (unlisted classes are only logged, then run)")
    return out


def install_warnings(values: Dict[str, Any]) -> List[str]:
    """What the site admin should know about the values (nothing is refused for these)."""
    notes = []
    if values["byoc_roles"]:
        notes.append(f"roles {values['byoc_roles']} may ship code with a job (BYOC): such jobs run any Python code "
                     "at this site and the class allow-list does not apply to them")
    if values["accept_unchecked_classes"] and unchecked_class_settings(values):
        notes.append("the class allow-list is not enforced at this site: " + " and ".join(
            unchecked_class_settings(values)))
    if "shell_commands" in values["project_admin_rights"]:
        notes.append("the project admin may run shell commands (ls, cat, grep...) in this site's workspace")
    return notes


def template_values(values: Dict[str, Any]) -> Dict[str, Any]:
    """Values as the templates name them: the schema's keys plus the rights derived from the role lists."""
    out = dict(values)
    clone_scope = {"project_admin": "any", "org_admin": "o:submitter"}
    for role in ROLES:
        submit = role in values["submit_roles"]
        out[f"submit_job.{role}"] = "any" if submit else "none"
        out[f"clone_job.{role}"] = clone_scope.get(role, "n:submitter") if submit else "none"
        out[f"byoc.{role}"] = "any" if role in values["byoc_roles"] else "none"
    for right in PROJECT_ADMIN_RIGHTS:
        out[f"{right}.project_admin"] = "any" if right in values["project_admin_rights"] else "none"
    return out


# ---------------------------------------------------------------------------------------------- templates
def render(node: Any, values: Dict[str, Any], template: str) -> Any:
    """Fill ``{{name}}`` placeholders. A string that is exactly one placeholder takes the value with its JSON
    type; a key whose value renders to ``None`` is dropped (the default of the file it is merged into stays)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            r = render(v, values, template)
            if r is not None:
                out[k] = r
        return out
    if isinstance(node, list):
        return [render(v, values, template) for v in node]
    if isinstance(node, str):
        names = PLACEHOLDER.findall(node)
        missing = [n for n in names if n not in values]
        if missing:
            raise InstallError(f"template {template} uses undefined values {missing}")
        whole = PLACEHOLDER.fullmatch(node)
        if whole:
            return copy.deepcopy(values[whole.group(1)])
        return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), node)
    return node


def load_template(name: str, values: Dict[str, Any]) -> Dict[str, Any]:
    with open(os.path.join(TEMPLATES, name)) as f:
        return render(json.load(f), values, name)


def merge_resources(base: Dict[str, Any], overlay: Dict[str, Any]) -> Dict[str, Any]:
    """``overlay`` merged onto the kit's ``resources.json.default``: nested objects merge key by key,
    ``components`` merge by ``id``, ``class_allow_list`` entries are appended to the kit's list."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if key == "class_allow_list":
            current = list(out.get(key) or [])
            if not current:
                from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
                current = list(DEFAULT_CLASS_ALLOW_LIST)
            out[key] = current + [c for c in value if c not in current]
        elif key == "components":
            comps = out.setdefault("components", [])
            for comp in value:
                match = [c for c in comps if c.get("id") == comp["id"]]
                if not match:
                    raise InstallError(f"the kit's resources.json.default has no component '{comp['id']}' to adjust")
                _merge_dict(match[0], {k: v for k, v in comp.items() if k != "id"}, f"components.{comp['id']}")
        elif isinstance(value, dict):
            if not isinstance(out.get(key), dict):
                raise InstallError(f"the kit's resources.json.default has no '{key}' section to adjust")
            _merge_dict(out[key], value, key)
        else:
            out[key] = value
    return out


def _merge_dict(target: Dict[str, Any], overlay: Dict[str, Any], where: str) -> None:
    for key, value in overlay.items():
        if isinstance(value, dict):
            if not isinstance(target.get(key), dict):
                raise InstallError(f"the kit's resources.json.default has no '{where}.{key}' section to adjust")
            _merge_dict(target[key], value, f"{where}.{key}")
        else:
            target[key] = value


def current_storage(kit: Kit) -> Dict[str, Optional[str]]:
    """Job and snapshot storage of the server's current ``resources.json`` (``nvflare poc prepare`` points them
    into the POC workspace there); kept when the values do not set them."""
    path = os.path.join(kit.local, "resources.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        current = json.load(f)
    out: Dict[str, Optional[str]] = {}
    try:
        out["snapshot_storage"] = current["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"]
    except (KeyError, TypeError):
        pass
    for comp in current.get("components") or []:
        if comp.get("id") == "job_manager":
            out["job_storage"] = (comp.get("args") or {}).get("uri_root")
    return out


def validate_authorization(policy: Dict[str, Any]) -> None:
    """Parse the policy with FLARE's own parser (what the site does at start-up)."""
    from nvflare.fuel.sec.authz import parse_policy_config
    from nvflare.security.security import COMMAND_CATEGORIES

    _, err = parse_policy_config(policy, COMMAND_CATEGORIES)
    if err:
        raise InstallError(f"authorization.json would be rejected by FLARE: {err}")


def validate_site_data(kit: Kit, data: Dict[str, Any], check_files: bool) -> None:
    """Validate medflare_site.json with medflare's own parser, and that the datalist exists."""
    sys.path.insert(0, os.path.join(ROOT, "custom"))
    try:
        from medflare.data.datalist import DataError
        from medflare.data.site_config import parse_site_config
        from medflare.segmentation.synthetic import DEFAULT_MODALITIES
    finally:
        sys.path.pop(0)
    target = os.path.join(kit.local, "medflare_site.json")
    try:
        parsed = parse_site_config(data, kit.name, target, tuple(DEFAULT_MODALITIES))
    except DataError as e:
        raise InstallError(str(e)) from None
    if check_files and parsed.datalist:
        datalist = parsed.datalist
        if not os.path.isabs(data["datalist"]):
            datalist = os.path.join(kit.local, os.path.expanduser(data["datalist"]))
        if not os.path.isfile(datalist):
            raise InstallError(f"datalist {datalist} does not exist (use --no-data-check to install anyway)")


def validate_site_policy(policy: Dict[str, Any]) -> None:
    """Validate medflare_policy.json with medflare's own parser (what the executor does at the site)."""
    sys.path.insert(0, os.path.join(ROOT, "custom"))
    try:
        from medflare.flare.site_policy import PolicyError, parse_site_policy
    finally:
        sys.path.pop(0)
    try:
        parse_site_policy(policy, "medflare_policy.json")
    except PolicyError as e:
        raise InstallError(str(e)) from None


# ---------------------------------------------------------------------------------------------- install
def build_files(kit: Kit, values: Dict[str, Any], check_data: bool = True) -> Dict[str, Dict[str, Any]]:
    """The JSON files to write into ``local/``, by file name."""
    tv = template_values(values)
    files: Dict[str, Dict[str, Any]] = {}
    if kit.kind == "client":
        if values["datalist"]:
            files["medflare_site.json"] = load_template("medflare_site.datalist.json", tv)
        elif values["synthetic_modality"]:
            files["medflare_site.json"] = load_template("medflare_site.synthetic.json", tv)
        if "medflare_site.json" in files:
            validate_site_data(kit, files["medflare_site.json"], check_data)
        files["privacy.json"] = load_template("privacy.json", tv)
        files["medflare_policy.json"] = load_template("medflare_policy.json", tv)
        validate_site_policy(files["medflare_policy.json"])
    with open(os.path.join(kit.local, "resources.json.default")) as f:
        base = json.load(f)
    if kit.kind == "server":
        current = current_storage(kit)
        for key in ("job_storage", "snapshot_storage"):
            if tv[key] is None:
                tv[key] = current.get(key)
    overlay = load_template(f"resources.{kit.kind}.json", tv)
    files["resources.json"] = merge_resources(base, overlay)
    files["authorization.json"] = load_template("authorization.json", tv)
    validate_authorization(files["authorization.json"])
    return files


def install(kit_dir: str, given: Dict[str, Any], source: str = "values", check_data: bool = True,
            dry_run: bool = False) -> Dict[str, Any]:
    """Validate, then write the site's files into ``kit_dir/local``. Returns ``{"kit", "files", "removed"}``."""
    kit = read_kit(kit_dir)
    values = resolve_values(kit, given, source)
    files = build_files(kit, values, check_data)
    written: List[str] = []
    removed: List[str] = []
    if not dry_run:
        for name, content in files.items():
            path = os.path.join(kit.local, name)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(content, f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
            written.append(path)
        stale = os.path.join(kit.local, "medflare_site.json")
        if kit.kind == "client" and "medflare_site.json" not in files and os.path.exists(stale):
            os.remove(stale)
            removed.append(stale)
        # local/custom/ is put on the site's Python path only if it exists when the site starts; keeping it
        # present lets a later install_code run take effect for the next job without a restart.
        os.makedirs(os.path.join(kit.local, "custom"), exist_ok=True)
        code = os.path.join(kit.local, "custom", "medflare")
        if values["install_code"]:
            if os.path.exists(code):
                shutil.rmtree(code)
            shutil.copytree(CODE_SOURCE, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            written.append(code)
        elif os.path.exists(code):
            shutil.rmtree(code)
            removed.append(code)
    return {"kit": kit, "values": values, "files": files, "written": written, "removed": removed,
            "warnings": install_warnings(values)}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kit", nargs="?", help="participant folder of the site (holds startup/ and local/)")
    parser.add_argument("--values", help="JSON file of site values (plain, or keyed by site under 'sites')")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="one value (repeatable)")
    parser.add_argument("--no-data-check", action="store_true", help="do not require the datalist to exist yet")
    parser.add_argument("--dry-run", action="store_true", help="print the files instead of writing them")
    parser.add_argument("--list-keys", action="store_true", help="list the accepted keys and exit")
    args = parser.parse_args(argv)
    if args.list_keys:
        for key, field in FIELDS.items():
            print(f"{key:28s} {'/'.join(field.kinds):14s} default {json.dumps(field.default):14s} {field.help}")
        return 0
    if not args.kit:
        parser.error("the kit folder is required")
    try:
        kit = read_kit(args.kit)
        given: Dict[str, Any] = {}
        source = "--set"
        if args.values:
            with open(args.values) as f:
                try:
                    raw = json.load(f)
                except json.JSONDecodeError as e:
                    raise InstallError(f"{args.values} is not valid JSON: {e}") from None
            given = select_site_values(raw, kit.name, args.values)
            source = args.values
        for item in args.set:
            key, value = parse_assignment(item)
            given[key] = value
        result = install(args.kit, given, source, check_data=not args.no_data_check, dry_run=args.dry_run)
    except InstallError as e:
        print(f"install_site: error: {e}", file=sys.stderr)
        return 2
    kit = result["kit"]
    for note in result["warnings"]:
        print(f"install_site: note: {note}", file=sys.stderr)
    if args.dry_run:
        for name, content in result["files"].items():
            print(f"--- {kit.local}/{name}")
            print(json.dumps(content, indent=2))
        return 0
    print(f"installed medflare site config for {kit.kind} '{kit.name}' into {kit.local}:")
    for path in result["written"]:
        print(f"  wrote   {os.path.relpath(path, kit.path)}")
    for path in result["removed"]:
        print(f"  removed {os.path.relpath(path, kit.path)}")
    print("restart the site (or start it) for resources.json and authorization.json changes to take effect")
    return 0


if __name__ == "__main__":
    sys.exit(main())
