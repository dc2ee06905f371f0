"""Site config templates and their installer (``site_configs/install_site.py``), job staging and the localhost
project copies, checked against FLARE's own parsers on real provisioned kits (no FLARE system is started)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from flare_processes import REPO, isolated_env
from install_site import FIELDS, InstallError, install, read_kit, select_site_values
from local_project import free_port, localize, write_local_project
from stage_job import StageError, stage_job

INSTALL = os.path.join(REPO, "site_configs", "install_site.py")
MEDFLARE_CLASS = "medflare.flare.executors.SegmentationExecutor"


def _provision(project_src: str, root: str) -> str:
    project = write_local_project(project_src, os.path.join(root, "project.yml"))
    nvflare = os.path.join(os.path.dirname(sys.executable), "nvflare")
    subprocess.run([nvflare, "provision", "-p", os.path.join(root, "project.yml"), "-w", os.path.join(root, "ws")],
                   env=isolated_env(root), check=True, timeout=120, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL)
    return os.path.join(root, "ws", project["name"], "prod_00")


@pytest.fixture(scope="module")
def prod(tmp_path_factory):
    """Kits provisioned from the repo's production project.yml (localhost copy)."""
    return _provision(os.path.join(REPO, "deploy", "project.yml"), str(tmp_path_factory.mktemp("kits")))


@pytest.fixture
def kits(prod, tmp_path):
    """Fresh copies of the server kit and one hospital kit for a test to modify."""
    import shutil

    out = {}
    for name in ("localhost", "hospital-a"):
        out[name] = str(tmp_path / name)
        shutil.copytree(os.path.join(prod, name), out[name])
    return out


def _json(path):
    with open(path) as f:
        return json.load(f)


def _workspace(kit):
    from nvflare.apis.workspace import Workspace

    return Workspace(root_dir=kit, site_name=os.path.basename(kit))


def _authorized(kit, component_path):
    from nvflare.app_common.widgets.component_path_authorizer import ComponentPathAuthorizer
    from nvflare.apis.fl_exception import UnsafeComponentError

    try:
        ComponentPathAuthorizer().authorize_component_config({"path": component_path}, workspace=_workspace(kit))
        return True
    except UnsafeComponentError:
        return False


def _right(kit, role, right, org="hospital_a"):
    from nvflare.fuel.sec.authz import AuthzContext, Person
    from nvflare.security.security import FLAuthorizer

    authorizer = FLAuthorizer(org, _json(os.path.join(kit, "local", "authorization.json")))
    user = Person("someone@example.org", org, role)
    ok, _ = authorizer.authorize(AuthzContext(right=right, user=user, submitter=user))
    return ok


def test_read_kit_identifies_server_and_client(kits):
    assert read_kit(kits["localhost"]).kind == "server"
    kit = read_kit(kits["hospital-a"])
    assert (kit.kind, kit.name) == ("client", "hospital-a")


def test_client_install_writes_the_site_files(kits):
    kit = kits["hospital-a"]
    install(kit, {"synthetic_modality": "ct", "num_of_gpus": 2, "mem_per_gpu_in_GiB": 40})
    local = os.path.join(kit, "local")
    assert _json(os.path.join(local, "medflare_site.json")) == {"synthetic": {"modality": "ct"}}
    resources = _json(os.path.join(local, "resources.json"))
    default = _json(os.path.join(local, "resources.json.default"))
    assert resources["class_allow_list"] == default["class_allow_list"] + ["medflare."]
    manager = [c for c in resources["components"] if c["id"] == "resource_manager"][0]
    assert manager["args"]["num_of_gpus"] == 2 and manager["args"]["mem_per_gpu_in_GiB"] == 40
    assert manager["args"]["expiration_period"] == 300  # the rest of the kit's default is kept
    assert resources["class_list_enforcement_mode"] == "enforce"
    assert os.path.isfile(os.path.join(local, "authorization.json"))
    assert _json(os.path.join(local, "privacy.json"))["default_scope"] == "medflare"
    assert _json(os.path.join(local, "medflare_policy.json")) == {
        "share_training_curves": False, "share_local_model": False, "send_weight_differences": False}
    assert not os.path.exists(os.path.join(local, "custom", "medflare"))


def test_site_policy_is_read_by_medflare(kits):
    from medflare.flare.site_policy import read_site_policy

    kit = kits["hospital-a"]
    local = os.path.join(kit, "local")
    install(kit, {})
    policy = read_site_policy(local)
    assert not (policy.share_training_curves or policy.share_local_model or policy.send_weight_differences)
    install(kit, {"share_training_curves": True, "privacy_scope": "svt-privacy"})
    policy = read_site_policy(local)
    assert policy.share_training_curves and policy.send_weight_differences and not policy.share_local_model


def test_site_data_config_is_read_by_medflare(kits, tmp_path):
    from medflare.data.site_config import resolve_site_config
    from medflare.segmentation.synthetic import DEFAULT_MODALITIES

    kit = kits["hospital-a"]
    data = tmp_path / "data"
    data.mkdir()
    (data / "hospital-a.json").write_text(json.dumps({"training": [], "validation": []}))
    install(kit, {"datalist": str(data / "hospital-a.json"), "base_dir": str(data), "modality": "t1",
                  "cache": False})
    cfg = resolve_site_config("hospital-a", os.path.join(kit, "local"), DEFAULT_MODALITIES)
    assert cfg.datalist == str(data / "hospital-a.json") and cfg.base_dir == str(data)
    assert (cfg.modality, cfg.cache, cfg.synthetic_index) == ("t1", False, None)

    install(kit, {"synthetic_modality": "flair"})
    cfg = resolve_site_config("hospital-a", os.path.join(kit, "local"), DEFAULT_MODALITIES)
    assert cfg.synthetic_modality == "flair"

    install(kit, {})  # no data values: the data config is removed (built-in benchmark for site-N names)
    assert not os.path.exists(os.path.join(kit, "local", "medflare_site.json"))


def test_missing_datalist_is_refused_unless_told(kits, tmp_path):
    with pytest.raises(InstallError, match="does not exist"):
        install(kits["hospital-a"], {"datalist": str(tmp_path / "nope.json")})
    install(kits["hospital-a"], {"datalist": str(tmp_path / "nope.json")}, check_data=False)


@pytest.mark.parametrize("values, message", [
    ({"datalist_path": "x"}, "unknown keys \\['datalist_path'\\]"),
    ({"num_of_gpus": -1}, "'num_of_gpus' must be integer >= 0"),
    ({"byoc_roles": ["root"]}, "'byoc_roles' must be list of roles"),
    ({"project_admin_rights": ["everything"]}, "'project_admin_rights' must be list of rights"),
    ({"allowed_classes": ["*"]}, "any Python class at this site.*accept_unchecked_classes: true"),
    ({"class_list_enforcement_mode": "warn"}, "only logged, then run.*accept_unchecked_classes: true"),
    ({"privacy_scope": "percentile-privacy", "send_weight_differences": False}, "filters weight differences only"),
    ({"svt_fraction": 2}, "svt_fraction must be in"),
    ({"share_local_model": "no"}, "'share_local_model' must be true/false"),
    ({"class_list_enforcement_mode": "off"}, "enforce or warn"),
    ({"datalist": "a.json", "synthetic_modality": "t1"}, "either 'datalist' or 'synthetic_modality'"),
    ({"modality": "t1"}, "need 'datalist'"),
    ({"synthetic_modality": "pet"}, "synthetic modality 'pet'"),
    ({"allowed_classes": ["not a path"]}, "is not a class path"),
    ({"privacy_scope": "nothing"}, "'privacy_scope' must be"),
])
def test_bad_values_are_refused_and_nothing_is_written(kits, values, message):
    local = os.path.join(kits["hospital-a"], "local")
    before = sorted(os.listdir(local))
    with pytest.raises(InstallError, match=message):
        install(kits["hospital-a"], values)
    assert sorted(os.listdir(local)) == before


def test_client_keys_are_refused_for_the_server(kits):
    with pytest.raises(InstallError, match="do not apply to the server"):
        install(kits["localhost"], {"num_of_gpus": 1})


def test_cli_refuses_unknown_keys(kits, tmp_path):
    values = tmp_path / "values.json"
    values.write_text(json.dumps({"sites": {"hospital-a": {"synthetic_modality": "t1", "gpus": 1}}}))
    proc = subprocess.run([sys.executable, INSTALL, kits["hospital-a"], "--values", str(values)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown keys ['gpus']" in proc.stderr
    assert not os.path.exists(os.path.join(kits["hospital-a"], "local", "resources.json"))


def test_cli_installs_with_values_file_and_set(kits, tmp_path):
    values = tmp_path / "values.json"
    values.write_text(json.dumps({"defaults": {"byoc_roles": []},
                                  "sites": {"hospital-a": {"synthetic_modality": "t2"}}}))
    proc = subprocess.run([sys.executable, INSTALL, kits["hospital-a"], "--values", str(values),
                           "--set", "num_of_gpus=1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    local = os.path.join(kits["hospital-a"], "local")
    assert _json(os.path.join(local, "medflare_site.json")) == {"synthetic": {"modality": "t2"}}
    manager = [c for c in _json(os.path.join(local, "resources.json"))["components"] if c["id"] == "resource_manager"]
    assert manager[0]["args"]["num_of_gpus"] == 1
    assert not _right(kits["hospital-a"], "lead", "byoc")


def test_dry_run_writes_nothing(kits):
    local = os.path.join(kits["hospital-a"], "local")
    before = sorted(os.listdir(local))
    proc = subprocess.run([sys.executable, INSTALL, kits["hospital-a"], "--dry-run", "--set", "num_of_gpus=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "resources.json" in proc.stdout and sorted(os.listdir(local)) == before


def test_server_install_sets_storage_and_keeps_the_rest(kits, tmp_path):
    kit = kits["localhost"]
    install(kit, {"job_storage": str(tmp_path / "jobs"), "snapshot_storage": str(tmp_path / "snap")})
    resources = _json(os.path.join(kit, "local", "resources.json"))
    default = _json(os.path.join(kit, "local", "resources.json.default"))
    manager = [c for c in resources["components"] if c["id"] == "job_manager"][0]
    assert manager["args"]["uri_root"] == str(tmp_path / "jobs")
    assert resources["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"] == str(tmp_path / "snap")
    assert [c["id"] for c in resources["components"]] == [c["id"] for c in default["components"]]
    assert resources["servers"] == default["servers"]
    assert not os.path.exists(os.path.join(kit, "local", "privacy.json"))


def test_server_keeps_storage_already_configured(kits, tmp_path):
    from nvflare.lighter.utils import update_storage_locations

    kit = kits["localhost"]
    update_storage_locations(local_dir=os.path.join(kit, "local"), workspace=str(tmp_path / "poc"))  # as poc prepare
    install(kit, {})
    resources = _json(os.path.join(kit, "local", "resources.json"))
    manager = [c for c in resources["components"] if c["id"] == "job_manager"][0]
    assert manager["args"]["uri_root"] == str(tmp_path / "poc" / "jobs-storage")
    assert resources["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"] == str(
        tmp_path / "poc" / "snapshot-storage")
    assert "medflare." in resources["class_allow_list"]


def test_allow_list_as_flare_enforces_it(kits):
    kit = kits["hospital-a"]
    install(kit, {})
    assert _authorized(kit, MEDFLARE_CLASS)
    assert _authorized(kit, "nvflare.app_opt.tracking.tb.tb_writer.TBWriter")
    assert not _authorized(kit, "somebody.else.Executor")
    install(kit, {"allowed_classes": []})
    assert not _authorized(kit, MEDFLARE_CLASS)
    result = install(kit, {"allowed_classes": [], "class_list_enforcement_mode": "warn",
                           "accept_unchecked_classes": True})  # only when the site says so explicitly
    assert _authorized(kit, MEDFLARE_CLASS)
    assert any("not enforced" in note for note in result["warnings"])
    install(kit, {"allowed_classes": ["*"], "accept_unchecked_classes": True})
    assert _authorized(kit, "somebody.else.Executor")


def test_authorization_rights_by_role(kits):
    kit = kits["localhost"]
    result = install(kit, {})  # secure default: project admins and leads submit, nobody ships code
    for role in ("project_admin", "lead", "org_admin", "member"):
        assert not _right(kit, role, "byoc"), role
    assert _right(kit, "project_admin", "submit_job") and _right(kit, "lead", "submit_job")
    assert not _right(kit, "org_admin", "submit_job") and not _right(kit, "member", "submit_job")
    assert _right(kit, "project_admin", "operate") and not _right(kit, "project_admin", "shell_commands")
    assert result["warnings"] == []
    result = install(kit, {"byoc_roles": ["lead"], "submit_roles": ["lead", "org_admin"],
                           "project_admin_rights": ["view"]})  # every right is the site's explicit choice
    assert _right(kit, "lead", "byoc") and not _right(kit, "project_admin", "byoc")
    assert _right(kit, "org_admin", "submit_job") and not _right(kit, "project_admin", "submit_job")
    assert _right(kit, "project_admin", "view") and not _right(kit, "project_admin", "operate")
    assert any("may ship code" in note and "allow-list does not apply" in note for note in result["warnings"])


def test_privacy_scopes_build_in_flare(kits):
    from nvflare.private.fed.app.fl_conf import create_privacy_manager

    kit = kits["hospital-a"]
    install(kit, {"privacy_scope": "exclude-vars", "exclude_vars": "^head\\."})
    manager = create_privacy_manager(_workspace(kit), names_only=False)
    assert manager.is_policy_defined()
    assert sorted(manager.name_to_scopes) == ["exclude-vars", "medflare", "percentile-privacy", "svt-privacy"]
    assert manager.default_scope.name == "exclude-vars"
    for scope in ("percentile-privacy", "svt-privacy"):  # the filters are built, for WEIGHT_DIFF results
        filters = [f for fs in manager.name_to_scopes[scope].task_result_filters.values() for f in fs]
        assert filters and all(f.data_kinds == ["WEIGHT_DIFF"] for f in filters), scope
    assert manager.name_to_scopes["medflare"].task_result_filters == {} or not any(
        manager.name_to_scopes["medflare"].task_result_filters.values())


def test_install_code_copies_the_package_and_removes_it_again(kits):
    kit = kits["localhost"]
    install(kit, {"install_code": True})
    code = os.path.join(kit, "local", "custom", "medflare")
    assert os.path.isfile(os.path.join(code, "flare", "executors", "segmentation.py"))
    assert not [d for d, _, _ in os.walk(code) if d.endswith("__pycache__")]
    install(kit, {"install_code": False})
    assert not os.path.exists(code) and os.path.isdir(os.path.join(kit, "local", "custom"))


def test_example_values_install(kits):
    examples = os.path.join(REPO, "site_configs", "examples")
    install(kits["localhost"], _json(os.path.join(examples, "server.json")))
    install(kits["hospital-a"], _json(os.path.join(examples, "hospital.json")), check_data=False)
    site = _json(os.path.join(kits["hospital-a"], "local", "medflare_site.json"))
    assert site["datalist"] == "/data/medflare/datalist.json" and site["modality"] == "t1"


def test_select_site_values():
    assert select_site_values({"num_of_gpus": 1}, "a", "f") == {"num_of_gpus": 1}
    raw = {"defaults": {"num_of_gpus": 1}, "sites": {"a": {"num_of_gpus": 2}}}
    assert select_site_values(raw, "a", "f") == {"num_of_gpus": 2}
    assert select_site_values(raw, "b", "f") == {"num_of_gpus": 1}
    with pytest.raises(InstallError, match="no values for site 'b'"):
        select_site_values({"sites": {"a": {}}}, "b", "f")
    with pytest.raises(InstallError, match="unknown top-level keys"):
        select_site_values({"sites": {}, "site": {}}, "a", "f")


def test_poc_site_values_install_into_poc_kits(tmp_path):
    prod = _provision(os.path.join(REPO, "poc", "project.yml"), str(tmp_path))
    with open(os.path.join(REPO, "poc", "sites.json")) as f:
        raw = json.load(f)
    names = sorted(os.listdir(prod))
    assert {"localhost", "site-1", "site-2", "site-3", "site-4"} <= set(names)
    for name in ["localhost", "site-1", "site-2", "site-3", "site-4"]:
        install(os.path.join(prod, name), select_site_values(raw, name, "poc/sites.json"))


def test_every_field_has_help_and_valid_default():
    for key, field in FIELDS.items():
        assert field.help and field.kinds, key
        assert field.check(field.default), key


def test_stage_job_shipped_and_site_code(tmp_path):
    src = os.path.join(REPO, "jobs", "fedavg")
    shipped = stage_job(src, str(tmp_path / "a"), num_rounds=1, min_clients=2,
                        executor_args={"synthetic": {"n_train": 8, "n_val": 2}})
    assert os.path.isfile(os.path.join(shipped, "app", "custom", "medflare", "__init__.py"))
    assert _json(os.path.join(shipped, "meta.json"))["min_clients"] == 2
    server = _json(os.path.join(shipped, "app", "config", "config_fed_server.json"))
    assert (server["num_rounds"], server["min_clients"]) == (1, 2)
    client = _json(os.path.join(shipped, "app", "config", "config_fed_client.json"))
    from jobspec import SEGMENTATION_BENCHMARK

    # the given settings replace the job's, the job's others stay
    assert client["executors"][0]["executor"]["args"]["synthetic"] == {**SEGMENTATION_BENCHMARK, "n_train": 8,
                                                                       "n_val": 2}
    cse = [w for w in server["workflows"] if w["id"] == "cross_site_validate"][0]
    assert cse["args"]["submit_model_task_name"] == ""  # staged jobs evaluate the global models only
    kept = stage_job(src, str(tmp_path / "k"), cross_site_local_models=True)
    cse = [w for w in _json(os.path.join(kept, "app", "config", "config_fed_server.json"))["workflows"]
           if w["id"] == "cross_site_validate"][0]
    assert "submit_model_task_name" not in cse["args"]

    site = stage_job(src, str(tmp_path / "b"), code="site", name="fedavg_site")
    assert os.path.basename(site) == "fedavg_site"
    assert _json(os.path.join(site, "meta.json"))["name"] == "fedavg_site"
    assert not os.path.exists(os.path.join(site, "app", "custom"))
    with pytest.raises(StageError):
        stage_job(str(tmp_path), str(tmp_path / "c"))


def test_localize_project():
    with open(os.path.join(REPO, "deploy", "project.yml")) as f:
        project = yaml.safe_load(f)
    port = free_port()
    local = localize(project, clients=["hospital-b"], port=port)
    server = [p for p in local["participants"] if p["type"] == "server"][0]
    assert server["name"] == "localhost" and server["fed_learn_port"] == port and "admin_port" not in server
    assert [p["name"] for p in local["participants"] if p["type"] == "client"] == ["hospital-b"]
    roles = {p["role"] for p in local["participants"] if p["type"] == "admin"}
    assert roles == {"project_admin", "lead", "org_admin"}
    with pytest.raises(ValueError, match="not in the project"):
        localize(project, clients=["hospital-z"])
