"""The storage side of streaming runs (keras_sie/streaming.py), without training.

Real pyarrow and real DuckDB; every number is checked against a numpy oracle
built from the rows that were handed to the writer. docs/streaming.md's DuckDB
queries are read from the page and run here, so the page cannot rot.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import disk_full_on

import keras_sie
from keras_sie import scores as scores_lib
from keras_sie import streaming
from keras_sie.streaming import (
    ShardWriter,
    is_stream_run,
    load_stream,
    read_stream_epoch,
    stream_epochs,
)

ROOT = Path(__file__).resolve().parents[1]
BATCH = 16


def manifest(key_dtype="int64", key_mapping="hash", num_samples=None):
    return {"key_mapping": key_mapping, "key_dtype": key_dtype, "num_samples": num_samples,
            "id_key": "user_id", "stream_capacity": 4 * BATCH}


def epoch_rows(seed, steps=20, num_keys=60, string=False, batch=BATCH):
    """`(keys, scores, steps)` of one epoch: `batch` rows per step, keys repeat (visits > 1)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, num_keys, size=steps * batch)
    keys = np.array([f"user-{i:03d}" for i in ids]) if string else ids.astype(np.int64)
    scores = rng.gamma(2.0, 1.0, size=ids.size).astype(np.float32)
    step = np.repeat(np.arange(steps, dtype=np.int64), batch)
    return keys, scores, step


def write_in_shards(writer, epoch, rows, steps_per_shard):
    """Flushes whole steps, `steps_per_shard` at a time (as the ring does)."""
    keys, scores, steps = rows
    for first in range(0, int(steps.max()) + 1, steps_per_shard):
        sel = (steps >= first) & (steps < first + steps_per_shard)
        writer.write(epoch, keys[sel], scores[sel], steps[sel])


def grouped_oracle(rows):
    keys, scores, _ = rows
    unique, inverse = np.unique(keys, return_inverse=True)
    return (unique, np.bincount(inverse, weights=scores.astype(np.float64)),
            np.bincount(inverse).astype(np.int64))


def write_run(log_dir, epochs=(0, 1), string=False, key_mapping="hash", num_samples=None,
              num_keys=60):
    writer = ShardWriter(log_dir, manifest("string" if string else "int64", key_mapping,
                                           num_samples))
    runs = {}
    for e in epochs:
        rows = epoch_rows(seed=e, string=string, num_keys=num_keys)
        writer.begin_epoch(e)
        write_in_shards(writer, e, rows, steps_per_shard=6)
        writer.end_epoch(e, {"feature_names": ["age", "title"],
                             "feature_sums": np.array([1.0, 3.0]), "nonfinite_rows": 2,
                             "steps": int(rows[2].max()) + 1})
        runs[e] = rows
    writer.close()
    return writer, runs


def epoch_path(log_dir, epoch):
    return Path(log_dir) / "keras_sie" / "stream" / f"epoch={epoch}"


# --------------------------------------------------------------------------- write, read back


@pytest.mark.parametrize("string", [False, True], ids=["int64_keys", "string_keys"])
def test_shards_read_back_grouped_equal_numpy(tmp_path, string):
    log_dir = str(tmp_path / "logs")
    writer, runs = write_run(log_dir, string=string)

    assert is_stream_run(log_dir) and stream_epochs(log_dir) == [0, 1]
    assert writer.rows_written == sum(r[0].size for r in runs.values())
    assert writer.bytes_written > 0 and writer.seconds_writing > 0
    for e, rows in runs.items():
        keys, sums, visits = read_stream_epoch(log_dir, e)
        want_keys, want_sums, want_visits = grouped_oracle(rows)
        np.testing.assert_array_equal(keys, want_keys)
        np.testing.assert_allclose(sums, want_sums, rtol=1e-12)
        np.testing.assert_array_equal(visits, want_visits)
        assert visits.max() > 1  # keys repeat within the epoch

        parts = sorted(os.listdir(epoch_path(log_dir, e)))
        assert parts == ["_epoch.json"] + [f"part-{k:05d}.parquet" for k in range(4)]
        table = pq.read_table(epoch_path(log_dir, e) / "part-00001.parquet")
        assert table.schema.field("key").type == (pa.string() if string else pa.int64())
        assert table.schema.field("score").type == pa.float32()
        assert table.schema.field("step").type == pa.int64()
        meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
        assert (meta["first_step"], meta["last_step"], meta["rows"]) == ("6", "11", str(6 * BATCH))
        assert float(meta["score_sum"]) == pytest.approx(
            float(table["score"].to_numpy().astype(np.float64).sum()), rel=1e-12)

        summary = json.loads((epoch_path(log_dir, e) / "_epoch.json").read_text())
        assert summary["rows"] == rows[0].size and summary["parts"] == 4
        assert summary["score_sum"] == pytest.approx(float(rows[1].astype(np.float64).sum()))
        assert summary["skipped_rows"] == 0 and summary["keras_epoch"] == e
        assert summary["feature_sums"] == [1.0, 3.0]


@pytest.mark.parametrize("string", [False, True], ids=["int64_keys", "string_keys"])
def test_load_stream_importance_is_normalized_mean_per_visit(tmp_path, string):
    log_dir = str(tmp_path / "logs")
    _, runs = write_run(log_dir, string=string)
    record = load_stream(log_dir)

    all_keys = np.unique(np.concatenate([r[0] for r in runs.values()]))
    assert record.key_mapping == "hash" and record.id_key == "user_id"
    assert record.epochs == [0, 1]
    np.testing.assert_array_equal(record.keys, all_keys)
    for e, rows in runs.items():
        keys, sums, visits = grouped_oracle(rows)
        slot = np.searchsorted(all_keys, keys)
        want_sums = np.zeros(all_keys.size)
        want_visits = np.zeros(all_keys.size, np.int64)
        want_sums[slot], want_visits[slot] = sums, visits
        want = scores_lib.normalize(want_sums, want_visits)
        scores = record.epoch(e)
        assert float(scores.importance.sum()) == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(scores.importance, want, rtol=1e-6)
        np.testing.assert_array_equal(scores.visits, want_visits)
        assert scores.keras_epoch == e
        assert scores.feature_importance == {"age": 0.25, "title": 0.75}
        assert scores.faults == {"nonfinite_rows": 2}
        assert scores.summary == scores_lib.summarize(scores.importance, scores.visits)
    top = record.top_k(3, epoch=1)
    assert [k for k, _, _ in top] == list(all_keys[np.argsort(-record.epoch(1).importance)[:3]])


def test_one_visit_per_key_importance_is_score_over_score_sum(tmp_path):
    log_dir = str(tmp_path / "logs")
    keys = np.arange(40, dtype=np.int64)[::-1]
    scores = np.random.default_rng(3).uniform(0.1, 2.0, 40).astype(np.float32)
    writer = ShardWriter(log_dir, manifest())
    writer.write(0, keys, scores, np.arange(40) // 8)
    summary = writer.end_epoch(0, {})
    writer.close()
    record = load_stream(log_dir)
    order = np.argsort(keys)
    np.testing.assert_allclose(record.importance, scores[order] / summary["score_sum"],
                               rtol=1e-6)


def test_index_manifest_gives_arrays_indexed_by_id(tmp_path):
    log_dir = str(tmp_path / "logs")
    n = 100  # epoch_rows draws ids 0..59: ids 60..99 are never visited
    _, runs = write_run(log_dir, key_mapping="index", num_samples=n)
    record = keras_sie.load(log_dir)  # storage.load dispatches to load_stream

    assert record.key_mapping == "index" and record.num_samples == n
    np.testing.assert_array_equal(record.keys, np.arange(n))
    for e, rows in runs.items():
        keys, sums, visits = grouped_oracle(rows)
        want_sums = np.bincount(keys, weights=sums, minlength=n)
        want_visits = np.bincount(keys, weights=visits, minlength=n).astype(np.int64)
        scores = record.epoch(e)
        np.testing.assert_allclose(scores.importance, scores_lib.normalize(want_sums, want_visits),
                                   rtol=1e-6)
        np.testing.assert_array_equal(scores.visits, want_visits)
        assert scores.importance[60:].sum() == 0 and scores.visits[60:].sum() == 0
        assert scores.summary["unvisited_samples"] == n - keys.size
    assert keras_sie.load(os.path.join(log_dir, "keras_sie")).epochs == [0, 1]


def test_bytes_keys_are_stored_as_strings_and_empty_writes_write_nothing(tmp_path):
    log_dir = str(tmp_path / "logs")
    writer = ShardWriter(log_dir, manifest("string"))
    writer.write(0, np.array([], dtype=object), np.zeros(0, np.float32), np.zeros(0, np.int64))
    writer.write(0, np.array([b"caf\xc3\xa9", b"b"], dtype=object),
                 np.array([1.0, 2.0], np.float32), np.array([0, 0]))
    writer.write(0, np.array([b"b"]), np.array([4.0], np.float32), np.array([1]))
    with pytest.raises(TypeError, match="key_dtype"):
        writer.write(0, np.array([1, 2]), np.ones(2), np.zeros(2, np.int64))
    writer.end_epoch(0, {})
    writer.close()
    keys, sums, visits = read_stream_epoch(log_dir, 0)
    assert keys.tolist() == ["b", "café"]
    assert sums.tolist() == [6.0, 1.0] and visits.tolist() == [2, 1]
    assert sorted(os.listdir(epoch_path(log_dir, 0))) == [
        "_epoch.json", "part-00000.parquet", "part-00001.parquet"]


# --------------------------------------------------------------------------- atomicity, restarts


def test_killed_job_replayed_from_step_0_writes_every_row_once(tmp_path):
    log_dir = str(tmp_path / "logs")
    epoch0, epoch1 = epoch_rows(seed=0), epoch_rows(seed=1)
    first = ShardWriter(log_dir, manifest())
    write_in_shards(first, 0, epoch0, steps_per_shard=6)
    first.end_epoch(0, {})
    first.begin_epoch(1)
    keys, scores, steps = epoch1
    flushed = steps < 12  # two shards of epoch 1 reached the disk ...
    write_in_shards(first, 1, (keys[flushed], scores[flushed], steps[flushed]), 6)
    first.wait()
    # ... the third was being written when the job was killed: its temporary file is left,
    # and the rows still in the ring are lost with the process. No end_epoch, no close.
    (epoch_path(log_dir, 1) / ".tmp-killed.part").write_bytes(b"PAR1 half a shard")
    assert stream_epochs(log_dir) == [0]
    assert stream_epochs(log_dir, complete=False) == [0, 1]
    assert load_stream(log_dir).epochs == [0]  # the unfinished epoch is not a record

    second = ShardWriter(log_dir, manifest())  # BackupAndRestore: epoch 1 again from step 0
    second.begin_epoch(1)
    assert not (epoch_path(log_dir, 1) / ".tmp-killed.part").exists()
    write_in_shards(second, 1, epoch1, steps_per_shard=5)  # other boundaries: 10..14 straddles
    summary = second.end_epoch(1, {})
    second.close()

    assert second.skipped_rows == int(flushed.sum()) == summary["skipped_rows"]
    assert summary["rows"] == keys.size and summary["parts"] == 2 + 2
    assert summary["score_sum"] == pytest.approx(float(scores.astype(np.float64).sum()))
    assert sorted(p for p in os.listdir(epoch_path(log_dir, 1)) if p.endswith(".parquet")) == [
        f"part-{k:05d}.parquet" for k in range(4)]  # 00000-00001 first job, 00002-00003 replay
    stored = pq.read_table(epoch_path(log_dir, 1)).sort_by([("step", "ascending")])
    order = np.lexsort((scores, keys, steps))
    got = np.lexsort((stored["score"].to_numpy(), stored["key"].to_numpy(),
                      stored["step"].to_numpy()))
    np.testing.assert_array_equal(stored["step"].to_numpy()[got], steps[order])
    np.testing.assert_array_equal(stored["key"].to_numpy()[got], keys[order])
    np.testing.assert_array_equal(stored["score"].to_numpy()[got], scores[order])

    record = load_stream(log_dir)
    assert record.epochs == [0, 1]
    for e, rows in ((0, epoch0), (1, epoch1)):
        want_keys, want_sums, want_visits = grouped_oracle(rows)
        got_keys, got_sums, got_visits = read_stream_epoch(log_dir, e)
        np.testing.assert_array_equal(got_keys, want_keys)
        np.testing.assert_allclose(got_sums, want_sums, rtol=1e-12)
        np.testing.assert_array_equal(got_visits, want_visits)


def test_a_killed_write_leaves_no_file_and_the_error_surfaces_on_the_next_call(
        tmp_path, monkeypatch):
    log_dir = str(tmp_path / "logs")
    rows = epoch_rows(seed=0)
    writer = ShardWriter(log_dir, manifest())
    write_in_shards(writer, 0, tuple(a[rows[2] < 6] for a in rows), 6)
    writer.wait()

    real = pq.write_table

    def crash(table, where, **kwargs):
        where.write(b"PAR1 half")  # a partial file, then the failure
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", crash)
    keys, scores, steps = (a[(rows[2] >= 6) & (rows[2] < 12)] for a in rows)
    writer.write(0, keys, scores, steps)  # returns: the failure is in the background thread
    with pytest.raises(OSError, match="No space left"):
        writer.wait()
    assert sorted(os.listdir(epoch_path(log_dir, 0))) == ["part-00000.parquet"]  # no temp file

    writer.write(0, keys, scores, steps)
    with pytest.raises(OSError, match="No space left"):
        writer.write(0, keys, scores, steps)  # the next write raises the previous one's error
    monkeypatch.setattr(pq, "write_table", real)
    writer.write(0, keys, scores, steps)
    summary = writer.end_epoch(0, {})
    writer.close()
    assert summary["parts"] == 2 and summary["rows"] == 12 * BATCH


def test_disk_full_in_the_background_is_raised_by_end_epoch(tmp_path, monkeypatch):
    log_dir = str(tmp_path / "logs")
    calls = disk_full_on(monkeypatch, "part-00001.parquet")
    writer = ShardWriter(log_dir, manifest())
    write_in_shards(writer, 0, epoch_rows(seed=0, steps=12), 6)
    with pytest.raises(OSError, match="No space left"):
        writer.end_epoch(0, {})
    assert calls["n"] == 1
    assert not (epoch_path(log_dir, 0) / "_epoch.json").exists()
    writer.close()


def test_write_returns_while_the_shard_is_written_and_holds_one_in_flight(tmp_path, monkeypatch):
    log_dir = str(tmp_path / "logs")
    rows = epoch_rows(seed=0, steps=4)
    gate, in_write, active = threading.Event(), threading.Event(), []
    real = pq.write_table

    def gated(table, where, **kwargs):
        active.append(1)
        assert len(active) == 1, "two shards written at once"
        in_write.set()
        gate.wait(10)
        real(table, where, **kwargs)
        active.pop()

    monkeypatch.setattr(pq, "write_table", gated)
    writer = ShardWriter(log_dir, manifest())
    writer.write(0, *(a[rows[2] < 2] for a in rows))  # returns with the shard unwritten
    assert in_write.wait(10) and not (epoch_path(log_dir, 0) / "part-00000.parquet").exists()
    second = threading.Thread(target=writer.write, args=(0, *(a[rows[2] >= 2] for a in rows)))
    second.start()
    second.join(0.3)
    assert second.is_alive()  # waits for the first shard
    gate.set()
    second.join(10)
    writer.close()
    assert writer.rows_written == rows[0].size
    assert sorted(os.listdir(epoch_path(log_dir, 0))) == ["part-00000.parquet",
                                                          "part-00001.parquet"]


def test_missing_pyarrow_fails_when_the_writer_is_made(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=re.escape("keras_sie[parquet]")):
        ShardWriter(str(tmp_path / "logs"), manifest())
    assert not is_stream_run(str(tmp_path / "logs"))


def test_manifest_is_merged_and_load_without_a_stream_run_fails_clearly(tmp_path):
    log_dir = str(tmp_path / "logs")
    ShardWriter(log_dir, dict(manifest(), aggregate_epochs=2)).close()
    ShardWriter(log_dir, manifest()).close()
    stored = streaming.read_stream_manifest(log_dir)
    assert stored["aggregate_epochs"] == 2 and stored["key_mapping"] == "hash"
    with pytest.raises(FileNotFoundError, match="No finished epoch"):
        keras_sie.load(log_dir)
    with pytest.raises(FileNotFoundError, match="no keras_sie/epoch_"):
        keras_sie.load(str(tmp_path))
    with pytest.raises(ValueError, match="key_mapping"):
        ShardWriter(log_dir, manifest(key_mapping="modulo"))


# --------------------------------------------------------------------------- DuckDB


def doc_queries() -> list[str]:
    text = (ROOT / "docs" / "streaming.md").read_text(encoding="utf-8")
    return re.findall(r"```sql\n(.*?)```", text, flags=re.DOTALL)


def test_duckdb_queries_of_the_docs_agree_with_load_stream(tmp_path, monkeypatch):
    top_query, distribution_query, join_query = doc_queries()
    monkeypatch.chdir(tmp_path)
    write_run("logs", epochs=(0, 1, 2), string=True, num_keys=200)
    # An unfinished epoch (no _epoch.json) is still in the glob; the queries below filter or
    # group by epoch, so it only adds its own group. Here all three epochs finished.
    record = keras_sie.load("logs")
    keys = record.keys

    top = duckdb.sql(top_query).fetchall()
    want = record.top_k(10, epoch=2)
    assert [r[0] for r in top] == [k for k, _, _ in want]
    np.testing.assert_allclose([r[1] for r in top], [s for _, s, _ in want], rtol=1e-6)
    assert [r[2] for r in top] == [v for _, _, v in want]

    distribution = duckdb.sql(distribution_query).fetchall()
    assert [r[0] for r in distribution] == record.epochs == [0, 1, 2]
    for epoch, count, quantiles, largest in distribution:
        importance, visits = record.scores(epoch)
        visited = importance[visits > 0].astype(np.float64)
        assert count == visited.size
        np.testing.assert_allclose(quantiles, np.quantile(visited, [0.5, 0.9, 0.99]), rtol=1e-6)
        assert largest == pytest.approx(visited.max(), rel=1e-6)

    # The training log: one line per key, with what a person would join on.
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, keys.size)
    with open("train_log.csv", "w") as f:
        f.write("key,label,country\n")
        f.writelines(f"{k},{label},c{len(k) % 3}\n" for k, label in zip(keys, labels))
    joined = duckdb.sql(join_query).fetchall()
    assert [r[0] for r in joined] == [k for k, _, _ in want]
    by_key = dict(zip(keys, labels))
    assert [r[1] for r in joined] == [by_key[k] for k, _, _ in want]
    np.testing.assert_allclose([r[-1] for r in joined], [s for _, s, _ in want], rtol=1e-6)
