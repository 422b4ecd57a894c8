"""cluster/: the Ray cluster-launcher YAML (checked by Ray's own validator) and the KubeRay manifests.

The KubeRay checks are structural (no Kubernetes here) plus cross-file consistency: image tag = package
version, rayVersion = the pinned Ray, the RayJob's directory = the image's WORKDIR, its entrypoint a
real `ermgap` command whose sweep spec validates (run locally with --dry-run), and its GPU plan fits
the worker group.
"""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "KEY", "CREDENTIAL")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _ray_pin() -> str:
    return next(re.search(r"==(\S+)", d).group(1) for d in _project()["dependencies"] if d.startswith("ray["))


def _image() -> str:
    return f"ermgap:{_project()['version']}"


def _final_workdir() -> str:
    text = (ROOT / "Dockerfile").read_text()
    final = text.split("\nFROM ")[-1]
    return re.findall(r"^WORKDIR\s+(\S+)", final, flags=re.M)[-1]


# --------------------------------------------------------------------------- cluster launcher


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())


def _prepared(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))  # what `ray up` does before validating
    validate_config(prepared)
    return prepared


def test_launcher_yaml_passes_rays_validator(launcher):
    import jsonschema

    prepared = _prepared(launcher)
    # The validator is real: an unknown field or an impossible worker count is rejected.
    bad = copy.deepcopy(launcher)
    bad["available_node_types"]["gpu_worker"]["gpus"] = 4
    with pytest.raises(jsonschema.ValidationError, match="gpus"):
        _prepared(bad)
    bad = copy.deepcopy(launcher)
    bad["available_node_types"]["gpu_worker"]["min_workers"] = launcher["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        _prepared(bad)
    assert prepared["head_node_type"] == "head"


def test_launcher_has_an_autoscaling_gpu_group_on_the_image(launcher):
    assert launcher["docker"]["image"] == _image()
    head = launcher["available_node_types"][launcher["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = [t for n, t in launcher["available_node_types"].items() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu, "no GPU worker group"
    assert all(t["min_workers"] < t["max_workers"] for t in gpu), "GPU group must autoscale"
    # Minimal setup: the image carries everything; at most the head's provider SDK is installed.
    assert launcher["setup_commands"] == [] and launcher["worker_setup_commands"] == []
    assert len(launcher["head_setup_commands"]) <= 1


def test_launcher_starts_ray_with_token_auth_and_a_loopback_dashboard(launcher):
    head = " ".join(launcher["head_start_ray_commands"])
    workers = " ".join(launcher["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    for cmds in (head, workers):
        assert "RAY_AUTH_MODE=token" in cmds
    # The token comes from the user's file, mounted at run time — never from the repo.
    src = launcher["file_mounts"]["/home/ray/.ray/auth_token"]
    assert src.startswith("~/"), src


# --------------------------------------------------------------------------- KubeRay


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / "kuberay" / name).read_text())


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("name,kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_kuberay_manifest_structure(name, kind):
    doc = _load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == _ray_pin()
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
    assert spec["headGroupSpec"]["rayStartParams"].get("num-gpus") == "0"
    for c in _containers(spec):
        assert c["image"] == _image(), c["name"]
        names = {e["name"]: e for e in c.get("env", [])}
        uri = names["MLFLOW_TRACKING_URI"]["valueFrom"]
        assert "configMapKeyRef" in uri or "secretKeyRef" in uri
        for n, e in names.items():
            if any(w in n.upper() for w in SECRET_WORDS):
                assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), f"{n}: credentials only from Secrets"
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/home/ray/ermgap/data", "/home/ray/ermgap/runs"} <= mounts
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] < g["maxReplicas"]
        for c in g["template"]["spec"]["containers"]:
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        pod = g["template"]["spec"]
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {"ermgap-data", "ermgap-runs"}
        assert pod["securityContext"]["runAsNonRoot"] is True


def test_storage_claims_are_shared_volumes():
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay" / "storage.yaml").read_text()))
    assert {d["metadata"]["name"] for d in docs} == {"ermgap-data", "ermgap-runs"}
    assert all(d["kind"] == "PersistentVolumeClaim" and d["spec"]["accessModes"] == ["ReadWriteMany"] for d in docs)


def _rayjob_command() -> tuple[str, list[str]]:
    """(directory, argv of the ermgap command) from the RayJob's `cd DIR && ermgap ...` entrypoint."""
    entry = _load("rayjob.yaml")["spec"]["entrypoint"]
    cd, sep, command = entry.partition("&&")
    assert sep, f"entrypoint must cd into the project first: {entry}"
    cd_argv = shlex.split(cd)
    assert cd_argv[0] == "cd" and len(cd_argv) == 2
    argv = shlex.split(command)
    assert argv[0] == "ermgap", argv
    return cd_argv[1], argv[1:]


def test_rayjob_runs_in_the_images_project_dir():
    directory, _ = _rayjob_command()
    assert directory == _final_workdir()


def test_rayjob_entrypoint_is_a_real_command_whose_spec_validates():
    _, args = _rayjob_command()
    assert args[0] == "sweep"
    # The very same command, run here with --dry-run (validates the spec and every trial, starts nothing).
    r = subprocess.run([sys.executable, "-m", "ermgap.cli.main", *args, "--dry-run"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "trials" in r.stdout


def test_rayjob_gpu_plan_fits_the_worker_group():
    from ermgap.sweep.spec import load_sweep_spec

    _, args = _rayjob_command()
    spec_path = args[1]
    overrides = [a for a in args[2:] if "=" in a and not a.startswith("-")]
    spec = load_sweep_spec(ROOT / spec_path, overrides)
    assert spec.model.storage_path.startswith("/home/ray/ermgap/runs/"), "Tune state must go to the shared volume"
    cfg = spec.trial_config(spec.example_trials()[0])
    assert cfg.distributed.use_gpu
    assert cfg.data.manifest.startswith("/home/ray/ermgap/data/")
    assert cfg.tracking.storage_path.startswith("/home/ray/ermgap/runs/")
    group = _cluster_spec(_load("rayjob.yaml"))["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus_per_pod, cpus_per_pod = int(limits["nvidia.com/gpu"]), float(limits["cpu"])
    assert cfg.distributed.cpus_per_worker <= cpus_per_pod, "a Train worker must fit in one GPU pod"
    concurrent = min(spec.num_trials(), spec.model.max_concurrent_trials or spec.num_trials())
    assert concurrent * cfg.distributed.num_workers <= group["maxReplicas"] * gpus_per_pod
