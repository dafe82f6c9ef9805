"""What a callback needs so that both Keras generations' `fit` can drive it.

`SampleImportance` is a Keras 3 callback. `tf_keras` (Keras 2) accepts any
object with the callback methods, but its `CallbackList` also asks each
callback a few questions the Keras 3 base class does not answer: whether it
implements batch-level hooks (so that Keras 2 can skip them), whether it takes
logs as tensors, and whether it runs on the chief only. `Keras2CallbackCompat`
answers them. It changes nothing under Keras 3, whose `CallbackList` never asks.
"""

from __future__ import annotations

_TRAIN_BATCH_HOOKS = ("on_batch_begin", "on_batch_end", "on_train_batch_begin",
                      "on_train_batch_end")
_TEST_BATCH_HOOKS = ("on_test_batch_begin", "on_test_batch_end")
_PREDICT_BATCH_HOOKS = ("on_predict_batch_begin", "on_predict_batch_end")


def _overrides(obj, names) -> bool:
    """Whether `obj`'s class defines any of `names` itself (not the Keras 3 base's no-op)."""
    import keras

    base = keras.callbacks.Callback
    cls = type(obj)
    return any(getattr(cls, name, None) is not getattr(base, name, None) for name in names)


class Keras2CallbackCompat:
    """Mixin for a Keras 3 `Callback` subclass used by `tf_keras`'s `fit`."""

    # Keras 2 converts logs to numpy before calling a callback that does not
    # take tensors; keras_sie only adds Python floats to the epoch logs.
    _supports_tf_logs = False
    # Keras 2's multi-worker v1 loops read it; keras_sie decides the chief itself.
    _chief_worker_only = None

    def _implements_train_batch_hooks(self) -> bool:
        return _overrides(self, _TRAIN_BATCH_HOOKS)

    def _implements_test_batch_hooks(self) -> bool:
        return _overrides(self, _TEST_BATCH_HOOKS)

    def _implements_predict_batch_hooks(self) -> bool:
        return _overrides(self, _PREDICT_BATCH_HOOKS)
