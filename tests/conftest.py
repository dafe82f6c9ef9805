import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.backend.clear_session()
    keras.utils.set_random_seed(1234)
    yield
    keras.mixed_precision.set_global_policy("float32")


def assert_close_to_max(actual, expected, rel=1e-5):
    """Assert ``max_i |a_i - e_i| <= rel * max_i |e_i|``.

    Score arrays are compared relative to their largest value, not per
    element: a sample with a near-zero score (a residual of ~1e-6) carries a
    float32 rounding error that is large relative to itself and differs from
    one CPU to the next, while being ~1e-7 of the largest score. A wrong score
    (wrong sample, wrong scale, wrong formula) still moves the largest
    difference far past ``rel`` times the largest value.
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != expected shape {e.shape}"
    assert np.isfinite(a).all(), f"non-finite values at {np.flatnonzero(~np.isfinite(a))}"
    assert np.isfinite(e).all(), "the expected array has non-finite values"
    if a.size == 0:
        return
    diff = np.abs(a - e)
    scale = float(np.abs(e).max())
    worst = int(np.argmax(diff))
    assert diff.max() <= rel * scale, (
        f"max |actual - expected| = {diff.max():.3g} at flat index {worst} "
        f"(actual {a.flat[worst]!r}, expected {e.flat[worst]!r}) exceeds "
        f"rel={rel:g} x max |expected| = {scale:.6g}"
    )


def linear_problem(n=103, d=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = rng.normal(size=(n, 1)).astype("float32")
    return x, y


def linear_model(d=4, lr=0.0):
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(lr), "mse")
    return model


def linear_oracle(model, x, y, sample_weight=None):
    """S_i = 2 |w.x_i + b - y_i| sum_j |w_j| (times sample weight); MSE, lr=0."""
    w, b = model.layers[-1].get_weights()
    s = 2.0 * np.abs(x @ w + b - y)[:, 0] * np.abs(w).sum()
    if sample_weight is not None:
        s = s * sample_weight
    return s


def disk_full_on(monkeypatch, file_name: str = "epoch_00001.npz") -> dict:
    """Fault injection at keras_sie's file layer: writing `file_name` hits ENOSPC.

    Returns a dict whose "n" counts the failed attempts.
    """
    import errno

    from keras_sie import storage

    real = storage.atomic_write_bytes
    calls = {"n": 0}

    def full_disk(path, writer, **kwargs):
        if path.endswith(file_name):
            calls["n"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, writer, **kwargs)

    monkeypatch.setattr(storage, "atomic_write_bytes", full_disk)
    return calls
