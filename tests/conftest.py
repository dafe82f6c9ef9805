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
