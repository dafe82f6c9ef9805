"""Fit inspection: everything checked before training spends compute.

`inspect_fit` reads the running `fit`'s arguments (through the adapter), checks
the ids, picks the key mapping and buffer size, traces the model once
symbolically to find what can be scored (float inputs, Embedding outputs,
through nested layers and sub-models), checks the loss reduction, and finds a
first batch for `check_coupling`, which tests numerically whether the model
or its loss mixes the rows of a batch.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from keras_sie import ids as ids_lib
from keras_sie import signals as signals_lib
from keras_sie.adapters.keras3 import REDUCTIONS, StepPlan

_AUTO_EMBEDDING_NAME = re.compile(r"^embedding(_\d+)?$")
_PROBE_ROWS = 64


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """The callback's settings that inspection needs."""

    id_key: str
    num_samples: int | None
    key_mapping: str
    on_invalid_id: str
    features: tuple[str, ...] | None
    per_task: bool | None
    signals: tuple[str, ...] = ()
    stream_capacity: int = 0  # streaming mode: ring rows (0: not streaming)


@dataclasses.dataclass
class FitPlan:
    """What one `fit` will record, decided before training."""

    mapping: str
    key_dtype: tf.DType
    num_samples: int
    feature_names: list[str]
    task_names: list[str]
    step: StepPlan
    probe_batch: Any = None
    list_size: int = 0  # ranked lists: items per list (0: one id per row)
    num_queries: int = 0  # ranked lists: per-query buffer slots (0: no query ids)


def _raise_no_ids(id_key: str, val_has_ids: bool) -> None:
    where = (
        "The validation data carries ids but the training data does not: ids are "
        "needed on the training data. " if val_has_ids else ""
    )
    raise ValueError(
        f"SampleImportance: {where}no {id_key!r} entry found in the training inputs, "
        "so scores cannot be tied to samples. Wrap the inputs: "
        "model.fit(keras_sie.with_ids(x), y, ...), use keras_sie.with_ids(dataset) before "
        f"shuffling and batching, or add an int64 {id_key!r} feature to your dict inputs (or "
        "pass the name of yours as id_key=...)."
    )


def _spec_of_arrays(x: Any) -> Any:
    def spec(v):
        if isinstance(v, tf.TensorSpec):
            return v
        t = tf.convert_to_tensor(v[:1]) if not tf.is_tensor(v) else v
        return tf.TensorSpec([None] + list(t.shape[1:]), t.dtype)

    return tf.nest.map_structure(spec, x)


def _split_element(element: Any) -> tuple[Any, Any, Any]:
    if isinstance(element, tuple) and len(element) in (2, 3):
        return element[0], element[1], element[2] if len(element) == 3 else None
    return element, None, None


def _dtype_of(leaf) -> tf.DType:
    if isinstance(leaf, tf.TensorSpec) or tf.is_tensor(leaf):
        return leaf.dtype
    arr = np.asarray(leaf)
    return tf.string if arr.dtype.kind in "USO" else tf.as_dtype(arr.dtype)


def _first_rows_of_dataset(ds: tf.data.Dataset):
    """The first batch of a copy of `ds` with its shuffles bypassed.

    Iterating `ds` itself (or `ds.take(1)`) would draw from its seed
    generators and shift every later epoch's order; the copy has none of them.
    Returns None when the pipeline cannot be copied.
    """
    graph = ids_lib._dataset_graph(ds)
    bypass = {n.name: n.input[0] for n in graph.node if n.op.startswith("Shuffle")}
    stateful = [n.op for n in graph.node if n.op in ("RandomDataset", "ExperimentalRandomDataset")]
    if stateful:
        return None
    for node in graph.node:
        for k, name in enumerate(node.input):
            base = name.split(":")[0]
            while base in bypass:
                name = bypass[base]
                base = name.split(":")[0]
            node.input[k] = name
    variant = tf.raw_ops.DatasetFromGraph(graph_def=graph.SerializeToString())
    copy = tf.data.experimental.from_variant(variant, structure=ds.element_spec)
    for element in copy.take(1):
        return element
    return None


def _data(config: FitConfig, adapter, fit_locals: dict[str, Any]):
    """(x spec with ids, id dtype, in-memory ids or None, first batch or None)."""
    x = fit_locals.get("x")
    if isinstance(x, tf.data.Dataset):
        spec = ids_lib.dataset_x_spec(x)
        batch = None
        try:
            batch = _first_rows_of_dataset(x)
        except (tf.errors.OpError, ValueError, TypeError):
            batch = None
        return spec, None, batch, True
    if isinstance(x, dict):
        ids = x.get(config.id_key)
        y = fit_locals.get("y")
        sw = fit_locals.get("sample_weight")
        rows = int(fit_locals.get("batch_size") or 32)
        from keras_sie.adapters.keras3 import numpy_rows

        batch = (numpy_rows(x, rows), None if y is None else numpy_rows(y, rows),
                 None if sw is None else numpy_rows(sw, rows))
        return x, ids, batch, True
    if x is None or isinstance(x, (np.ndarray, list, tuple)) or tf.is_tensor(x):
        return None, None, None, True
    # Generators and PyDataset: Keras's own data adapter knows the spec.
    spec = adapter.adapter_element_spec(fit_locals)
    batch = adapter.adapter_first_batch(fit_locals)
    return (_split_element(spec)[0] if spec is not None else None), None, batch, False


def _mapping_and_size(config: FitConfig, fit_locals, x_struct, ids, checkable: bool):
    val = fit_locals.get("validation_data")
    val_x = None
    if isinstance(val, (tuple, list)) and val:
        val_x = val[0]
    elif isinstance(val, tf.data.Dataset):
        val_x = ids_lib.dataset_x_spec(val)
    if not ids_lib.has_ids(x_struct, config.id_key):
        _raise_no_ids(config.id_key, ids_lib.has_ids(val_x, config.id_key))
    entry = x_struct[config.id_key]
    if isinstance(entry, dict):
        if ids_lib.ITEM_KEY not in entry:
            raise ValueError(
                f"The {config.id_key!r} entry is a dict without an {ids_lib.ITEM_KEY!r} key. "
                f"For ranked lists pass {{{ids_lib.ITEM_KEY!r}: [N, L] item ids, "
                f"{ids_lib.QUERY_KEY!r}: [N] query ids}} (keras_sie.with_ids(x, list_axis=1))."
            )
        entry = entry[ids_lib.ITEM_KEY]
        if isinstance(ids, dict):
            ids = ids[ids_lib.ITEM_KEY]
    id_dtype = _dtype_of(entry)
    mapping = config.key_mapping
    if mapping == "auto":
        mapping = "hash" if id_dtype == tf.string else "index"
    if id_dtype.is_floating or id_dtype == tf.bool:
        raise TypeError(
            f"Sample ids ({config.id_key!r}) have dtype {id_dtype.name}; they must be "
            "integers (or strings with key_mapping='hash'). keras_sie.with_ids(x) makes "
            "int64 ids."
        )
    if mapping == "index" and id_dtype == tf.string:
        raise TypeError(
            f"Sample ids ({config.id_key!r}) are strings; use key_mapping='hash' (or 'auto')."
        )
    num_samples = config.num_samples
    if ids is not None:
        ids = np.asarray(ids)
        if ids.dtype.kind == "O":
            ids = ids.astype(str)
        implied = ids_lib.infer_from_arrays(ids, mapping)
        val_ids = val_x.get(config.id_key) if isinstance(val_x, dict) else None
        if isinstance(val_ids, dict):
            val_ids = val_ids.get(ids_lib.ITEM_KEY)
        if mapping == "index" and val_ids is not None and not tf.is_tensor(val_ids) \
                and not isinstance(val_ids, tf.TensorSpec):
            # validation_split: size the buffer like the user's full array, so
            # scores line up with x (validation rows stay unvisited).
            implied = max(implied, ids_lib.infer_from_arrays(np.asarray(val_ids), mapping))
        if num_samples is None:
            num_samples = implied
        elif mapping == "index" and implied > num_samples and config.on_invalid_id == "raise":
            raise ValueError(
                f"Sample id {int(ids.max())} does not fit num_samples={num_samples} (ids "
                f"must be 0..{num_samples - 1}). Pass num_samples>={implied}, or "
                "on_invalid_id='skip' to leave such rows out."
            )
    elif num_samples is None and config.stream_capacity:
        num_samples = 0  # streaming: rows go to the ring; the id range is unknown
    elif num_samples is None:
        what = "a tf.data pipeline" if checkable else "generator / PyDataset inputs"
        raise ValueError(
            f"SampleImportance needs num_samples for {what} (it cannot be read before "
            "training). Pass num_samples=<number of distinct sample ids> (ids "
            "0..num_samples-1, or the key capacity with key_mapping='hash')."
        )
    key_dtype = tf.string if id_dtype == tf.string else tf.int64
    return mapping, key_dtype, int(num_samples)


def _list_plan(config: FitConfig, x_struct, mapping: str, num_samples: int) -> tuple[int, int]:
    """Ranked lists: (list size L, query buffer slots), or (0, 0) for one id per row.

    The id entry is a list of items when it has shape [batch, L] (directly, or
    as the "item" entry of an {"item", "query"} dict); query ids, when
    present, get a second record of `num_queries` slots: the largest
    in-memory query id + 1, or `num_samples` for pipelines (every list has
    at least one item, so query ids 0..Q-1 fit when Q <= num_samples).
    """
    entry = x_struct[config.id_key]
    queries = None
    if isinstance(entry, dict):
        queries = entry.get(ids_lib.QUERY_KEY)
        entry = entry[ids_lib.ITEM_KEY]
    shape = tuple(entry.shape) if hasattr(entry, "shape") else np.shape(entry)
    in_memory = not isinstance(entry, tf.TensorSpec) and not tf.is_tensor(entry)
    if len(shape) < 2:
        if queries is not None:
            raise ValueError(
                f"The {config.id_key!r} entry has query ids but its item ids have shape "
                f"{shape}; ranked lists need item ids of shape [N, list_size]."
            )
        return 0, 0
    if len(shape) != 2 or shape[1] is None:
        raise ValueError(
            f"Ranked-list item ids ({config.id_key!r}) must have shape [N, list_size] with a "
            f"known list size; got {shape}."
        )
    if mapping != "index":
        raise NotImplementedError(
            "Ranked lists need integer item ids 0..num_samples-1 (key_mapping='index'); "
            "map item keys to such ids in the input pipeline (-1 for padding)."
        )
    if config.signals:
        raise ValueError(
            f"signals={list(config.signals)} are per-row classification signals; they are not "
            "available for ranked lists (item ids of shape [N, L]). Remove signals=."
        )
    if queries is None:
        return int(shape[1]), 0
    if not isinstance(queries, tf.TensorSpec) and not tf.is_tensor(queries) and in_memory:
        q = np.asarray(queries).reshape(-1)
        if q.size and not np.issubdtype(q.dtype, np.integer):
            raise TypeError(f"Query ids have dtype {q.dtype}; expected integers 0..Q-1.")
        return int(shape[1]), int(q.max()) + 1 if q.size and q.max() >= 0 else 1
    return int(shape[1]), num_samples


def _reduction(adapter) -> str:
    reductions = adapter.loss_reductions()
    if not reductions:
        return "sum_over_batch_size"
    unique = sorted({str(r) for r in reductions})
    if len(unique) == 1 and unique[0] in REDUCTIONS:
        return unique[0]
    raise ValueError(
        f"SampleImportance: the compiled loss uses reduction {', '.join(unique)}. Per-sample "
        f"scores are exact for one reduction shared by every output among {REDUCTIONS}; "
        "compile the loss with one of them (Keras's default is 'sum_over_batch_size')."
    )


def _feature_plan(config: FitConfig, adapter, x_spec) -> tuple[list[str], tuple, tuple, tuple]:
    """(group names, watched leaves, their groups, (layer, group) pairs)."""
    leaves = tf.nest.flatten(x_spec)
    input_names = adapter.input_names(x_spec)
    trace = adapter.trace_forward(x_spec)
    # Inputs the adapter found feeding only the loss's targets (e.g. a TFRS label).
    targets = set(getattr(adapter, "target_leaves", ()) or ())
    features = set(config.features) if config.features is not None else None

    # Embedding groups: one per layer with a per-sample (batch-major) output.
    layer_leaves: dict[int, set[int]] = {}
    layers: dict[int, Any] = {}
    for layer, ancestors, per_sample in trace.calls:
        if not per_sample:
            continue
        layers[id(layer)] = layer
        layer_leaves.setdefault(id(layer), set()).update(ancestors)
    called = {layer.name for layer in layers.values()}
    reached = set().union(*layer_leaves.values()) if layer_leaves else set()

    if features is not None:
        known = set(input_names) | {layer.name for layer in adapter.embedding_layers()}
        unknown = sorted(features - known)
        if unknown:
            raise ValueError(
                f"features={sorted(features)}: {unknown} is neither a model input nor an "
                f"Embedding layer. Inputs: {input_names}; Embedding layers: "
                f"{sorted(layer.name for layer in adapter.embedding_layers())}."
            )
        not_called = sorted(
            f for f in features
            if f not in input_names and f not in called
        )
        if not_called:
            raise ValueError(
                f"features= names Embedding layer(s) {not_called}, but the model's forward "
                "pass never calls them (their table is used some other way, or not at all), "
                "so they have no output gradient to score. Remove them from `features=`."
            )
    else:
        for i, (name, leaf) in enumerate(zip(input_names, leaves)):
            if i in targets:
                continue  # feeds only the loss's labels/weights (TFRS tasks)
            if not leaf.dtype.is_floating and i not in reached:
                raise ValueError(
                    f"Input {name!r} has dtype {leaf.dtype.name} and reaches no Embedding "
                    "layer in the model's forward pass (nested layers and sub-models "
                    "included), so it can have no input gradient. Pass `features=[...]` to "
                    f"SampleImportance listing the inputs/Embedding layers to score (without "
                    f"{name!r})."
                )

    names: list[str] = []
    watched, leaf_groups = [], []
    for i, (name, leaf) in enumerate(zip(input_names, leaves)):
        if features is None and i in targets:
            continue
        if leaf.dtype.is_floating and (features is None or name in features):
            watched.append(i)
            leaf_groups.append(len(names))
            names.append(name)
    chosen = []
    for key, layer in layers.items():
        feeders = sorted(layer_leaves[key])
        if features is not None and layer.name not in features and not any(
            input_names[i] in features for i in feeders
        ):
            continue
        chosen.append((layer, feeders))
    # Readable names: a named Embedding keeps its name; an auto-named one is
    # reported under the input that feeds it (suffixed when it feeds several).
    per_input: dict[str, int] = {}
    layer_groups = []
    for layer, feeders in chosen:
        name = layer.name
        if _AUTO_EMBEDDING_NAME.match(name) and len(feeders) == 1:
            base = input_names[feeders[0]]
            per_input[base] = per_input.get(base, 0) + 1
            name = base if per_input[base] == 1 else f"{base}_{per_input[base]}"
        while name in names:
            name = f"{name}_emb"
        layer_groups.append((layer, len(names)))
        names.append(name)
    if not names:
        raise ValueError(
            "SampleImportance found nothing to score: the model has no float input and no "
            "keras.layers.Embedding in its forward pass"
            + (f" among features={sorted(features)}." if features else ".")
            + " Integer/string inputs need an Embedding (or list the inputs that have a "
            "gradient in `features=`)."
        )
    return names, tuple(watched), tuple(leaf_groups), tuple(layer_groups)


def _output_names(adapter, fit_locals) -> list[str]:
    names = adapter.output_names()
    if names:
        return names
    y = fit_locals.get("y")  # subclassed models: the targets tell
    x = fit_locals.get("x")
    if y is None and isinstance(x, tf.data.Dataset):
        spec = x.element_spec
        y = spec[1] if isinstance(spec, tuple) and len(spec) >= 2 else None
    n = len(tf.nest.flatten(y)) if y is not None else 0
    return [f"output_{k}" for k in range(n)]


def _task_names(config: FitConfig, adapter, fit_locals) -> list[str]:
    if config.per_task is False:
        return []
    names = _output_names(adapter, fit_locals)
    if len(names) <= 1:
        if config.per_task:
            warnings.warn("per_task=True: the model has a single output; nothing to split.",
                          stacklevel=4)
        return []
    return names


def _signals(config: FitConfig, adapter, fit_locals) -> tuple[str, ...]:
    if not config.signals:
        return ()
    if not adapter.train_step_is_default():
        raise ValueError(
            f"signals={list(config.signals)} need keras_sie's fused train step, but this model "
            "overrides train_step (keras_sie.record only passes input gradients). Remove "
            "signals=, or train without a custom train_step."
        )
    outputs = max(1, len(_output_names(adapter, fit_locals)))
    return signals_lib.check_requested(config.signals, adapter.output_kind(), outputs)


def inspect_fit(config: FitConfig, adapter, fit_locals: dict[str, Any]) -> FitPlan:
    """Decides what this `fit` records, or raises with the fix before any compute."""
    x_struct, ids, batch, checkable = _data(config, adapter, fit_locals)
    if x_struct is None:
        val = fit_locals.get("validation_data")
        val_x = val[0] if isinstance(val, (tuple, list)) and val else None
        _raise_no_ids(config.id_key, ids_lib.has_ids(val_x, config.id_key))
    mapping, key_dtype, num_samples = _mapping_and_size(
        config, fit_locals, x_struct, ids, checkable
    )
    list_size, num_queries = _list_plan(config, x_struct, mapping, num_samples)
    if list_size and config.stream_capacity:
        raise NotImplementedError(
            "stream=True does not support ranked-list ids (list_axis) yet; use stream=False."
        )
    x_spec = _spec_of_arrays(ids_lib.split_ids(x_struct, config.id_key)[0])
    reduction = _reduction(adapter)
    if adapter.train_step_is_default():
        names, watched, leaf_groups, layer_groups = _feature_plan(config, adapter, x_spec)
    else:  # the user's train_step calls keras_sie.record with its own gradients
        names, watched, leaf_groups, layer_groups = adapter.input_names(x_spec), (), (), ()
    # Streaming records the total-loss score only (per-task scores stay off).
    tasks = [] if list_size or config.stream_capacity else _task_names(config, adapter,
                                                                        fit_locals)
    signals = _signals(config, adapter, fit_locals)
    step = StepPlan(
        id_key=config.id_key,
        watched_leaves=watched,
        leaf_groups=leaf_groups,
        layer_groups=layer_groups,
        num_groups=len(names),
        reduction=reduction,
        num_tasks=len(tasks),
        mapping=mapping,
        task_names=tuple(tasks),
        signals=signals,
        output_kind=adapter.output_kind() if signals else None,
        list_size=list_size,
        num_queries=num_queries,
        stream_capacity=config.stream_capacity,
    )
    return FitPlan(mapping, key_dtype, num_samples, names, tasks, step, batch,
                   list_size=list_size, num_queries=num_queries)


# ------------------------------------------------------------- coupling
def _perturbed(value: Any, rows: int, half: int) -> Any:
    """`value` with rows half..rows-1 replaced by copies of rows 0..half-1, rotated.

    A permutation of the second half would keep batch statistics; copies of
    other real rows change them, as a different batch would.
    """
    if value is None:
        return None

    def one(v):
        t = tf.convert_to_tensor(v)[:rows]
        return tf.concat([t[:half], tf.roll(t[:rows - half], shift=1, axis=0)], axis=0)

    return tf.nest.map_structure(one, value)


def _first(value: Any, rows: int) -> Any:
    if value is None:
        return None
    return tf.nest.map_structure(lambda v: tf.convert_to_tensor(v)[:rows], value)


def check_coupling(adapter, plan: FitPlan, tolerance: float | None = None) -> str | None:
    """Whether a row's output or input gradient moves when only other rows change.

    Runs the model twice in training mode on the first batch (at most 64
    rows): once as is, once with the second half of the rows rotated among
    themselves, with every state variable (moving statistics, random seeds,
    metrics) restored afterwards, so training is unchanged. For samples that
    do not interact, rows of the first half give identical outputs and loss
    gradients both times.

    Returns:
        A description of the coupling found, or None.
    """
    if plan.probe_batch is None:
        return None
    x, y, sw = _split_element(plan.probe_batch)
    if isinstance(plan.probe_batch, (tuple, list)) and len(plan.probe_batch) == 3:
        x, y, sw = plan.probe_batch
    x, _ = ids_lib.split_ids(x, plan.step.id_key)
    leaves = tf.nest.flatten(x)
    if not leaves:
        return None
    rows = min(int(np.shape(leaves[0])[0]), _PROBE_ROWS)
    if rows < 4:
        return None
    half = rows // 2
    layers = [layer for layer, _ in plan.step.layer_groups]
    state = adapter.state_variables()
    saved = [v.numpy() for v in state]
    results = []
    try:
        with adapter.strategy.scope():
            for variant in (_first, lambda v, r: _perturbed(v, r, half)):
                for v, value in zip(state, saved):
                    v.assign(value)
                # Sample weights stay: under mean_with_sample_weight their batch
                # sum scales every row alike, which the score undoes exactly.
                outs, grads = adapter.forward_gradients(
                    variant(x, rows), variant(y, rows), _first(sw, rows),
                    list(plan.step.watched_leaves), layers,
                )
                results.append(([np.asarray(o, np.float64) for o in outs],
                                [np.asarray(tf.convert_to_tensor(g), np.float64) for g in grads]))
    finally:
        for v, value in zip(state, saved):
            v.assign(value)
    low_precision = any(np.asarray(leaf).dtype == np.float16 for leaf in results[0][0])
    tol = tolerance if tolerance is not None else (2e-2 if low_precision else 1e-3)
    found = []
    for kind, a_list, b_list in (("outputs", results[0][0], results[1][0]),
                                 ("input gradients", results[0][1], results[1][1])):
        for a, b in zip(a_list, b_list):
            if a.ndim == 0 or a.shape != b.shape or a.shape[0] != rows:
                if a.shape != b.shape or not np.array_equal(a, b):
                    found.append((kind, float("inf")))
                continue
            finite = np.isfinite(a[:half]) & np.isfinite(b[:half])
            if not finite.any():
                continue
            scale = max(np.max(np.abs(np.where(np.isfinite(a), a, 0))),
                        np.max(np.abs(np.where(np.isfinite(b), b, 0))), 1e-30)
            moved = float(np.max(np.abs(np.where(finite, a[:half] - b[:half], 0)))) / scale
            if moved > tol:
                found.append((kind, moved))
    if not found:
        return None
    kinds = sorted({k for k, _ in found})
    worst = max(m for _, m in found)
    return (
        f"changing only rows {half}..{rows - 1} of the first batch moved the {' and '.join(kinds)} "
        f"of rows 0..{half - 1} (by up to {worst:.2g} of the largest value)"
    )


def coupling_warning(description: str) -> str:
    return (
        f"keras_sie: the samples of a batch are coupled in this model or its loss: "
        f"{description}. The score of sample i is then row i of d(batch loss)/d(inputs): "
        "it includes sample i's effect on the other samples' predictions and losses (through "
        "batch statistics, in-batch negatives, layers or losses that mix rows), not the "
        "gradient of its own loss alone. Rankings can differ from per-sample ones. For exact "
        "scores, remove the coupling (e.g. freeze BatchNormalization with trainable=False, "
        "score with a row-wise model)."
    )


def feature_names_for(plan: FitPlan, num_groups: int) -> list[str]:
    """Group names for the number of groups the step reported."""
    if num_groups == len(plan.feature_names):
        return list(plan.feature_names)
    return ["input"] if num_groups == 1 else [f"input_{k}" for k in range(num_groups)]


def listed(features: Sequence[str] | None) -> tuple[str, ...] | None:
    return tuple(features) if features is not None else None
