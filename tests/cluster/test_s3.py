"""A sweep whose pool and Tune storage are on S3: an S3-compatible server (moto) that the
test starts on 127.0.0.1. Trials checkpoint there (and a crashed trial resumes from
there), the pool is there, and the soups are cooked from there."""

import os

import boto3
import pytest
import torch
from moto.server import ThreadedMotoServer

from orchestrator.common.errors import PoolError
from orchestrator.common.pool import Pool, Row
from orchestrator.soup.recipes import RECIPES, default_recipes
from tests.helpers import finish, sweep_cmd, start

pytestmark = pytest.mark.slow
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


@pytest.fixture
def s3(monkeypatch):
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
    client.create_bucket(Bucket="orch")
    yield client, f"endpoint_override={host}:{port}&scheme=http"
    server.stop()


def test_sweep_on_s3_checkpoints_resumes_and_cooks_from_there(s3, tmp_path):
    client, options = s3
    pool_uri, storage = f"s3://orch/pool?{options}", f"s3://orch/tune?{options}"
    markers = tmp_path / "crashed"
    markers.mkdir()
    cmd = sweep_cmd(tmp_path, "remote", 2, pool=pool_uri, storage=storage, recipes=None)
    code, log = finish(start(cmd, tmp_path, ORCHESTRATOR_TEST_CRASH=f"1:raise:{markers}", **CREDENTIALS), tmp_path)
    assert code == 0, log[-3000:]
    assert log.count("resuming after epoch 1 from its checkpoint") == 2  # restored from S3

    keys = [o["Key"] for o in client.list_objects_v2(Bucket="orch")["Contents"]]
    assert any(k.startswith("tune/remote-") and "/checkpoint_" in k for k in keys)
    assert not os.path.exists(tmp_path / "pool") and not os.path.exists(tmp_path / "ray_results")
    pool = Pool(pool_uri)
    df = pool.manifest()
    trials = df[df["kind"] == "trial"]
    assert len(trials) == 2 and trials["id"].is_unique and set(trials["status"]) == {"ok"}
    soups = df[df["kind"] == "soup"]
    assert {h["recipe"] for h in soups["hparams"]} == {r for r in default_recipes() if RECIPES[r].produces_weights}
    uniform = soups[[h["recipe"] == "uniform_soup" for h in soups["hparams"]]].iloc[0]
    assert sorted(uniform["parents"]) == sorted(trials["id"])
    assert pool.verify() == []
    assert all(w and w in "".join(keys) for w in trials["weights"])  # each trial's weights file is on S3


def test_weights_on_s3_are_downloaded_once_verified_and_cached(s3):
    """Each ingredient crosses the network once per Pool (hashed while it streams into a
    local cache), later loads map the cached file; a corrupt object is one line."""
    client, options = s3
    uri = f"s3://orch/reads?{options}"
    writer = Pool(uri, create=True)
    states = {i: {"w": torch.full((256, 64), float(i)), "b": torch.arange(5.0) + i} for i in (1, 2)}
    for i, state in states.items():
        writer.add(Row(id=f"t{i}", kind="trial", sweep="s", task="glyphs", status="ok"), state)
    size = {i: client.head_object(Bucket="orch", Key=f"reads/{writer.get(f't{i}')['weights']}")["ContentLength"]
            for i in states}
    reader = Pool(uri)
    for _ in range(3):
        for i, state in states.items():
            loaded = reader.load(f"t{i}")
            assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert reader.bytes_read == size[1] + size[2]
    cache = reader._cache
    assert sorted(os.listdir(cache)) == sorted(f"{writer.get(f't{i}')['sha256']}.safetensors" for i in states)
    del reader, loaded
    import gc
    gc.collect()
    assert not os.path.exists(cache)  # the cache goes with its Pool

    client.put_object(Bucket="orch", Key=f"reads/{writer.get('t2')['weights']}", Body=b"tampered")
    with pytest.raises(PoolError, match="t2.*corrupt"):
        Pool(uri).load("t2")
    assert "t2" in " ".join(Pool(uri).verify())
