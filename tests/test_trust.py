"""Every score is right or loudly refused: the user paths of issue "Trust" (#13).

Each test walks one ordinary workflow (tf.data as people write it, a second
`fit`, KerasTuner's deep copies, evaluate after fit, nested models, ...) and
asserts the exact scores or the exact error text.
"""

from __future__ import annotations

import copy
import hashlib
import pickle
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import linear_model, linear_oracle, linear_problem

import keras_sie
from keras_sie import storage
from keras_sie.adapters import keras3

_INSTALLED = {"train_step", "test_step", "make_train_function", "make_test_function",
              "_keras_sie_hook"}


def _close_to_max(actual, expected, rel=2e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    err = np.max(np.abs(actual - expected))
    assert err <= rel * np.max(np.abs(expected)), f"max error {err:.3g} > {rel} x max"


def _assert_unpatched(model):
    assert not _INSTALLED & set(model.__dict__), set(model.__dict__) & _INSTALLED
    assert model.train_function is None


def _normalized(s):
    return s / s.sum()


# ------------------------------------------------------------ 1, 2: tf.data
def _csv(tmp_path, n=60):
    x, y = linear_problem(n=n, d=3)
    path = tmp_path / "data.csv"
    rows = ["a,b,c,label"] + [f"{a},{b},{c},{t}" for (a, b, c), (t,) in zip(x, y)]
    path.write_text("\n".join(rows) + "\n")
    return str(path), x, y


def test_with_ids_after_a_shuffling_csv_reader_is_refused_naming_the_fix(tmp_path):
    path, _, _ = _csv(tmp_path)
    ds = tf.data.experimental.make_csv_dataset(path, batch_size=8, label_name="label",
                                               shuffle=True, num_epochs=1)
    with pytest.raises(ValueError, match=r"order changes from epoch to epoch before the ids "
                                         r"are attached \(.*shuffle.*Attach ids at the source"):
        keras_sie.with_ids(ds.unbatch())


@pytest.mark.parametrize("make", [
    lambda b: b.shuffle(10, reshuffle_each_iteration=False),
    lambda b: b.map(lambda v: v, num_parallel_calls=2, deterministic=False),
    lambda b: b.interleave(lambda v: tf.data.Dataset.range(v), cycle_length=2,
                           num_parallel_calls=2, deterministic=False),
    lambda b: tf.data.Dataset.sample_from_datasets([b, b]),
], ids=["shuffle_no_reshuffle", "map_nondeterministic", "interleave_nondeterministic",
        "sample_from_datasets"])
def test_with_ids_refuses_every_reordering_op_upstream(make):
    with pytest.raises(ValueError, match="Attach ids at the source"):
        keras_sie.with_ids(make(tf.data.Dataset.range(10)))


def test_with_ids_refuses_a_pipeline_made_nondeterministic_by_options():
    options = tf.data.Options()
    options.deterministic = False
    ds = tf.data.Dataset.range(10).with_options(options).map(lambda v: v, num_parallel_calls=2)
    with pytest.raises(ValueError, match="deterministic=False"):
        keras_sie.with_ids(ds)


def test_with_ids_on_a_batched_dataset_says_call_it_before_batch(tmp_path):
    path, _, _ = _csv(tmp_path)
    ds = tf.data.experimental.make_csv_dataset(path, batch_size=8, label_name="label",
                                               shuffle=False, num_epochs=1)
    with pytest.raises(ValueError, match=r"already batched.*Call with_ids before \.batch\(\)"):
        keras_sie.with_ids(ds)
    x, y = linear_problem(n=20)
    with pytest.raises(ValueError, match="already batched"):
        keras_sie.with_ids(tf.data.Dataset.from_tensor_slices((x, y)).batch(4).map(
            lambda a, b: (a, b)))


def test_ids_attached_at_the_csv_source_then_shuffled_give_the_exact_scores(tmp_path):
    path, x, y = _csv(tmp_path)
    ds = tf.data.experimental.make_csv_dataset(path, batch_size=7, label_name="label",
                                               shuffle=False, num_epochs=1)

    def to_xy(features, label):
        return tf.stack([features["a"], features["b"], features["c"]], axis=1), label[:, None]

    source = ds.map(to_xy).unbatch()  # batched then unbatched, nothing reorders upstream
    pipeline = keras_sie.with_ids(source).shuffle(64, seed=3).batch(9)
    model = linear_model(d=3)
    sie = keras_sie.SampleImportance(num_samples=len(x), verbose=0)
    model.fit(pipeline, epochs=2, callbacks=[sie], verbose=0)
    _close_to_max(sie.importance, _normalized(linear_oracle(model, x, y)))


# ------------------------------------------------ 3: record numbers and fits
def test_a_second_fit_with_initial_epoch_continues_contiguous_record_numbers(tmp_path):
    x, y = linear_problem(n=40)
    model = linear_model()
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path), verbose=0)
    model.fit(keras_sie.with_ids(x), y, batch_size=8, epochs=3, callbacks=[sie], verbose=0)
    history = model.fit(keras_sie.with_ids(x), y, batch_size=8, initial_epoch=3, epochs=6,
                        callbacks=[sie], verbose=0)
    assert sie.epochs == [0, 1, 2, 3, 4, 5]
    assert [sie.record.epoch(e).keras_epoch for e in sie.epochs] == [0, 1, 2, 3, 4, 5]
    assert storage.list_epochs(str(tmp_path)) == [0, 1, 2, 3, 4, 5]
    assert len(history.history["sie_gini"]) == 3
    model.fit(keras_sie.with_ids(x), y, batch_size=8, epochs=2, callbacks=[sie], verbose=0)
    assert sie.epochs == list(range(8))
    assert [sie.record.epoch(e).keras_epoch for e in (6, 7)] == [0, 1]
    loaded = keras_sie.load(str(tmp_path))
    assert loaded.epochs == list(range(8))
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(storage.run_dir(str(tmp_path)),
                                             size_guidance={"tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Tensors("importance/gini")] == list(range(8))


def test_event_files_opened_in_one_second_are_read_in_order(tmp_path):
    """TensorFlow names event files `...<second>.<host>.<pid>.<n>.v2`; ".10" sorts
    before ".9", so two fits in one second could be read out of order."""
    import glob

    from tensorboard.backend.event_processing import event_accumulator

    from keras_sie.summaries import create_file_writer

    scratch, run = tmp_path / "scratch", tmp_path / "run"
    while True:  # bring the process's writer counter to 8, 98, 998, ...
        w = tf.summary.create_file_writer(str(scratch))
        w.close()
        counters = [int(name.split(".")[-2]) for name in glob.glob(str(scratch / "*"))]
        if set(str(max(counters) + 1)) == {"9"}:
            break  # the next two files are numbered 9 and 10 (99 and 100, ...)
    for step in range(2):
        w = create_file_writer(str(run))
        with w.as_default():
            tf.summary.scalar("x", float(step), step=step)
        w.close()
    acc = event_accumulator.EventAccumulator(str(run), size_guidance={"tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Tensors("x")] == [0, 1]
    assert len(glob.glob(str(run / "events.out.tfevents.*"))) == 2


def test_an_event_file_stamped_in_the_future_does_not_hold_up_the_writer(tmp_path):
    """A run folder copied from a machine whose clock is ahead: no waiting for it."""
    import time

    from keras_sie.summaries import create_file_writer

    future = int(time.time()) + 3600
    (tmp_path / f"events.out.tfevents.{future}.host.1.0.v2").write_bytes(b"")
    start = time.monotonic()
    create_file_writer(str(tmp_path)).close()
    assert time.monotonic() - start < 1.5


# -------------------------------------------------- 4: two callbacks, one model
def test_two_sample_importance_callbacks_in_one_fit_are_refused_and_the_model_restored():
    x, y = linear_problem(n=24)
    model = linear_model()
    first, second = (keras_sie.SampleImportance(verbose=0) for _ in range(2))
    with pytest.raises(ValueError, match="this fit has 2 SampleImportance callbacks"):
        model.fit(keras_sie.with_ids(x), y, callbacks=[first, second], verbose=0)
    _assert_unpatched(model)
    model.fit(x, y, verbose=0)  # plain Keras works afterwards
    # One of them alone works.
    model.fit(keras_sie.with_ids(x), y, batch_size=8, callbacks=[first], verbose=0)
    _close_to_max(first.importance, _normalized(linear_oracle(model, x, y)))


# ---------------------------------------------------- 5: copies and KerasTuner
def test_deep_copies_and_pickles_are_independent_working_callbacks():
    x, y = linear_problem(n=30)
    original = keras_sie.SampleImportance(verbose=0)
    copies = [copy.deepcopy(original), pickle.loads(pickle.dumps(original))]
    for cb in copies:
        model = linear_model()
        model.fit(keras_sie.with_ids(x), y, batch_size=8, callbacks=[cb], verbose=0)
        _close_to_max(cb.importance, _normalized(linear_oracle(model, x, y)))
    assert original.record is None  # the copies recorded on their own
    # A copy of a callback that has recorded carries the record, independently.
    again = copy.deepcopy(copies[0])
    np.testing.assert_array_equal(again.importance, copies[0].importance)
    assert again.record is not copies[0].record


def test_keras_tuner_random_search_scores_every_trial(tmp_path):
    keras_tuner = pytest.importorskip("keras_tuner")
    x, y = linear_problem(n=48)

    def build(hp):
        model = keras.Sequential([keras.Input((4,)),
                                  keras.layers.Dense(hp.Choice("units", [2, 3])),
                                  keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.01), "mse")
        return model

    sie = keras_sie.SampleImportance(log_dir=str(tmp_path / "sie"), verbose=0)
    tuner = keras_tuner.RandomSearch(build, objective="loss", max_trials=2, seed=1,
                                     directory=str(tmp_path / "tuner"), project_name="p")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuner.search(keras_sie.with_ids(x), y, batch_size=8, epochs=2, callbacks=[sie],
                     verbose=0)
    assert len(tuner.oracle.trials) == 2
    assert sie.record is None  # KerasTuner trained deep copies
    run = keras_sie.load(str(tmp_path / "sie"))  # the last trial's run
    assert run.epochs == [0, 1]
    assert np.all(np.isfinite(run.importance)) and run.importance.sum() == pytest.approx(1.0)
    assert (run.visits == 1).all() and np.count_nonzero(run.importance) == len(x)


# ------------------------------------------------------ 6: ids after fit
def test_without_ids_gives_back_model_inputs_for_evaluate_and_predict():
    rng = np.random.default_rng(0)
    x = {"a": rng.normal(size=(64, 1)).astype("float32"),
         "b": rng.normal(size=(64, 1)).astype("float32")}
    y = (x["a"] - 2 * x["b"] > 0).astype("float32")
    a, b = keras.Input((1,), name="a"), keras.Input((1,), name="b")
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(1, activation="sigmoid")(
        keras.layers.Concatenate()([a, b])))
    model.compile(keras.optimizers.Adam(0.1), "binary_crossentropy", metrics=["accuracy"])
    x_ids = keras_sie.with_ids(x)
    model.fit(x_ids, y, epochs=20, batch_size=16, verbose=0,
              callbacks=[keras_sie.SampleImportance(verbose=0)])
    _assert_unpatched(model)
    expected = model.evaluate(x, y, verbose=0)
    assert model.evaluate(keras_sie.without_ids(x_ids), y, verbose=0) == expected
    assert set(keras_sie.without_ids(x_ids)) == {"a", "b"}
    # Arrays wrapped by with_ids come back as the same arrays.
    arr = np.arange(12.0).reshape(6, 2)
    assert keras_sie.without_ids(keras_sie.with_ids(arr)) is arr
    # Datasets, before or after batching.
    ds = keras_sie.with_ids(tf.data.Dataset.from_tensor_slices((x, y)))
    for d in (ds, ds.batch(16)):
        assert set(keras_sie.without_ids(d).element_spec[0]) == {"a", "b"}
    np.testing.assert_allclose(model.predict(keras_sie.without_ids(ds.batch(16)), verbose=0),
                               model.predict(x, verbose=0), rtol=1e-6)


# -------------------------------------------------- 7: epoch-end guards
class _Hijack(keras.callbacks.Callback):
    """Replaces the train function after keras_sie installed its step."""

    def on_train_begin(self, logs=None):
        model = self.model

        def plain_step(data):
            x, y = data[0], data[1]
            x, _ = keras_sie.split_ids(x)
            return type(model).train_step(model, (x, y))

        object.__setattr__(model, "train_step", plain_step)
        model.train_function = None
        type(model).make_train_function(model)


def test_a_step_that_never_runs_raises_at_the_first_epoch_end_and_saves_nothing(tmp_path):
    x, y = linear_problem(n=24)
    model = linear_model()
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path), verbose=0)
    with pytest.raises(RuntimeError, match="recorded nothing this epoch although its step was "
                                           "installed"):
        model.fit(keras_sie.with_ids(x), y, callbacks=[sie, _Hijack()], verbose=0)
    assert storage.list_epochs(str(tmp_path)) == []
    assert sie.record is None or len(sie.record) == 0


class _TakeLayer(keras.layers.Layer):
    """Uses an Embedding's table directly (weight tying), never calling it."""

    def __init__(self, emb, **kwargs):
        super().__init__(**kwargs)
        self.emb = emb

    def call(self, ids):
        return keras.ops.take(self.emb.embeddings, ids, axis=0)


def test_features_naming_an_embedding_that_is_never_called_raises():
    ids_in = keras.Input((), dtype="int64", name="item")
    num = keras.Input((2,), name="num")
    tied = keras.layers.Embedding(10, 3, name="tied")
    tied.build((None,))
    h = keras.layers.Concatenate()([_TakeLayer(tied)(ids_in), num])
    model = keras.Model({"item": ids_in, "num": num}, keras.layers.Dense(1)(h))
    model.compile("sgd", "mse")
    x = {"item": np.arange(8) % 10, "num": np.ones((8, 2), "float32")}
    with pytest.raises(ValueError, match=r"features= names Embedding layer\(s\) \['tied'\], but "
                                         "the model's forward pass never calls them"):
        model.fit(keras_sie.with_ids(x), np.ones((8, 1)), verbose=0,
                  callbacks=[keras_sie.SampleImportance(features=["tied", "num"], verbose=0)])
    _assert_unpatched(model)


# ------------------------------------------------ 8: state after an error
def test_every_keras_sie_error_leaves_the_model_as_it_found_it(tmp_path):
    x, y = linear_problem(n=40)
    model = linear_model()
    ids = keras_sie.with_ids(x)
    bad = dict(ids, sample_id=np.arange(40) + 1000)
    # Raised at epoch end (after the step ran).
    with pytest.raises(ValueError, match="does not fit num_samples=10"):
        model.fit(bad, y, callbacks=[keras_sie.SampleImportance(num_samples=10, verbose=0)],
                  verbose=0)
    _assert_unpatched(model)
    # Raised at a resume (on_epoch_begin).
    keras_sie.SampleImportance(log_dir=str(tmp_path), verbose=0)
    model.fit(ids, y, epochs=1, verbose=0,
              callbacks=[keras_sie.SampleImportance(log_dir=str(tmp_path), verbose=0)])
    smaller = keras_sie.with_ids(x[:20])
    with pytest.raises(ValueError, match="Cannot resume"):
        model.fit(smaller, y[:20], initial_epoch=1, epochs=2, verbose=0,
                  callbacks=[keras_sie.SampleImportance(log_dir=str(tmp_path), verbose=0)])
    _assert_unpatched(model)
    # After every refusal, plain Keras trains and evaluates the same model.
    model.fit(x, y, verbose=0)
    model.evaluate(x, y, verbose=0)


def test_a_crash_inside_fit_does_not_leave_keras_sie_on_a_later_plain_fit():
    x, y = linear_problem(n=32)
    model = linear_model()

    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise KeyboardInterrupt  # not ours: Keras never calls on_train_end

    with pytest.raises(KeyboardInterrupt):
        model.fit(keras_sie.with_ids(x), y, callbacks=[keras_sie.SampleImportance(verbose=0),
                                                       Crash()], verbose=0)
    model.fit(x, y, verbose=0)  # the make_train_function guard took the step off
    assert not _INSTALLED & set(model.__dict__)
    model.evaluate(x, y, verbose=0)


# ---------------------------------------------------- 10: mixed precision
def test_loss_scale_overflow_steps_are_skipped_not_counted_as_faults():
    keras.mixed_precision.set_global_policy("mixed_float16")
    x, y = linear_problem(n=64)
    y = y * 3.0
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, dtype="float32")])
    model.compile(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.0),
                                                      initial_scale=2.0 ** 18), "mse")
    model.layers[-1].dtype_policy = keras.DTypePolicy("float32")
    hidden = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4), keras.layers.Dense(1)])
    hidden.compile(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.0),
                                                       initial_scale=2.0 ** 18), "mse")
    sie = keras_sie.SampleImportance(verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no NaN/Inf-row warning
        hidden.fit(keras_sie.with_ids(x), y, batch_size=8, shuffle=False, callbacks=[sie],
                   verbose=0)
    skipped = sie.faults["skipped_steps"]
    assert 0 < skipped < 8
    assert sie.faults["nonfinite_rows"] == 0
    assert int(hidden.optimizer.iterations.numpy()) == 8 - skipped
    # Exactly the rows of the skipped steps are unvisited (shuffle=False: a
    # step is 8 consecutive rows), the rows of the applied steps visited once.
    per_step = sie.visits.reshape(8, 8)
    assert ((per_step == 0).all(axis=1) | (per_step == 1).all(axis=1)).all()
    assert int((per_step == 0).all(axis=1).sum()) == skipped
    assert np.isfinite(sie.importance).all() and sie.importance.sum() == pytest.approx(1.0)


# -------------------------------------------------- 11: loss reductions
@pytest.mark.parametrize("reduction", ["sum", "mean_with_sample_weight"])
def test_sum_and_weighted_mean_reductions_give_the_exact_own_loss_scores(reduction):
    x, y = linear_problem(n=45)
    sw = np.random.default_rng(3).uniform(0.5, 2.0, size=45).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.0),
                  keras.losses.MeanSquaredError(reduction=reduction))
    sie = keras_sie.SampleImportance(verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a per-batch scale is not coupling
        model.fit(keras_sie.with_ids(x), y, sample_weight=sw, batch_size=7, shuffle=True,
                  callbacks=[sie], verbose=0)
    _close_to_max(sie.importance, _normalized(linear_oracle(model, x, y, sw)))
    _close_to_max(sie.record.epoch().sums, linear_oracle(model, x, y, sw))


def test_an_unreduced_loss_is_refused_before_training():
    x, y = linear_problem(n=16)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", keras.losses.MeanSquaredError(reduction=None))
    with pytest.raises(ValueError, match="reduction None.*sum_over_batch_size"):
        model.fit(keras_sie.with_ids(x), y, verbose=0,
                  callbacks=[keras_sie.SampleImportance(verbose=0)])
    _assert_unpatched(model)


# ------------------------------------------- 12: string keys from generators
def _string_key_batches(x, y, keys, batch=8):
    def gen():
        for i in range(0, len(x), batch):
            yield {"features": x[i:i + batch], "sample_id": keys[i:i + batch]}, y[i:i + batch]
    return gen


def _features_model():
    inp = keras.Input((4,), name="features")
    model = keras.Model({"features": inp}, keras.layers.Dense(1)(inp))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    return model


def test_string_keys_from_a_generator_are_hashed_with_auto_mapping():
    x, y = linear_problem(n=32)
    names = [f"req-{i}" for i in range(32)]
    keys = tf.constant(names)  # Keras's generator adapter takes string tensors
    model = _features_model()
    sie = keras_sie.SampleImportance(num_samples=32, verbose=0)
    model.fit(_string_key_batches(x, y, keys)(), callbacks=[sie], verbose=0)
    slot = {k: i for i, k in enumerate(sie.keys.tolist())}
    got = np.array([sie.importance[slot[k]] for k in names])
    _close_to_max(got, _normalized(linear_oracle(model, x, y)))


def test_string_keys_with_index_mapping_are_a_clear_error_before_training():
    x, y = linear_problem(n=16)
    keys = tf.constant([f"k{i}" for i in range(16)])

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            s = slice(8 * i, 8 * i + 8)
            return {"features": x[s], "sample_id": keys[s]}, y[s]

    model = _features_model()
    with pytest.raises(TypeError, match="are strings; use key_mapping='hash'"):
        model.fit(Batches(), verbose=0, callbacks=[
            keras_sie.SampleImportance(num_samples=16, key_mapping="index", verbose=0)])
    _assert_unpatched(model)


# --------------------------------------- 13: nested embeddings and names
class _GatedEmbedding(keras.layers.Layer):
    """A custom layer owning its Embedding (as keras-io's GRN/VSN examples do)."""

    def __init__(self, vocab, dim, **kwargs):
        super().__init__(**kwargs)
        self.emb = keras.layers.Embedding(vocab, dim)
        self.gate = keras.layers.Dense(dim, activation="sigmoid")

    def call(self, ids):
        e = self.emb(ids)
        return e * self.gate(e)


def _nested_model():
    user = keras.Input((), dtype="int64", name="user")
    city = keras.Input((), dtype="int64", name="city")
    title = keras.Input((3,), dtype="int64", name="title")
    age = keras.Input((1,), name="age")
    tower_in = keras.Input((), dtype="int64")
    tower = keras.Model(tower_in, keras.layers.Embedding(20, 4, name="user_table")(tower_in))
    t1 = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(15, 2)(title))
    t2 = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(15, 2)(title))
    h = keras.layers.Concatenate()([tower(user), _GatedEmbedding(9, 3)(city), t1, t2, age])
    model = keras.Model({"user": user, "city": city, "title": title, "age": age},
                        keras.layers.Dense(1)(keras.layers.Dense(5, activation="tanh")(h)))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    return model


def test_embeddings_in_custom_layers_and_sub_models_are_found_and_named():
    from test_models import oracle

    rng = np.random.default_rng(5)
    n = 26
    x = {"user": rng.integers(0, 20, n), "city": rng.integers(0, 9, n),
         "title": rng.integers(0, 15, (n, 3)), "age": rng.normal(size=(n, 1)).astype("float32")}
    y = rng.normal(size=(n, 1)).astype("float32")
    model = _nested_model()
    sie = keras_sie.SampleImportance(verbose=0)
    model.fit(keras_sie.with_ids(x), y, batch_size=8, callbacks=[sie], verbose=0)
    # A named Embedding keeps its name; auto-named ones take their input's name.
    assert set(sie.feature_importance) == {"user_table", "city", "title", "title_2", "age"}
    _close_to_max(sie.importance, _normalized(oracle(model, x, y)))


# ----------------------------------------------------- 14: coupled batches
def _two_tower(mix_batch: bool):
    user = keras.Input((), dtype="int64", name="user")
    movie = keras.Input((), dtype="int64", name="movie")
    u = keras.layers.Embedding(12, 4)(user)
    m = keras.layers.Embedding(12, 4)(movie)
    if mix_batch:  # keras-io collaborative filtering: contracts the batch axis too
        score = keras.layers.Lambda(lambda t: keras.ops.tensordot(t[0], t[1], 2)
                                    * keras.ops.ones_like(t[0][:, :1]))([u, m])
    else:
        score = keras.layers.Dot(axes=1)([u, m])
    model = keras.Model({"user": user, "movie": movie}, keras.layers.Activation("sigmoid")(score))
    model.compile("adam", "binary_crossentropy")
    return model


@pytest.mark.parametrize("mix_batch", [True, False])
def test_a_model_that_mixes_the_batch_gets_a_warning_and_a_row_wise_one_none(mix_batch):
    rng = np.random.default_rng(1)
    x = {"user": rng.integers(0, 12, 64), "movie": rng.integers(0, 12, 64)}
    y = (rng.random((64, 1)) > 0.5).astype("float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _two_tower(mix_batch).fit(keras_sie.with_ids(x), y, batch_size=32, verbose=0,
                                  callbacks=[keras_sie.SampleImportance(verbose=0)])
    coupled = [w for w in caught if "samples of a batch are coupled" in str(w.message)]
    assert len(coupled) == (1 if mix_batch else 0)
    if mix_batch:
        assert "not the gradient of its own loss alone" in str(coupled[0].message)


def test_a_loss_over_the_whole_batch_gets_the_warning():
    def in_batch_softmax(y_true, y_pred):  # each row's loss depends on every row
        return -keras.ops.log(keras.ops.softmax(keras.ops.transpose(y_pred))[0] + 1e-7) \
            * keras.ops.ones_like(y_pred[:, 0])

    x, y = linear_problem(n=32)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", in_batch_softmax)
    with pytest.warns(UserWarning, match="coupled.*input gradients"):
        model.fit(keras_sie.with_ids(x), y, batch_size=16, verbose=0,
                  callbacks=[keras_sie.SampleImportance(verbose=0)])


def test_the_coupling_check_does_not_change_training():
    x, y = linear_problem(n=64)
    tf.config.experimental.enable_op_determinism()
    try:
        weights = None
        results = []
        for with_sie in (False, True):
            keras.utils.set_random_seed(7)
            model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(),
                                      keras.layers.Dropout(0.3), keras.layers.Dense(1)])
            model.compile(keras.optimizers.Adam(0.01), "mse")
            if weights is None:
                weights = model.get_weights()
            model.set_weights(weights)
            cbs = [keras_sie.SampleImportance(verbose=0)] if with_sie else []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                keras.utils.set_random_seed(7)
                model.fit(keras_sie.with_ids(x) if with_sie else x, y, batch_size=16, epochs=2,
                          callbacks=cbs, verbose=0)
            results.append(model.get_weights())
        for a, b in zip(*results):
            np.testing.assert_array_equal(a, b)
    finally:
        # Determinism turns XLA off in Keras; later tests need it back.
        from tensorflow.python.framework import config as tf_config

        tf_config.disable_op_determinism()


# ------------------------------------------------------ 15: one API
def test_live_callback_and_loaded_run_expose_the_same_names_and_values(tmp_path):
    x, y = linear_problem(n=30)
    model = linear_model(lr=0.05)
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path), aggregate_epochs=2, verbose=0)
    model.fit(keras_sie.with_ids(x), y, batch_size=8, epochs=3, validation_split=0.2,
              callbacks=[sie], verbose=0)
    run = keras_sie.load(str(tmp_path))
    assert isinstance(run, keras_sie.ScoreRecord) and isinstance(sie.record, keras_sie.ScoreRecord)
    for source in (sie, sie.record):
        np.testing.assert_array_equal(source.importance, run.importance)
        np.testing.assert_array_equal(source.visits, run.visits)
        np.testing.assert_array_equal(source.aggregate, run.aggregate)
        np.testing.assert_array_equal(source.keys, run.keys)
        assert source.feature_importance == run.feature_importance
        assert sorted(source.history) == sorted(run.history) == [0, 1, 2]
        for e in (0, 2, "aggregate"):
            assert source.top_k(4, largest=False, epoch=e) == run.top_k(4, largest=False, epoch=e)
    with pytest.raises(TypeError):
        run.top_k(5, False)  # optional arguments are keyword-only
    with pytest.raises(TypeError):
        sie.top_k(5, False)
    # One definition of "visited" for the aggregate: select and the CLI agree.
    keep = keras_sie.select(run, top=1.0, epoch="aggregate")
    _, visits = run.scores("aggregate")
    assert sorted(keep.tolist()) == np.flatnonzero(visits > 0).tolist()
    assert (visits > 0).sum() == 24  # validation rows are never visited


# ------------------------------------------------ Keras coupling, support
def test_the_fused_step_copy_matches_the_installed_keras_train_step():
    digest = hashlib.sha256(keras3.train_step_source().encode()).hexdigest()
    assert digest == keras3.TRAIN_STEP_SHA256, (
        f"Keras {keras.__version__}'s TensorFlowTrainer.train_step differs from the "
        f"{keras3.TRAIN_STEP_COPIED_FROM} version keras_sie's fused step "
        "(keras_sie/adapters/keras3.py, StepHook._fused_train_step) was copied from. "
        "Re-check the copy against the new source (loss, tracker, metrics, gradient "
        "application), then update TRAIN_STEP_SHA256 and TRAIN_STEP_COPIED_FROM."
    )


def test_a_missing_private_keras_member_is_named_with_the_keras_version(monkeypatch):
    # As if a Keras release renamed a member the adapter uses.
    monkeypatch.setattr(keras3, "_MODEL_ATTRS", keras3._MODEL_ATTRS + ("_renamed_member",))
    x, y = linear_problem(n=8)
    model = linear_model()
    with pytest.raises(RuntimeError, match=rf"Keras {keras.__version__} models lack "
                                           r"`_renamed_member`.*keras>=3.15"):
        model.fit(keras_sie.with_ids(x), y, verbose=0,
                  callbacks=[keras_sie.SampleImportance(verbose=0)])
    _assert_unpatched(model)
