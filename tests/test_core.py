"""Core behaviour of SampleImportance, checked against exact oracles."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close_to_max, linear_model, linear_oracle, linear_problem

import keras_sie


def _fit(model, x, y, sie, **kw):
    kw.setdefault("batch_size", 16)
    kw.setdefault("epochs", 1)
    kw.setdefault("verbose", 0)
    return model.fit(keras_sie.with_ids(x), y, callbacks=[sie], **kw)


def test_linear_oracle_matches_with_shuffle_and_partial_batch():
    x, y = linear_problem(n=103)  # 103 = 6*16 + 7: a partial last batch
    model = linear_model()
    sie = keras_sie.SampleImportance(verbose=0)
    _fit(model, x, y, sie, shuffle=True, epochs=2)
    s = linear_oracle(model, x, y)
    assert_close_to_max(sie.importance, s / s.sum(), rel=1e-5)
    assert (sie.visits == 1).all()
    assert sorted(sie.history) == [0, 1]
    assert_close_to_max(sie.aggregate, s / s.sum(), rel=1e-5)


def test_raw_sums_are_per_sample_gradient_independent_of_batch_size(tmp_path):
    x, y = linear_problem(n=50)
    model = linear_model()
    s = None
    for batch_size in (7, 50):
        sie = keras_sie.SampleImportance(log_dir=str(tmp_path / f"b{batch_size}"), verbose=0)
        _fit(model, x, y, sie, batch_size=batch_size)
        run = keras_sie.load(str(tmp_path / f"b{batch_size}"))
        s = linear_oracle(model, x, y)
        assert_close_to_max(run.epoch().sums, s, rel=1e-5)


def test_sample_weight_and_class_weight_enter_the_score():
    x, y = linear_problem(n=64)
    sw = np.linspace(0.5, 2.0, 64).astype("float32")
    model = linear_model()
    sie = keras_sie.SampleImportance(verbose=0)
    model.fit(keras_sie.with_ids(x), y, sample_weight=sw, batch_size=16, callbacks=[sie], verbose=0)
    s = linear_oracle(model, x, y, sample_weight=sw)
    assert_close_to_max(sie.importance, s / s.sum(), rel=1e-5)

    # class_weight: binary classifier, logistic loss; class 1 weighted 3x.
    rng = np.random.default_rng(1)
    xc = rng.normal(size=(64, 3)).astype("float32")
    yc = (rng.random(64) > 0.5).astype("float32")
    clf = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, activation="sigmoid")])
    clf.compile(keras.optimizers.SGD(0.0), "binary_crossentropy")
    sie = keras_sie.SampleImportance(verbose=0)
    clf.fit(keras_sie.with_ids(xc), yc, class_weight={0: 1.0, 1: 3.0}, batch_size=16,
            callbacks=[sie], verbose=0)
    w, b = clf.layers[-1].get_weights()
    p = 1 / (1 + np.exp(-(xc @ w + b)[:, 0]))
    # d BCE / dx = (p - y) w, times the class weight.
    cw = np.where(yc == 1, 3.0, 1.0)
    s = np.abs(p - yc) * np.abs(w).sum() * cw
    assert_close_to_max(sie.importance, s / s.sum(), rel=1e-4)


def test_planted_outliers_come_out_on_top_by_id():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 5)).astype("float32")
    w = rng.normal(size=(5, 1)).astype("float32")
    y = x @ w
    planted = np.array([7, 123, 250, 399])
    y[planted] += 50.0
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    sie = keras_sie.SampleImportance(verbose=0)
    model.fit(keras_sie.with_ids(x), y, batch_size=32, shuffle=True, epochs=2,
              callbacks=[sie], verbose=0)
    top = [k for k, _, _ in sie.top_k(4)]
    assert sorted(top) == sorted(planted.tolist())


def _deterministic_run(with_callback, tmp_path):
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(7)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)).astype("float32")
    y = (rng.random((200, 1)) > 0.5).astype("float32")
    model = keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    model.compile(keras.optimizers.Adam(0.01), "binary_crossentropy", metrics=["accuracy"])
    # The reference run is plain Keras: no ids, no callback.
    xin = keras_sie.with_ids(x) if with_callback else x
    callbacks = [keras_sie.SampleImportance(log_dir=str(tmp_path), verbose=0)] if with_callback else []
    hist = model.fit(xin, y, batch_size=32, epochs=3, shuffle=True, validation_split=0.2,
                     callbacks=callbacks, verbose=0)
    return model.get_weights(), hist.history


def test_callback_does_not_change_training(tmp_path):
    try:
        w0, h0 = _deterministic_run(False, tmp_path / "a")
        w1, h1 = _deterministic_run(True, tmp_path / "b")
    finally:
        # Determinism turns XLA off in Keras; later tests need it back.
        from tensorflow.python.framework import config as tf_config

        tf_config.disable_op_determinism()
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert h0[key] == h1[key], key
    assert "sie_gini" in h1 and "sie_gini" not in h0


def test_validation_data_does_not_change_scores():
    x, y = linear_problem(n=80)
    xv, yv = linear_problem(n=40, seed=9)
    m1, m2 = linear_model(), linear_model()
    m2.set_weights(m1.get_weights())
    a = keras_sie.SampleImportance(verbose=0)
    b = keras_sie.SampleImportance(verbose=0)
    _fit(m1, x, y, a)
    _fit(m2, x, y, b, validation_data=(xv, yv))
    assert_close_to_max(a.importance, b.importance, rel=1e-6)


def test_validation_split_keeps_validation_rows_out_of_the_buffer():
    x, y = linear_problem(n=100)
    model = linear_model()
    sie = keras_sie.SampleImportance(verbose=0)
    _fit(model, x, y, sie, validation_split=0.2, shuffle=True)
    # Keras takes the last 20 % as validation: never visited, scored 0.
    assert (sie.visits[:80] == 1).all() and (sie.visits[80:] == 0).all()
    assert sie.summary["unvisited_samples"] == 20
    s = linear_oracle(model, x[:80], y[:80])
    assert_close_to_max(sie.importance[:80], s / s.sum(), rel=1e-5)


@pytest.mark.parametrize("compile_kw", [{"steps_per_execution": 4}, {"jit_compile": True}])
def test_steps_per_execution_and_xla_give_the_same_scores(compile_kw):
    x, y = linear_problem(n=90)
    ref_model = linear_model()
    ref = keras_sie.SampleImportance(verbose=0)
    _fit(ref_model, x, y, ref)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.0), "mse", **compile_kw)
    model.set_weights(ref_model.get_weights())
    sie = keras_sie.SampleImportance(verbose=0)
    _fit(model, x, y, sie)
    if compile_kw.get("jit_compile"):
        assert model.jit_compile is True  # really compiled with XLA
    assert_close_to_max(sie.importance, ref.importance, rel=1e-5)
    assert (sie.visits == 1).all()


def test_fit_twice_continues_the_record_and_restores_the_model():
    x, y = linear_problem(n=40)
    model = linear_model()
    sie = keras_sie.SampleImportance(verbose=0)
    _fit(model, x, y, sie, epochs=2)
    assert "train_step" not in model.__dict__  # step hook removed after fit
    _fit(model, x, y, sie, epochs=1)
    assert sorted(sie.history) == [0, 1, 2]
    # Without ids and without the callback the model trains as usual.
    model.fit(x, y, epochs=1, verbose=0)


def test_missing_ids_fail_before_training_with_instructions():
    x, y = linear_problem(n=40)
    model = linear_model()
    w0 = model.get_weights()
    with pytest.raises(ValueError, match="with_ids"):
        model.fit(x, y, callbacks=[keras_sie.SampleImportance(verbose=0)], verbose=0)
    for a, b in zip(w0, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_summaries_are_in_logs_and_history():
    x, y = linear_problem(n=64)
    model = linear_model()
    sie = keras_sie.SampleImportance(verbose=0)
    hist = _fit(model, x, y, sie, epochs=2)
    for key in ("sie_gini", "sie_top1pct_share", "sie_ess", "sie_entropy"):
        assert len(hist.history[key]) == 2
    assert hist.history["sie_gini"][-1] == pytest.approx(sie.summary["gini"])
    p = sie.importance
    assert hist.history["sie_ess"][-1] == pytest.approx(1 / np.sum(p**2), rel=1e-6)


@pytest.mark.parametrize("first", [3, None])
def test_aggregate_averages_the_first_epochs_by_default(first, tmp_path):
    x, y = linear_problem(n=48)
    model = linear_model(lr=0.05)  # the scores change from epoch to epoch
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path), aggregate_epochs=first, verbose=0)
    _fit(model, x, y, sie, epochs=5)
    used = [sie.history[e].astype(np.float64) for e in sorted(sie.history)][: first or 5]
    expected = np.mean(used, axis=0)
    expected /= expected.sum()
    assert_close_to_max(sie.aggregate, expected, rel=1e-6)
    assert_close_to_max(keras_sie.load(str(tmp_path)).aggregate, expected, rel=1e-6)
    assert not np.allclose(sie.aggregate, sie.importance)  # not just the last epoch


def test_epoch_summary_values_and_no_blas_call(monkeypatch):
    """The summary scalars against their definitions, computed without BLAS:
    np.dot woke OpenBLAS's thread pool, whose spinning threads slowed the next
    epoch's steps (benchmarks/README.md, "In a real fit")."""
    from keras_sie import scores

    def no_blas(*args, **kwargs):
        raise AssertionError("the epoch summary must not call BLAS (np.dot)")

    monkeypatch.setattr(np, "dot", no_blas)
    importance = np.array([0.1, 0.2, 0.3, 0.4, 0.0], np.float32)
    visits = np.array([1, 2, 1, 1, 0])
    summary = scores.summarize(importance, visits)
    p = np.array([0.1, 0.2, 0.3, 0.4])
    assert summary["effective_sample_size"] == pytest.approx(1.0 / np.sum(p * p), rel=1e-6)
    assert summary["entropy"] == pytest.approx(-np.sum(p * np.log(p)), rel=1e-6)
    assert summary["top1pct_share"] == pytest.approx(0.4, rel=1e-6)
    # Gini of sorted p: sum_i (2i - n - 1) p_i / (n sum p), i = 1..n
    n = 4
    expected = np.sum((2 * np.arange(1, n + 1) - n - 1) * np.sort(p)) / (n * p.sum())
    assert summary["gini"] == pytest.approx(expected, rel=1e-6)
    assert summary["visited_samples"] == 4 and summary["unvisited_samples"] == 1
