"""The checkpoint pool: safetensors weights + a Parquet manifest, on local disk or a URI."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest
import torch

from orchestrator.common.errors import PoolError
from orchestrator.common.pool import Pool, Row
from tests.helpers import REPO, weights_file



def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 1, 3, 3, generator=g),
        "conv.bias": torch.randn(4, generator=g),
        "head.weight": torch.randn(10, 4, generator=g).to(torch.bfloat16),
        "half": torch.randn(5, generator=g).to(torch.float16),
        "double": torch.randn(3, generator=g, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(seed, dtype=torch.int64),
        "special": torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-45]),
    }


def row(i: int | str, **extra) -> Row:
    return Row(**{
        "id": f"trial-{i}", "kind": "trial", "status": "ok", "sweep": "s1", "task": "glyphs",
        "hparams": {"lr": 1e-3, "epochs": 3, "seed": i if isinstance(i, int) else 0},
        "metrics": {"val_acc": 0.5, "id_acc": 0.6, "ood_acc": 0.4, "train_loss": 1.25},
        "history": [{"epoch": 1, "val_acc": 0.4}, {"epoch": 2, "val_acc": 0.5}],
        "parents": ["pretrained-glyphs-x"],
        **extra,
    })


def failed(ingredient_id: str) -> Row:
    return Row(id=ingredient_id, kind="trial", sweep="s1", task="glyphs", status="failed")


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape:
            return False
        if a[k].reshape(-1).view(torch.uint8).tolist() != b[k].reshape(-1).view(torch.uint8).tolist():
            return False
    return True


def assert_no_stray_files(root) -> None:
    for sub, suffix in (("manifest", ".parquet"), ("weights", ".safetensors")):
        folder = os.path.join(root, sub)
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            assert not name.startswith("."), f"hidden/temp file left behind: {sub}/{name}"
            assert name.endswith(suffix) and not name.endswith(".tmp"), f"unexpected file {sub}/{name}"


@pytest.fixture
def pool(tmp_path):
    return Pool(str(tmp_path / "pool"), create=True)


# -- basics --------------------------------------------------------------------------------


def test_create_makes_a_marked_pool(tmp_path):
    root = tmp_path / "new" / "pool"
    p = Pool(str(root), create=True)
    assert (root / "pool.json").is_file()
    assert p.manifest().empty
    assert p.verify() == []
    # reopening without create works, and a second create=True on an existing pool is fine
    assert Pool(str(root)).manifest().empty
    Pool(str(root), create=True)


def test_round_trip_is_bitwise(pool):
    saved = weights(3)
    added = pool.add(row(3), saved)
    assert len(added["sha256"]) == 64
    assert added["weights"] == f"weights/{added['sha256']}.safetensors"  # named by its content
    assert pool.has("trial-3")
    loaded = pool.load("trial-3")
    assert bitwise_equal(saved, loaded)
    # loading by row works too, and from a fresh Pool object on the same folder
    assert bitwise_equal(saved, pool.load(pool.get("trial-3")))
    assert bitwise_equal(saved, Pool(pool.uri).load("trial-3"))


def test_get_decodes_row(pool):
    pool.add(row(1), weights(1))
    got = pool.get("trial-1")
    assert got["id"] == "trial-1"
    assert got["hparams"] == {"lr": 1e-3, "epochs": 3, "seed": 1}
    assert got["metrics"]["val_acc"] == 0.5
    assert got["history"] == [{"epoch": 1, "val_acc": 0.4}, {"epoch": 2, "val_acc": 0.5}]
    assert list(got["parents"]) == ["pretrained-glyphs-x"]
    with pytest.raises(PoolError, match="nope"):
        pool.get("nope")


def test_manifest_has_one_row_per_ingredient_with_decoded_columns(pool):
    pool.add(row(1, metrics={"val_acc": 0.7, "id_acc": 0.8, "ood_acc": 0.3}), weights(1))
    pool.add(row(2, metrics={"val_acc": 0.6, "id_acc": 0.65, "ood_acc": 0.35}), weights(2))
    pool.add(failed("trial-3"))  # no weights, no metrics
    df = pool.manifest()
    assert isinstance(df, pd.DataFrame)
    assert len(df) == 3
    assert sorted(df["id"]) == ["trial-1", "trial-2", "trial-3"]
    assert df["id"].is_unique
    by_id = df.set_index("id")
    # JSON columns decoded to Python objects
    assert by_id.loc["trial-1", "hparams"] == {"lr": 1e-3, "epochs": 3, "seed": 1}
    assert isinstance(by_id.loc["trial-2", "metrics"], dict)
    assert isinstance(by_id.loc["trial-1", "history"], list)
    assert by_id.loc["trial-3", "hparams"] == {} and by_id.loc["trial-3", "history"] == []
    # metrics spread into columns
    for col in ("val_acc", "id_acc", "ood_acc"):
        assert col in df.columns
    assert by_id.loc["trial-1", "val_acc"] == 0.7
    assert by_id.loc["trial-2", "ood_acc"] == 0.35
    assert pd.isna(by_id.loc["trial-3", "val_acc"])
    assert by_id.loc["trial-3", "weights"] == ""
    # oldest first
    assert list(df["id"]) == ["trial-1", "trial-2", "trial-3"]


def test_adding_the_same_id_twice_keeps_one_row(pool):
    first = pool.add(row(1, metrics={"val_acc": 0.9}), weights(1))
    second = pool.add(row(1, metrics={"val_acc": 0.1}), weights(99))
    df = pool.manifest()
    assert len(df) == 1
    assert df.loc[0, "val_acc"] == 0.9  # the first write wins
    assert second["sha256"] == first["sha256"]
    assert bitwise_equal(pool.load("trial-1"), weights(1))
    assert len(os.listdir(os.path.join(pool.root, "weights"))) == 1


def test_bad_kind_or_status_is_rejected(pool):
    with pytest.raises(ValueError):
        Row(id="x", kind="banana", sweep="s1", task="glyphs", status="ok")
    with pytest.raises(ValueError):
        Row(id="x", kind="trial", sweep="s1", task="glyphs", status="fine")
    assert not pool.has("x")


def test_load_without_weights_raises(pool):
    pool.add(failed("failed-1"))
    with pytest.raises(PoolError, match="failed-1"):
        pool.load("failed-1")


# -- concurrency ---------------------------------------------------------------------------


def test_16_threads_appending_lose_no_rows(pool):
    n = 16
    barrier = threading.Barrier(n)

    def work(i: int):
        barrier.wait()
        pool.add(row(i), weights(i))
        pool.add(row("shared"), weights(1000))  # every thread also retries the same id
        return i

    with ThreadPoolExecutor(max_workers=n) as ex:
        assert sorted(ex.map(work, range(n))) == list(range(n))
    df = pool.manifest()
    assert sorted(df["id"]) == sorted([f"trial-{i}" for i in range(n)] + ["trial-shared"])
    assert df["id"].is_unique
    assert pool.verify() == []
    assert_no_stray_files(pool.root)
    for i in (0, 7, 15):
        assert bitwise_equal(pool.load(f"trial-{i}"), weights(i))


def _process_worker(root: str, worker: int, per_worker: int, barrier) -> None:
    p = Pool(root)
    barrier.wait()
    for j in range(per_worker):
        i = worker * 100 + j
        p.add(row(i), weights(i))


def test_4_processes_appending_lose_no_rows(pool):
    ctx = multiprocessing.get_context("spawn")
    n, per_worker = 4, 5
    barrier = ctx.Barrier(n)
    procs = [ctx.Process(target=_process_worker, args=(pool.root, w, per_worker, barrier)) for w in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * n
    df = pool.manifest()
    expected = sorted(f"trial-{w * 100 + j}" for w in range(n) for j in range(per_worker))
    assert sorted(df["id"]) == expected
    assert pool.verify() == []
    assert_no_stray_files(pool.root)
    assert bitwise_equal(pool.load("trial-302"), weights(302))


def _contested_writer(root: str, seed: int, rounds: int, barrier) -> None:
    p = Pool(root)
    for r in range(rounds):
        barrier.wait()  # every round, both processes add the same new id with different bytes
        p.add(row(f"contested-{r}", metrics={"val_acc": seed / 10}), weights(seed))


def test_two_processes_writing_one_id_leave_a_row_that_describes_its_own_file(pool):
    ctx = multiprocessing.get_context("spawn")
    barrier, rounds = ctx.Barrier(2), 10
    procs = [ctx.Process(target=_contested_writer, args=(pool.root, seed, rounds, barrier)) for seed in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    df = pool.manifest()
    assert sorted(df["id"]) == sorted(f"trial-contested-{r}" for r in range(rounds))  # one row each
    assert pool.verify() == []  # every row's sha256 is its own file's
    for r in df.to_dict("records"):  # and the row's metrics belong to the weights it names
        winner = round(r["metrics"]["val_acc"] * 10)
        assert bitwise_equal(pool.load(r["id"]), weights(winner))
    assert_no_stray_files(pool.root)


# -- damage --------------------------------------------------------------------------------


def test_corrupt_weights_are_reported(pool):
    pool.add(row(1), weights(1))
    pool.add(row(2), weights(2))
    with open(weights_file(pool.root, "trial-2"), "ab") as f:
        f.write(b"\x00garbage")
    problems = pool.verify()
    assert len(problems) == 1
    assert "trial-2" in problems[0] and "corrupt" in problems[0]
    with pytest.raises(PoolError, match="trial-2"):
        pool.load("trial-2")
    assert bitwise_equal(pool.load("trial-1"), weights(1))  # the others are fine


def test_each_weights_file_is_read_once_per_pool(pool):
    """Verified while read (a streamed hash), remembered, then memory-mapped: loading an
    ingredient again reads nothing from storage."""
    pool.add(row(1), weights(1))
    pool.add(row(2), weights(2))
    sizes = {i: os.path.getsize(weights_file(pool.root, f"trial-{i}")) for i in (1, 2)}
    reader = Pool(pool.uri)
    for _ in range(3):
        assert bitwise_equal(reader.load("trial-1"), weights(1))
    assert reader.bytes_read == sizes[1]
    reader.local_weights(reader.get("trial-2"))  # what the kitchen's check does: hash, no load
    assert bitwise_equal(reader.load("trial-2"), weights(2))
    assert reader.bytes_read == sizes[1] + sizes[2]


def test_a_file_changed_after_it_was_verified_is_checked_again(pool):
    pool.add(row(1), weights(1))
    assert bitwise_equal(pool.load("trial-1"), weights(1))
    with open(weights_file(pool.root, "trial-1"), "ab") as f:
        f.write(b"\x00garbage")
    with pytest.raises(PoolError, match="trial-1.*corrupt"):
        pool.load("trial-1")


def test_a_file_with_the_right_hash_that_is_not_safetensors_is_one_line(pool):
    """Only a writer outside the pool can make one; the error still names the file."""
    pool.add(row(1), weights(1))
    path = weights_file(pool.root, "trial-1")
    with open(path, "wb") as f:
        f.write(b"not safetensors")
    import hashlib
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pq.read_table(f"{pool.root}/manifest/trial-1.parquet")
    table = table.set_column(table.schema.get_field_index("sha256"), "sha256",
                             pa.array([hashlib.sha256(b"not safetensors").hexdigest()]))
    pq.write_table(table, f"{pool.root}/manifest/trial-1.parquet")
    with pytest.raises(PoolError, match="trial-1.*unreadable"):
        Pool(pool.uri).load("trial-1")


def test_unreadable_rows_are_skipped_with_a_warning_and_fail_verify(pool, caplog):
    """What a crash or a full disk leaves: a 0-byte row file and a truncated one."""
    for i in (1, 2, 3):
        pool.add(row(i), weights(i))
    manifest = os.path.join(pool.root, "manifest")
    open(os.path.join(manifest, "trial-2.parquet"), "wb").close()
    with open(os.path.join(manifest, "trial-3.parquet"), "r+b") as f:
        f.truncate(os.path.getsize(f.name) // 2)
    df = pool.manifest()
    assert list(df["id"]) == ["trial-1"]  # the rest of the pool still reads
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 2 and all("skipping unreadable pool row" in w for w in warned)
    assert any("trial-2.parquet" in w for w in warned) and any("trial-3.parquet" in w for w in warned)
    problems = pool.verify()
    assert sorted(p.split("/")[-1].split()[0] for p in problems) == ["trial-2.parquet", "trial-3.parquet"]
    with pytest.raises(PoolError, match="trial-2.parquet is unreadable"):
        pool.get("trial-2")


def test_an_unreadable_row_is_rewritten_by_the_next_add(pool):
    pool.add(row(1), weights(1))
    open(os.path.join(pool.root, "manifest", "trial-1.parquet"), "wb").close()
    pool.add(row(1), weights(1))
    assert pool.get("trial-1")["status"] == "ok" and pool.verify() == []


def test_a_finished_row_supersedes_a_failed_one_and_ok_is_never_replaced(pool):
    pool.add(failed("trial-1"))  # the driver's row for a trial that failed after its retries
    pool.add(row(1), weights(1))  # ... which then finished after --resume
    assert pool.get("trial-1")["status"] == "ok" and bitwise_equal(pool.load("trial-1"), weights(1))
    pool.add(failed("trial-1"))
    pool.add(row(1, metrics={"val_acc": 0.1}), weights(7))
    kept = pool.get("trial-1")
    assert kept["status"] == "ok" and kept["metrics"]["val_acc"] == 0.5
    assert bitwise_equal(pool.load("trial-1"), weights(1)) and len(pool.manifest()) == 1


def test_gc_finds_leftover_temp_files_and_unreferenced_weights(pool):
    pool.add(row(1), weights(1))
    orphan = os.path.join(pool.root, "weights", "gone.safetensors")
    temp = os.path.join(pool.root, "manifest", ".trial-2.parquet.0123abcd.tmp")
    for path in (orphan, temp):
        with open(path, "wb") as f:
            f.write(b"left behind")
    assert pool.garbage() == []  # younger than the default hour: maybe a running sweep's
    assert pool.garbage(min_age_s=0) == sorted([temp, orphan])
    pool.remove(pool.garbage(min_age_s=0))
    assert not os.path.exists(orphan) and not os.path.exists(temp)
    assert pool.garbage(min_age_s=0) == [] and pool.verify() == []
    assert bitwise_equal(pool.load("trial-1"), weights(1))


def test_gc_removes_unreadable_rows_and_the_weights_only_they_referenced(pool, caplog):
    pool.add(row(1), weights(1))
    pool.add(row(2), weights(2))
    damaged, its_weights = f"{pool.root}/manifest/trial-2.parquet", weights_file(pool.root, "trial-2")
    open(damaged, "wb").close()  # 0 bytes: what a full disk leaves
    assert sorted(pool.garbage(min_age_s=0)) == sorted([damaged, its_weights])
    assert sum("skipping unreadable pool row" in r.message for r in caplog.records) == 1  # warned once per Pool
    pool.remove(pool.garbage(min_age_s=0))
    assert pool.verify() == [] and list(pool.manifest()["id"]) == ["trial-1"]


def dynamics_row(trial: str) -> Row:
    return Row(id=f"{trial}.dynamics", kind="dynamics", sweep="s1", task="glyphs", status="ok", parents=[trial])


def test_a_table_row_round_trips_is_verified_and_kept_by_gc(pool):
    import pyarrow as pa

    table = pa.table({"id": [2, 0, 1], "epoch": [0, 0, 0], "p_gold": [0.5, 0.25, 1.0], "correct": [True, False, True]})
    pool.add(row(1), weights(1))
    added = pool.add(dynamics_row("trial-1"), table=table)
    assert added["weights"].startswith("tables/") and added["weights"].endswith(".parquet")
    assert pool.load_table("trial-1.dynamics").equals(table)
    orphan = os.path.join(pool.root, "tables", "gone.parquet")
    with open(orphan, "wb") as f:
        f.write(b"left behind")
    assert pool.garbage(min_age_s=0) == [orphan]  # the referenced table stays
    with open(os.path.join(pool.root, added["weights"]), "r+b") as f:
        f.write(b"X")  # damaged after it was written
    assert any("trial-1.dynamics" in p and "corrupt" in p for p in pool.verify())
    with pytest.raises(PoolError, match="trial-1.dynamics"):
        pool.load_table("trial-1.dynamics")


def test_missing_weights_are_reported(pool):
    pool.add(row(1), weights(1))
    pool.add(row(2), weights(2))
    os.remove(weights_file(pool.root, "trial-1"))
    problems = pool.verify()
    assert len(problems) == 1
    assert "trial-1" in problems[0] and "missing" in problems[0]
    with pytest.raises(PoolError, match="trial-1"):
        pool.load("trial-1")


def test_non_empty_non_pool_folder_is_refused(tmp_path):
    folder = tmp_path / "stuff"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a pool")
    with pytest.raises(PoolError, match="not a pool|not empty"):
        Pool(str(folder), create=True)
    assert not (folder / "pool.json").exists()


@pytest.mark.parametrize("make", ["missing", "empty", "non_empty"])
def test_folder_without_marker_needs_create(tmp_path, make):
    folder = tmp_path / "p"
    if make != "missing":
        folder.mkdir()
    if make == "non_empty":
        (folder / "x").write_text("x")
    with pytest.raises(PoolError, match="pool.json"):
        Pool(str(folder))
    assert not (folder / "pool.json").exists()


def test_a_file_is_not_a_pool(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(PoolError):
        Pool(str(f), create=True)


def test_ids_are_listed_whatever_their_first_character(pool):
    """Every added row must show up in the manifest and be verified.

    The manifest is read as a pyarrow dataset, which skips files whose names start
    with '.' or '_'; safe_id keeps a leading '_', so such rows are invisible.
    """
    pool.add(row(0, id="_scratch-uniform_soup-abc"), weights(0))
    pool.add(row(1), weights(1))
    assert pool.has("_scratch-uniform_soup-abc")
    assert sorted(pool.manifest()["id"]) == ["_scratch-uniform_soup-abc", "trial-1"]


# -- URIs ----------------------------------------------------------------------------------


def test_file_uri_round_trip(tmp_path):
    uri = f"file://{tmp_path}/p"
    p = Pool(uri, create=True)
    assert p.uri == uri
    saved = weights(5)
    p.add(row(5), saved)
    assert bitwise_equal(p.load("trial-5"), saved)
    assert list(p.manifest()["id"]) == ["trial-5"]
    assert p.verify() == []
    # the same pool seen through the plain path and through the URI again
    assert (tmp_path / "p" / "pool.json").is_file()
    assert bitwise_equal(Pool(str(tmp_path / "p")).load("trial-5"), saved)
    assert bitwise_equal(Pool(uri).load("trial-5"), saved)
    assert_no_stray_files(str(tmp_path / "p"))


# -- command line --------------------------------------------------------------------------


def _start_cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "orchestrator.pool", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Run every `python -m orchestrator.pool` case at once (each start costs seconds of imports)."""
    base = tmp_path_factory.mktemp("cli")
    good, bad = str(base / "good"), str(base / "bad")
    for root in (good, bad):
        p = Pool(root, create=True)
        p.add(row(1, metrics={"val_acc": 0.75, "id_acc": 0.5, "ood_acc": 0.25}), weights(1))
        p.add(row(2), weights(2))
        p.add(failed("trial-3"))
    with open(weights_file(bad, "trial-2"), "ab") as f:
        f.write(b"junk")
    proxy = str(base / "proxy")
    Pool(proxy, create=True).add(Row(id="run-1", kind="proxy", sweep="lr", task="proxy_lm", status="ok",
                                     hparams={"intervention": "qk_layernorm", "width": 64, "lr": 0.03, "seed": 0},
                                     metrics={"final_loss": 2.625}))
    unreadable, leftovers = str(base / "unreadable"), str(base / "leftovers")
    for root in (unreadable, leftovers):
        Pool(root, create=True).add(row(1), weights(1))
    open(os.path.join(unreadable, "manifest", "trial-2.parquet"), "wb").close()
    with open(os.path.join(leftovers, "weights", "orphan.safetensors"), "wb") as f:
        f.write(b"x")
    cases = {
        "verify_good": ("verify", "--pool", good),
        "show_good": ("show", "--pool", good),
        "verify_bad": ("verify", "--pool", bad),
        "show_missing": ("show", "--pool", str(base / "nowhere")),
        "show_file": ("show", "--pool", str(base / "good" / "pool.json")),
        "verify_unreadable": ("verify", "--pool", unreadable),
        "gc_dry": ("gc", "--pool", leftovers, "--dry-run", "--min-age", "0"),
        "show_start": ("show", "--pool", good, "--start-point", "pretrained-glyphs-x", "--sweep", "s1"),
        "show_kind": ("show", "--pool", good, "--kind", "soup"),
        "show_proxy": ("show", "--pool", proxy),
    }
    procs = {name: _start_cli(*args) for name, args in cases.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


def test_cli_verify_good_pool_exits_0(cli):
    res = cli["verify_good"]
    assert res.returncode == 0, res.stderr
    assert "2/2 weights files verified" in res.stdout
    assert res.stderr == ""


def test_cli_verify_corrupt_pool_exits_1(cli):
    res = cli["verify_bad"]
    assert res.returncode == 1, res.stderr
    assert "trial-2" in res.stderr and "corrupt" in res.stderr
    assert "trial-1" not in res.stderr
    assert "1/2 weights files verified" in res.stdout


def test_cli_show_prints_ids(cli):
    res = cli["show_good"]
    assert res.returncode == 0, res.stderr
    for i in (1, 2, 3):
        assert f"trial-{i}" in res.stdout
    assert "0.7500" in res.stdout  # val_acc column
    assert "3 ingredients" in res.stdout


def test_cli_missing_pool_is_a_one_line_error(cli):
    res = cli["show_missing"]
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error:")
    assert "nowhere" in lines[0]
    assert "Traceback" not in res.stderr


def test_cli_show_on_a_file_says_it_is_a_file(cli):
    res = cli["show_file"]
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: {res.args[-1]}: is a file, not a pool folder"]


def test_cli_verify_names_an_unreadable_row_and_exits_1(cli):
    res = cli["verify_unreadable"]
    assert res.returncode == 1
    assert "trial-2.parquet is unreadable" in res.stderr
    assert "1/1 weights files verified; 1 unreadable row file(s) of 2" in res.stdout


def test_cli_gc_dry_run_lists_and_removes_nothing(cli):
    res = cli["gc_dry"]
    assert res.returncode == 0, res.stderr
    assert "would remove" in res.stdout and "orphan.safetensors" in res.stdout and "1 file(s) to remove" in res.stdout
    assert os.path.exists(res.args[res.args.index("--pool") + 1] + "/weights/orphan.safetensors")


def test_cli_show_filters_by_start_point_and_sweep(cli):
    res = cli["show_start"]
    assert res.returncode == 0, res.stderr
    assert "trial-1" in res.stdout and "trial-2" in res.stdout and "trial-3" not in res.stdout  # no start point
    assert "2 ingredients" in res.stdout and "pretrained-glyphs-x" in res.stdout


def test_cli_show_filters_by_kind_and_shows_proxy_runs_with_their_columns(cli):
    assert cli["show_kind"].returncode == 0 and "no rows match" in cli["show_kind"].stdout
    res = cli["show_proxy"]
    assert res.returncode == 0, res.stderr
    header, line = res.stdout.splitlines()[:2]
    assert header.split() == ["id", "status", "sweep", "intervention", "width", "lr", "seed", "final_loss",
                              "attn_logit_peak"]
    assert line.split()[:8] == ["run-1", "ok", "lr", "qk_layernorm", "64", "0.03", "0", "2.6250"]
