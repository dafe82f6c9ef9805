"""The `keras-sie` console script, run for real in subprocesses on runs made by `fit`."""

import csv
import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_sie
from keras_sie import scores as scores_lib

N = 120


def _make_run(log_dir, seed):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 5)).astype("float32")
    y = (x @ rng.normal(size=(5, 1))).astype("float32")
    y[[3, 50, 77]] += 20.0  # planted outliers
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    sie = keras_sie.SampleImportance(log_dir=str(log_dir), verbose=0)
    model.fit(keras_sie.with_ids(x), y, epochs=3, batch_size=16, validation_split=0.25,
              shuffle=True, callbacks=[sie], verbose=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    _make_run(root / "a", seed=1)
    _make_run(root / "b", seed=2)
    return str(root / "a"), str(root / "b")


def _script():
    exe = os.path.join(os.path.dirname(sys.executable), "keras-sie")
    exe = exe if os.path.exists(exe) else shutil.which("keras-sie")
    assert exe, "the keras-sie console script is not installed: pip install -e ."
    return [exe]


def _cli(*args, module=False, env=None):
    cmd = [sys.executable, "-m", "keras_sie"] if module else _script()
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True,
                          timeout=120, env=full_env, check=False)


def test_help_lists_the_commands_and_exit_codes():
    r = _cli("--help")
    assert r.returncode == 0
    for word in ("report", "export", "diff", "Exit codes"):
        assert word in r.stdout
    r = _cli("export", "--help", module=True)
    assert r.returncode == 0 and "--format" in r.stdout and "parquet" in r.stdout


@pytest.mark.parametrize("args", [
    [],                                        # no command
    ["report"],                                # missing LOGDIR
    ["export", "x", "--format", "xls", "-o", "f"],  # bad format
    ["report", "x", "-k", "0"],                # bad value
    ["bogus"],
])
def test_usage_errors_exit_2(args):
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    assert "usage:" in r.stderr


def test_report_text_shows_epochs_summary_histogram_and_tables(runs):
    a, _ = runs
    run = keras_sie.load(a)
    r = _cli("report", a, "-k", "5")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "epochs: 0, 1, 2" in out
    assert "samples: 120 (90 scored, 30 not visited)" in out
    summary = scores_lib.summarize(run.importance, run.visits)
    assert f"{summary['gini']:.4g}" in out
    # Histogram: its counts add up to the scored samples.
    hist = out.split("histogram of importance")[1].split("top 5")[0].strip().splitlines()[1:]
    assert sum(int(line.split()[-1]) for line in hist) == 90
    # The first row of the top table is the most important sample; the planted
    # outliers (all in the training part) lead it.
    top_block = out.split("top 5")[1].split("bottom 5")[0].strip().splitlines()
    first_key = int(top_block[1].split()[1])
    assert first_key == run.top_k(1)[0][0]
    assert {int(line.split()[1]) for line in top_block[1:4]} == {3, 50, 77}


def test_report_json_matches_the_run_for_one_epoch_via_python_m(runs):
    a, _ = runs
    run = keras_sie.load(a)
    r = _cli("report", a, "--epoch", "0", "-k", "4", "--json", module=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["epochs"] == [0, 1, 2] and out["shown"] == "epoch 0"
    assert [t["key"] for t in out["top"]] == [k for k, _, _ in run.top_k(4, epoch=0)]
    assert [t["key"] for t in out["bottom"]] == [
        k for k, _, _ in run.top_k(4, epoch=0, largest=False)]
    assert out["top"][0]["importance"] == pytest.approx(run.top_k(1, epoch=0)[0][1])
    expected = scores_lib.summarize(run.epoch(0).importance, run.epoch(0).visits)
    assert out["summary"] == pytest.approx(expected)
    assert len(out["per_epoch"]) == 3
    # The keras_sie/ subfolder is accepted too.
    r = _cli("report", os.path.join(a, "keras_sie"), "--aggregate", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["shown"].startswith("aggregate of epochs 0")


def test_export_csv_npz_parquet_round_trip_exactly(runs, tmp_path):
    a, _ = runs
    run = keras_sie.load(a)
    r = _cli("export", a, "--format", "csv", "-o", tmp_path / "all.csv")
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "all.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * N
    assert list(rows[0]) == ["epoch", "key", "importance", "visits", "grad_sum"]
    for e in run.epochs:
        mine = [row for row in rows if int(row["epoch"]) == e]
        np.testing.assert_array_equal([float(m["importance"]) for m in mine], run.epoch(e).importance)
        np.testing.assert_array_equal([int(m["visits"]) for m in mine], run.epoch(e).visits)
        np.testing.assert_array_equal([int(m["key"]) for m in mine], np.arange(N))

    r = _cli("export", a, "--format", "npz", "--epoch", "1", "-o", tmp_path / "e1.npz",
             module=True)
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "e1.npz", allow_pickle=False) as z:
        assert z["epochs"].tolist() == [1]
        np.testing.assert_array_equal(z["importance"][0], run.epoch(1).importance)
        np.testing.assert_array_equal(z["grad_sum"][0], run.epoch(1).sums)
        np.testing.assert_array_equal(z["keys"], np.arange(N))
        assert z["feature_importance"][0].sum() == pytest.approx(1.0)

    pq = pytest.importorskip("pyarrow.parquet")
    r = _cli("export", a, "--format", "parquet", "-o", tmp_path / "all.parquet")
    assert r.returncode == 0, r.stderr
    table = pq.read_table(tmp_path / "all.parquet").to_pydict()
    assert len(table["key"]) == 3 * N
    np.testing.assert_array_equal(np.asarray(table["importance"][-N:]), run.epoch(2).importance)
    np.testing.assert_array_equal(table["epoch"][:N], [0] * N)


def test_export_parquet_without_pyarrow_says_how_to_install(runs, tmp_path):
    a, _ = runs
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "pyarrow.py").write_text("raise ImportError('pyarrow blocked by the test')\n")
    r = _cli("export", a, "--format", "parquet", "-o", tmp_path / "x.parquet",
             env={"PYTHONPATH": str(blocker)})
    assert r.returncode == 1
    assert "pip install" in r.stderr and "pyarrow" in r.stderr
    assert not (tmp_path / "x.parquet").exists()


def test_diff_reports_rank_correlation_and_top_k_overlap(runs):
    a, b = runs
    r = _cli("diff", a, a, "--json")
    assert r.returncode == 0, r.stderr
    same = json.loads(r.stdout)
    assert same["spearman"] == pytest.approx(1.0)
    assert same["top_k_overlap"] == 1.0 and same["common"] == 90

    r = _cli("diff", a, b, "-k", "10", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    ia, ib = keras_sie.load(a).importance, keras_sie.load(b).importance
    scored = keras_sie.load(a).visits > 0
    ia, ib = ia[scored], ib[scored]
    assert np.unique(ia).size == ia.size and np.unique(ib).size == ib.size  # no ties
    # Spearman without ties: 1 - 6 sum d^2 / (n (n^2 - 1)).
    d = np.argsort(np.argsort(ia)) - np.argsort(np.argsort(ib))
    n = ia.size
    assert got["spearman"] == pytest.approx(1 - 6 * np.sum(d**2) / (n * (n**2 - 1)), abs=1e-12)
    keys = np.flatnonzero(scored)
    top_a, top_b = set(keys[np.argsort(-ia)[:10]]), set(keys[np.argsort(-ib)[:10]])
    assert got["top_k_overlap"] == len(top_a & top_b) / 10
    r = _cli("diff", a, b, "--epoch-a", "0", "--epoch-b", "2")
    assert r.returncode == 0 and "Spearman rank correlation" in r.stdout


def test_missing_empty_and_corrupt_runs_fail_with_exit_1_and_a_clear_message(runs, tmp_path):
    a, _ = runs
    r = _cli("report", tmp_path / "nope")
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "empty").mkdir()
    r = _cli("report", tmp_path / "empty")
    assert r.returncode == 1 and "No keras_sie run" in r.stderr
    r = _cli("report", a, "--epoch", "7")
    assert r.returncode == 1 and "epoch 7 is not in" in r.stderr
    bad = tmp_path / "bad"
    shutil.copytree(a, bad)
    (bad / "keras_sie" / "epoch_00001.npz").write_bytes(b"not a zip file")
    for args in (["report", bad], ["export", bad, "--format", "csv", "-o", tmp_path / "o.csv"],
                 ["diff", a, bad]):
        r = _cli(*args)
        assert r.returncode == 1, args
        assert "corrupt run" in r.stderr and "epoch_00001.npz" in r.stderr
        assert "Traceback" not in r.stderr
    r = _cli("export", a, "--format", "csv", "-o", tmp_path / "no" / "dir" / "o.csv")
    assert r.returncode == 1 and "does not exist" in r.stderr


def test_string_keys_of_a_hash_run_survive_report_export_and_diff(tmp_path):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4)).astype("float32")
    y = rng.normal(size=(30, 1)).astype("float32")
    keys = np.array([f"user-{i * 3}" for i in range(30)])
    inp = keras.Input((4,), name="x")
    model = keras.Model({"x": inp}, keras.layers.Dense(1)(inp))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    ds = tf.data.Dataset.from_tensor_slices(({"x": x, "sample_id": keys}, y)).batch(8)
    log_dir = str(tmp_path / "h")
    # Capacity 50 > 30 keys: unused slots must not show up anywhere.
    sie = keras_sie.SampleImportance(log_dir=log_dir, num_samples=50, verbose=0)
    model.fit(ds, epochs=2, callbacks=[sie], shuffle=False, verbose=0)
    run = keras_sie.load(log_dir)

    r = _cli("report", log_dir, "-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["num_samples"] == 30
    assert [t["key"] for t in out["top"]] == [k for k, _, _ in run.top_k(2)]
    r = _cli("export", log_dir, "--format", "csv", "--epoch", "1", "-o", tmp_path / "h.csv")
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "h.csv") as f:
        rows = list(csv.DictReader(f))
    got = {row["key"]: float(row["importance"]) for row in rows}
    assert sorted(got) == sorted(keys.tolist())
    slot = {k: i for i, k in enumerate(run.keys.tolist())}
    for k, v in got.items():
        assert v == run.epoch(1).importance[slot[k]]
    r = _cli("diff", log_dir, log_dir, "--epoch-a", "0", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["common"] == 30
