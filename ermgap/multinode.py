"""What a run or sweep needs when its Ray cluster has more than one node, checked before any trial
starts: storage every node shares, a tracking server every node reaches, and inputs every node can
read.

One machine can keep everything under `runs/`. On several nodes a directory on the driver's disk
is invisible to the others (checkpoints written by a worker elsewhere would be lost, Tune could not
restore), and a sqlite/file MLflow store would be a different file on each node. Nodes sharing a
filesystem (NFS, or the test cluster on one host) are told apart only by the user, hence
`--allow-local-paths`; whether an input is readable is asked of every node, by a task pinned to it.
"""

from __future__ import annotations

import os
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ermgap.config import RunConfig
from ermgap.errors import ConfigError
from ermgap.storage import is_uri
from ermgap.tracking import is_node_local

SHARED_STORAGE_HINT = ("use s3://BUCKET/PREFIX or gs://BUCKET/PREFIX (an S3-compatible store: also set "
                       "AWS_ENDPOINT_URL), or pass --allow-local-paths if it is an NFS mount at the same path on "
                       "every node")
TRACKING_HINT = ("use an MLflow tracking server, e.g. tracking_uri=http://HOST:5000 (start one with `ermgap ui "
                 "--serve --artifacts-destination s3://BUCKET/mlflow`), or pass --allow-local-paths for a store on "
                 "NFS")


def alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def input_paths(cfg: RunConfig) -> dict[str, str]:
    """{config key: local path} of the files a run's workers read (hub model ids are not paths)."""
    out = {"data.manifest": str(cfg.data.manifest)}
    model = cfg.model.name_or_path
    if os.path.isabs(model) or Path(model).expanduser().exists():
        out["model.name_or_path"] = str(Path(model).expanduser())
    return out


@ray.remote(num_cpus=0)
def _missing(paths: dict[str, str]) -> tuple[str, list[str]]:
    return ray.util.get_node_ip_address(), [k for k, p in paths.items() if not os.path.exists(p)]


def check_shared_paths(*, storage: str, tracking_uri: str, inputs: dict[str, str], allow_local_paths: bool = False,
                       where: str = "") -> None:
    """On a Ray cluster of more than one node: refuse a node-local storage path or tracking store (unless
    `allow_local_paths`), and inputs some node cannot read. No-op on one node."""
    nodes = alive_nodes()
    if len(nodes) <= 1:
        return
    prefix = f"{where}: " if where else ""
    n = len(nodes)
    if not allow_local_paths:
        if not is_uri(storage):
            raise ConfigError(f"{prefix}storage_path {storage}: a directory on this node, but the Ray cluster has "
                              f"{n} nodes, whose workers write checkpoints and Tune state there; {SHARED_STORAGE_HINT}")
        if is_node_local(tracking_uri):
            raise ConfigError(f"{prefix}tracking URI {tracking_uri}: an MLflow store on this node, but the Ray "
                              f"cluster has {n} nodes, whose workers log to it; {TRACKING_HINT}")
    checks = [_missing.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
              .remote(inputs) for node in nodes]
    for node, (ip, missing) in zip(nodes, ray.get(checks, timeout=120)):
        if missing:
            key = missing[0]
            raise ConfigError(f"{prefix}{key}: {inputs[key]} does not exist on node {ip} ({node['NodeID'][:12]}) "
                              f"of the {n}-node Ray cluster; put data and models on a volume mounted at the same "
                              "path on every node (or copy them there)")
