"""The fused train step: input gradients from the same tape as the weight update.

`StepHook.install(model)` puts an instance-level `train_step`/`test_step` on the
model (Keras builds its compiled train function from `self.train_step`), and
`uninstall()` removes them again; both reset the cached compiled functions so
that Keras re-traces. The fused step is Keras's own `TensorFlowTrainer.train_step`
with three additions:

* the id entry is taken off the inputs before the model sees them;
* float inputs are watched and every `keras.layers.Embedding` output produced
  in the forward pass is captured, and one `tape.gradient` call returns the
  weight gradients *and* d(batch loss)/d(input) for those tensors;
* the per-sample row sums are added to the device buffer.

Why row i of d(batch loss)/dx is the sample's own gradient: Keras's default
loss reduction is a mean over the global batch, so row i equals
sw_i * dl_i/dx_i / (B_local * replicas) * loss_scale when samples do not
interact. Multiplying by the global batch size and dividing by the loss scale
gives sw_i * dl_i/dx_i, independent of the batch size.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from keras_sie import ids as ids_lib

_TRAINER_ATTRS = ("_compute_loss", "_loss_tracker", "_call_has_training_arg", "compute_metrics")


def fit_call_locals(model: keras.Model, max_depth: int | None = None) -> dict[str, Any] | None:
    """Local variables of the running `model.fit` call found up the stack, or None.

    Callbacks never see `fit`'s data or callback list; reading its frame lets
    the callback check ids before any compute and lets the step tell whether
    its callback takes part in the running `fit`.

    Args:
        model: The model whose `fit` frame to find.
        max_depth: Frames to look through (None: the whole stack).
    """
    frame = inspect.currentframe()
    try:
        f = frame.f_back if frame is not None else None
        depth = 0
        while f is not None and (max_depth is None or depth < max_depth):
            if f.f_code.co_name == "fit" and f.f_locals.get("self") is model:
                return dict(f.f_locals)
            f = f.f_back
            depth += 1
    finally:
        del frame
    return None


def keras_train_step_is_default(model: keras.Model) -> bool:
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    return type(model).train_step is TensorFlowTrainer.train_step


def check_keras_supported(model: keras.Model) -> None:
    """The fused step uses private trainer members; fail clearly if they moved."""
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            f"keras_sie needs the TensorFlow backend of Keras 3; KERAS_BACKEND is "
            f"{keras.backend.backend()!r}. Set KERAS_BACKEND=tensorflow."
        )
    missing = [a for a in _TRAINER_ATTRS if not hasattr(model, a)]
    if missing:
        raise RuntimeError(
            f"keras_sie supports Keras >=3.5,<4 with the TensorFlow backend; this Keras "
            f"({keras.__version__}) lacks {missing}. Install a supported Keras version."
        )


def _multi_worker_reducible(logs):
    """Step outputs that Keras 3 can average across workers.

    Under `MultiWorkerMirroredStrategy` with several workers, Keras 3 averages
    each step output with `strategy.reduce("MEAN", v, axis=0)`, which fails on
    the scalar metrics every step returns ("Invalid reduction dimension 0 for
    input with 0 dimensions", tensorflow/tensorflow#72388). A leading axis of
    one makes that reduction the mean over replicas, as Keras does on one
    machine. Elsewhere the outputs are returned unchanged.
    """
    from keras.src.backend.tensorflow import trainer as tf_trainer

    multi_worker = getattr(tf_trainer, "_collective_all_reduce_multi_worker", None)
    if multi_worker is None or not multi_worker(tf.distribute.get_strategy()):
        return logs
    return tf.nest.map_structure(
        lambda v: tf.reshape(v, [1]) if tf.is_tensor(v) and v.shape.rank == 0 else v, logs
    )


def _is_float(t) -> bool:
    return t.dtype.is_floating


def _input_names(model: keras.Model, x: Any) -> list[str]:
    """One name per leaf of `x` (dict keys; functional input names; positions)."""
    if isinstance(x, dict):
        return [str(k) for k in sorted(x.keys())]  # tf.nest sorts dict keys
    leaves = tf.nest.flatten(x)
    names = None
    try:
        inputs = model.inputs
        if inputs is not None and len(inputs) == len(leaves):
            names = [getattr(t, "name", None) for t in inputs]
    except (AttributeError, ValueError):
        names = None
    if not names or any(n is None for n in names):
        names = ["input"] if len(leaves) == 1 else [f"input_{i}" for i in range(len(leaves))]
    return [str(n).split(":")[0] for n in names]


def _row_abs_sum(g: tf.Tensor, mask: tf.Tensor | None = None) -> tf.Tensor:
    """sum_j |g_ij| over every non-batch axis -> [B] float32."""
    g = tf.abs(tf.cast(g, tf.float32))
    if mask is not None:
        # Padded positions (mask_zero) contribute nothing.
        m = tf.cast(mask, tf.float32)
        while m.shape.rank < g.shape.rank:
            m = m[..., None]
        g = g * m
    if g.shape.rank == 1:
        return g
    return tf.reduce_sum(tf.reshape(g, [tf.shape(g)[0], -1]), axis=1)


class _EmbeddingCapture:
    """Records the outputs (and masks) of Embedding layers during one forward pass."""

    def __init__(self, layers: list[keras.layers.Layer]):
        self.layers = layers
        self.records: list[tuple[str, tf.Tensor, tf.Tensor | None]] = []

    @contextlib.contextmanager
    def active(self):
        patched = []
        # Unbuilt (subclassed) models build their layers with a symbolic call
        # in a scratch graph during this forward pass: keep only the tensors
        # of the step's own graph.
        step_graph = tf.compat.v1.get_default_graph()
        try:
            for layer in self.layers:
                original = layer.call

                def wrapped(inputs, *args, __layer=layer, __call=original, **kwargs):
                    out = __call(inputs, *args, **kwargs)
                    if not tf.is_tensor(out) or tf.compat.v1.get_default_graph() is not step_graph:
                        return out
                    mask = None
                    if getattr(__layer, "mask_zero", False):
                        mask = tf.not_equal(inputs, 0)
                    self.records.append((__layer.name, out, mask))
                    return out

                object.__setattr__(layer, "call", wrapped)
                patched.append(layer)
            yield self
        finally:
            for layer in patched:
                try:
                    object.__delattr__(layer, "call")
                except AttributeError:
                    pass


def embedding_layers(model: keras.Model) -> list[keras.layers.Layer]:
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.Embedding)
    ]


def functional_input_consumers(model: keras.Model) -> dict[str, list[str]] | None:
    """For functional models: input name -> names of Embedding layers it reaches.

    Follows the graph from each input through non-embedding ops (lookups,
    hashing, reshapes) and stops at the first Embedding on each path. Returns
    None for models without a static graph (subclassed).
    """
    try:
        inputs = model.inputs
        operations = model._operations  # functional graph
    except (AttributeError, ValueError):
        return None
    if not inputs:
        return None
    consumers: dict[int, list] = {}
    for op in operations:
        for node in getattr(op, "_inbound_nodes", []):
            for t in node.input_tensors:
                consumers.setdefault(id(t), []).append(node)
    result = {}
    for t in inputs:
        found, stack, seen = [], [t], set()
        while stack:
            cur = stack.pop()
            for node in consumers.get(id(cur), []):
                if id(node) in seen:
                    continue
                seen.add(id(node))
                if isinstance(node.operation, keras.layers.Embedding):
                    found.append(node.operation.name)
                else:
                    stack.extend(node.output_tensors)
        result[t.name] = sorted(set(found))
    return result


class StepHook:
    """Installs and removes the fused train step on one model.

    Args:
        id_key: Name of the id entry in the inputs.
        features: Names of inputs / Embedding layers that participate, or None
            for every float input and every Embedding output.
        get_buffer: Returns the active `ImportanceBuffer` (read at trace time).
    """

    def __init__(self, id_key: str, features: list[str] | None, get_buffer: Callable):
        self.id_key = id_key
        self.features = features
        self.get_buffer = get_buffer
        self.feature_names: list[str] = []
        self.model: keras.Model | None = None
        self.traced = False
        self.fused = True
        self.owner = None  # weakref to the SampleImportance that installed the step
        self.num_tasks = 0  # set by the callback: >1 keeps per-output scores
        self.task_names: list[str] = []

    # -------------------------------------------------------------- install
    def install(self, model: keras.Model) -> None:
        check_keras_supported(model)
        self.model = model
        self.traced = False
        self.fused = keras_train_step_is_default(model)
        if self.fused:
            object.__setattr__(model, "train_step", self._fused_train_step)
        object.__setattr__(model, "test_step", self._id_stripping_test_step)
        object.__setattr__(model, "_keras_sie_hook", self)
        model.train_function = None
        model.test_function = None

    def uninstall(self) -> None:
        model = self.model
        if model is None:
            return
        for name in ("train_step", "test_step", "_keras_sie_hook"):
            if name in model.__dict__:
                object.__delattr__(model, name)
        model.train_function = None
        model.test_function = None
        self.model = None

    # ---------------------------------------------------------------- steps
    def _split(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x, ids = ids_lib.split_ids(x, self.id_key)
        return x, y, sample_weight, ids

    def _id_stripping_test_step(self, data):
        x, y, sample_weight, _ = self._split(data)
        model = self.model
        return _multi_worker_reducible(
            type(model).test_step(model, keras.utils.pack_x_y_sample_weight(x, y, sample_weight))
        )

    def _validate_default_inputs(self, names: list[str], leaves: list) -> None:
        if self.features is not None:
            return
        consumers = functional_input_consumers(self.model)
        if consumers is None:
            return
        for name, leaf in zip(names, leaves):
            if leaf is None or _is_float(leaf):
                continue
            if not consumers.get(name):
                raise ValueError(
                    f"Input {name!r} has dtype {leaf.dtype.name} and reaches no Embedding "
                    "layer, so it can have no input gradient. Pass `features=[...]` to "
                    "SampleImportance listing the inputs/Embedding layers to score (without "
                    f"{name!r})."
                )

    def _check_ids(self, ids):
        if ids is None:
            raise ValueError(
                f"SampleImportance: the training batches carry no {self.id_key!r} entry, so "
                "scores cannot be tied to samples. Wrap the inputs with "
                "`keras_sie.with_ids(x)`, or add an id feature to your dict inputs and pass "
                "its name as `id_key`."
            )
        buffer = self.get_buffer()
        if buffer.key_mapping == "index" and not ids.dtype.is_integer:
            raise TypeError(
                f"Sample ids ({self.id_key!r}) have dtype {ids.dtype.name}; expected integers "
                "0..num_samples-1. Use keras_sie.with_ids(x), cast the ids to int64, or pass "
                "key_mapping='hash' for arbitrary int64/string keys."
            )
        if buffer.key_mapping == "hash" and not (ids.dtype.is_integer or ids.dtype == tf.string):
            raise TypeError(
                f"Sample keys ({self.id_key!r}) have dtype {ids.dtype.name}; hash keys must be "
                "integers or strings."
            )

    def _owner_in_current_fit(self) -> bool:
        """Is the callback that installed this step part of the running `fit`?

        After a crash inside `fit`, Keras never calls `on_train_end`, so the
        step stays on the model; a later `fit` without the callback must then
        train exactly as plain Keras. Read from the `fit` frame (the step is
        traced inside it); True when no `fit` frame is found (custom loops).
        """
        owner = self.owner() if self.owner is not None else None
        fit_locals = fit_call_locals(self.model)
        if fit_locals is None:
            return True
        callbacks = getattr(fit_locals.get("callbacks"), "callbacks", None)
        return callbacks is None or any(cb is owner for cb in callbacks)

    def _fused_train_step(self, data):
        from keras.src.losses import loss as loss_module

        model = self.model
        if not self._owner_in_current_fit():
            x, y, sample_weight, _ = self._split(data)
            return type(model).train_step(
                model, keras.utils.pack_x_y_sample_weight(x, y, sample_weight)
            )
        buffer = self.get_buffer()
        x, y, sample_weight, ids = self._split(data)
        self._check_ids(ids)

        leaves = tf.nest.flatten(x)
        names = _input_names(model, x)
        self._validate_default_inputs(names, leaves)
        watch_candidates = [
            (n, l) for n, l in zip(names, leaves)
            if l is not None and _is_float(l) and (self.features is None or n in self.features)
        ]
        listed = set(self.features or ())
        if self.features is not None:  # an int input listed by name: its Embeddings
            consumers = functional_input_consumers(model) or {}
            listed.update(name for f in self.features for name in consumers.get(f, []))
        capture_layers = [
            layer for layer in embedding_layers(model)
            if self.features is None or layer.name in listed
        ]
        capture = _EmbeddingCapture(capture_layers)
        # Per-task scores need one more (input-only) backward pass per output,
        # so the tape must outlive the first gradient call.
        per_task = self.num_tasks > 1
        with tf.GradientTape(persistent=per_task) as tape:
            for _, leaf in watch_candidates:
                tape.watch(leaf)
            with capture.active():
                if model._call_has_training_arg:
                    y_pred = model(x, training=True)
                else:
                    y_pred = model(x)
            loss = model._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            model._loss_tracker.update_state(
                loss_module.unscale_loss_for_distribution(loss),
                sample_weight=tf.shape(next(i for i in leaves if i is not None))[0],
            )
            if model.optimizer is not None:
                loss = model.optimizer.scale_loss(loss)
            task_losses = (
                _per_output_losses(model, y, y_pred, sample_weight) if per_task else None
            )

        # The loss scale this step used (read before apply_gradients changes it).
        loss_scale = 1.0
        if model.optimizer is not None:
            loss_scale = model.optimizer.scale_loss(tf.constant(1.0, tf.float32))

        trainable = model.trainable_weights
        input_sources = [leaf for _, leaf in watch_candidates]
        emb_sources = [out for _, out, _ in capture.records]
        gradients = tape.gradient(loss, list(trainable) + input_sources + emb_sources)
        n_w = len(trainable)
        weight_grads = gradients[:n_w]
        input_grads = gradients[n_w:]

        task_rows = None
        if task_losses:
            # One input-only backward pass per output: its weighted loss's share.
            task_rows = []
            self.task_names = [name for name, _ in task_losses]
            for _, task_loss in task_losses:
                if model.optimizer is not None:
                    task_loss = model.optimizer.scale_loss(task_loss)
                g = tape.gradient(task_loss, input_sources + emb_sources)
                rows = self._group_rows(watch_candidates, capture.records, g)[1]
                task_rows.append(tf.add_n(list(rows.values())))
        if per_task:
            del tape
        self._accumulate(
            buffer, ids, watch_candidates, capture.records, input_grads, loss_scale, task_rows
        )

        if trainable:
            model.optimizer.apply_gradients(zip(weight_grads, trainable))
        else:
            warnings.warn("The model does not have any trainable weights.")
        self.traced = True
        return _multi_worker_reducible(
            model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        )

    def _group_rows(self, watched, records, grads) -> tuple[list[str], dict[str, tf.Tensor]]:
        """[B] row sums of |gradient| per feature group (float input / Embedding)."""
        groups: dict[str, tf.Tensor] = {}
        order: list[str] = []

        def add(name, row):
            if name in groups:
                groups[name] = groups[name] + row
            else:
                groups[name] = row
                order.append(name)

        n_in = len(watched)
        for (name, leaf), g in zip(watched, grads[:n_in]):
            if g is None:
                if self.features is not None:
                    raise ValueError(
                        f"Feature {name!r} does not affect the loss (its gradient is None). "
                        "Remove it from `features=`."
                    )
                g = tf.zeros_like(leaf)
            add(name, _row_abs_sum(g))
        for (layer_name, out, mask), g in zip(records, grads[n_in:]):
            if g is None:
                g = tf.zeros_like(out)
            if isinstance(g, tf.IndexedSlices):
                g = tf.convert_to_tensor(g)
            add(layer_name, _row_abs_sum(g, mask))
        return order, groups

    def _accumulate(self, buffer, ids, watched, records, grads, loss_scale, task_rows=None):
        order, groups = self._group_rows(watched, records, grads)
        if not order:
            raise ValueError(
                "SampleImportance found nothing to score: the model has no float input and "
                "no keras.layers.Embedding in its forward pass"
                + (f" among features={self.features}." if self.features else ".")
                + " Integer/string inputs need an Embedding (or list the inputs that have "
                "a gradient in `features=`)."
            )
        if len(order) > 256:
            raise ValueError(f"Too many feature groups ({len(order)}); at most 256 are supported.")
        self.feature_names = order
        scale = _own_loss_scale(ids, loss_scale)
        buffer.accumulate(ids, [groups[n] for n in order], scale, task_rows)


def _per_output_losses(model, y, y_pred, sample_weight) -> list[tuple[str, tf.Tensor]] | None:
    """[(output name, loss_weight * that output's batch loss)] of a multi-output model.

    Computed with the compiled per-output loss functions (the same ones Keras
    sums), not through `compute_loss`, which would update the per-output loss
    metrics a second time. Returns None (per-task scores off, with a warning)
    for target structures this does not recognise.
    """
    from keras.src import tree
    from keras.src.losses import loss as loss_module

    compile_loss = getattr(model, "_compile_loss", None)
    flat_losses = getattr(compile_loss, "_flat_losses", None)
    if not flat_losses:
        return None
    try:
        if isinstance(y_pred, dict) and isinstance(y, (list, tuple)):
            y = dict(zip(compile_loss.output_names, y))
        elif isinstance(y_pred, (list, tuple)) and isinstance(y, dict):
            y = [y[name] for name in compile_loss.output_names]
        out = []
        for path, loss_fn, loss_weight, _ in flat_losses:
            y_t, y_p = y, y_pred
            for key in path:
                y_t, y_p = y_t[key], y_p[key]
            sw = sample_weight
            if sample_weight is not None and tree.is_nested(sample_weight):
                for key in path:
                    sw = sw[key]
            value = tf.cast(loss_fn(y_t, y_p, sw), tf.float32)
            if loss_weight is not None:
                value = value * loss_weight
            name = path[-1] if path and isinstance(path[-1], str) else None
            if name is None:
                names = list(getattr(model, "output_names", None) or [])
                index = path[-1] if path and isinstance(path[-1], int) else len(out)
                name = names[index] if index < len(names) else f"output_{index}"
            out.append((str(name), loss_module.scale_loss_for_distribution(value)))
        return out
    except (KeyError, IndexError, TypeError, ValueError) as e:
        warnings.warn(f"keras_sie: per-task scores are off for this model ({e}).", stacklevel=2)
        return None


def _own_loss_scale(ids, loss_scale) -> tf.Tensor:
    """Factor turning row i of d(batch loss)/dx into sample i's own-loss gradient.

    Keras's loss is a mean over the global batch (local batch x replicas) and
    carries the optimizer's loss scale under mixed precision.
    """
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    local_batch = tf.shape(tf.reshape(ids, [-1]))[0]
    return tf.cast(local_batch * replicas, tf.float32) / tf.cast(loss_scale, tf.float32)


def record(model: keras.Model, sample_ids, input_gradients, loss_scale=1.0) -> None:
    """Records importance from inside a custom `train_step`.

    For models that override `train_step`, `SampleImportance` cannot fuse its
    own step; call this once per step instead, with the gradient of the
    (unscaled) batch-mean loss with respect to the inputs you want scored. It
    does nothing when no `SampleImportance` is attached, so the model works
    with or without the callback.

    Args:
        model: The model (`self` inside `train_step`).
        sample_ids: The [B] ids taken off the inputs with `keras_sie.split_ids`.
        input_gradients: A tensor or a list/dict of tensors, each [B, ...]:
            d(mean batch loss)/d(input) from your tape.
        loss_scale: The loss scale the gradients carry (mixed precision), if any.

    Example:

    ```python
    def train_step(self, data):
        x, y = data
        x, ids = keras_sie.split_ids(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = self.compute_loss(y=y, y_pred=self(x, training=True))
        grads = tape.gradient(loss, self.trainable_weights + [x])
        keras_sie.record(self, ids, grads[-1])
        ...
    ```
    """
    hook = getattr(model, "_keras_sie_hook", None)
    if hook is None:
        return
    buffer = hook.get_buffer()
    if buffer is None:
        return
    hook._check_ids(sample_ids)
    leaves = tf.nest.flatten(input_gradients)
    names = _input_names(model, input_gradients)
    hook.feature_names = names
    scale = _own_loss_scale(sample_ids, loss_scale)
    buffer.accumulate(sample_ids, [_row_abs_sum(g) for g in leaves], scale)
    hook.traced = True


def prepare_distributed(model: keras.Model, id_key: str = ids_lib.DEFAULT_ID_KEY) -> keras.Model:
    """Lets `fit` start with id-carrying inputs on a model made under a strategy.

    For a model created in a `tf.distribute` strategy's scope, Keras 3 builds
    the model, loss and metric state from the first batch before any callback
    runs. That batch still holds the sample id (a model that does not expect
    it then stops with "The structure of `inputs` doesn't match" or "Missing
    data for input"), and under `MultiWorkerMirroredStrategy` with several
    workers Keras 3.15 stops there anyway ("Attempt to convert a value
    (PerReplica...)"), because it all-reduces the whole batch. This replaces
    that step, for this model only, with one that builds from this worker's
    first replica's batch with the id removed: only shapes and dtypes are
    used, nothing is computed or exchanged. Call it once after `compile`; it
    is harmless for inputs without ids and without a strategy.

    Args:
        model: A compiled Keras model.
        id_key: Name of the id entry. Must match `SampleImportance(id_key=...)`.
            Defaults to `"sample_id"`.

    Returns:
        The same model.

    Example:

    ```python
    strategy = tf.distribute.MirroredStrategy()
    with strategy.scope():
        model = make_model()
        model.compile("adam", "mse")
    keras_sie.prepare_distributed(model)
    model.fit(keras_sie.with_ids(x), y, callbacks=[keras_sie.SampleImportance()])
    ```
    """
    check_keras_supported(model)

    def _maybe_symbolic_build(iterator=None, data_batch=None):
        strategy = getattr(model, "_distribute_strategy", None)
        if strategy is None:
            return  # as Keras: without a strategy the build happens when tracing
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = next(it)
                break
        if data_batch is None:
            return

        def local(value):
            if isinstance(value, tf.distribute.DistributedValues):
                return strategy.experimental_local_results(value)[0]
            return value

        data_batch = tf.nest.map_structure(local, data_batch)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data_batch)
        x, _ = ids_lib.split_ids(x, id_key)
        with strategy.scope():
            model._symbolic_build(data_batch=(x, y, sample_weight))

    object.__setattr__(model, "_maybe_symbolic_build", _maybe_symbolic_build)
    return model
