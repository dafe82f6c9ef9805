"""The Keras 3 (TensorFlow backend) step adapter.

Every touch point on private Keras 3 / TensorFlow internals lives in this
module, behind `Keras3Adapter.check_supported`, which fails loudly (naming the
missing attribute and the Keras version) when one is gone:

* an instance-level `train_step` / `test_step` on the model (Keras builds its
  compiled functions from `self.train_step`), and instance-level
  `make_train_function` / `make_test_function` guards that take the step off a
  model whose `fit` no longer has our callback;
* the fused step is a copy of `TensorFlowTrainer.train_step` (its source hash is
  pinned in `TRAIN_STEP_SHA256`; a test fails when the installed Keras differs)
  and uses `_compute_loss`, `_loss_tracker`, `_call_has_training_arg`,
  `keras.src.losses.loss.unscale_loss_for_distribution`;
* `fit`'s frame, found by its code object, for the data and callback list;
* Keras's data adapter (`epoch_iterator.data_adapter`) for generator and
  `PyDataset` input specs;
* `_flatten_layers`, `_compile_loss._flat_losses`, layers' `_seed_generators`;
* `_maybe_symbolic_build` (`prepare_distributed`);
* the multi-worker check `_collective_all_reduce_multi_worker`.

Why row i of d(batch loss)/dx is the sample's own gradient: Keras's default
reduction is a mean over the global batch, so row i equals
sw_i * dl_i/dx_i / (B_local * replicas) * loss_scale when samples do not
interact; `own_loss_scale` undoes exactly the factor each reduction applies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_sie import ids as ids_lib
from keras_sie import signals as signals_lib
from keras_sie.signals import OutputKind

SUPPORTED = "keras>=3.15,<4 with the TensorFlow backend"
# The fused step copies Keras's own `TensorFlowTrainer.train_step` of this version.
TRAIN_STEP_COPIED_FROM = "3.15.1"
TRAIN_STEP_SHA256 = "debf0efab9d5794b017ade2937acbcc51886fc1dc5cf021e7d7e80f974ee707c"

_MODEL_ATTRS = (
    "_compute_loss",
    "_loss_tracker",
    "_call_has_training_arg",
    "compute_metrics",
    "make_train_function",
    "make_test_function",
    "train_function",
    "test_function",
    "_flatten_layers",
    "_maybe_symbolic_build",
    "_symbolic_build",
    "distribute_strategy",
)
REDUCTIONS = ("sum_over_batch_size", "sum", "mean_with_sample_weight")
_INSTALLED_ATTRS = (
    "train_step",
    "test_step",
    "make_train_function",
    "make_test_function",
    "_keras_sie_hook",
)


def _private(what: str):
    """Imports one private Keras module member, or fails naming it."""
    module_name, _, attr = what.rpartition(".")
    try:
        module = __import__(module_name, fromlist=[attr])
        return getattr(module, attr)
    except (ImportError, AttributeError) as e:
        raise RuntimeError(
            f"keras_sie: Keras {keras.__version__} lacks `{what}`, which keras_sie's Keras 3 "
            f"step adapter uses. keras_sie supports {SUPPORTED}. Install a supported Keras "
            "version, or remove the callback."
        ) from e


def _trainer_class():
    return _private("keras.src.backend.tensorflow.trainer.TensorFlowTrainer")


def fit_code():
    """Code object of Keras's `TensorFlowTrainer.fit` (the frame we look for)."""
    return inspect.unwrap(_trainer_class().fit).__code__


def train_step_source() -> str:
    return inspect.getsource(_trainer_class().train_step)


def fit_locals_of(model: Any) -> dict[str, Any] | None:
    """Local variables of the `fit` call running on `model`, found by code object.

    Callbacks never see `fit`'s data or callback list; this lets the callback
    check ids before any compute and lets the installed step tell whether its
    callback still takes part. Returns None outside `fit` (evaluate, predict,
    custom loops) and in threads that have no `fit` frame.
    """
    return frame_locals(model, fit_code())


def frame_locals(model: Any, code) -> dict[str, Any] | None:
    """Locals of the innermost running frame of `code` whose `self` is `model`."""
    frame = inspect.currentframe()
    try:
        f = frame.f_back if frame is not None else None
        while f is not None:
            if f.f_code is code and f.f_locals.get("self") is model:
                return dict(f.f_locals)
            f = f.f_back
    finally:
        del frame
    return None


def _callbacks_of(fit_locals: dict[str, Any]) -> list:
    """The running fit's callbacks: the user's list while Keras builds its
    CallbackList (during `set_model`), the CallbackList's list afterwards."""
    callbacks = fit_locals.get("callbacks")
    if isinstance(callbacks, (list, tuple)):
        return list(callbacks)
    return list(getattr(callbacks, "callbacks", None) or [])


def _is_float(t) -> bool:
    return t.dtype.is_floating


def row_abs_sum(g: tf.Tensor, mask: tf.Tensor | None = None) -> tf.Tensor:
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
    if g.shape.rank is not None:  # one reduction, no dynamic reshape
        return tf.reduce_sum(g, axis=list(range(1, g.shape.rank)))
    return tf.reduce_sum(tf.reshape(g, [tf.shape(g)[0], -1]), axis=1)


def _is_multi_worker(strategy) -> bool:
    from keras.src.backend.tensorflow import trainer as tf_trainer

    multi_worker = getattr(tf_trainer, "_collective_all_reduce_multi_worker", None)
    return bool(multi_worker is not None and multi_worker(strategy))


def _multi_worker_reducible(logs):
    """Step outputs that Keras 3 can average across workers.

    Under `MultiWorkerMirroredStrategy` with several workers, Keras 3 averages
    each step output with `strategy.reduce("MEAN", v, axis=0)`, which fails on
    the scalar metrics every step returns (tensorflow/tensorflow#72388). A
    leading axis of one makes that reduction the mean over replicas.
    Elsewhere the outputs are returned unchanged.
    """
    from keras.src.backend.tensorflow import trainer as tf_trainer

    multi_worker = getattr(tf_trainer, "_collective_all_reduce_multi_worker", None)
    if multi_worker is None or not multi_worker(tf.distribute.get_strategy()):
        return logs
    return tf.nest.map_structure(
        lambda v: tf.reshape(v, [1]) if tf.is_tensor(v) and v.shape.rank == 0 else v, logs
    )


class EmbeddingCapture:
    """Records the outputs (and masks) of Embedding layers during one forward pass.

    Args:
        layers: The `keras.layers.Embedding` layers to wrap.
        graph_only: Keep only tensors of the graph that is current when the
            capture starts (unbuilt models build their layers in a scratch
            graph during the first forward pass).
    """

    def __init__(self, layers: list, graph_only: bool = True):
        self.layers = list(layers)
        self.graph_only = graph_only
        self.records: list[tuple[Any, tf.Tensor, tf.Tensor, tf.Tensor | None]] = []

    @contextlib.contextmanager
    def active(self):
        patched = []
        step_graph = tf.compat.v1.get_default_graph()
        try:
            for layer in self.layers:
                original = layer.call

                def wrapped(inputs, *args, __layer=layer, __call=original, **kwargs):
                    out = __call(inputs, *args, **kwargs)
                    if not tf.is_tensor(out):
                        return out
                    if self.graph_only and tf.compat.v1.get_default_graph() is not step_graph:
                        return out
                    mask = None
                    if getattr(__layer, "mask_zero", False):
                        mask = tf.not_equal(inputs, 0)
                    self.records.append((__layer, inputs, out, mask))
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


@dataclasses.dataclass(frozen=True)
class ForwardTrace:
    """What one symbolic forward pass shows about a model (see `trace_forward`).

    Attributes:
        calls: One entry per Embedding call: (layer, indices of the input
            leaves its input depends on, whether its output has the batch as
            leading axis).
    """

    calls: tuple[tuple[Any, tuple[int, ...], bool], ...]


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What the fused step scores, fixed before tracing.

    Attributes:
        id_key: Name of the id entry.
        watched_leaves: Indices into `tf.nest.flatten(x)` of the float inputs scored.
        leaf_groups: Feature group of each watched leaf.
        layer_groups: (Embedding layer, feature group) pairs.
        num_groups: Number of feature groups.
        reduction: The compiled loss's reduction (see `own_loss_scale`).
        num_tasks: Outputs scored separately (0: total loss only).
        mapping: "index" or "hash" (decides the id dtype check).
        task_names: Output names, in the order per-task sums are stored.
        signals: Training-dynamics signals to record (`keras_sie.signals`).
        output_kind: How to read the (single) classification output.
        list_size: Ranked lists: items per list L (ids of shape [B, L]); 0 for
            one id per row.
        num_queries: Ranked lists: slots of the per-query buffer (0: no
            query ids, no per-query record).
        stream_capacity: Streaming mode: rows of the device ring (0: not
            streaming; the step then sees ring positions as ids).
    """

    id_key: str
    watched_leaves: tuple[int, ...]
    leaf_groups: tuple[int, ...]
    layer_groups: tuple[tuple[Any, int], ...]
    num_groups: int
    reduction: str = "sum_over_batch_size"
    num_tasks: int = 0
    mapping: str = "index"
    task_names: tuple[str, ...] = ()
    signals: tuple[str, ...] = ()
    output_kind: OutputKind | None = None
    list_size: int = 0
    num_queries: int = 0
    stream_capacity: int = 0


def own_loss_scale(ids, loss_scale, reduction: str, sample_weight=None) -> tf.Tensor:
    """Factor turning row i of d(replica loss)/dx into sample i's own-loss gradient.

    Keras divides each replica's loss by the number of replicas and multiplies
    it by the optimizer's loss scale under mixed precision. Within a replica,
    `sum_over_batch_size` divides by the local batch, `sum` does not, and
    `mean_with_sample_weight` divides by the local sum of sample weights.
    """
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    local_batch = tf.cast(tf.shape(tf.reshape(ids, [-1]))[0], tf.float32)
    if reduction == "sum":
        per_replica = tf.constant(1.0, tf.float32)
    elif reduction == "mean_with_sample_weight" and sample_weight is not None:
        per_replica = tf.reduce_sum(tf.cast(tf.nest.flatten(sample_weight)[0], tf.float32))
    else:
        per_replica = local_batch
    return per_replica * tf.cast(replicas, tf.float32) / tf.cast(loss_scale, tf.float32)


def _is_loss_scale_optimizer(optimizer) -> bool:
    return isinstance(optimizer, keras.optimizers.LossScaleOptimizer)


class StepHook:
    """The fused train step for one model in one `fit`.

    Created by the callback with everything it needs; `install()` puts the
    step on the model, `uninstall()` takes it off (also done automatically when
    anything raises inside the step, and by the `make_*_function` guards when
    a later `fit`/`evaluate` runs without the owning callback).

    Args:
        adapter: The model's `Keras3Adapter`.
        buffer: The `ImportanceBuffer` the step accumulates into.
        plan: What to score (`StepPlan`).
        owner: The callback that owns this step.
        stream: Streaming mode's `StreamRing` (None: not streaming).
    """

    def __init__(self, adapter: Keras3Adapter, buffer, plan: StepPlan, owner: Any,
                 stream=None):
        self.adapter = adapter
        self.model = adapter.model
        self.buffer = buffer
        self.plan = plan
        self.owner = owner
        self.stream = stream
        self.leaf_groups = plan.leaf_groups  # feature group of each watched leaf
        self.fused = adapter.train_step_is_default()
        self.installed = False

    # -------------------------------------------------------------- install
    def install(self) -> None:
        model = self.model
        if self.plan.list_size and self.plan.num_queries and self.buffer.queries is None:
            with self.adapter.strategy.scope():
                self.buffer.attach_queries(self.plan.num_queries)
        if self.fused:
            object.__setattr__(model, "train_step", self._train_step)
        object.__setattr__(model, "test_step", self._test_step)
        object.__setattr__(model, "make_train_function", self._guarded("make_train_function"))
        object.__setattr__(model, "make_test_function", self._guarded("make_test_function"))
        object.__setattr__(model, "_keras_sie_hook", self)
        model.train_function = None
        model.test_function = None
        self.installed = True

    def uninstall(self) -> None:
        if self.installed:
            self.adapter.restore()
            self.installed = False

    def _guarded(self, name: str):
        model = self.model

        def make_function(force: bool = False):
            if not self._owner_in_running_fit():
                # A crash skipped on_train_end; this fit/evaluate is not ours.
                self.uninstall()
            elif name == "make_train_function" and self.maps_keys:
                if model.train_function is None or force:
                    model.train_function = self._keyed_train_function()
                return model.train_function
            elif name == "make_test_function" and self.maps_keys:
                if model.test_function is None or force:
                    model.test_function = self._keyed_train_function(test=True)
                return model.test_function
            return getattr(type(model), name)(model, force=force)

        return make_function

    @property
    def maps_keys(self) -> bool:
        """Whether ids are replaced by slots before the compiled step (hash
        keys, or ring positions in streaming mode)."""
        return self.plan.mapping == "hash" or self.stream is not None

    def _keyed_train_function(self, test: bool = False):
        """Keras's train function with one stage in front: keys -> slots.

        With `test=True`, the validation function of the same shape, whose
        stage drops the keys (string keys must never reach an XLA-compiled
        function: XLA has no string type).

        The compiled step (XLA or not, on every replica) only ever sees int64
        slots. The key->slot table is a host-side `tf.lookup` resource that XLA
        cannot compile and replicas cannot share, so the mapping runs in its
        own (non-XLA) `tf.function` on the whole global batch, before
        `strategy.run`: one table, one order of first appearance, the same
        slots as on one device. Under `MultiWorkerMirroredStrategy` the keys
        are all-gathered first and every worker inserts the same global batch
        in the same order, so the workers' tables stay identical.

        The step itself is built the way `TensorFlowTrainer._make_function`
        builds it (`strategy.run` + `reduce_per_replica`, `jit_compile` as the
        model says); `steps_per_execution` steps run per call.
        """
        model = self.model
        strategy = model.distribute_strategy
        reduce_per_replica = _private(
            "keras.src.backend.tensorflow.trainer.reduce_per_replica")
        train_step = model.test_step if test else model.train_step

        def one_step_on_data(data):
            outputs = strategy.run(train_step, args=(data,))
            return reduce_per_replica(outputs, strategy, reduction="auto")

        key_slots = self._key_slots
        if not model.run_eagerly:
            one_step_on_data = tf.function(one_step_on_data, reduce_retracing=True,
                                           jit_compile=bool(model.jit_compile))
            # Only the keys go through this function (passing the whole batch
            # in and out cost about 100 us more per step on our CPUs).
            key_slots = tf.function(key_slots, reduce_retracing=True)

        def map_keys(data):
            keys = self._keys_of(data)
            return self._with_slots(data, keys, list(key_slots(keys)))

        if self.stream is not None:
            map_keys = self._ring_slots  # host bookkeeping, no device wait
        if test:
            map_keys = self._without_keys

        def function(iterator):
            outputs = None
            try:
                for _ in range(max(1, int(model.steps_per_execution))):
                    try:
                        data = next(iterator)
                    except (StopIteration, tf.errors.OutOfRangeError):
                        break
                    outputs = one_step_on_data(map_keys(data))
            except BaseException:
                self.uninstall()  # leave the model as we found it
                raise
            if outputs is None:
                raise StopIteration
            return outputs

        return function

    def _without_keys(self, data):
        """Validation batches: the id entry taken off before the compiled step."""
        x = data[0] if isinstance(data, tuple) else data
        x, _ = ids_lib.split_ids(x, self.plan.id_key)
        return (x,) + tuple(data[1:]) if isinstance(data, tuple) else x

    def _keys_of(self, data):
        x = data[0] if isinstance(data, tuple) else data
        if not isinstance(x, dict) or self.plan.id_key not in x:
            self.check_ids(None)
        return x[self.plan.id_key]

    def _with_slots(self, data, keys, slot_parts: list):
        """`data` with its keys replaced by per-replica slot tensors."""
        if len(slot_parts) == 1 and not isinstance(keys, tf.distribute.DistributedValues):
            slots = slot_parts[0]
        else:
            slots = type(keys)(tuple(slot_parts))
        x = dict(data[0] if isinstance(data, tuple) else data)
        x[self.plan.id_key] = slots
        return (x,) + tuple(data[1:]) if isinstance(data, tuple) else x

    def _ring_slots(self, data):
        """Streaming mode: each row gets the next ring position (see `StreamRing`)."""
        keys = self._keys_of(data)
        parts = self.model.distribute_strategy.experimental_local_results(keys)
        return self._with_slots(data, keys, self.stream.slots(list(parts)))

    def _key_slots(self, keys) -> tuple:
        """The buffer slots of a global batch's keys, one tensor per local replica."""
        strategy = self.model.distribute_strategy
        parts = strategy.experimental_local_results(keys)
        if _is_multi_worker(strategy):
            everyone = strategy.gather(keys, axis=0)  # same order on every worker
            self.buffer.slots_for_keys(everyone)
        slots_all = self.buffer.slots_for_keys(tf.concat([tf.reshape(p, [-1]) for p in parts], 0))
        sizes = [tf.size(p) for p in parts]
        pieces = tf.split(slots_all, tf.stack(sizes)) if len(parts) > 1 else [slots_all]
        new_parts = []
        for part, piece in zip(parts, pieces):
            with tf.device(part.device):
                new_parts.append(tf.reshape(tf.identity(piece), tf.shape(part)))
        return tuple(new_parts)

    def _owner_in_running_fit(self) -> bool:
        fit_locals = self.adapter.fit_locals()
        if fit_locals is None:
            return False
        return any(cb is self.owner for cb in _callbacks_of(fit_locals))

    # ---------------------------------------------------------------- steps
    def _split(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x, ids = ids_lib.split_ids(x, self.plan.id_key)
        return x, y, sample_weight, ids

    def _test_step(self, data):
        x, y, sample_weight, _ = self._split(data)
        model = self.model
        return _multi_worker_reducible(
            type(model).test_step(model, keras.utils.pack_x_y_sample_weight(x, y, sample_weight))
        )

    def check_ids(self, ids) -> None:
        """Trace-time checks of the id tensor (raise with the fix)."""
        key = self.plan.id_key
        if ids is None:
            raise ValueError(
                f"SampleImportance: the training batches carry no {key!r} entry, so scores "
                "cannot be tied to samples. Wrap the inputs with `keras_sie.with_ids(x)`, or "
                "add an id feature to your dict inputs and pass its name as `id_key`."
            )
        if self.plan.list_size:
            ids, query_ids = ids_lib.list_ids(ids)
            if ids.shape.rank != 2 or query_ids is not None and query_ids.shape.rank != 1:
                raise ValueError(
                    f"Ranked-list ids ({key!r}) must be [batch, list_size] item ids and "
                    f"[batch] query ids; got {ids.shape} and "
                    f"{None if query_ids is None else query_ids.shape}."
                )
            if query_ids is not None and not query_ids.dtype.is_integer:
                raise TypeError(f"Query ids ({key!r}) have dtype {query_ids.dtype.name}; "
                                "expected integers.")
        if self.plan.mapping == "index" and not ids.dtype.is_integer:
            raise TypeError(
                f"Sample ids ({key!r}) have dtype {ids.dtype.name}; expected integers "
                "0..num_samples-1. Use keras_sie.with_ids(x), cast the ids to int64, or pass "
                "key_mapping='hash' for arbitrary int64/string keys."
            )
        if self.plan.mapping == "hash" and not (ids.dtype.is_integer or ids.dtype == tf.string):
            raise TypeError(
                f"Sample keys ({key!r}) have dtype {ids.dtype.name}; hash keys must be "
                "integers or strings."
            )

    def _train_step(self, data):
        try:
            return self._fused_step(data)
        except BaseException:
            self.uninstall()  # leave the model as we found it
            raise

    def _fused_step(self, data):
        """The step this generation fuses into (tf_keras picks TFRS's or its own)."""
        return self._fused_train_step(data)

    def _fused_train_step(self, data):
        from keras.src.losses import loss as loss_module

        model = self.model
        plan = self.plan
        x, y, sample_weight, ids = self._split(data)
        self.check_ids(ids)
        leaves = tf.nest.flatten(x)
        watched = [leaves[i] for i in plan.watched_leaves]
        capture = EmbeddingCapture([layer for layer, _ in plan.layer_groups])
        per_task = plan.num_tasks > 1
        with tf.GradientTape(persistent=per_task) as tape:
            for leaf in watched:
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
                _per_output_losses(model, y, y_pred, sample_weight, plan.task_names)
                if per_task else None
            )

        # The loss scale this step used (read before apply_gradients changes it).
        loss_scale = tf.constant(1.0, tf.float32)
        if model.optimizer is not None:
            loss_scale = model.optimizer.scale_loss(tf.constant(1.0, tf.float32))

        trainable = model.trainable_weights
        emb_outputs = [out for _, _, out, _ in capture.records]
        gradients = tape.gradient(loss, list(trainable) + watched + emb_outputs)
        n_w = len(trainable)
        weight_grads = gradients[:n_w]
        if plan.list_size:
            self._accumulate_lists(ids, watched, capture.records, gradients[n_w:], loss_scale,
                                   sample_weight, weight_grads)
            if trainable:
                model.optimizer.apply_gradients(zip(weight_grads, trainable))
            return _multi_worker_reducible(
                model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
            )
        rows = self._group_rows(ids, watched, capture.records, gradients[n_w:])

        task_rows = None
        if task_losses:
            if len(task_losses) != plan.num_tasks:
                raise RuntimeError(
                    f"keras_sie: expected {plan.num_tasks} per-output losses, found "
                    f"{len(task_losses)}. Pass per_task=False to SampleImportance."
                )
            task_rows = []
            for task_loss in task_losses:
                if model.optimizer is not None:
                    task_loss = model.optimizer.scale_loss(task_loss)
                g = tape.gradient(task_loss, watched + emb_outputs)
                task_rows.append(tf.add_n(self._group_rows(ids, watched, capture.records, g)))
        if per_task:
            del tape

        step_ok = None
        if _is_loss_scale_optimizer(model.optimizer):
            # The optimizer skips this step when a weight gradient overflowed:
            # such a step is neither counted nor a NaN/Inf fault.
            step_ok = tf.reduce_all(
                [tf.reduce_all(tf.math.is_finite(g)) for g in weight_grads if g is not None]
            )
        scale = own_loss_scale(ids, loss_scale, plan.reduction, sample_weight)
        signal_rows, correct = self._signal_rows(ids, y, y_pred)
        self.buffer.accumulate(ids, rows, scale, task_rows, step_ok=step_ok,
                               signal_rows=signal_rows, correct=correct)

        if trainable:
            model.optimizer.apply_gradients(zip(weight_grads, trainable))
        else:
            warnings.warn("The model does not have any trainable weights.")
        return _multi_worker_reducible(
            model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        )

    def _signal_rows(self, ids, y, y_pred):
        """[B] values of the requested signals, and per-row correctness."""
        plan = self.plan
        if not plan.signals:
            return None, None
        batch = tf.shape(tf.reshape(ids, [-1]))[0]
        rows: dict[str, tf.Tensor] = {}
        if "loss" in plan.signals:
            rows["loss"] = _unreduced_loss(self.model, y, y_pred, batch)
        correct = None
        if plan.output_kind is not None and plan.output_kind.is_classification and any(
            s in plan.signals for s in signals_lib.CLASSIFICATION_SIGNALS
        ):
            values = signals_lib.classification(
                plan.output_kind, tf.nest.flatten(y)[0], tf.nest.flatten(y_pred)[0]
            )
            for name in ("el2n", "margin", "confidence"):
                if name in plan.signals:
                    rows[name] = values[name]
            if "forgetting" in plan.signals:
                correct = values["correct"]
        return rows, correct

    def _group_rows(self, ids, watched, records, grads) -> list[tf.Tensor]:
        """[B] row sums of |gradient| per feature group, in plan order."""
        plan = self.plan
        batch = tf.shape(tf.reshape(ids, [-1]))[0]
        groups: list[tf.Tensor | None] = [None] * plan.num_groups

        def add(group, row):
            groups[group] = row if groups[group] is None else groups[group] + row

        for group, g in zip(self.leaf_groups, grads[: len(watched)]):
            if g is not None:
                add(group, row_abs_sum(g))
        layer_group = {id(layer): group for layer, group in plan.layer_groups}
        for (layer, _, _, mask), g in zip(records, grads[len(watched):]):
            if g is None:
                continue
            if isinstance(g, tf.IndexedSlices):
                g = tf.convert_to_tensor(g)
            add(layer_group[id(layer)], row_abs_sum(g, mask))
        return [g if g is not None else tf.zeros([batch], tf.float32) for g in groups]

    def _list_group_rows(self, item_ids, watched, records, grads):
        """Ranked lists: per feature group, [B, L] item rows and [B] query-level rows.

        A feature (float input or Embedding output) whose axis 1 has the list
        size is per item: |g| summed over its axes >= 2 gives one value per
        (list, item). Any other feature ([B, ...]) is a query-level feature:
        it has no item, and goes to the per-query rows only.
        """
        plan = self.plan
        size = plan.list_size
        shape = tf.shape(item_ids)
        items: list[tf.Tensor | None] = [None] * plan.num_groups
        lists: list[tf.Tensor | None] = [None] * plan.num_groups

        def add(store, group, row):
            store[group] = row if store[group] is None else store[group] + row

        def one(group, g, mask=None):
            if isinstance(g, tf.IndexedSlices):
                g = tf.convert_to_tensor(g)
            if g.shape.rank is not None and g.shape.rank >= 2 and g.shape[1] == size:
                a = tf.abs(tf.cast(g, tf.float32))
                if mask is not None:
                    m = tf.cast(mask, tf.float32)
                    while m.shape.rank < a.shape.rank:
                        m = m[..., None]
                    a = a * m
                if a.shape.rank > 2:
                    a = tf.reduce_sum(a, axis=list(range(2, a.shape.rank)))
                add(items, group, a)
            else:
                add(lists, group, row_abs_sum(g, mask))

        for group, g in zip(plan.leaf_groups, grads[: len(watched)]):
            if g is not None:
                one(group, g)
        layer_group = {id(layer): group for layer, group in plan.layer_groups}
        for (layer, _, _, mask), g in zip(records, grads[len(watched):]):
            if g is not None:
                one(layer_group[id(layer)], g, mask)
        items = [r if r is not None else tf.zeros(shape, tf.float32) for r in items]
        lists = [r if r is not None else tf.zeros(shape[:1], tf.float32) for r in lists]
        return items, lists

    def _accumulate_lists(self, ids, watched, records, grads, loss_scale, sample_weight,
                          weight_grads) -> None:
        """Ranked lists: per-item rows into the buffer, per-query rows into its query buffer.

        J_q, the list's own loss as the optimizer sees it, is the batch loss
        times the number of lists (global batch): `own_loss_scale` on one
        id per list.
        """
        plan = self.plan
        item_ids, query_ids = ids_lib.list_ids(ids)
        item_ids = tf.cast(item_ids, tf.int64)
        items, lists = self._list_group_rows(item_ids, watched, records, grads)
        step_ok = None
        if _is_loss_scale_optimizer(self.model.optimizer):
            step_ok = tf.reduce_all(
                [tf.reduce_all(tf.math.is_finite(g)) for g in weight_grads if g is not None]
            )
        scale = own_loss_scale(item_ids[:, 0], loss_scale, plan.reduction, sample_weight)
        self.buffer.accumulate(tf.reshape(item_ids, [-1]),
                               [tf.reshape(r, [-1]) for r in items], scale,
                               step_ok=step_ok, padding=True)
        queries = self.buffer.queries
        if queries is None or query_ids is None:
            return
        query_ids = tf.cast(query_ids, tf.int64)
        real = tf.cast(item_ids >= 0, tf.float32)
        per_query = [tf.reduce_sum(r * real, axis=1) + q for r, q in zip(items, lists)]
        queries.accumulate(query_ids, per_query, scale, step_ok=step_ok, padding=True)
        self.buffer.accumulate_item_queries(item_ids, query_ids)

    def record(self, sample_ids, input_gradients, loss_scale=1.0) -> None:
        """The `keras_sie.record` path for models with their own `train_step`."""
        self.check_ids(sample_ids)
        leaves = tf.nest.flatten(input_gradients)
        scale = own_loss_scale(sample_ids, loss_scale, self.plan.reduction)
        self.buffer.accumulate(sample_ids, [row_abs_sum(g) for g in leaves], scale)


def _per_output_losses(model, y, y_pred, sample_weight, task_names: Sequence[str]
                       ) -> list[tf.Tensor] | None:
    """loss_weight * batch loss of each output of a multi-output model.

    Computed with the compiled per-output loss functions (the same ones Keras
    sums), not through `compute_loss`, which would update the per-output loss
    metrics a second time.
    """
    from keras.src import tree
    from keras.src.losses import loss as loss_module

    compile_loss = getattr(model, "_compile_loss", None)
    flat_losses = getattr(compile_loss, "_flat_losses", None)
    if not flat_losses:
        return None
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
        out.append((name, loss_module.scale_loss_for_distribution(value)))
    if all(name in task_names for name, _ in out) and len(out) == len(task_names):
        out.sort(key=lambda item: task_names.index(item[0]))  # the plan's order
    return [value for _, value in out]


def _unreduced_loss(model, y, y_pred, batch) -> tf.Tensor:
    """Each row's own loss (no sample weight), summed over outputs with `loss_weights`."""
    compile_loss = getattr(model, "_compile_loss", None)
    flat_losses = getattr(compile_loss, "_flat_losses", None)
    if not flat_losses:
        raise RuntimeError(
            "keras_sie: the 'loss' signal needs a model compiled with `loss=` (Keras's "
            "CompileLoss); this model computes its loss another way."
        )
    if isinstance(y_pred, dict) and isinstance(y, (list, tuple)):
        y = dict(zip(compile_loss.output_names, y))
    elif isinstance(y_pred, (list, tuple)) and isinstance(y, dict):
        y = [y[name] for name in compile_loss.output_names]
    total = None
    for path, loss_fn, loss_weight, _ in flat_losses:
        y_t, y_p = y, y_pred
        for key in path:
            y_t, y_p = y_t[key], y_p[key]
        call = loss_fn.call if isinstance(loss_fn, keras.losses.Loss) else loss_fn
        value = signals_lib.per_row_mean(call(y_t, y_p), batch)
        if loss_weight is not None:
            value = value * loss_weight
        total = value if total is None else total + value
    return total


_KIND_BY_FUNCTION = {
    "sparse_categorical_crossentropy": "sparse_categorical",
    "categorical_crossentropy": "categorical",
    "binary_crossentropy": "binary",
}


def model_output_names(model) -> list[str]:
    """Output names of a functional model (positions as a fallback; [] when unknown).

    Shared by the Keras 3 and tf_keras adapters: both generations expose
    `outputs` and `output_names` the same way.
    """
    try:
        outputs = model.outputs or []
    except (AttributeError, ValueError):
        outputs = []
    names = list(getattr(model, "output_names", None) or [])
    if len(names) == len(outputs):
        return [str(n) for n in names]
    return [f"output_{k}" for k in range(len(outputs))]


def model_input_names(model, x_structure: Any) -> list[str]:
    """One name per leaf of `x`: dict keys, else the functional Input layers' names
    ("features"; "input_layer" when auto-named), else positions. Shared by both adapters."""
    if isinstance(x_structure, dict):
        return [str(k) for k in sorted(x_structure.keys())]  # tf.nest sorts dict keys
    leaves = tf.nest.flatten(x_structure)
    names = None
    try:
        inputs = model.inputs
        if inputs is not None and len(inputs) == len(leaves):
            names = [
                getattr(getattr(t, "_keras_history", [None])[0], "name", None)
                or getattr(t, "name", None)
                for t in inputs
            ]
    except (AttributeError, ValueError):
        names = None
    if not names or any(n is None for n in names):
        names = ["input"] if len(leaves) == 1 else [f"input_{i}" for i in range(len(leaves))]
    return [str(n).split(":")[0] for n in names]


class Keras3Adapter:
    """Everything keras_sie needs from a Keras 3 model, in one place.

    Args:
        model: A Keras 3 model (TensorFlow backend).
    """

    generation = "keras3"
    supported = SUPPORTED

    def __init__(self, model: keras.Model):
        self.model = model

    # -------------------------------------------------------------- support
    def check_supported(self) -> None:
        """Fails loudly, naming the attribute and the Keras version, when one is gone."""
        if keras.backend.backend() != "tensorflow":
            raise RuntimeError(
                f"keras_sie needs the TensorFlow backend of Keras 3; KERAS_BACKEND is "
                f"{keras.backend.backend()!r}. Set KERAS_BACKEND=tensorflow before importing "
                "keras."
            )
        for name in _MODEL_ATTRS:
            if not hasattr(self.model, name):
                raise RuntimeError(
                    f"keras_sie: Keras {keras.__version__} models lack `{name}`, which "
                    f"keras_sie's Keras 3 step adapter uses. keras_sie supports {SUPPORTED}. "
                    "Install a supported Keras version, or remove the callback."
                )
        for what in (
            "keras.src.backend.tensorflow.trainer.TensorFlowTrainer",
            "keras.src.losses.loss.unscale_loss_for_distribution",
            "keras.src.losses.loss.scale_loss_for_distribution",
            "keras.src.tree.is_nested",
        ):
            _private(what)

    def train_step_is_default(self) -> bool:
        return type(self.model).train_step is _trainer_class().train_step

    def check_key_mapping(self, plan) -> None:
        """Refuses, before training, key mappings this generation cannot run.

        Keras 3 maps hash keys outside the compiled step, so they work on one
        device, under `MirroredStrategy` and with `jit_compile=True`; under
        `MultiWorkerMirroredStrategy` the workers share keys through an
        all-gather, which collectives support for integers only.
        """
        if plan.step.stream_capacity and _is_multi_worker(self.strategy):
            raise NotImplementedError(
                "stream=True is not supported under MultiWorkerMirroredStrategy yet (each "
                "worker would need its own shards). Use stream=False, or one worker with "
                "MirroredStrategy."
            )
        if (plan.mapping == "hash" and plan.key_dtype == tf.string
                and _is_multi_worker(self.strategy)):
            raise NotImplementedError(
                "key_mapping='hash' with string keys is not supported under "
                "MultiWorkerMirroredStrategy (workers share new keys with an all-gather, which "
                "needs integer keys). Turn the keys into int64 in the input pipeline, e.g. "
                "`tf.strings.to_hash_bucket_fast(key, 2**62)` or a fingerprint, and keep "
                "key_mapping='hash'."
            )

    def step_hook(self, buffer, plan: StepPlan, owner: Any, stream=None) -> StepHook:
        """The fused step of this Keras generation for this model (not yet installed)."""
        return StepHook(self, buffer, plan, owner, stream=stream)

    # ------------------------------------------------------------- fit frame
    def fit_locals(self) -> dict[str, Any] | None:
        return fit_locals_of(self.model)

    @staticmethod
    def fit_callbacks(fit_locals: dict[str, Any]) -> list:
        return _callbacks_of(fit_locals)

    @staticmethod
    def data_adapter(fit_locals: dict[str, Any]):
        iterator = fit_locals.get("epoch_iterator")
        return getattr(iterator, "data_adapter", None)

    def adapter_element_spec(self, fit_locals: dict[str, Any]):
        """Element spec of Keras's own data adapter (generators, PyDataset)."""
        adapter = self.data_adapter(fit_locals)
        if adapter is None:
            return None
        return adapter.get_tf_dataset().element_spec

    def adapter_first_batch(self, fit_locals: dict[str, Any]):
        """A batch Keras already holds (generator peek) or can index (PyDataset)."""
        adapter = self.data_adapter(fit_locals)
        first = getattr(adapter, "_first_batches", None)
        if first:
            return first[0]
        py_dataset = getattr(adapter, "py_dataset", None)
        if py_dataset is not None:
            return py_dataset[0]
        return None

    # ----------------------------------------------------------- the model
    @property
    def strategy(self):
        return self.model.distribute_strategy

    def is_default_strategy(self) -> bool:
        return type(self.strategy).__name__ == "_DefaultDistributionStrategy"

    def all_layers(self) -> list:
        return list(self.model._flatten_layers(include_self=False, recursive=True))

    def embedding_layers(self) -> list:
        return [layer for layer in self.all_layers() if isinstance(layer, keras.layers.Embedding)]

    def loss_reductions(self) -> list[str]:
        """Reduction of every compiled loss (user's `compile(loss=...)`)."""
        from keras.src import tree

        spec = getattr(self.model, "loss", None)
        if spec is None:
            return []
        out = []
        for loss in tree.flatten(spec):
            if loss is None:
                continue
            out.append(getattr(loss, "reduction", "sum_over_batch_size"))
        return out

    def output_kind(self) -> OutputKind:
        """How the compiled loss reads the model's output (single-output models)."""
        from keras.src import tree

        spec = getattr(self.model, "loss", None)
        losses = [loss for loss in tree.flatten(spec)] if spec is not None else []
        losses = [loss for loss in losses if loss is not None]
        if len(losses) != 1:
            return OutputKind("other")
        loss = losses[0]
        from_logits = False
        if isinstance(loss, str):
            fn = keras.losses.get(loss)
        elif isinstance(loss, keras.losses.Loss):
            fn = getattr(loss, "fn", None)
            from_logits = bool(getattr(loss, "_fn_kwargs", {}).get("from_logits", False))
        else:
            fn = loss
        name = getattr(fn, "__name__", "")
        known = getattr(keras.losses, name, None) is fn
        return OutputKind(_KIND_BY_FUNCTION.get(name, "other") if known else "other", from_logits)

    def overrides_compute_loss(self) -> bool:
        return type(self.model).compute_loss is not keras.Model.compute_loss

    def output_names(self) -> list[str]:
        return model_output_names(self.model)

    def input_names(self, x_structure: Any) -> list[str]:
        """One name per leaf of `x` (dict keys; functional input names; positions)."""
        return model_input_names(self.model, x_structure)

    def trace_forward(self, x_spec: Any) -> ForwardTrace:
        """Traces one symbolic training-mode forward pass (nothing runs).

        Follows each Embedding call's input back through the traced graph to
        the model inputs it depends on, through custom layers and nested
        sub-models alike.
        """
        model = self.model
        flat_specs = unbatched_specs(x_spec)
        layers = self.embedding_layers()
        found: dict[str, Any] = {}

        def forward(*flat):
            x = tf.nest.pack_sequence_as(x_spec, list(flat))
            capture = EmbeddingCapture(layers)
            with capture.active():
                if model._call_has_training_arg:
                    model(x, training=True)
                else:
                    model(x)
            found["records"] = capture.records
            return tf.constant(0)

        with self.strategy.scope():
            concrete = tf.function(forward, autograph=False).get_concrete_function(*flat_specs)
        placeholders = {t.op.name: i for i, t in enumerate(concrete.graph.inputs[: len(flat_specs)])}
        calls = []
        for layer, inputs, out, _ in found.get("records", []):
            calls.append((layer, _ancestor_leaves(inputs, placeholders), out.shape.rank is not None
                          and out.shape.rank >= 1 and out.shape[0] is None))
        return ForwardTrace(tuple(calls))

    def forward_gradients(self, x, y, sample_weight, float_leaves: list[int], layers: list):
        """Eager training-mode forward + loss gradient for the coupling probe.

        Returns (flat outputs, [d loss / d input] for float leaves and Embedding outputs).
        """
        model = self.model
        leaves = tf.nest.flatten(x)
        capture = EmbeddingCapture(layers, graph_only=False)
        with tf.GradientTape() as tape:
            watched = [leaves[i] for i in float_leaves]
            for t in watched:
                tape.watch(t)
            with capture.active():
                y_pred = model(x, training=True) if model._call_has_training_arg else model(x)
            loss = model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                       training=True)
        outs = [out for _, _, out, _ in capture.records]
        grads = tape.gradient(loss, watched + outs)
        return tf.nest.flatten(y_pred), [g for g in grads if g is not None]

    def state_variables(self) -> list:
        """Variables a forward pass may change (moving stats, RNG, metrics)."""
        model = self.model
        candidates = list(model.non_trainable_variables)
        for layer in self.all_layers() + [model]:
            for sg in getattr(layer, "_seed_generators", []) or []:
                candidates.append(sg.state)
        for metric in model.metrics:
            candidates.extend(metric.variables)
        compile_loss = getattr(model, "_compile_loss", None)
        if compile_loss is not None:
            candidates.extend(getattr(compile_loss, "variables", []) or [])
        return unique_variables(candidates)

    # -------------------------------------------------------------- restore
    def restore(self) -> None:
        """Takes every keras_sie step and guard off the model (idempotent)."""
        model = self.model
        for name in _INSTALLED_ATTRS:
            if name in model.__dict__:
                object.__delattr__(model, name)
        model.train_function = None
        model.test_function = None


def unique_variables(candidates: list) -> list:
    """`candidates` without repeats (by identity), in first-seen order."""
    seen, out = set(), []
    for v in candidates:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def unbatched_specs(x_spec: Any) -> list:
    """Flat input specs with the batch dimension unknown.

    The symbolic trace tells per-sample tensors (first dimension: the batch,
    None) from per-batch ones; a pipeline with a fixed batch size
    (`drop_remainder=True`, or N a multiple of the batch) must not make every
    tensor look per-batch.
    """
    out = []
    for spec in tf.nest.flatten(x_spec):
        if isinstance(spec, tf.TensorSpec) and spec.shape.rank:
            spec = tf.TensorSpec([None] + spec.shape.as_list()[1:], spec.dtype, name=spec.name)
        out.append(spec)
    return out


def _ancestor_leaves(tensor: tf.Tensor, placeholders: dict[str, int]) -> tuple[int, ...]:
    """Indices of the input placeholders `tensor` depends on in its graph."""
    found, stack, seen = set(), [tensor.op], set()
    while stack:
        op = stack.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        if op.name in placeholders:
            found.add(placeholders[op.name])
            continue
        stack.extend(t.op for t in op.inputs)
    return tuple(sorted(found))


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
            Defaults to 1.0.

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
    hook = model.__dict__.get("_keras_sie_hook") if hasattr(model, "__dict__") else None
    if hook is None:
        return
    hook.record(sample_ids, input_gradients, loss_scale)


def prepare_distributed(model: keras.Model, id_key: str = ids_lib.DEFAULT_ID_KEY) -> keras.Model:
    """Lets `fit` start with id-carrying inputs on a model made under a strategy.

    For a model created in a `tf.distribute` strategy's scope, Keras 3 builds
    the model, loss and metric state from the first batch inside `fit`, before
    any callback exists. That batch still holds the sample id (a model that
    does not expect it then stops with "The structure of `inputs` doesn't
    match" or "Missing data for input"), and under `MultiWorkerMirroredStrategy`
    with several workers Keras 3.15 stops there anyway, because it all-reduces
    the whole batch. This replaces that step, for this model only, with one
    that builds from this worker's first replica's batch with the id removed:
    only shapes and dtypes are used. Call it once after `compile`; it is
    harmless for inputs without ids and without a strategy.

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
    if "tf_keras" in type(model).__module__ or any(
        (cls.__module__ or "").startswith("tf_keras") for cls in type(model).__mro__
    ):
        return model  # tf_keras builds the model inside the step: nothing to prepare
    Keras3Adapter(model).check_supported()

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


def numpy_rows(value: Any, n: int) -> Any:
    """The first `n` rows of every leaf (numpy / tensors) of a structure."""
    return tf.nest.map_structure(
        lambda v: np.asarray(v)[:n] if not tf.is_tensor(v) else v[:n], value
    )
