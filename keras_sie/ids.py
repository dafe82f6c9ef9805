"""Sample ids: attaching them to the data and taking them off before the model.

Keras shuffles numpy inputs itself and never shows a batch to callbacks, so
the only way to know which sample a gradient row belongs to is to let an id
travel with the features.  `with_ids` attaches one; the fused train step
(`step_hook`) removes it before the model is called.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

DEFAULT_ID_KEY = "sample_id"
# Key under which non-dict inputs are wrapped so that an id can sit beside them.
WRAPPED_INPUTS_KEY = "_keras_sie_inputs"


def _num_rows(x: Any) -> int:
    leaves = tf.nest.flatten(x)
    if not leaves:
        raise ValueError("with_ids: the inputs are empty; nothing to attach ids to.")
    sizes = {int(np.shape(leaf)[0]) for leaf in leaves}
    if len(sizes) != 1:
        raise ValueError(
            f"with_ids: input arrays have different numbers of rows {sorted(sizes)}; "
            "every input must have one row per sample."
        )
    return sizes.pop()


def _attach(x: Any, ids: Any, id_key: str) -> dict:
    if isinstance(x, dict):
        if id_key in x:
            raise ValueError(
                f"with_ids: the inputs already have a {id_key!r} entry. Pass a different "
                "`id_key` to both with_ids and SampleImportance, or use the ids you have."
            )
        out = dict(x)
        out[id_key] = ids
        return out
    return {WRAPPED_INPUTS_KEY: x, id_key: ids}


def with_ids(x: Any, id_key: str = DEFAULT_ID_KEY, start: int = 0) -> Any:
    """Attaches sample ids 0..N-1 to model inputs so that they travel with the data.

    The ids are int64 and follow each sample through Keras's shuffling,
    `validation_split` and batching. `SampleImportance` removes them before the
    model is called, so the model never sees them.

    Args:
        x: The model inputs: a numpy array, a list/tuple or dict of arrays
            (one row per sample), or an unbatched `tf.data.Dataset` whose
            elements are `x`, `(x, y)` or `(x, y, sample_weight)`.
        id_key: Name of the id entry. Must match `SampleImportance(id_key=...)`.
            Defaults to `"sample_id"`.
        start: First id (ids are `start .. start+N-1`). Defaults to 0.

    Returns:
        For arrays, a dict of arrays holding the inputs and the ids; pass it as
        `x` to `model.fit`. For a dataset, a dataset with the id added to each
        element's inputs (batch it afterwards).

    Example:

    ```python
    sie = keras_sie.SampleImportance(log_dir="logs")
    model.fit(keras_sie.with_ids(x_train), y_train, shuffle=True,
              validation_split=0.1, callbacks=[sie])
    ```
    """
    if isinstance(x, tf.data.Dataset):
        return _dataset_with_ids(x, id_key, start)
    if isinstance(x, (list, tuple)):
        x = type(x)(np.asarray(v) if not tf.is_tensor(v) else v for v in x)
    elif isinstance(x, dict):
        x = {k: (np.asarray(v) if not tf.is_tensor(v) else v) for k, v in x.items()}
    elif not tf.is_tensor(x):
        x = np.asarray(x)
    n = _num_rows(x)
    ids = np.arange(start, start + n, dtype=np.int64)
    return _attach(x, ids, id_key)


def _dataset_with_ids(ds: tf.data.Dataset, id_key: str, start: int) -> tf.data.Dataset:
    def add(i, element):
        i = tf.cast(i, tf.int64) + start
        if isinstance(element, tuple) and len(element) in (2, 3):
            return (_attach(element[0], i, id_key),) + tuple(element[1:])
        return _attach(element, i, id_key)

    return ds.enumerate().map(add, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def split_ids(x: Any, id_key: str = DEFAULT_ID_KEY) -> tuple[Any, Any]:
    """Removes the id entry from (possibly batched) inputs.

    Args:
        x: Model inputs as they arrive in a train/test step.
        id_key: Name of the id entry.

    Returns:
        `(inputs_without_id, ids)`; `ids` is None when the inputs carry none.

    Example:

    ```python
    def train_step(self, data):
        x, y = data
        x, ids = keras_sie.split_ids(x)
        ...
    ```
    """
    if isinstance(x, dict) and id_key in x:
        ids = x[id_key]
        if WRAPPED_INPUTS_KEY in x:
            return x[WRAPPED_INPUTS_KEY], ids
        rest = {k: v for k, v in x.items() if k != id_key}
        return rest, ids
    return x, None


def has_ids(x: Any, id_key: str) -> bool:
    return isinstance(x, dict) and id_key in x


def dataset_x_spec(ds: tf.data.Dataset) -> Any:
    spec = ds.element_spec
    if isinstance(spec, tuple) and len(spec) in (2, 3):
        return spec[0]
    return spec


def infer_from_arrays(ids: np.ndarray, key_mapping: str) -> int:
    """Buffer size implied by ids held in memory (fail fast on bad ids)."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size == 0:
        raise ValueError("The sample id array is empty.")
    if key_mapping == "hash":
        return int(np.unique(ids).size)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(
            f"Sample ids have dtype {ids.dtype}; with key_mapping='index' they must be "
            "integers 0..N-1. Use keras_sie.with_ids(x) to make such ids, or pass "
            "key_mapping='hash' for arbitrary int64 or string keys."
        )
    lo = int(ids.min())
    if lo < 0:
        raise ValueError(
            f"Sample id {lo} is negative; ids must be 0..num_samples-1. Use "
            "key_mapping='hash' for arbitrary keys."
        )
    return int(ids.max()) + 1
