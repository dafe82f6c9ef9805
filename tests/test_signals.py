"""Training-dynamics signals recorded in the fused step, against exact oracles (issue #14)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import assert_close_to_max, linear_problem

import keras_sie
from keras_sie import storage

ALL = ("loss", "el2n", "margin", "confidence", "forgetting")


class _SetWeights(keras.callbacks.Callback):
    """Frozen training (lr=0) with a different set of weights in each epoch."""

    def __init__(self, per_epoch):
        super().__init__()
        self.per_epoch = per_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.model.set_weights(self.per_epoch[epoch])


def _softmax_problem(n=37, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype("float32"), rng.integers(0, k, n)


def _log_softmax(z):
    z = z.astype(np.float64)
    return z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(
        1, keepdims=True)


def _softmax_oracle(logits, y):
    logp = _log_softmax(logits)
    k = logits.shape[1]
    onehot = np.eye(k)[y]
    rows = np.arange(len(y))
    other = np.where(onehot > 0, -np.inf, logp).max(1)
    return {
        "loss": -logp[rows, y],
        "el2n": np.linalg.norm(np.exp(logp) - onehot, axis=1),
        "margin": logp[rows, y] - other,
        "confidence": np.exp(logp[rows, y]),
        "correct": logp.argmax(1) == y,
    }


def test_softmax_signals_match_per_sample_oracles_over_epochs(tmp_path):
    x, y = _softmax_problem()
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    model.compile(keras.optimizers.SGD(0.0),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(1)
    weights = [[rng.normal(size=w.shape).astype("float32") * 1.5 for w in model.get_weights()]
               for _ in range(3)]
    sample_weight = rng.uniform(0.5, 2.0, size=len(y)).astype("float32")
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path), signals=ALL, verbose=0)
    model.fit(keras_sie.with_ids(x), y, sample_weight=sample_weight, batch_size=8, epochs=3,
              shuffle=True, callbacks=[_SetWeights(weights), sie], verbose=0)
    per_epoch = []
    for w in weights:
        model.set_weights(w)
        per_epoch.append(_softmax_oracle(model.predict(x, verbose=0), y))
    for e, oracle in enumerate(per_epoch):
        for name in ("loss", "el2n", "margin", "confidence"):  # no sample weight in "loss"
            assert_close_to_max(sie.signal(name, epoch=e), oracle[name], rel=1e-5)
    conf = np.stack([o["confidence"] for o in per_epoch])
    assert_close_to_max(sie.signal("confidence_std"), conf.std(axis=0), rel=1e-4)
    assert_close_to_max(sie.signal("confidence_std", epoch=1), conf[:2].std(axis=0), rel=1e-4)
    correct = np.stack([o["correct"] for o in per_epoch])
    events = (correct[:-1] & ~correct[1:]).astype(int)
    np.testing.assert_array_equal(sie.signal("forgetting"), events.sum(axis=0))
    np.testing.assert_array_equal(sie.signal("forgetting", epoch=1), events[:1].sum(axis=0))
    assert events.sum() > 0  # the oracle has forgetting events to find
    # AUM-style aggregate: mean of the per-epoch margins.
    assert_close_to_max(sie.signal("margin", epoch="aggregate"),
                        np.mean([o["margin"] for o in per_epoch], axis=0), rel=1e-5)
    # The loaded run answers the same, from the npz files.
    run = keras_sie.load(str(tmp_path))
    for name in ALL + ("confidence_std",):
        np.testing.assert_array_equal(run.signal(name), sie.signal(name))
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(storage.run_dir(str(tmp_path)),
                                             size_guidance={"tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    for name in ALL + ("confidence_std",):
        assert {f"signals/{name}/distribution", f"signals/{name}/mean"} <= tags
    from keras_sie.export import to_columns
    cols = to_columns(run, epoch=2)
    np.testing.assert_array_equal(cols["margin"], run.signal("margin", epoch=2))


@pytest.mark.parametrize("from_logits", [False, True])
def test_sigmoid_signals_match_the_binary_definitions(from_logits):
    x, _ = linear_problem(n=29)
    y = (np.random.default_rng(3).random((29, 1)) > 0.5).astype("float32")
    act = None if from_logits else "sigmoid"
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation=act)])
    model.compile(keras.optimizers.SGD(0.0), keras.losses.BinaryCrossentropy(
        from_logits=from_logits))
    sie = keras_sie.SampleImportance(signals=("el2n", "margin", "confidence", "loss"), verbose=0)
    model.fit(keras_sie.with_ids(x), y, batch_size=8, shuffle=True, callbacks=[sie], verbose=0)
    out = model.predict(x, verbose=0)[:, 0].astype(np.float64)
    p = 1 / (1 + np.exp(-out)) if from_logits else out
    t = y[:, 0]
    assert_close_to_max(sie.signal("el2n"), np.abs(p - t), rel=1e-5)
    assert_close_to_max(sie.signal("confidence"), np.where(t > 0.5, p, 1 - p), rel=1e-5)
    assert_close_to_max(sie.signal("margin"), (2 * t - 1) * np.log(p / (1 - p)), rel=1e-4)
    assert_close_to_max(sie.signal("loss"), -(t * np.log(p) + (1 - t) * np.log(1 - p)),
                        rel=1e-4)


def test_one_hot_probability_outputs_use_log_probabilities():
    x, labels = _softmax_problem(n=30, k=4, seed=2)
    y = np.eye(4, dtype="float32")[labels]
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.0), "categorical_crossentropy")
    sie = keras_sie.SampleImportance(signals=("margin", "el2n", "confidence"), verbose=0)
    model.fit(keras_sie.with_ids(x), y, batch_size=7, callbacks=[sie], verbose=0)
    probs = model.predict(x, verbose=0)
    oracle = _softmax_oracle(np.log(probs), labels)
    for name in ("margin", "el2n", "confidence"):
        assert_close_to_max(sie.signal(name), oracle[name], rel=1e-4)


def test_regression_records_the_loss_and_refuses_classification_signals():
    x, y = linear_problem(n=31)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.0), "mse")
    sw = np.linspace(0.5, 2, 31).astype("float32")
    sie = keras_sie.SampleImportance(signals=("loss",), verbose=0)
    model.fit(keras_sie.with_ids(x), y, sample_weight=sw, batch_size=8, validation_split=0.2,
              callbacks=[sie], verbose=0)
    residual = (model.predict(x, verbose=0) - y)[:, 0].astype(np.float64)
    loss = sie.signal("loss")
    visited = sie.visits > 0
    assert visited.sum() == int(31 * 0.8) and np.isnan(loss[~visited]).all()  # validation: never
    assert_close_to_max(loss[visited], residual[visited] ** 2, rel=1e-5)
    with pytest.raises(ValueError, match=r"Signals \['el2n'\] need a classification loss"):
        model.fit(keras_sie.with_ids(x), y, verbose=0,
                  callbacks=[keras_sie.SampleImportance(signals=("el2n",), verbose=0)])
    with pytest.raises(ValueError, match="Signal 'margin' was not recorded. Request it with "
                                         r"SampleImportance\(signals=\('margin',\)\)"):
        sie.signal("margin")
    with pytest.raises(ValueError, match="Unknown signal 'aum'"):
        keras_sie.SampleImportance(signals=("aum",))


def test_rows_with_a_nonfinite_gradient_are_left_out_of_every_signal():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 2.0, size=(24, 3)).astype("float32")
    x[[4, 10], 1] = 0.0
    y = rng.normal(size=(24, 1)).astype("float32")
    inp = keras.Input((3,))
    out = keras.layers.Dense(1)(keras.layers.Lambda(lambda t: keras.ops.sqrt(t))(inp))
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.SGD(0.0), "mse")
    sie = keras_sie.SampleImportance(signals=("loss",), verbose=0)
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        model.fit(keras_sie.with_ids(x), y, batch_size=8, callbacks=[sie], verbose=0)
    loss = sie.signal("loss")
    assert np.isnan(loss[[4, 10]]).all() and np.isfinite(np.delete(loss, [4, 10])).all()


def test_a_second_fit_carries_forgetting_state_over():
    x, y = _softmax_problem(n=16)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    model.compile(keras.optimizers.SGD(0.0),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(4)
    weights = [[rng.normal(size=w.shape).astype("float32") * 2 for w in model.get_weights()]
               for _ in range(2)]
    sie = keras_sie.SampleImportance(signals=("forgetting",), verbose=0)
    correct = []
    for w in weights:  # two fits of one epoch each
        model.fit(keras_sie.with_ids(x), y, batch_size=4, callbacks=[_SetWeights([w]), sie],
                  verbose=0)
        correct.append(model.predict(x, verbose=0).argmax(1) == y)
    np.testing.assert_array_equal(sie.signal("forgetting"), (correct[0] & ~correct[1]).astype(int))


def test_select_and_weights_by_a_signal():
    x, y = _softmax_problem(n=40)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    model.compile(keras.optimizers.SGD(0.0),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    sie = keras_sie.SampleImportance(signals=("loss", "margin"), verbose=0)
    model.fit(keras_sie.with_ids(x), y, batch_size=8, callbacks=[sie], verbose=0)
    loss = sie.signal("loss")
    top = keras_sie.select(sie, top=5, by="loss", epoch=None)
    np.testing.assert_array_equal(top, np.argsort(-loss, kind="stable")[:5])
    hardest = keras_sie.select(sie, bottom=5, by="margin", epoch=None)
    np.testing.assert_array_equal(hardest, np.argsort(sie.signal("margin"), kind="stable")[:5])
    w = keras_sie.to_sample_weight(sie, by="loss", epoch=None, smoothing=0.0)
    assert w.mean() == pytest.approx(1.0)
    np.testing.assert_allclose(w, loss / loss.mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="by='margin' can be negative"):
        keras_sie.to_sample_weight(sie, by="margin")
    # Stratified by margin: the hard end is the low margins, so the cutoff drops those.
    margin = sie.signal("margin")
    keep = keras_sie.select(sie, stratified=20, by="margin", hard_cutoff=0.25, epoch=None)
    assert keep.size == 20
    assert set(keep.tolist()).isdisjoint(np.argsort(margin, kind="stable")[:10].tolist())


def test_stratified_selection_keeps_coverage_and_drops_the_hardest():
    scores = np.linspace(0.0, 1.0, 1000)
    keep = keras_sie.select(scores, stratified=0.3, hard_cutoff=0.1, strata=10, seed=0)
    assert keep.size == 300 and np.unique(keep).size == 300
    assert keep.max() < 900  # the hardest 10 % are dropped
    counts = np.bincount(keep // 90, minlength=10)
    assert (counts == 30).all()  # the budget is spread evenly over the strata
    # Small strata are taken whole and their unused budget goes to the others.
    skewed = np.concatenate([np.zeros(500), np.linspace(0.5, 1.0, 10)])
    keep = keras_sie.select(skewed, stratified=100, hard_cutoff=0.0, strata=5)
    assert keep.size == 100 and set(range(500, 510)) <= set(keep.tolist())
    with pytest.raises(ValueError, match="exactly one of top=, bottom=, band= or stratified="):
        keras_sie.select(scores, top=3, stratified=3)


def test_with_confidence_recorded_the_data_map_is_the_cartography_map(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from keras_sie import datamap, reporting

    seen = {}

    def spy(history, visits, epoch, **kwargs):
        seen[epoch] = kwargs.get("cartography")
        return datamap.render_data_map(history, visits, epoch, **kwargs)

    monkeypatch.setattr(reporting, "render_data_map", spy)
    x, y = _softmax_problem(n=40)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    model.compile(keras.optimizers.SGD(0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path), signals=("confidence",),
                                     data_map=True, verbose=0)
    model.fit(keras_sie.with_ids(x), y, batch_size=8, epochs=2, callbacks=[sie], verbose=0)
    mean, std = seen[1]
    assert_close_to_max(std, sie.signal("confidence_std"), rel=1e-9)
    assert_close_to_max(mean, (sie.signal("confidence", epoch=0)
                               + sie.signal("confidence", epoch=1)) / 2, rel=1e-9)
