"""Streaming mode end to end: the device ring, Parquet shards, restarts, reading back.

The storage layer alone (shard writer, reader, DuckDB) is tested in
test_stream_storage.py; here every run trains a real model with
`SampleImportance(stream=True)` and is compared with the index-mode run of
the same data or with the closed-form oracle of a frozen linear model.
"""

import os
import signal
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close_to_max, linear_model, linear_oracle, linear_problem
from tensorboard.backend.event_processing import event_accumulator as ea

import keras_sie

pytest.importorskip("pyarrow")

N = 203  # with batch 16: 12 full batches and one of 11 rows


def _mlp(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.05), "mse")
    return model


def _dataset(x, y, ids):
    # Shuffled every epoch (seeded), batched, partial last batch.
    return tf.data.Dataset.from_tensor_slices(({"x": x, "sample_id": ids}, y)).shuffle(
        len(y), seed=3).batch(16)


def _functional(seed=0, jit_compile=False):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((4,), name="x")
    out = keras.layers.Dense(1)(keras.layers.Dense(8, activation="tanh")(inp))
    model = keras.Model({"x": inp}, out)
    model.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=jit_compile)
    return model


def _by_id(record, keys):
    slot = {k: i for i, k in enumerate(record.keys.tolist())}
    return lambda arr: np.array([arr[slot[k]] for k in keys.tolist()])


@pytest.mark.parametrize("ids", ["index", "string", "int64"])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_a_ring_smaller_than_the_epoch_gives_the_index_scores(tmp_path, ids, jit_compile):
    x, y = linear_problem(n=N)
    reference_model = _functional(jit_compile=jit_compile)
    weights = reference_model.get_weights()
    index = keras_sie.SampleImportance(num_samples=N, verbose=0)
    reference_model.fit(_dataset(x, y, np.arange(N)), epochs=2, callbacks=[index], verbose=0)

    raw = np.random.default_rng(1).choice(10**12, size=N, replace=False).astype("int64")
    keys = {"index": np.arange(N), "int64": raw,
            "string": np.array([f"req-{k:x}:item" for k in raw])}[ids]
    model = _functional(jit_compile=jit_compile)
    model.set_weights(weights)
    # 40 rows: 2 batches per flush, so an epoch writes 7 shards.
    sie = keras_sie.SampleImportance(
        log_dir=str(tmp_path), stream=True, stream_capacity=40, verbose=0,
        key_mapping="index" if ids == "index" else "hash",
        num_samples=N if ids == "index" else None,
    )
    model.fit(_dataset(x, y, keys), epochs=2, callbacks=[sie], verbose=0)

    for e in (0, 1):
        parts = sorted(os.listdir(tmp_path / "keras_sie" / "stream" / f"epoch={e}"))
        assert [p for p in parts if p.endswith(".parquet")] == [
            f"part-{i:05d}.parquet" for i in range(7)]
    run = keras_sie.load(str(tmp_path))
    assert run.epochs == [0, 1]
    if ids == "index":
        assert run.key_mapping == "index" and run.num_samples == N
        got = {e: run.history[e] for e in (0, 1)}
        visits = run.visits
    else:
        assert run.key_mapping == "hash" and sorted(run.keys.tolist()) == sorted(keys.tolist())
        order = _by_id(run, keys)
        got = {e: order(run.history[e]) for e in (0, 1)}
        visits = order(run.visits)
    assert (visits == 1).all()
    for e in (0, 1):
        assert_close_to_max(got[e], index.history[e], rel=1e-5)
    # The live callback reads the same files, with the same names.
    np.testing.assert_array_equal(sie.importance, run.importance)
    assert sie.top_k(3) == run.top_k(3)
    # Training is not changed by the callback.
    for a, b in zip(model.get_weights(), reference_model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_streamed_scores_equal_the_closed_form_oracle_and_tensorboard_counts_the_rows(tmp_path):
    x, y = linear_problem(n=N)
    model = linear_model(lr=0.0)  # frozen: the oracle holds for every epoch
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path), stream=True, stream_capacity=64,
                                     top_k=5, verbose=0)
    model.fit(keras_sie.with_ids(x), y, batch_size=16, epochs=2, callbacks=[sie], verbose=0)
    oracle = linear_oracle(model, x, y)
    run = keras_sie.load(str(tmp_path))
    for e in (0, 1):
        assert_close_to_max(run.history[e], oracle / oracle.sum(), rel=1e-5)
        assert abs(float(run.history[e].sum()) - 1.0) < 1e-5

    acc = ea.EventAccumulator(str(tmp_path / "keras_sie"), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    for tag in ("stream/rows", "stream/shards", "stream/score_sum", "faults/nonfinite_rows",
                "stream/visit_score_distribution", "stream/top_visits"):
        assert tag in tags, tag

    def scalar(tag):
        return [float(tf.make_ndarray(ev.tensor_proto)) for ev in acc.Tensors(tag)]

    assert scalar("stream/rows") == [N, N]
    assert scalar("stream/shards") == [4, 4]  # 64-row ring, 16-row batches: 4 flushes
    # The raw sums are the oracle's (the normalizer written with the shards).
    np.testing.assert_allclose(scalar("stream/score_sum"), [oracle.sum()] * 2, rtol=1e-5)
    top = tf.make_ndarray(acc.Tensors("stream/top_visits")[-1].tensor_proto).item().decode()
    assert f"| 1 | {int(np.argmax(oracle))} |" in top


_RESTART_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras, numpy as np, tensorflow as tf
    import keras_sie

    log_dir, kill_at = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(203, 4)).astype("float32")
    y = rng.normal(size=(203, 1)).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.05), "mse")

    class Kill(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    sie = keras_sie.SampleImportance(log_dir=log_dir, stream=True, stream_capacity=40,
                                     verbose=0)
    callbacks = [sie] + ([Kill()] if kill_at >= 0 else [])
    model.fit(keras_sie.with_ids(x), y, batch_size=16, epochs=1, shuffle=False,
              callbacks=callbacks, verbose=0)
""")


def _run(script, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, str(script), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_sigkill_mid_epoch_then_restart_loses_nothing_flushed_and_duplicates_nothing(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(_RESTART_SCRIPT)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    # Killed after step 8. The ring (40 rows, 16-row batches) was flushed
    # before steps 2, 4, 6 and 8; the shard of the last flush may still have
    # been in flight on the writer thread, and step 8's rows were in the ring.
    r = _run(script, killed, 8)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    epoch_dir = killed / "keras_sie" / "stream" / "epoch=0"
    parts = sorted(p for p in os.listdir(epoch_dir) if p.endswith(".parquet"))
    assert len(parts) in (3, 4)
    assert parts == [f"part-{i:05d}.parquet" for i in range(len(parts))]
    assert not any(p.startswith(".") or ".tmp" in p for p in parts)
    assert not (epoch_dir / "_epoch.json").exists()
    with pytest.raises(FileNotFoundError, match="No finished epoch"):
        keras_sie.load(str(killed))  # no complete epoch yet

    # The restarted job replays the epoch from step 0 into the same folder.
    r = _run(script, killed, -1)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming the streaming run" in r.stderr
    r = _run(script, clean, -1)
    assert r.returncode == 0, r.stderr[-2000:]

    import pyarrow.parquet as pq

    keys = pq.read_table(str(epoch_dir), columns=["key"]).column("key").to_numpy()
    assert len(keys) == 203 and len(np.unique(keys)) == 203  # every row once
    restarted, reference = keras_sie.load(str(killed)), keras_sie.load(str(clean))
    assert restarted.epochs == reference.epochs == [0]
    np.testing.assert_array_equal(restarted.visits, np.ones(203))
    assert_close_to_max(restarted.importance, reference.importance, rel=1e-6)
    after = sorted(p for p in os.listdir(epoch_dir) if p.endswith(".parquet"))
    assert after[: len(parts)] == parts  # finished shards are kept as they were
    assert after == [f"part-{i:05d}.parquet" for i in range(len(after))]  # numbering goes on


def test_stream_configuration_mistakes_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="pass a log_dir"):
        keras_sie.SampleImportance(stream=True)
    with pytest.raises(ValueError, match="signals"):
        keras_sie.SampleImportance(log_dir=str(tmp_path), stream=True, signals=("loss",))
    with pytest.raises(ValueError, match="stream=True"):
        keras_sie.SampleImportance(log_dir=str(tmp_path), stream_capacity=10)
    with pytest.raises(ValueError, match="positive int"):
        keras_sie.SampleImportance(log_dir=str(tmp_path), stream=True, stream_capacity=0)

    x, y = linear_problem(n=64)
    model = _mlp()
    before = [w.copy() for w in model.get_weights()]
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path), stream=True, stream_capacity=8,
                                     verbose=0)
    with pytest.raises(ValueError, match="does not fit stream_capacity=8"):
        model.fit(keras_sie.with_ids(x), y, batch_size=16, callbacks=[sie], verbose=0)
    assert "train_step" not in model.__dict__  # the model is left as it was
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)  # no step ran
    model.fit(x, y, batch_size=16, verbose=0)  # and trains as plain Keras


def test_index_ids_outside_num_samples_are_refused_at_epoch_end_or_skipped(tmp_path):
    x, y = linear_problem(n=48)
    ids = np.arange(48)
    ids[5] = 1000
    ds = tf.data.Dataset.from_tensor_slices(({"x": x, "sample_id": ids}, y)).batch(16)
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path / "a"), stream=True, num_samples=48,
                                     verbose=0)
    with pytest.raises(ValueError, match="e.g. id 1000"):
        _functional().fit(ds, callbacks=[sie], verbose=0)
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path / "b"), stream=True, num_samples=48,
                                     on_invalid_id="skip", verbose=0)
    _functional().fit(ds, callbacks=[sie], verbose=0)
    run = keras_sie.load(str(tmp_path / "b"))
    assert run.visits[5] == 0 and run.visits.sum() == 47
    assert run.epoch(0).faults["invalid_id_rows"] == 1


def test_another_run_into_the_same_folder_replaces_it_and_a_second_fit_goes_on(tmp_path):
    x, y = linear_problem(n=96)
    first = _mlp(seed=0)
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path), stream=True, stream_capacity=32,
                                     verbose=0)
    first.fit(keras_sie.with_ids(x), y, batch_size=16, epochs=2, shuffle=False,
              callbacks=[sie], verbose=0)
    # A second fit of the same callback, from epoch 0 again: records 2 and 3.
    first.fit(keras_sie.with_ids(x), y, batch_size=16, epochs=2, shuffle=False,
              callbacks=[sie], verbose=0)
    run = keras_sie.load(str(tmp_path))
    assert run.epochs == [0, 1, 2, 3]
    assert [run.epoch(e).keras_epoch for e in run.epochs] == [0, 1, 0, 1]
    assert (run.visits == 1).all()
    np.testing.assert_array_equal(sie.history[3], run.history[3])

    # Another model (other initial weights) into the same folder: detected at
    # its first flush, the old run is deleted, the new one written whole.
    other = _mlp(seed=5)
    reference = _mlp(seed=5)
    index = keras_sie.SampleImportance(verbose=0)
    reference.fit(keras_sie.with_ids(x), y, batch_size=16, epochs=1, shuffle=False,
                  callbacks=[index], verbose=0)
    new = keras_sie.SampleImportance(log_dir=str(tmp_path), stream=True, stream_capacity=32,
                                     verbose=0)
    with pytest.warns(UserWarning, match="held another streaming run"):
        other.fit(keras_sie.with_ids(x), y, batch_size=16, epochs=1, shuffle=False,
                  callbacks=[new], verbose=0)
    run = keras_sie.load(str(tmp_path))
    assert run.epochs == [0]
    assert (run.visits == 1).all()
    assert_close_to_max(run.importance, index.importance, rel=1e-5)


@pytest.mark.parametrize("stream", [False, True])
def test_string_keys_with_xla_and_validation_data_that_carries_them(tmp_path, stream):
    """Validation batches lose their keys before the XLA-compiled test step."""
    x, y = linear_problem(n=100)
    keys = np.array([f"k{i}" for i in range(100)], dtype=object)
    model = _functional(jit_compile=True)
    sie = keras_sie.SampleImportance(key_mapping="hash", verbose=0, stream=stream,
                                     log_dir=str(tmp_path) if stream else None,
                                     num_samples=None if stream else 100)
    history = model.fit({"x": x, "sample_id": keys}, y, batch_size=16, epochs=2,
                        validation_split=0.2, callbacks=[sie], verbose=0)
    assert np.isfinite(history.history["val_loss"]).all()
    visited = sorted(k for k, v in zip(sie.keys.tolist(), sie.visits) if v)
    assert sie.visits.sum() == 80 and visited == sorted(keys[:80].tolist())  # training rows
    assert "train_step" not in model.__dict__ and "make_test_function" not in model.__dict__
    assert np.isfinite(model.evaluate({"x": x}, y, verbose=0))


def test_reruns_into_one_folder_keep_only_the_new_run(tmp_path):
    """A normal run, then stream reruns with fewer epochs and with more rows."""
    x, y = linear_problem(n=120)

    def run(n, epochs, stream=True):
        model = _mlp(seed=0)
        sie = keras_sie.SampleImportance(log_dir=str(tmp_path), stream=stream,
                                         stream_capacity=40 if stream else None, verbose=0)
        model.fit(keras_sie.with_ids(x[:n]), y[:n], batch_size=16, epochs=epochs,
                  shuffle=False, callbacks=[sie], verbose=0)
        return sie

    run(100, 3, stream=False)
    with pytest.warns(UserWarning, match="holds 3 epoch"):
        first = run(100, 4)
    assert keras_sie.load(str(tmp_path)).epochs == [0, 1, 2, 3]
    reference = first.history[1]
    # The same job again with fewer epochs: epochs 2-3 of the old run are gone.
    with pytest.warns(UserWarning, match=r"deleted epochs \[1, 2, 3\]"):
        again = run(100, 2)
    run_ = keras_sie.load(str(tmp_path))
    assert again.epochs == run_.epochs == [0, 1]
    assert_close_to_max(run_.history[1], reference, rel=1e-6)
    # More rows (the first steps match the old shards, later ones do not):
    # every id of the new run is there once.
    with pytest.warns(UserWarning, match="held another streaming run"):
        more = run(120, 1)
    run_ = keras_sie.load(str(tmp_path))
    assert more.epochs == [0]
    assert run_.epochs == [0] and (run_.visits == 1).all() and run_.visits.size == 120
