"""The data map image: its numbers, its drawing, and how it degrades."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import linear_model, linear_problem
from tensorboard.backend.event_processing import event_accumulator as ea

import keras_sie
from keras_sie import datamap


def test_coordinates_match_hand_computed_mean_spread_and_top_fraction():
    # 4 samples, 3 epochs; sample 3 is not visited in epoch 1 (score 0).
    h = {
        0: np.array([0.1, 0.2, 0.3, 0.4]),
        1: np.array([0.2, 0.2, 0.6, 0.0]),
        2: np.array([0.4, 0.1, 0.1, 0.4]),
    }
    c = datamap.data_map_coordinates(h, np.array([1, 1, 1, 1]), epoch=2)
    rel = np.array([[0.4, 0.8, 1.2, 1.6], [0.6, 0.6, 1.8, np.nan], [1.6, 0.4, 0.4, 1.6]])
    mean = np.nanmean(rel, axis=0)
    std = np.nanstd(rel, axis=0)
    np.testing.assert_array_equal(c["index"], [0, 1, 2, 3])
    np.testing.assert_allclose(c["mean"], mean)
    np.testing.assert_allclose(c["variability"], std)
    np.testing.assert_allclose(c["cv"], std / mean)
    np.testing.assert_allclose(c["latest"], rel[2])
    # Each epoch's 90th percentile leaves only its maximum on top (ties count).
    np.testing.assert_allclose(c["top_fraction"], [1 / 3, 0.0, 1 / 3, 2 / 2])
    assert c["n_visited"] == 4
    assert list(c["epochs"]) == [0, 1, 2]
    # Later epochs are ignored; unvisited samples of the drawn epoch are left out.
    c1 = datamap.data_map_coordinates(h, np.array([1, 1, 1, 0]), epoch=1)
    np.testing.assert_array_equal(c1["index"], [0, 1, 2])
    np.testing.assert_allclose(c1["mean"], np.mean(rel[:2, :3], axis=0))


def test_large_runs_are_subsampled_reproducibly():
    rng = np.random.default_rng(0)
    n = 60_000
    h = {e: rng.random(n) / (n / 2) for e in range(3)}
    visits = np.ones(n, dtype=np.int64)
    visits[::3] = 0
    a = datamap.data_map_coordinates(h, visits, epoch=2)
    b = datamap.data_map_coordinates(h, visits, epoch=2)
    assert a["index"].size == datamap.MAX_POINTS
    assert a["n_visited"] == n - n // 3
    np.testing.assert_array_equal(a["index"], b["index"])
    assert (np.diff(a["index"]) > 0).all() and (visits[a["index"]] > 0).all()


def test_render_draws_an_rgb_picture_of_the_requested_size():
    rng = np.random.default_rng(1)
    h = {e: rng.dirichlet(np.ones(500)) for e in range(3)}
    image = datamap.render_data_map(h, np.ones(500), epoch=2, width=640, height=480)
    assert image.shape == (480, 640, 3) and image.dtype == np.uint8
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) > 50  # points, axes and a colour bar, not a blank canvas
    # Deterministic: the same inputs give the same pixels (the tests compare PNGs).
    np.testing.assert_array_equal(image, datamap.render_data_map(h, np.ones(500), epoch=2,
                                                                 width=640, height=480))
    with_loss = datamap.render_data_map(h, np.ones(500), epoch=2, loss=rng.random(500))
    assert with_loss.shape == (480, 640, 3)


def _hide_matplotlib(monkeypatch):
    # A None entry in sys.modules makes `import` raise ImportError, as if not installed.
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(datamap, "_missing_notice_shown", False)


def test_without_matplotlib_render_returns_none_with_a_single_one_line_notice(monkeypatch):
    _hide_matplotlib(monkeypatch)
    h = {0: np.array([0.5, 0.5])}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert datamap.render_data_map(h, None, 0) is None
        assert datamap.render_data_map(h, None, 0) is None
    notices = [str(w.message) for w in caught if "matplotlib" in str(w.message)]
    assert len(notices) == 1 and "\n" not in notices[0]
    assert "pip install matplotlib" in notices[0]


def _image_tags(log_dir) -> list[str]:
    acc = ea.EventAccumulator(str(log_dir / "keras_sie"), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    assert "importance/gini" in tags and "importance/top_k" in tags
    return [t for t in tags if acc.SummaryMetadata(t).plugin_data.plugin_name == "images"]


def _fit(log_dir, **kw):
    x, y = linear_problem(n=64)
    sie = keras_sie.SampleImportance(log_dir=str(log_dir), verbose=0, **kw)
    linear_model(lr=0.01).fit(keras_sie.with_ids(x), y, batch_size=16, epochs=2,
                              callbacks=[sie], verbose=0)
    return sie


def test_callback_logs_one_data_map_per_epoch_and_can_be_turned_off(tmp_path):
    sie = _fit(tmp_path / "on", data_map=True)
    assert _image_tags(tmp_path / "on") == ["importance/data_map"]
    assert len(sie.history) == 2
    _fit(tmp_path / "off", data_map=False)
    assert _image_tags(tmp_path / "off") == []


def test_fit_without_matplotlib_logs_everything_else(tmp_path, monkeypatch):
    _hide_matplotlib(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sie = _fit(tmp_path)
    assert sum("matplotlib is not installed" in str(w.message) for w in caught) == 1
    assert _image_tags(tmp_path) == []
    assert sorted(sie.history) == [0, 1]


def test_a_failing_drawing_turns_off_only_the_picture(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no canvas")

    monkeypatch.setattr("keras_sie.reporting.render_data_map", broken)
    with pytest.warns(RuntimeWarning, match="drawing the data map failed .*no canvas"):
        sie = _fit(tmp_path)
    assert sie._reporter.data_map is False  # the picture only; scores go on
    assert sorted(sie.history) == [0, 1]  # scores and other tags still reported
    assert sorted(keras_sie.load(str(tmp_path)).epochs) == [0, 1]
    assert _image_tags(tmp_path) == []


def test_importing_keras_sie_and_its_datamap_does_not_need_matplotlib():
    # matplotlib made unimportable: keras_sie, its callback and its data-map module
    # must still import (TensorFlow itself may try matplotlib; it copes without).
    code = ("import sys; sys.modules['matplotlib'] = None; "
            "import keras_sie, keras_sie.datamap, keras_sie.callback; "
            "keras_sie.SampleImportance(verbose=0)")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", code], env=env, timeout=120, check=False,
                            capture_output=True, text=True)
    assert result.returncode == 0, f"keras_sie needs matplotlib at import:\n{result.stderr[-2000:]}"


def test_an_epoch_with_no_positive_score_still_draws():
    h = {0: np.zeros(10)}
    image = datamap.render_data_map(h, np.ones(10), 0)
    assert image.shape == (480, 640, 3)
    assert datamap.data_map_coordinates(h, np.ones(10), 0)["index"].size == 0


def _image_steps(log_dir):
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(str(log_dir / "keras_sie"),
                                             size_guidance={"tensors": 0})
    acc.Reload()
    if "importance/data_map" not in acc.Tags()["tensors"]:
        return []
    return [e.step for e in acc.Tensors("importance/data_map")]


def test_auto_data_map_keeps_drawing_within_two_percent_of_epoch_time(tmp_path):
    # Epochs of this tiny fit take milliseconds while a drawing takes tenths of
    # a second: "auto" draws the first epoch, then waits for the budget.
    x, y = linear_problem(n=64)
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path), verbose=0)  # data_map="auto"
    linear_model(lr=0.01).fit(keras_sie.with_ids(x), y, batch_size=16, epochs=4,
                              callbacks=[sie], verbose=0)
    assert _image_steps(tmp_path) == [0]
    assert sie._reporter._map_cost is not None
    assert sie._reporter._map_budget < sie._reporter._map_cost
    # With data_map=True every epoch gets its picture.
    every = keras_sie.SampleImportance(log_dir=str(tmp_path / "every"), data_map=True,
                                       verbose=0)
    linear_model(lr=0.01).fit(keras_sie.with_ids(x), y, batch_size=16, epochs=3,
                              callbacks=[every], verbose=0)
    assert _image_steps(tmp_path / "every") == [0, 1, 2]


def test_cartography_with_unvisited_samples_draws_without_numpy_warnings(tmp_path):
    """Samples an epoch never reaches are NaN in the confidence history: the map
    leaves them out without numpy's "Mean of empty slice" warning."""
    x, y = linear_problem(n=64)
    y = (y > np.median(y)).astype("float32")
    model = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01),
                  keras.losses.BinaryCrossentropy(from_logits=True))
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path), verbose=0, data_map=True,
                                     signals=("confidence",), num_samples=64)
    # Only the first 32 ids ever occur: samples 32..63 are never visited.
    ds = keras_sie.with_ids(tf.data.Dataset.from_tensor_slices((x[:32], y[:32]))).batch(16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(ds, epochs=2, callbacks=[sie], verbose=0)
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []
    assert _image_tags(tmp_path) == ["importance/data_map"]
    assert int((sie.visits == 0).sum()) == 32
