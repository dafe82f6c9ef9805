"""Sample ids: attaching them to the data and taking them off before the model.

Keras shuffles numpy inputs itself and never shows a batch to callbacks, so
the only way to know which sample a gradient row belongs to is to let an id
travel with the features.  `with_ids` attaches one; the fused train step
(`adapters.keras3.StepHook`) removes it before the model is called.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

DEFAULT_ID_KEY = "sample_id"
# Ranked lists: the id entry may be a dict of per-item ids [B, L] and per-query ids [B].
ITEM_KEY = "item"
QUERY_KEY = "query"
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


def with_ids(x: Any, id_key: str = DEFAULT_ID_KEY, start: int = 0, *,
             list_axis: int | None = None, mask: Any = None) -> Any:
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
        list_axis: For ranked lists (inputs of shape `[N, L, ...]`: N queries
            with L candidate items each), `1` gives one id per item,
            `start + n*L + i` for item i of list n, and one id per query, `n`
            (see "Ranked lists" in docs/usage.md). The id entry is then a
            dict `{"item": [N, L] int64, "query": [N] int64}`. `None` (the
            default) gives one id per row.
        mask: With `list_axis=1`, a `[N, L]` boolean array, True for real
            items: padded items get id -1 (never counted, never an error).
            Defaults to None (every item is real).

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
    if list_axis is not None and list_axis != 1:
        raise ValueError(f"with_ids: list_axis must be 1 (or None), got {list_axis!r}.")
    if isinstance(x, tf.data.Dataset):
        if mask is not None:
            raise ValueError(
                "with_ids: mask= needs in-memory arrays; for a tf.data pipeline put a "
                f"{{'item': [L] ids (-1 for padding), 'query': id}} {id_key!r} entry in each "
                "element yourself."
            )
        return _dataset_with_ids(x, id_key, start, list_axis)
    if isinstance(x, (list, tuple)):
        x = type(x)(np.asarray(v) if not tf.is_tensor(v) else v for v in x)
    elif isinstance(x, dict):
        x = {k: (np.asarray(v) if not tf.is_tensor(v) else v) for k, v in x.items()}
    elif not tf.is_tensor(x):
        x = np.asarray(x)
    n = _num_rows(x)
    if list_axis is not None:
        return _attach(x, _list_ids(x, n, start, mask), id_key)
    ids = np.arange(start, start + n, dtype=np.int64)
    return _attach(x, ids, id_key)


def _list_size(shapes: list) -> int:
    """L: axis 1 of the inputs of shape [N, L, ...] (rank >= 3 first, then [N, L])."""
    for rank_ok in (lambda r: r >= 3, lambda r: r == 2):
        sizes = sorted({int(s[1]) for s in shapes if rank_ok(len(s)) and s[1] is not None})
        if len(sizes) == 1:
            return sizes[0]
        if len(sizes) > 1:
            raise ValueError(
                f"with_ids(list_axis=1): inputs have different sizes {sizes} on axis 1, so "
                "the list size is ambiguous. Pass mask= ([N, L]), or build the id entry "
                "yourself: {'item': [N, L] ids, 'query': [N] ids} (docs/usage.md, Ranked "
                "lists)."
            )
    raise ValueError(
        "with_ids(list_axis=1): no input has a list axis (shape [N, L, ...]); for one id "
        "per row, leave list_axis=None."
    )


def _list_ids(x: Any, n: int, start: int, mask: Any) -> dict:
    if mask is not None:
        size = int(np.shape(mask)[1]) if np.ndim(mask) == 2 else -1
    else:
        size = _list_size([tuple(np.shape(leaf)) for leaf in tf.nest.flatten(x)])
    items = start + np.arange(n * size, dtype=np.int64).reshape(n, size)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (n, size):
            raise ValueError(f"with_ids: mask has shape {mask.shape}; expected {(n, size)}.")
        items = np.where(mask, items, -1)
    return {ITEM_KEY: items, QUERY_KEY: np.arange(n, dtype=np.int64)}


def list_ids(ids: Any) -> tuple[Any, Any]:
    """`(item ids, query ids or None)` of an id entry (a tensor or an item/query dict)."""
    if isinstance(ids, dict):
        return ids[ITEM_KEY], ids.get(QUERY_KEY)
    return ids, None


# tf.data ops that reorder elements differently from one epoch (iterator) to
# the next, or pick elements at random.
_REORDERING_OPS = {
    "ShuffleDataset": "shuffle",
    "ShuffleDatasetV2": "shuffle",
    "ShuffleDatasetV3": "shuffle",
    "ShuffleAndRepeatDataset": "shuffle",
    "ShuffleAndRepeatDatasetV2": "shuffle",
    "ExperimentalShuffleAndRepeatDataset": "shuffle",
    "RandomDataset": "random sampling (sample_from_datasets / Dataset.random)",
    "ExperimentalRandomDataset": "random sampling (sample_from_datasets / Dataset.random)",
}
# Ops with a `deterministic` attr: "false" reorders; "default" follows options.
_PARALLEL_OPS = {
    "ParallelMapDataset": "map(num_parallel_calls=..., deterministic=False)",
    "ParallelMapDatasetV2": "map(num_parallel_calls=..., deterministic=False)",
    "ParallelInterleaveDatasetV2": "interleave(..., deterministic=False)",
    "ParallelInterleaveDatasetV3": "interleave(..., deterministic=False)",
    "ParallelInterleaveDatasetV4": "interleave(..., deterministic=False)",
    "ParallelBatchDataset": "batch(num_parallel_calls=..., deterministic=False)",
    "MapAndBatchDataset": "map_and_batch with deterministic=False",
    "ParallelFilterDataset": "filter(num_parallel_calls=..., deterministic=False)",
    "LegacyParallelInterleaveDatasetV2": "parallel_interleave(sloppy=True)",
}
_BATCHING_OPS = {
    "BatchDataset", "BatchDatasetV2", "ParallelBatchDataset", "PaddedBatchDataset",
    "PaddedBatchDatasetV2", "MapAndBatchDataset", "ExperimentalMapAndBatchDataset",
    "DenseToSparseBatchDataset", "ExperimentalDenseToSparseBatchDataset", "RebatchDataset",
    "RebatchDatasetV2", "GroupByWindowDataset", "ExperimentalGroupByWindowDataset",
}
_UNBATCHING_OPS = {"UnbatchDataset", "ExperimentalUnbatchDataset"}


def _dataset_graph(ds: tf.data.Dataset):
    from tensorflow.core.framework import graph_pb2

    serialized = tf.raw_ops.DatasetToGraphV2(
        input_dataset=ds._variant_tensor, external_state_policy=1, strip_device_assignment=True
    )
    graph = graph_pb2.GraphDef()
    graph.ParseFromString(serialized.numpy())
    return graph


def _options_nondeterministic(node) -> bool:
    from tensorflow.core.framework import dataset_options_pb2

    options = dataset_options_pb2.Options()
    try:
        options.ParseFromString(node.attr["serialized_options"].s)
    except Exception:  # noqa: BLE001 - unreadable options: assume the default
        return False
    return options.HasField("deterministic") and not options.deterministic


def reordering_ops(ds: tf.data.Dataset) -> list[str]:
    """What in `ds`'s pipeline changes the element order from epoch to epoch.

    Reads the dataset's graph (the main chain and the functions it calls,
    e.g. the per-file datasets of an interleave). Returns a readable name per
    offending op; empty when the order is the same every epoch.
    """
    graph = _dataset_graph(ds)
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    nondeterministic_default = any(
        n.op == "OptionsDataset" and _options_nondeterministic(n) for n in nodes
    )
    found = []
    for n in nodes:
        if n.op in _REORDERING_OPS:
            if n.op.startswith("Shuffle") and "reshuffle_each_iteration" in n.attr \
                    and not n.attr["reshuffle_each_iteration"].b:
                found.append("shuffle (even with reshuffle_each_iteration=False the order "
                             "is not the source order)")
            else:
                found.append(_REORDERING_OPS[n.op])
        elif n.op in _PARALLEL_OPS:
            det = n.attr["deterministic"].s.decode() if "deterministic" in n.attr else ""
            sloppy = "sloppy" in n.attr and n.attr["sloppy"].b
            if det == "false" or sloppy or (det == "default" and nondeterministic_default):
                found.append(_PARALLEL_OPS[n.op])
    return sorted(set(found))


def is_batched(ds: tf.data.Dataset) -> bool:
    """Whether the last batching-related op of `ds`'s main chain batches."""
    graph = _dataset_graph(ds)
    by_name = {n.name: n for n in graph.node}
    node = next((n for n in graph.node if n.op == "_Retval"), None)
    while node is not None:
        if node.op in _BATCHING_OPS:
            return True
        if node.op in _UNBATCHING_OPS:
            return False
        inputs = [i for i in node.input if not i.startswith("^")]
        if node.op == "DirectedInterleaveDataset":
            inputs = inputs[1:]  # the first input only selects; the data follows
        node = by_name.get(inputs[0].split(":")[0]) if inputs else None
    return False


def _dataset_with_ids(ds: tf.data.Dataset, id_key: str, start: int,
                      list_axis: int | None = None) -> tf.data.Dataset:
    reordering = reordering_ops(ds)
    if reordering:
        raise ValueError(
            "keras_sie.with_ids: the dataset's order changes from epoch to epoch before the "
            f"ids are attached ({'; '.join(reordering)}), so id k would be a different row in "
            "each epoch and every score would be wrong. Attach ids at the source, before any "
            "shuffle (keras_sie.with_ids(source_ds).shuffle(...).batch(...); for "
            "make_csv_dataset pass shuffle=False and shuffle after with_ids), or use an "
            "id/key column the data already carries (its name as "
            "SampleImportance(id_key=...), key_mapping='hash' for arbitrary keys)."
        )

    if is_batched(ds):
        raise ValueError(
            "keras_sie.with_ids: this dataset is already batched, so ids would be given to "
            "whole batches instead of samples. Call with_ids before .batch() "
            "(keras_sie.with_ids(ds).shuffle(...).batch(...)), or .unbatch() first (only if "
            "nothing before the batch shuffles)."
        )

    size = None
    if list_axis is not None:
        x_spec = dataset_x_spec(ds)
        size = _list_size([tuple([None] + list(t.shape)) for t in tf.nest.flatten(x_spec)])

    def add(i, element):
        if size is not None:
            i = tf.cast(i, tf.int64)
            i = {ITEM_KEY: start + i * size + tf.range(size, dtype=tf.int64), QUERY_KEY: i}
        else:
            i = tf.cast(i, tf.int64) + start
        if isinstance(element, tuple) and len(element) in (2, 3):
            return (_attach(element[0], i, id_key),) + tuple(element[1:])
        return _attach(element, i, id_key)

    return ds.enumerate().map(add, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def without_ids(x: Any, id_key: str = DEFAULT_ID_KEY) -> Any:
    """Takes the sample ids off inputs made for a `fit` with `SampleImportance`.

    Use it to `evaluate` or `predict` on the same data: Keras feeds a dict
    entry the model does not expect to the model by position (a functional
    model with dict inputs then reads the id column in place of a feature),
    and a `keras_sie.with_ids(x)` wrapper is not model input at all.

    Args:
        x: What `with_ids` returned (arrays, dict of arrays, or a
            `tf.data.Dataset` of `x`, `(x, y)` or `(x, y, sample_weight)`,
            batched or not), or dict inputs that carry an `id_key` entry.
        id_key: Name of the id entry. Defaults to `"sample_id"`.

    Returns:
        The same inputs without the id: the original array/list/dict for
        in-memory inputs, a mapped dataset for a `tf.data.Dataset`. Inputs
        without an id are returned unchanged.

    Example:

    ```python
    x_ids = keras_sie.with_ids(x_train)
    model.fit(x_ids, y_train, callbacks=[keras_sie.SampleImportance()])
    model.evaluate(keras_sie.without_ids(x_ids), y_train)
    ```
    """
    if isinstance(x, tf.data.Dataset):
        spec = x.element_spec
        if not has_ids(dataset_x_spec(x), id_key):
            return x

        def drop(*element):
            if len(element) == 1:
                return split_ids(element[0], id_key)[0]
            if isinstance(spec, tuple) and len(spec) in (2, 3):
                return (split_ids(element[0], id_key)[0],) + tuple(element[1:])
            return split_ids(element, id_key)[0]

        return x.map(drop, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return split_ids(x, id_key)[0]


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
    ids = np.asarray(ids)
    if ids.ndim == 2 and ids.dtype.kind in "iu" and key_mapping == "index":
        ids = ids[ids >= 0]  # ranked lists: negative ids are padding
        if ids.size == 0:
            raise ValueError("Every item id is negative (padding); there is nothing to score.")
    ids = ids.reshape(-1)
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
