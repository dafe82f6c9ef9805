"""Bad input, numerical faults, interruption and resume: nothing silently wrong or lost."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close_to_max, disk_full_on, linear_model, linear_oracle, linear_problem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_sie
from keras_sie import storage
from keras_sie.buffer import ImportanceBuffer


def _ds(x, y, ids, batch=16):
    return tf.data.Dataset.from_tensor_slices(({"features": x, "sample_id": ids}, y)).batch(batch)


def _dict_model(d=4, lr=0.0, jit_compile=False):
    inp = keras.Input((d,), name="features")
    model = keras.Model({"features": inp}, keras.layers.Dense(1)(inp))
    model.compile(keras.optimizers.SGD(lr), "mse", jit_compile=jit_compile)
    return model


# ------------------------------------------------------------------ ids
@pytest.mark.parametrize("jit_compile", [False, True])
def test_out_of_range_ids_raise_naming_the_id_and_size(jit_compile):
    # jit_compile=True: XLA drops out-of-range scatter indices silently even on
    # CPU (as GPUs do), so this covers the silent-drop path.
    x, y = linear_problem(n=40)
    ids = np.arange(40, dtype="int64")
    ids[5] = 1000
    model = _dict_model(jit_compile=jit_compile)
    sie = keras_sie.SampleImportance(num_samples=40, verbose=0)
    with pytest.raises(ValueError, match=r"id 1000.*num_samples=40"):
        model.fit(_ds(x, y, ids), callbacks=[sie], verbose=0)


def test_negative_ids_in_memory_fail_before_training():
    x, y = linear_problem(n=40)
    ids = np.arange(40, dtype="int64")
    ids[3] = -2
    model = _dict_model()
    with pytest.raises(ValueError, match="-2 is negative"):
        model.fit({"features": x, "sample_id": ids}, y,
                  callbacks=[keras_sie.SampleImportance(verbose=0)], verbose=0)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_skip_mode_counts_skipped_rows_and_keeps_the_rest_exact(jit_compile, tmp_path):
    x, y = linear_problem(n=40)
    ids = np.arange(40, dtype="int64")
    ids[[5, 17]] = [1000, -1]
    model = _dict_model(jit_compile=jit_compile)
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path), num_samples=40,
                                     on_invalid_id="skip", verbose=0)
    with pytest.warns(RuntimeWarning, match="skipped 2 rows"):
        model.fit(_ds(x, y, ids), callbacks=[sie], verbose=0)
    assert sie.visits[5] == 0 and sie.visits[17] == 0 and sie.visits.sum() == 38
    s = linear_oracle(model, x, y)
    s[[5, 17]] = 0
    assert_close_to_max(sie.importance, s / s.sum(), rel=1e-5)
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(storage.run_dir(str(tmp_path)),
                                             size_guidance={"tensors": 0})
    acc.Reload()
    value = tf.make_ndarray(acc.Tensors("faults/invalid_id_rows")[0].tensor_proto)
    assert float(value) == 2.0


def test_an_unknown_id_on_a_row_with_a_nan_gradient_is_still_refused():
    # The row counts as non-finite (that fault wins in the buffer), but the
    # buffer's worst id sees every id, so the bad id is refused all the same.
    x, y = linear_problem(n=40)
    x[7] = np.nan
    ids = np.arange(40, dtype="int64")
    ids[7] = 1000
    model = _dict_model()
    sie = keras_sie.SampleImportance(num_samples=40, verbose=0)
    with pytest.raises(ValueError, match=r"some training rows had a sample id outside "
                                         r"0\.\.39 \(e\.g\. id 1000\)"):
        model.fit(_ds(x, y, ids, batch=40), callbacks=[sie], verbose=0)


def test_duplicate_ids_in_a_batch_are_all_counted():
    x, y = linear_problem(n=32)
    ids = np.arange(32, dtype="int64") % 8  # each id 4 times, within batches
    model = _dict_model()
    sie = keras_sie.SampleImportance(num_samples=8, verbose=0)
    model.fit(_ds(x, y, ids), callbacks=[sie], verbose=0)
    assert sie.visits.tolist() == [4] * 8
    s = linear_oracle(model, x, y)
    per_visit = np.bincount(ids, weights=s) / 4
    assert_close_to_max(sie.importance, per_visit / per_visit.sum(), rel=1e-5)


@pytest.mark.parametrize("ids,match", [
    (np.arange(40, dtype="float32"), "dtype float32"),
    (np.array([str(i) for i in range(40)]), "strings; use key_mapping='hash'"),
])
def test_wrong_id_types_fail_before_training(ids, match):
    x, y = linear_problem(n=40)
    model = _dict_model()
    sie = keras_sie.SampleImportance(key_mapping="index", num_samples=40, verbose=0)
    with pytest.raises(TypeError, match=match):
        model.fit(_ds(x, y, ids), callbacks=[sie], verbose=0)


def test_float_ids_in_memory_fail_before_training():
    x, y = linear_problem(n=40)
    model = _dict_model()
    sie = keras_sie.SampleImportance(verbose=0)
    with pytest.raises(TypeError, match="float64"):
        model.fit({"features": x, "sample_id": np.arange(40.0)}, y, callbacks=[sie], verbose=0)


def test_ids_on_validation_data_only_is_a_clear_error():
    x, y = linear_problem(n=40)
    model = linear_model()
    with pytest.raises(ValueError, match="validation data carries ids"):
        model.fit(x, y, validation_data=(keras_sie.with_ids(x), y),
                  callbacks=[keras_sie.SampleImportance(verbose=0)], verbose=0)


def test_dataset_without_ids_is_a_clear_error():
    x, y = linear_problem(n=40)
    model = linear_model()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    with pytest.raises(ValueError, match="with_ids"):
        model.fit(ds, callbacks=[keras_sie.SampleImportance(num_samples=40, verbose=0)], verbose=0)


# ------------------------------------------------------- numerical faults
def _sqrt_model():
    # d sqrt(x)/dx is infinite at 0: a row with a zero input gets an Inf/NaN
    # input gradient while the loss and weight gradients stay finite.
    inp = keras.Input((3,), name="features")
    h = keras.layers.Lambda(lambda t: tf.sqrt(t))(inp)
    model = keras.Model({"features": inp}, keras.layers.Dense(1)(h))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    return model


def test_nonfinite_gradient_rows_are_excluded_counted_and_warned(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 2.0, size=(48, 3)).astype("float32")
    x[[4, 30], 1] = 0.0
    y = rng.normal(size=(48, 1)).astype("float32")
    model = _sqrt_model()
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path), verbose=0)
    with pytest.warns(RuntimeWarning, match="2 training rows had a NaN/Inf"):
        model.fit(keras_sie.with_ids(x, id_key="sample_id"), y, batch_size=16, callbacks=[sie],
                  verbose=0)
    assert np.isfinite(sie.record.epoch().sums).all()
    assert sie.faults["nonfinite_rows"] == 2
    assert sie.visits[4] == 0 and sie.visits[30] == 0
    assert np.isfinite(sie.importance).all()
    # The other samples' scores are exact: sum_j |2 r_i w_j / (2 sqrt x_ij)|.
    w, b = model.layers[-1].get_weights()
    r = np.sqrt(x) @ w + b - y
    s = (2 * np.abs(r) * np.abs(w[:, 0] / (2 * np.sqrt(np.where(x > 0, x, 1))))).sum(1)
    s[[4, 30]] = 0
    assert_close_to_max(sie.importance, s / s.sum(), rel=1e-5)
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(storage.run_dir(str(tmp_path)),
                                             size_guidance={"tensors": 0})
    acc.Reload()
    assert float(tf.make_ndarray(acc.Tensors("faults/nonfinite_rows")[0].tensor_proto)) == 2.0


def test_bool_input_is_a_clear_error_or_excluded_with_features():
    rng = np.random.default_rng(0)
    flag = keras.Input((1,), dtype="bool", name="flag")
    num = keras.Input((2,), name="num")
    h = keras.layers.Concatenate()([keras.ops.cast(flag, "float32"), num])
    model = keras.Model({"flag": flag, "num": num}, keras.layers.Dense(1)(h))
    model.compile("sgd", "mse")
    x = {"flag": rng.random((32, 1)) > 0.5, "num": rng.normal(size=(32, 2)).astype("float32")}
    y = rng.normal(size=(32, 1)).astype("float32")
    with pytest.raises(ValueError, match="'flag' has dtype bool"):
        model.fit(keras_sie.with_ids(x), y, callbacks=[keras_sie.SampleImportance(verbose=0)],
                  verbose=0)
    sie = keras_sie.SampleImportance(features=["num"], verbose=0)
    model.fit(keras_sie.with_ids(x), y, callbacks=[sie], verbose=0)
    assert list(sie.feature_importance) == ["num"]


# ------------------------------------------------------------- sizes
def test_num_samples_smaller_than_the_ids_fails_before_training():
    x, y = linear_problem(n=40)
    model = linear_model()
    with pytest.raises(ValueError, match="id 39 does not fit num_samples=30"):
        model.fit(keras_sie.with_ids(x), y,
                  callbacks=[keras_sie.SampleImportance(num_samples=30, verbose=0)], verbose=0)


def test_num_samples_larger_than_the_data_counts_unvisited_samples():
    x, y = linear_problem(n=40)
    model = linear_model()
    sie = keras_sie.SampleImportance(num_samples=50, verbose=0)
    model.fit(keras_sie.with_ids(x), y, callbacks=[sie], verbose=0)
    assert sie.importance.shape == (50,)
    assert sie.summary["unvisited_samples"] == 10 and (sie.importance[40:] == 0).all()
    s = linear_oracle(model, x, y)
    assert_close_to_max(sie.importance[:40], s / s.sum(), rel=1e-5)


def test_zero_epochs_and_zero_step_epochs_do_not_crash(tmp_path):
    x, y = linear_problem(n=40)
    model = linear_model()
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path), verbose=0)
    model.fit(keras_sie.with_ids(x), y, epochs=0, callbacks=[sie], verbose=0)
    assert sie.importance is None and sie.top_k(3) == []
    assert "train_step" not in model.__dict__
    # An epoch that sees no batch: all samples unvisited, importance all zero.
    empty = tf.data.Dataset.from_tensor_slices(({"features": x, "sample_id": np.arange(40)}, y))
    empty = empty.take(0).batch(8)
    dm = _dict_model()
    sie = keras_sie.SampleImportance(num_samples=40, verbose=0)
    with pytest.warns(UserWarning):
        dm.fit(empty, epochs=1, callbacks=[sie], verbose=0)
    # Documented output: the epoch is recorded with every sample unvisited.
    assert sorted(sie.history) == [0] and (sie.importance == 0).all()
    assert sie.summary["unvisited_samples"] == 40 and sie.summary["gini"] == 0.0


def test_model_without_trainable_weights_still_scores():
    x, y = linear_problem(n=40)
    model = linear_model()
    model.layers[-1].trainable = False
    model.compile(keras.optimizers.SGD(0.1), "mse")
    sie = keras_sie.SampleImportance(verbose=0)
    with pytest.warns(UserWarning, match="no trainable weights|does not have any trainable"):
        model.fit(keras_sie.with_ids(x), y, callbacks=[sie], verbose=0)
    s = linear_oracle(model, x, y)
    assert_close_to_max(sie.importance, s / s.sum(), rel=1e-5)


# -------------------------------------------------------------- disk
def test_unwritable_log_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    x, y = linear_problem(n=40)
    model = linear_model()
    w0 = model.get_weights()[0].copy()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    with pytest.raises(PermissionError, match="cannot write to log_dir"):
        model.fit(keras_sie.with_ids(x), y, callbacks=[
            keras_sie.SampleImportance(log_dir=str(blocker / "logs"), verbose=0)], verbose=0)
    np.testing.assert_array_equal(model.get_weights()[0], w0)


def test_disk_full_during_a_write_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    x, y = linear_problem(n=40)
    model = linear_model(lr=0.01)
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path), verbose=0)
    calls = disk_full_on(monkeypatch)  # the 2nd epoch file hits ENOSPC
    with pytest.warns(RuntimeWarning, match="No space left on device.*disabled"):
        hist = model.fit(keras_sie.with_ids(x), y, epochs=3, callbacks=[sie], verbose=0)
    assert len(hist.history["loss"]) == 3  # training completed
    assert calls["n"] == 1  # reporting disabled after the fault: no retry storm
    run = keras_sie.load(str(tmp_path))
    assert run.epochs == [0]  # the earlier epoch's file is intact
    assert not [f for f in os.listdir(storage.run_dir(str(tmp_path))) if f.endswith(".part")]


def test_reporting_fault_fails_open_by_default_and_raises_in_strict_mode(monkeypatch):
    from keras_sie import callback as callback_mod

    def broken(*a, **k):
        raise RuntimeError("bug in reporting")

    monkeypatch.setattr(callback_mod.scores_lib, "summarize", broken)
    x, y = linear_problem(n=40)
    ref = linear_model(lr=0.05)
    w = ref.get_weights()
    ref.fit(x, y, epochs=2, shuffle=False, verbose=0)
    model = linear_model(lr=0.05)
    model.set_weights(w)
    sie = keras_sie.SampleImportance(verbose=0)
    with pytest.warns(RuntimeWarning, match="bug in reporting") as record:
        model.fit(keras_sie.with_ids(x), y, epochs=2, shuffle=False, callbacks=[sie], verbose=0)
    assert len([r for r in record if "bug in reporting" in str(r.message)]) == 1
    for a, b in zip(ref.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    with pytest.raises(RuntimeError, match="bug in reporting"):
        model.fit(keras_sie.with_ids(x), y, callbacks=[
            keras_sie.SampleImportance(strict=True, verbose=0)], verbose=0)


# ------------------------------------------------------ crash and resume
_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np, keras, keras_sie
    log_dir, backup_dir, kill_epoch, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), 4
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 4)).astype("float32")
    y = (x @ rng.normal(size=(4, 1))).astype("float32") + rng.normal(size=(96, 1)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.05), "mse")

    class Killer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
        def on_train_batch_end(self, batch, logs=None):
            if self.epoch == kill_epoch and batch == 2:
                os.kill(os.getpid(), signal.SIGKILL)  # mid-epoch, no cleanup

    callbacks = [keras.callbacks.BackupAndRestore(backup_dir),
                 keras_sie.SampleImportance(log_dir=log_dir, verbose=0), Killer()]
    model.fit(keras_sie.with_ids(x), y, batch_size=16, epochs=epochs, shuffle=False,
              callbacks=callbacks, verbose=0)
    np.save(os.path.join(log_dir, "final_aggregate.npy"), callbacks[1].aggregate)
""")


def _run_script(tmp_path, name, kill_epoch, backup):
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)
    log_dir = tmp_path / name
    return subprocess.run(
        [sys.executable, str(script), str(log_dir), str(tmp_path / backup), str(kill_epoch)],
        capture_output=True, text=True, timeout=300, check=False,
    ), log_dir


def test_sigkill_mid_epoch_keeps_finished_epochs_and_resume_matches_uninterrupted(tmp_path):
    killed, log_dir = _run_script(tmp_path, "run", kill_epoch=2, backup="backup")
    assert killed.returncode == -9, killed.stderr[-2000:]
    run = keras_sie.load(str(log_dir))
    assert run.epochs == [0, 1]  # the killed epoch left no file read as valid
    for e in run.epochs:
        assert np.isclose(run.epoch(e).importance.sum(), 1.0)
    # A half-written temp file (as a crash during a write would leave) is ignored.
    (log_dir / "keras_sie" / ".tmp-abc.part").write_bytes(b"PK\x03\x04 truncated")
    assert keras_sie.load(str(log_dir)).epochs == [0, 1]

    resumed, _ = _run_script(tmp_path, "run", kill_epoch=-1, backup="backup")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    clean, clean_dir = _run_script(tmp_path, "clean", kill_epoch=-1, backup="backup_clean")
    assert clean.returncode == 0, clean.stderr[-2000:]
    a, b = keras_sie.load(str(log_dir)), keras_sie.load(str(clean_dir))
    assert a.epochs == b.epochs == [0, 1, 2, 3]
    for e in a.epochs:
        assert_close_to_max(a.epoch(e).importance, b.epoch(e).importance, rel=1e-5)
    assert_close_to_max(np.load(log_dir / "final_aggregate.npy"),
                        np.load(clean_dir / "final_aggregate.npy"), rel=1e-5)


def test_loading_crafted_or_corrupt_files_is_a_clear_error(tmp_path):
    folder = tmp_path / "keras_sie"
    folder.mkdir()
    # An object array would need pickle (arbitrary code on load): refused.
    with open(folder / "epoch_00000.npz", "wb") as f:
        np.savez(f, importance=np.array([object()], dtype=object), sums=np.zeros(1),
                 visits=np.zeros(1))
    with pytest.raises(keras_sie.CorruptRunError, match="not a readable keras_sie epoch"):
        keras_sie.load(str(tmp_path))
    (folder / "epoch_00000.npz").write_bytes(b"garbage, not a zip")
    with pytest.raises(keras_sie.CorruptRunError):
        keras_sie.load(str(tmp_path))
    with open(folder / "epoch_00000.npz", "wb") as f:
        np.savez(f, importance=np.zeros(3), sums=np.zeros(2), visits=np.zeros(3))
    with pytest.raises(keras_sie.CorruptRunError, match="inconsistent shapes"):
        keras_sie.load(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No keras_sie run"):
        keras_sie.load(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="No such folder"):
        keras_sie.load(str(tmp_path / "missing"))


# ------------------------------------------------- property-based buffer
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 12),
    batches=st.lists(
        st.lists(st.tuples(st.integers(-3, 15), st.floats(0, 10), st.booleans()), min_size=1,
                 max_size=9),
        min_size=1, max_size=4),
)
def test_buffer_accumulation_matches_numpy_reference(n, batches):
    buf = ImportanceBuffer(n)
    step = tf.function(lambda ids, rows: buf.accumulate(ids, [rows], 1.0), reduce_retracing=True)
    sums, visits = np.zeros(n), np.zeros(n, dtype=np.int64)
    invalid = nonfinite = 0
    for batch in batches:
        ids = np.array([b[0] for b in batch], dtype=np.int64)
        vals = np.array([b[1] if b[2] else np.nan for b in batch], dtype=np.float32)
        step(tf.constant(ids), tf.constant(vals))
        for i, v in zip(ids, vals):
            if not np.isfinite(v):  # a NaN/Inf row counts as non-finite, whatever its id
                nonfinite += 1
            elif not 0 <= i < n:
                invalid += 1
            else:
                sums[i] += v
                visits[i] += 1
    snap = buf.read()
    np.testing.assert_allclose(snap.sums, sums, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(snap.visits, visits)
    assert snap.invalid_rows == invalid and snap.nonfinite_rows == nonfinite
    assert np.isfinite(snap.sums).all()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(capacity=st.integers(1, 8),
       batches=st.lists(st.lists(st.integers(0, 12), min_size=1, max_size=6), min_size=1,
                        max_size=4))
def test_hash_keys_match_a_first_come_slot_reference(capacity, batches):
    buf = ImportanceBuffer(capacity, key_mapping="hash")
    step = tf.function(lambda keys, rows: buf.accumulate(buf.slots_for_keys(keys), [rows], 1.0),
                       reduce_retracing=True)
    slot_of, sums, dropped = {}, np.zeros(capacity), 0
    for batch in batches:
        keys = np.array(batch, dtype=np.int64) * 1000 + 7
        vals = np.arange(1, len(batch) + 1, dtype=np.float32)
        step(tf.constant(keys), tf.constant(vals))
        for k in dict.fromkeys(keys.tolist()):  # new keys get slots in batch order
            if k not in slot_of and len(slot_of) < capacity:
                slot_of[k] = len(slot_of)
        for k, v in zip(keys.tolist(), vals):
            if k in slot_of:
                sums[slot_of[k]] += v
            else:
                dropped += 1
    snap = buf.read()
    assert snap.dropped_rows == dropped
    assert sorted(snap.keys.tolist()) == sorted(slot_of)
    got = {k: snap.sums[i] for i, k in enumerate(snap.keys.tolist())}
    for k, slot in slot_of.items():
        assert got[k] == pytest.approx(sums[slot], rel=1e-6)


def test_a_crash_inside_fit_leaves_a_model_that_trains_as_plain_keras():
    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise KeyboardInterrupt("user pressed ctrl-c")

    x, y = linear_problem(n=48)
    model = linear_model(lr=0.05)
    reference = linear_model(lr=0.05)
    with pytest.raises(KeyboardInterrupt):
        model.fit(keras_sie.with_ids(x), y, callbacks=[keras_sie.SampleImportance(verbose=0),
                                                      Crash()], verbose=0)
    assert "train_step" in model.__dict__  # Keras skipped on_train_end
    reference.set_weights(model.get_weights())
    model.fit(x, y, epochs=2, shuffle=False, verbose=0)  # no ids, no callback: plain Keras
    reference.fit(x, y, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_feature_sums_leave_out_dumped_rows_and_survive_ring_flushes():
    # One group: the sum is read off the rows; several groups, or a stream
    # ring (zeroed at each flush): summed in the step. Either way, rows with a
    # bad id or a NaN gradient are left out, and a ring keeps flushed rows.
    from keras_sie.buffer import StreamRing

    ids = tf.constant([0, 7, 2, -1, 2], tf.int64)
    a = tf.constant([1.0, 2.0, np.nan, 4.0, 8.0])
    b = tf.constant([16.0, 32.0, 1.0, 64.0, 128.0])
    one = ImportanceBuffer(5)
    one.accumulate(ids, [a], 2.0)
    np.testing.assert_array_equal(one.read().feature_sums[:2], [18.0, 0.0])
    two = ImportanceBuffer(5)
    two.accumulate(ids, [a, b], 2.0)
    # Row 2 is NaN in total, so both of its group values are left out.
    np.testing.assert_array_equal(two.read().feature_sums[:3], [18.0, 288.0, 0.0])
    with pytest.raises(ValueError, match="ring=True"):
        StreamRing(ImportanceBuffer(5), sink=lambda *args: None)
    flushed = []
    ring = StreamRing(ImportanceBuffer(5, ring=True), sink=lambda *args: flushed.append(args))
    (positions,) = ring.slots([tf.constant([10, 11], tf.int64)])
    ring.buffer.accumulate(positions, [tf.constant([1.0, 2.0])], 1.0)
    ring.flush()
    (positions,) = ring.slots([tf.constant([12], tf.int64)])
    ring.buffer.accumulate(positions, [tf.constant([4.0])], 1.0)
    assert flushed[0][0].tolist() == [10, 11] and flushed[0][1].tolist() == [1.0, 2.0]
    assert ring.buffer.read().feature_sums[0] == 7.0
