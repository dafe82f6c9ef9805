"""Large-run paths: background epoch writes and sampled statistics (issues #17, #18)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import disk_full_on, linear_model, linear_problem

import keras_sie
from keras_sie import reporting, scores, storage


def test_background_writes_give_the_same_files_and_flush_at_train_end(tmp_path, monkeypatch):
    monkeypatch.setattr(reporting, "ASYNC_MIN_SAMPLES", 1)  # as for a run of 2^20+ samples
    x, y = linear_problem(n=64)
    model = linear_model(lr=0.01)
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path), data_map=False, verbose=0)
    model.fit(keras_sie.with_ids(x), y, batch_size=16, epochs=4, callbacks=[sie], verbose=0)
    run = keras_sie.load(str(tmp_path))  # every epoch is on disk once fit returns
    assert run.epochs == [0, 1, 2, 3]
    for e in run.epochs:
        np.testing.assert_array_equal(run.epoch(e).importance, sie.record.epoch(e).importance)
    assert storage.read_manifest(str(tmp_path))["epochs"] == [0, 1, 2, 3]
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(storage.run_dir(str(tmp_path)),
                                             size_guidance={"tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Tensors("importance/gini")] == [0, 1, 2, 3]


def test_a_fault_in_a_background_write_warns_once_or_raises_when_strict(tmp_path, monkeypatch):
    monkeypatch.setattr(reporting, "ASYNC_MIN_SAMPLES", 1)
    calls = disk_full_on(monkeypatch)  # the 2nd epoch file hits ENOSPC
    x, y = linear_problem(n=32)
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path), data_map=False, verbose=0)
    with pytest.warns(RuntimeWarning, match="No space left on device.*disabled"):
        linear_model().fit(keras_sie.with_ids(x), y, epochs=4, callbacks=[sie], verbose=0)
    assert calls["n"] == 1 and sie.epochs == [0, 1, 2, 3]  # scores kept in memory
    assert keras_sie.load(str(tmp_path)).epochs == [0]
    strict = keras_sie.SampleImportance(log_dir=str(tmp_path / "s"), strict=True, verbose=0)
    model = linear_model()
    with pytest.raises(OSError, match="No space left on device"):
        model.fit(keras_sie.with_ids(x), y, epochs=3, callbacks=[strict], verbose=0)
    assert "train_step" not in model.__dict__


def test_gini_above_the_exact_limit_is_a_close_sampled_estimate():
    values = np.random.default_rng(1).pareto(2.0, size=400_000)
    exact = scores.gini(values, max_exact=10**7)
    estimate = scores.gini(values, max_exact=100_000)
    assert estimate != exact and abs(estimate - exact) < 0.01
    assert scores.gini(values, max_exact=10**7) == exact  # deterministic (fixed seed)
