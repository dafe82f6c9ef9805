"""Step adapters: one per Keras generation, chosen from the model's class.

Everything keras_sie touches inside Keras or TensorFlow that is not public API
lives in an adapter module, behind one support check
(`Keras3Adapter.check_supported`). The callback, the buffer, the record and the
reporting only talk to the adapter's interface.
"""

from __future__ import annotations

from typing import Any

from keras_sie.adapters.keras3 import SUPPORTED, Keras3Adapter

__all__ = ["Keras3Adapter", "adapter_for"]


def _generation(model: Any) -> str:
    module = type(model).__module__
    for cls in type(model).__mro__:
        mod = cls.__module__ or ""
        if mod.startswith(("tf_keras", "tensorflow.python.keras", "keras.src.engine")):
            return "tf_keras"
        if mod.startswith(("keras.src", "keras.")):
            return "keras3"
    return f"unknown ({module})"


def adapter_for(model: Any) -> Keras3Adapter:
    """The step adapter for `model`, or a clear error naming what is supported.

    Args:
        model: The model `fit` is training.

    Returns:
        The adapter that owns every private Keras/TensorFlow touch point for
        this model's Keras generation.

    Raises:
        TypeError: the model is not a Keras 3 model (e.g. a `tf_keras` model).
    """
    generation = _generation(model)
    if generation == "keras3":
        return Keras3Adapter(model)
    what = f"{type(model).__module__}.{type(model).__qualname__}"
    if generation == "tf_keras":
        raise TypeError(
            f"keras_sie: the model is a tf_keras (Keras 2) model ({what}). This version of "
            f"keras_sie supports Keras 3 models (`import keras`, {SUPPORTED}) only. Build the "
            "model with Keras 3, or remove the callback."
        )
    raise TypeError(
        f"keras_sie: {what} is not a Keras model. SampleImportance supports Keras 3 models "
        f"({SUPPORTED})."
    )
