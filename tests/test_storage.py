"""ermgap.storage.Location against a real S3-compatible server (moto, on 127.0.0.1) and the local
filesystem; objects are checked with boto3, not through ermgap. Also: the drivers refuse an
unreachable store or tracking server at once, naming it."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
from _procs import free_port, wait_http

CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "sEcReT-testing", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "ermgap-store"


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint, proc, log)
        yield endpoint
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)


@pytest.fixture
def s3(moto_endpoint, monkeypatch):
    import boto3

    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    client = boto3.client("s3", endpoint_url=moto_endpoint)
    if BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=BUCKET)
    return client


def _get(s3, key: str) -> bytes:
    return s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()


@pytest.mark.server
def test_s3_location_reads_writes_lists_uploads(s3, tmp_path, moto_endpoint):
    from ermgap.storage import Location

    loc = Location.of(f"s3://{BUCKET}/a/run/")
    assert str(loc) == f"s3://{BUCKET}/a/run" and loc.endpoint == moto_endpoint and loc.name == "run"
    assert not loc.exists() and loc.list() == []
    (loc / "metrics.json").write_text('{"x": 1}')
    assert _get(s3, "a/run/metrics.json") == b'{"x": 1}'
    assert (loc / "metrics.json").read_text() == '{"x": 1}' and loc.exists() and (loc / "metrics.json").is_file()
    from ermgap.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        (loc / "metrics.json").write_text("again")
    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    (src / "w.bin").write_bytes(b"\x00\x01")
    (src / "sub" / "c.json").write_text("{}")
    (loc / "adapter").upload(src)
    with (loc / "staged").staged() as d:
        (d / "preds.csv").write_text("a,b\n")
        (d / "deep" / "x").mkdir(parents=True)
        (d / "deep" / "x" / "y.txt").write_text("y")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="a/run/")["Contents"]}
    assert keys == {"a/run/metrics.json", "a/run/adapter/w.bin", "a/run/adapter/sub/c.json",
                    "a/run/staged/preds.csv", "a/run/staged/deep/x/y.txt"}
    assert _get(s3, "a/run/adapter/w.bin") == b"\x00\x01"
    assert loc.list() == ["adapter", "metrics.json", "staged"]
    # A failed block uploads nothing.
    with pytest.raises(RuntimeError), (loc / "failed").staged() as d:
        (d / "half.csv").write_text("x")
        raise RuntimeError("boom")
    assert not (loc / "failed").exists()
    (loc / "metrics.json").delete()
    assert not (loc / "metrics.json").exists()
    loc.rmtree()
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix="a/run/").get("KeyCount", 0) == 0


@pytest.mark.server
def test_location_pickles_with_endpoint_but_without_credentials(s3):
    from ermgap.storage import Location

    loc = Location.of(f"s3://{BUCKET}/p")
    _, fs = loc.ray_storage()
    for blob in (pickle.dumps(loc), pickle.dumps(fs)):
        assert CREDS["AWS_SECRET_ACCESS_KEY"].encode() not in blob
    assert pickle.loads(pickle.dumps(loc)).endpoint == loc.endpoint
    assert loc.ray_storage()[0] == f"{BUCKET}/p"


def test_local_location_is_pathlib(tmp_path):
    from ermgap.errors import ConfigError
    from ermgap.storage import Location

    loc = Location.of(tmp_path / "r")
    assert not loc.is_remote and loc.ray_storage() == (str(tmp_path / "r"), None)
    with loc.staged() as d:
        assert d == tmp_path / "r"
        (d / "f.txt").write_text("hi")
    (loc / "g.txt").write_text("g")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == loc.list() == ["f.txt", "g.txt"]
    assert (loc / "f.txt").read_text() == "hi"
    with pytest.raises(FileNotFoundError):
        (loc / "missing").read_text()
    with pytest.raises(ConfigError, match="s3://bucket/prefix"):
        Location.of("ftp://host/x")


def test_unreachable_store_or_tracking_server_is_refused_at_once(tmp_path, synth_corpus, tiny_model, monkeypatch):
    """A closed port: the sweep driver fails before Ray starts, naming what it could not reach."""
    import yaml

    from ermgap.errors import StorageError
    from ermgap.sweep import run_sweep

    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    dead = f"http://127.0.0.1:{free_port()}"
    base = {"data": {"manifest": str(synth_corpus)}, "model": {"name_or_path": str(tiny_model)},
            "distributed": {"num_workers": 1}}
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "dead", "base": base, "storage_path": str(tmp_path / "sw"),
                                    "mlflow": {"tracking_uri": dead}}))
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=f"the sweep driver cannot reach the MLflow tracking server {dead}"):
        run_sweep(spec)
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    spec.write_text(yaml.safe_dump({"name": "dead", "base": base, "storage_path": "s3://nowhere-bucket/x",
                                    "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"}}))
    with pytest.raises(StorageError, match="the sweep driver cannot reach the store of s3://nowhere-bucket/x/dead"):
        run_sweep(spec)
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "sw").exists() and not (tmp_path / "m.db").exists()


@pytest.mark.server
def test_feature_cache_entries_are_objects_and_a_corrupt_one_is_recomputed(s3, moto_endpoint):
    import torch

    from ermgap.config import load_config
    from ermgap.feature_cache import FeatureCache, cache_dir
    from ermgap.storage import Location

    where = cache_dir(load_config(None, [f"tracking.storage_path=s3://{BUCKET}/train"]))
    assert where == Location(f"s3://{BUCKET}/train/feature_cache", moto_endpoint)
    cache = FeatureCache(where, "fp")
    t = torch.arange(600, dtype=torch.float32).reshape(20, 30)
    key = cache.key("audio-digest")
    cache.store(key, t)
    obj = f"train/feature_cache/{key[:2]}/{key}.safetensors"
    listed = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="train/feature_cache/")["Contents"]}
    assert listed == {obj}
    torch.testing.assert_close(FeatureCache(where, "fp").load(key), t, atol=0, rtol=0)
    data = bytearray(_get(s3, obj))
    data[-5] ^= 0xFF  # inside the tensor bytes: parses, but the checksum no longer matches
    s3.put_object(Bucket=BUCKET, Key=obj, Body=bytes(data))
    reader = FeatureCache(where, "fp")
    with pytest.warns(UserWarning, match="checksum mismatch"):
        assert reader.load(key) is None
    assert reader.stats.corrupt == 1


@pytest.mark.server
def test_force_replaces_only_a_prefix_ermgap_wrote(s3):
    from ermgap.errors import ConfigError
    from ermgap.storage import Location

    foreign = Location.of(f"s3://{BUCKET}/foreign")
    s3.put_object(Bucket=BUCKET, Key="foreign/data.bin", Body=b"x")
    with pytest.raises(ConfigError, match="not a sweep ermgap created"):
        foreign.set_aside("sweep")
    assert _get(s3, "foreign/data.bin") == b"x"

    ours = Location.of(f"s3://{BUCKET}/ours")
    assert ours.set_aside("sweep") is None  # nothing there: nothing to replace
    ours.claim("sweep", "x")
    (ours / "sweep_state.json").write_text("{}")
    assert ours.set_aside("sweep") is None
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix="ours/").get("KeyCount", 0) == 0
