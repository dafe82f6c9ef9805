"""Step adapters: one per Keras generation, chosen from the model's class.

Everything keras_sie touches inside Keras or TensorFlow that is not public API
lives in an adapter module, behind one support check per module
(`Keras3Adapter.check_supported` in `keras3.py`, `TfKerasAdapter.check_supported`
in `tf_keras.py`, which also covers TensorFlow Recommenders models). The
callback, the buffer, the record and the reporting only talk to the adapter's
interface. `compat.py` holds the callback mixin tf_keras's `fit` needs.
"""

from __future__ import annotations

from typing import Any

from keras_sie.adapters.compat import Keras2CallbackCompat
from keras_sie.adapters.keras3 import SUPPORTED, Keras3Adapter

__all__ = ["Keras2CallbackCompat", "Keras3Adapter", "adapter_for"]

TF_KERAS_SUPPORTED = "tf-keras 2.21 with tensorflow-recommenders 0.7.7 (TF_USE_LEGACY_KERAS=1)"


def _generation(model: Any) -> str:
    module = type(model).__module__
    for cls in type(model).__mro__:
        mod = cls.__module__ or ""
        if mod.startswith("tf_keras"):
            return "tf_keras"
        if mod.startswith(("tensorflow.python.keras", "keras.src.engine", "keras.engine")):
            return "old Keras 2"  # Keras 2 bundled with TF < 2.16, or keras 2.x
        if mod.startswith(("keras.src", "keras.")):
            return "keras3"
    return f"unknown ({module})"


def adapter_for(model: Any):
    """The step adapter for `model`, or a clear error naming what is supported.

    Args:
        model: The model `fit` is training.

    Returns:
        The adapter that owns every private Keras/TensorFlow touch point for
        this model's Keras generation.

    Raises:
        TypeError: the model is neither a Keras 3 nor a tf_keras model.
    """
    generation = _generation(model)
    if generation == "keras3":
        return Keras3Adapter(model)
    if generation == "tf_keras":
        from keras_sie.adapters.tf_keras import TfKerasAdapter

        return TfKerasAdapter(model)
    what = f"{type(model).__module__}.{type(model).__qualname__}"
    if generation == "old Keras 2":
        what += " (a Keras 2 model from TensorFlow < 2.16 or the keras 2.x package)"
    raise TypeError(
        f"keras_sie: {what} is not a supported Keras model. SampleImportance supports Keras 3 "
        f"models (`import keras`, {SUPPORTED}) and tf_keras (Keras 2) models, TensorFlow "
        f"Recommenders models included ({TF_KERAS_SUPPORTED})."
    )
