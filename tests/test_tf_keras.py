"""tf_keras (Keras 2) and TensorFlow Recommenders models (issue #16).

Runs only in a process where `TF_USE_LEGACY_KERAS=1` was set before TensorFlow
was imported (so that `tf.keras` is tf_keras and TFRS imports), with `tf-keras`
and `tensorflow-recommenders` installed: `.ci/run`'s second job,

    TF_USE_LEGACY_KERAS=1 python -m pytest -q tests/test_tf_keras.py

Elsewhere (the main job) the whole module is skipped.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import inspect
import os
import subprocess
import sys
import warnings

import pytest

if os.environ.get("TF_USE_LEGACY_KERAS", "").lower() not in ("1", "true"):
    pytest.skip("tf_keras tests need TF_USE_LEGACY_KERAS=1 set before TensorFlow is imported "
                "(.ci/run's second job)", allow_module_level=True)

tf_keras = pytest.importorskip("tf_keras")
tfrs = pytest.importorskip("tensorflow_recommenders")

import numpy as np
import tensorflow as tf
from conftest import assert_close_to_max, linear_problem

import keras_sie
from keras_sie import datasets
from keras_sie.adapters import adapter_for
from keras_sie.adapters import tf_keras as tfk_adapter

_INSTALLED = {"train_step", "test_step", "make_train_function", "make_test_function",
              "_keras_sie_hook"}


@pytest.fixture(autouse=True)
def _fresh_tf_keras_state():
    tf_keras.backend.clear_session()
    tf_keras.utils.set_random_seed(1234)
    yield


def _assert_unpatched(model):
    assert not _INSTALLED & set(model.__dict__), set(model.__dict__) & _INSTALLED


# ------------------------------------------------------------ linear oracle
def _linear_model(d=4, lr=0.0, kind="sequential"):
    if kind == "sequential":
        model = tf_keras.Sequential([tf_keras.Input((d,)), tf_keras.layers.Dense(1)])
    elif kind == "functional":
        inp = tf_keras.Input((d,), name="features")
        model = tf_keras.Model(inp, tf_keras.layers.Dense(1)(inp))
    else:
        class Linear(tf_keras.Model):
            def __init__(self):
                super().__init__()
                self.dense = tf_keras.layers.Dense(1)

            def call(self, x):
                return self.dense(x)

        model = Linear()
    model.compile(tf_keras.optimizers.SGD(lr), "mse")
    return model


def _dense_of(model):
    return [layer for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, tf_keras.layers.Dense)][-1]


def _oracle(model, x, y, sample_weight=None):
    """S_i = 2 |w.x_i + b - y_i| sum_j |w_j| (times sample weight); MSE, lr=0."""
    w, b = _dense_of(model).get_weights()
    s = 2.0 * np.abs(x @ w + b - y)[:, 0] * np.abs(w).sum()
    if sample_weight is not None:
        s = s * sample_weight
    return s / s.sum()


@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed"])
def test_linear_oracle_is_exact_shuffled_with_a_partial_last_batch(kind):
    x, y = linear_problem(n=103)  # 103 = 10 batches of 10 + a batch of 3
    model = _linear_model(kind=kind)
    adapter = adapter_for(model)
    assert isinstance(adapter, tfk_adapter.TfKerasAdapter)
    sie = keras_sie.SampleImportance(verbose=0)
    history = model.fit(keras_sie.with_ids(x), y, batch_size=10, epochs=2, shuffle=True,
                        callbacks=[sie], verbose=0)
    assert sie.epochs == [0, 1]
    assert (sie.visits == 1).all()
    assert_close_to_max(sie.importance, _oracle(model, x, y), rel=1e-5)
    assert sie.importance.sum() == pytest.approx(1.0, abs=1e-6)
    assert "sie_gini" in history.history and "loss" in history.history
    _assert_unpatched(model)
    # The model is left as it was: evaluate and a plain fit work without ids.
    model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=1, verbose=0)


def test_sample_weights_and_validation_data_keep_the_oracle_exact():
    x, y = linear_problem(n=64)
    sw = np.random.default_rng(1).uniform(0.5, 2.0, size=64).astype("float32")
    model = _linear_model()
    sie = keras_sie.SampleImportance(verbose=0)
    model.fit(keras_sie.with_ids(x), y, sample_weight=sw, batch_size=16, epochs=1,
              validation_data=(keras_sie.with_ids(x[:8]), y[:8]), callbacks=[sie], verbose=0)
    assert_close_to_max(sie.importance, _oracle(model, x, y, sw), rel=1e-5)


def test_a_shuffled_tf_data_pipeline_matches_the_oracle():
    x, y = linear_problem(n=40)
    model = _linear_model()
    ds = keras_sie.with_ids(tf.data.Dataset.from_tensor_slices((x, y))).shuffle(64, seed=2)
    sie = keras_sie.SampleImportance(num_samples=40, verbose=0)
    model.fit(ds.batch(7), epochs=2, callbacks=[sie], verbose=0)
    assert_close_to_max(sie.importance, _oracle(model, x, y), rel=1e-5)


@pytest.mark.parametrize("source", ["generator", "sequence"])
def test_generator_and_sequence_inputs_match_the_oracle(source):
    x, y = linear_problem(n=40)
    xi = keras_sie.with_ids(x)

    def batch(i):
        return {k: v[i * 8:i * 8 + 8] for k, v in xi.items()}, y[i * 8:i * 8 + 8]

    class Batches(tf_keras.utils.Sequence):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return batch(i)

    data = (batch(i) for i in range(5)) if source == "generator" else Batches()
    model = _linear_model()
    sie = keras_sie.SampleImportance(num_samples=40, verbose=0)
    model.fit(data, epochs=1, steps_per_epoch=5, callbacks=[sie], verbose=0)
    assert_close_to_max(sie.importance, _oracle(model, x, y), rel=1e-5)


def test_mixed_precision_loss_scale_is_undone_exactly():
    x, y = linear_problem(n=48)
    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = tf_keras.Sequential([tf_keras.Input((4,)),
                                     tf_keras.layers.Dense(1, dtype="float32")])
        model.compile(tf_keras.optimizers.SGD(0.0), "mse")
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
    assert isinstance(model.optimizer, tf_keras.mixed_precision.LossScaleOptimizer)
    sie = keras_sie.SampleImportance(verbose=0)
    model.fit(keras_sie.with_ids(x), y, batch_size=16, epochs=1, callbacks=[sie], verbose=0)
    assert sie.faults["skipped_steps"] == 0
    assert_close_to_max(sie.importance, _oracle(model, x, y), rel=1e-5)
    assert sie.record.epoch().sums.max() < 1e3  # the loss scale (32768) is divided out


def test_record_inside_a_custom_tf_keras_train_step():
    x, y = linear_problem(n=50)

    class Custom(tf_keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = tf_keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

        def train_step(self, data):
            x, y = data
            x, ids = keras_sie.split_ids(x)
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = self.compiled_loss(y, self(x, training=True))
            grads = tape.gradient(loss, self.trainable_variables + [x])
            keras_sie.record(self, ids, grads[-1])
            self.optimizer.apply_gradients(zip(grads[:-1], self.trainable_variables))
            return {"loss": loss}

    model = Custom()
    model.compile(tf_keras.optimizers.SGD(0.0), "mse")
    sie = keras_sie.SampleImportance(verbose=0)
    model.fit(keras_sie.with_ids(x), y, batch_size=8, epochs=1, callbacks=[sie], verbose=0)
    assert_close_to_max(sie.importance, _oracle(model, x, y), rel=1e-5)


def test_multi_output_tf_keras_model_scores_each_output_exactly():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(48, 3)).astype("float32")
    ya, yb = rng.normal(size=(48, 1)).astype("float32"), rng.normal(size=(48, 1)).astype("float32")
    inp = tf_keras.Input((3,))
    a = tf_keras.layers.Dense(1, name="a")(inp)
    b = tf_keras.layers.Dense(1, name="b")(inp)
    model = tf_keras.Model(inp, [a, b])
    model.compile(tf_keras.optimizers.SGD(0.0), ["mse", "mse"], loss_weights=[1.0, 3.0])
    sie = keras_sie.SampleImportance(verbose=0)
    model.fit(keras_sie.with_ids(x), [ya, yb], batch_size=8, epochs=1, callbacks=[sie],
              verbose=0)
    wa, ba = model.get_layer("a").get_weights()
    wb, bb = model.get_layer("b").get_weights()
    ga = 2.0 * (x @ wa + ba - ya) * wa[:, 0]  # d loss_a / dx, per row
    gb = 3.0 * 2.0 * (x @ wb + bb - yb) * wb[:, 0]
    total = np.abs(ga + gb).sum(axis=1)
    assert_close_to_max(sie.importance, total / total.sum(), rel=1e-5)
    ta, tb = np.abs(ga).sum(axis=1), np.abs(gb).sum(axis=1)
    assert_close_to_max(sie.task_importance["a"], ta / ta.sum(), rel=1e-5)
    assert_close_to_max(sie.task_importance["b"], tb / tb.sum(), rel=1e-5)


def test_signals_are_refused_before_training_on_a_tf_keras_model():
    x, y = linear_problem(n=20)
    model = _linear_model()
    sie = keras_sie.SampleImportance(signals=["loss"], verbose=0)
    with pytest.raises(ValueError, match="signals= are not supported for tf_keras models yet"):
        model.fit(keras_sie.with_ids(x), y, epochs=1, callbacks=[sie], verbose=0)
    _assert_unpatched(model)
    model.fit(x, y, epochs=1, verbose=0)


def test_streaming_and_hash_keys_under_xla_are_refused_before_training(tmp_path):
    x, y = linear_problem(n=20)
    model = _linear_model()
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path), stream=True, verbose=0)
    with pytest.raises(NotImplementedError, match="stream=True is not supported for tf_keras"):
        model.fit(keras_sie.with_ids(x), y, epochs=1, callbacks=[sie], verbose=0)
    _assert_unpatched(model)
    model.compile(model.optimizer, "mse", jit_compile=True)
    sie = keras_sie.SampleImportance(key_mapping="hash", num_samples=20, verbose=0)
    with pytest.raises(ValueError, match="which XLA cannot compile; compile the model with "
                                         "jit_compile=False"):
        model.fit(dict(keras_sie.with_ids(x), sample_id=np.arange(20) * 7), y, epochs=1,
                  callbacks=[sie], verbose=0)
    _assert_unpatched(model)


def test_adapter_for_names_the_supported_generations_for_anything_else():
    with pytest.raises(TypeError, match=r"builtins\.object is not a supported Keras model.*"
                                        r"Keras 3.*tf_keras \(Keras 2\)"):
        adapter_for(object())


def test_the_fused_steps_copy_the_installed_train_steps():
    """The fused steps are copies: a new tf-keras/TFRS must be re-checked by hand."""
    from tf_keras.src.engine import training

    def sha(fn):
        return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()

    assert sha(training.Model.train_step) == tfk_adapter.TRAIN_STEP_SHA256, (
        f"tf-keras {tf_keras.__version__}'s Model.train_step differs from the "
        f"{tfk_adapter.TRAIN_STEP_COPIED_FROM} copy in keras_sie/adapters/tf_keras.py")
    assert sha(tfrs.models.Model.train_step) == tfk_adapter.TFRS_TRAIN_STEP_SHA256, (
        "tfrs.models.Model.train_step differs from the "
        f"{tfk_adapter.TFRS_TRAIN_STEP_COPIED_FROM} copy in keras_sie/adapters/tf_keras.py")


# ----------------------------------------------------------------- TFRS
def _reviews():
    """The bundled reviews as (user, item, rating): user = the reviewer's age group."""
    with gzip.open(datasets.REVIEWS_FILE, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    users = np.array([f"age_{r['Age']}" for r in rows])
    items = np.array([f"item_{r['Clothing ID']}" for r in rows])
    ratings = np.array([float(r["Rating"]) for r in rows], np.float32)
    return users, items, ratings


class _RankingModel(tf.keras.Model):
    def __init__(self, user_vocab, item_vocab, dim=16):
        super().__init__()
        self.user_embeddings = tf.keras.Sequential([
            tf.keras.layers.StringLookup(vocabulary=user_vocab, mask_token=None),
            tf.keras.layers.Embedding(len(user_vocab) + 1, dim, name="user_embedding"),
        ])
        self.item_embeddings = tf.keras.Sequential([
            tf.keras.layers.StringLookup(vocabulary=item_vocab, mask_token=None),
            tf.keras.layers.Embedding(len(item_vocab) + 1, dim, name="item_embedding"),
        ])
        self.ratings = tf.keras.Sequential([
            tf.keras.layers.Dense(32, activation="relu"),
            tf.keras.layers.Dense(1),
        ])

    def call(self, inputs):
        user_id, item_id = inputs
        return self.ratings(tf.concat([self.user_embeddings(user_id),
                                       self.item_embeddings(item_id)], axis=1))


class _ReviewsRankingModel(tfrs.models.Model):
    """TFRS's "basic ranking" tutorial model, on the bundled reviews."""

    def __init__(self, user_vocab, item_vocab):
        super().__init__()
        self.ranking_model = _RankingModel(user_vocab, item_vocab)
        self.task = tfrs.tasks.Ranking(
            loss=tf.keras.losses.MeanSquaredError(),
            metrics=[tf.keras.metrics.RootMeanSquaredError()],
        )

    def call(self, features):
        return self.ranking_model((features["user_id"], features["item_id"]))

    def compute_loss(self, features, training=False):
        labels = features.pop("rating")
        return self.task(labels=labels, predictions=self(features))


def _ranking_fit(users, items, ratings, *, callback=None, lr=0.1, epochs=2, batch=4096):
    tf_keras.backend.clear_session()
    tf_keras.utils.set_random_seed(7)
    model = _ReviewsRankingModel(np.unique(users), np.unique(items))
    model.compile(optimizer=tf.keras.optimizers.Adagrad(lr))
    ds = tf.data.Dataset.from_tensor_slices({"user_id": users, "item_id": items,
                                             "rating": ratings})
    if callback is not None:
        ds = keras_sie.with_ids(ds)
    ds = ds.shuffle(len(users), seed=3).batch(batch)
    history = model.fit(ds, epochs=epochs, callbacks=[callback] if callback else [], verbose=0)
    return model, history.history


def test_tfrs_basic_ranking_on_the_reviews_scores_every_row_and_trains_identically(tmp_path):
    users, items, ratings = _reviews()
    n = len(users)
    tf.config.experimental.enable_op_determinism()
    try:
        _, plain = _ranking_fit(users, items, ratings)
        sie = keras_sie.SampleImportance(log_dir=str(tmp_path), num_samples=n, verbose=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no coupling warning: MSE is per row
            model, fused = _ranking_fit(users, items, ratings, callback=sie)
    finally:
        from tensorflow.python.framework import config as tf_config

        tf_config.disable_op_determinism()
    for name, values in plain.items():  # loss, RMSE, regularization and total loss
        assert fused[name] == values, name
    assert set(fused) - set(plain) == {"sie_gini", "sie_top1pct_share", "sie_ess",
                                      "sie_entropy"}
    assert sie.epochs == [0, 1]
    assert (sie.visits == 1).all()  # every row, once per epoch
    assert np.isfinite(sie.importance).all()
    assert sie.importance.sum() == pytest.approx(1.0, abs=1e-5)
    shares = sie.feature_importance
    # Named Embeddings are reported by name; the label feeds only the task's loss:
    # not a feature group at all.
    assert shares["user_embedding"] > 0 and shares["item_embedding"] > 0
    assert "rating" not in shares
    _assert_unpatched(model)
    run = keras_sie.load(str(tmp_path))
    assert run.epochs == [0, 1]
    np.testing.assert_array_equal(run.importance, sie.importance)
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(str(tmp_path / "keras_sie"),
                                             size_guidance={"tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    assert {"importance/distribution", "importance/gini"} <= tags, sorted(tags)


def test_tfrs_ranking_scores_are_each_rows_own_embedding_gradient():
    users, items, ratings = _reviews()
    users, items, ratings = users[:300], items[:300], ratings[:300]
    sie = keras_sie.SampleImportance(num_samples=300, verbose=0)
    model, _ = _ranking_fit(users, items, ratings, callback=sie, lr=0.0, epochs=1, batch=64)
    ranking = model.ranking_model
    u = ranking.user_embeddings(tf.constant(users))
    i = ranking.item_embeddings(tf.constant(items))
    with tf.GradientTape() as tape:
        tape.watch([u, i])
        pred = ranking.ratings(tf.concat([u, i], axis=1))[:, 0]
        per_row = tf.reduce_sum((pred - ratings) ** 2)  # each row's own squared error
    gu, gi = tape.gradient(per_row, [u, i])
    oracle = np.abs(gu.numpy()).sum(1) + np.abs(gi.numpy()).sum(1)
    assert_close_to_max(sie.importance, oracle / oracle.sum(), rel=1e-5)


class _ReviewsRetrievalModel(tfrs.models.Model):
    """A two-tower retrieval model with TFRS's in-batch softmax."""

    def __init__(self, user_vocab, item_vocab, dim=16):
        super().__init__()
        self.user_model = tf.keras.Sequential([
            tf.keras.layers.StringLookup(vocabulary=user_vocab, mask_token=None),
            tf.keras.layers.Embedding(len(user_vocab) + 1, dim),
        ])
        self.item_model = tf.keras.Sequential([
            tf.keras.layers.StringLookup(vocabulary=item_vocab, mask_token=None),
            tf.keras.layers.Embedding(len(item_vocab) + 1, dim),
        ])
        self.task = tfrs.tasks.Retrieval()

    def compute_loss(self, features, training=False):
        return self.task(self.user_model(features["user_id"]),
                         self.item_model(features["item_id"]))


def test_tfrs_retrieval_in_batch_softmax_is_flagged_as_coupled():
    users, items, _ = _reviews()
    users, items = users[:2000], items[:2000]
    model = _ReviewsRetrievalModel(np.unique(users), np.unique(items))
    model.compile(optimizer=tf.keras.optimizers.Adagrad(0.1))
    ds = keras_sie.with_ids(tf.data.Dataset.from_tensor_slices(
        {"user_id": users, "item_id": items})).shuffle(2000, seed=1).batch(256)
    sie = keras_sie.SampleImportance(num_samples=2000, verbose=0)
    with pytest.warns(UserWarning, match=r"samples of a batch are coupled.*in-batch negatives"):
        model.fit(ds, epochs=1, callbacks=[sie], verbose=0)
    assert (sie.visits == 1).all()
    assert np.isfinite(sie.importance).all()
    assert sie.importance.sum() == pytest.approx(1.0, abs=1e-5)
    assert set(sie.feature_importance) == {"user_id", "item_id"}


_MIRRORED = r"""
import os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np, tf_keras, keras_sie
rng = np.random.default_rng(0)
x = rng.normal(size=(103, 4)).astype("float32"); y = rng.normal(size=(103, 1)).astype("float32")
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
sie = keras_sie.SampleImportance(verbose=0)
if sys.argv[1] == "tfrs":  # a TFRS model; its task's loss is a sum (tf_keras refuses "auto")
    import tensorflow_recommenders as tfrs

    class Ranker(tfrs.models.Model):
        def __init__(self):
            super().__init__()
            self.dense = tf.keras.layers.Dense(1)
            self.task = tfrs.tasks.Ranking(tf.keras.losses.MeanSquaredError(reduction="sum"))

        def compute_loss(self, features, training=False):
            return self.task(labels=features["y"], predictions=self.dense(features["x"]))

    with strategy.scope():
        model = Ranker()
        model.compile(tf.keras.optimizers.SGD(0.0))
    model.fit(keras_sie.with_ids({"x": x, "y": y}), batch_size=10, epochs=2, callbacks=[sie],
              verbose=0)
    w, b = model.dense.get_weights()
else:
    with strategy.scope():
        model = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(1)])
        loss = tf_keras.losses.MeanSquaredError(reduction=sys.argv[1])
        model.compile(tf_keras.optimizers.SGD(0.0), loss)
    model.fit(keras_sie.with_ids(x), y, batch_size=10, epochs=2, callbacks=[sie], verbose=0)
    w, b = model.layers[-1].get_weights()
s = 2.0 * np.abs(x @ w + b - y)[:, 0] * np.abs(w).sum()
s = s / s.sum()
assert (sie.visits == 1).all(), sie.visits
err = np.abs(sie.importance - s).max() / s.max()
assert err <= 1e-5, err
print("ok", strategy.num_replicas_in_sync, err)
"""


@pytest.mark.parametrize("reduction", ["auto", "sum", "tfrs"])
def test_mirrored_strategy_on_two_cpu_replicas_is_exact(reduction, tmp_path):
    script = tmp_path / "mirrored.py"
    script.write_text(_MIRRORED)
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, str(script), reduction], env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok 2" in out.stdout
