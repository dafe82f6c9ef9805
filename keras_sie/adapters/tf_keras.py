"""The tf_keras (Keras 2) step adapter, TensorFlow Recommenders included.

Every touch point on private tf_keras (and TensorFlow Recommenders) internals
lives in this module, behind `TfKerasAdapter.check_supported`, which fails
loudly, naming the missing attribute and the versions, when one is gone:

* instance-level `train_step` / `test_step` / `make_train_function` /
  `make_test_function` on the model, as in the Keras 3 adapter (tf_keras's
  `make_train_function` builds its `tf.function` from `self.train_step`);
* two fused steps, each a copy of the step it replaces, with the input
  gradients taken from the same tape and the same backward pass:
  - `tf_keras.Model.train_step` (pinned by `TRAIN_STEP_SHA256`): forward,
    `self.compute_loss` (the compiled loss, or the user's override),
    `_validate_target_and_loss`, the optimizer's `minimize` (loss scaling and
    `_transform_loss` included), `compute_metrics`;
  - `tfrs.models.Model.train_step` (pinned by `TFRS_TRAIN_STEP_SHA256`):
    `self.compute_loss(inputs, training=True)` plus regularization losses,
    `apply_gradients`, every metric's result. Every TFRS model defines
    `compute_loss`, so every TFRS model gets scores without code of its own;
* `fit`'s frame (`tf_keras.src.engine.training.Model.fit`, found by its code
  object) for the data and callback list, and its `data_handler._adapter`
  for generator and `Sequence` inputs;
* `_flatten_layers`, `compiled_loss._losses` / `_loss_weights` (per-output
  scores), `tf_keras.src.engine.compile_utils.match_dtype_and_rank`, the
  loss-scale optimizer classes, TFRS task layers' `_loss`.

Why row i of d(batch loss)/dx is the sample's own gradient: tf_keras's
compiled loss with `sum_over_batch_size` (its default, "auto") is a mean over
the replica's batch divided by the number of replicas; with `sum` it is a plain
sum (tf_keras does not divide it by the replicas). A TFRS task's loss is what
its Keras loss returns (the retrieval task's default is a `sum`), never divided
by the replicas. `_own_scale` undoes exactly the factor each applies.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import sys
from typing import Any

import tensorflow as tf

from keras_sie import ids as ids_lib
from keras_sie.adapters.keras3 import (
    EmbeddingCapture,
    ForwardTrace,
    Keras3Adapter,
    StepHook,
    StepPlan,
    _ancestor_leaves,
    frame_locals,
    model_output_names,
    row_abs_sum,
    unbatched_specs,
    unique_variables,
)

SUPPORTED = "tf-keras 2.21 (TF_USE_LEGACY_KERAS=1), tensorflow-recommenders 0.7.7"
# The fused steps copy these methods of these versions (sources pinned).
TRAIN_STEP_COPIED_FROM = "tf-keras 2.21.0"
TRAIN_STEP_SHA256 = "ba57201087c8ab7b8ac4d66f4631bcfefcb3b0e1dc1e3a880973e257768f781a"
TFRS_TRAIN_STEP_COPIED_FROM = "tensorflow-recommenders 0.7.7"
TFRS_TRAIN_STEP_SHA256 = "a6272b79427ce0a0e7d5bb6415cd67833b6e011e597aa98c102f096ed32a9180"

_MODEL_ATTRS = (
    "compute_loss",
    "compute_metrics",
    "make_train_function",
    "make_test_function",
    "train_function",
    "test_function",
    "_flatten_layers",
    "_validate_target_and_loss",
    "distribute_strategy",
)
# Keras 2 reduction names -> keras_sie's (inspection.REDUCTIONS).
_REDUCTION_NAMES = {"auto": "sum_over_batch_size", "sum_over_batch_size": "sum_over_batch_size",
                    "sum": "sum", "none": "none"}
# Arguments of a TFRS task that carry targets, not features (their inputs are
# not scored by default).
_TFRS_TARGET_ARGS = ("labels", "sample_weight", "candidate_sampling_probability",
                     "candidate_ids")


def _tf_keras():
    try:
        import tf_keras
    except ImportError as e:  # pragma: no cover - adapter_for only picks us for tf_keras models
        raise RuntimeError(
            "keras_sie: the model is a tf_keras model but `tf_keras` cannot be imported. "
            "Install `tf-keras` (pip install 'keras_sie[tfkeras]')."
        ) from e
    return tf_keras


def _private(what: str):
    """Imports one private tf_keras member, or fails naming it."""
    module_name, _, attr = what.rpartition(".")
    try:
        module = __import__(module_name, fromlist=[attr])
        return getattr(module, attr)
    except (ImportError, AttributeError) as e:
        raise RuntimeError(
            f"keras_sie: tf_keras {getattr(_tf_keras(), '__version__', '?')} lacks `{what}`, "
            f"which keras_sie's tf_keras step adapter uses. keras_sie supports {SUPPORTED}. "
            "Install a supported version, or remove the callback."
        ) from e


def _model_class():
    return _private("tf_keras.src.engine.training.Model")


def _tfrs_model_class():
    """`tfrs.models.Model` if TensorFlow Recommenders is loaded (never imports it)."""
    tfrs = sys.modules.get("tensorflow_recommenders")
    models = getattr(tfrs, "models", None) if tfrs is not None else None
    return getattr(models, "Model", None)


def _tfrs_task_class():
    tfrs = sys.modules.get("tensorflow_recommenders")
    tasks = getattr(tfrs, "tasks", None) if tfrs is not None else None
    return getattr(tasks, "Task", None)


def _sha256(fn) -> str:
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()


def fit_code():
    """Code object of tf_keras's `Model.fit` (the frame we look for)."""
    return inspect.unwrap(_model_class().fit).__code__


def fit_locals_of(model: Any) -> dict[str, Any] | None:
    """Local variables of the tf_keras `fit` call running on `model`, or None."""
    return frame_locals(model, fit_code())


def _unpack(data):
    """tf_keras's `unpack_x_y_sample_weight` (a tuple of 1-3, else x alone)."""
    if isinstance(data, list):
        data = tuple(data)
    if not isinstance(data, tuple):
        return data, None, None
    if len(data) == 1:
        return data[0], None, None
    if len(data) == 2:
        return data[0], data[1], None
    if len(data) == 3:
        return data
    raise ValueError(f"Data is expected to be (x,), (x, y) or (x, y, sample_weight); got {data}")


def _without_ids(data, id_key: str):
    """(data with the id entry removed from its inputs, the ids, x, y, sample weight)."""
    x, y, sample_weight = _unpack(data)
    x, ids = ids_lib.split_ids(x, id_key)
    if isinstance(data, (tuple, list)):
        rest = tuple(data)
        return (x,) + rest[1:], ids, x, y, sample_weight
    return x, ids, x, y, sample_weight


def _loss_scale_optimizer(optimizer):
    """The optimizer when it scales the loss (tf_keras mixed precision), else None."""
    if optimizer is None:
        return None
    lso = _private("tf_keras.src.mixed_precision.loss_scale_optimizer")
    classes = tuple(c for c in (getattr(lso, "BaseLossScaleOptimizer", None),
                                getattr(lso, "LossScaleOptimizerV3", None)) if c is not None)
    return optimizer if classes and isinstance(optimizer, classes) else None


def _own_scale(ids, loss_scale, reduction: str, divided_by_replicas: bool) -> tf.Tensor:
    """Factor turning row i of d(replica loss)/dx into sample i's own-loss gradient.

    `sum_over_batch_size` divides the replica's loss by its batch, `sum` does
    not; tf_keras's compiled loss divides a `sum_over_batch_size` loss by the
    number of replicas, a TFRS loss never is; mixed precision multiplies it by
    the loss scale.
    """
    local_batch = tf.cast(tf.shape(tf.reshape(ids, [-1]))[0], tf.float32)
    per_replica = tf.constant(1.0, tf.float32) if reduction == "sum" else local_batch
    if divided_by_replicas and reduction != "sum":
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        per_replica = per_replica * tf.cast(replicas, tf.float32)
    return per_replica / tf.cast(loss_scale, tf.float32)


class TfKerasStepHook(StepHook):
    """The fused train step for one tf_keras model in one `fit`.

    The same life cycle as the Keras 3 `StepHook`, whose install / uninstall,
    `make_*_function` guards, id checks and per-group row sums it inherits:
    only the steps differ (tf_keras's own `train_step`, or TFRS's) and which
    inputs are scored (not a TFRS model's targets).

    Args:
        adapter: The model's `TfKerasAdapter`.
        buffer: The `ImportanceBuffer` the step accumulates into.
        plan: What to score (`StepPlan`).
        owner: The callback that owns this step.
    """

    # tf_keras maps hash keys inside the step (one replica, no XLA: the
    # adapter refuses the rest before training).
    maps_keys = False

    def _slots(self, ids):
        return self.buffer.slots_for_keys(ids) if self.plan.mapping == "hash" else ids

    def __init__(self, adapter: TfKerasAdapter, buffer, plan: StepPlan, owner: Any):
        if getattr(plan, "signals", ()):
            raise NotImplementedError(
                "keras_sie: signals= are not supported for tf_keras models yet; remove "
                "signals= (the input-gradient scores are recorded as usual)."
            )
        super().__init__(adapter, buffer, plan, owner)
        self.kind = adapter.step_kind()
        self.fused = self.kind in ("keras2", "tfrs")
        # Target-only inputs of a TFRS model (labels, weights) are not scored.
        skip = set(adapter.target_leaves)
        self.watched_leaves = tuple(i for i in plan.watched_leaves if i not in skip)
        group_of = dict(zip(plan.watched_leaves, plan.leaf_groups))
        self.leaf_groups = tuple(group_of[i] for i in self.watched_leaves)

    # ---------------------------------------------------------------- steps
    def _test_step(self, data):
        data, _, _, _, _ = _without_ids(data, self.plan.id_key)
        return type(self.model).test_step(self.model, data)

    def _fused_step(self, data):
        if self.kind == "tfrs":
            return self._fused_tfrs_step(data)
        return self._fused_train_step(data)

    def _fused_train_step(self, data):
        """`tf_keras.Model.train_step` with the input gradients from its own tape."""
        model = self.model
        plan = self.plan
        data, ids, x, y, sample_weight = _without_ids(data, plan.id_key)
        self.check_ids(ids)
        leaves = tf.nest.flatten(x)
        capture = EmbeddingCapture([layer for layer, _ in plan.layer_groups])
        watched = [leaves[i] for i in self.watched_leaves]
        tape = tf.GradientTape(persistent=plan.num_tasks > 1)
        optimizer = model.optimizer
        lso = _loss_scale_optimizer(optimizer)
        with tape:
            for leaf in watched:
                tape.watch(leaf)
            with capture.active():
                y_pred = model(x, training=True)
            loss = model.compute_loss(x, y, y_pred, sample_weight)
            task_losses = (
                _per_output_losses(model, y, y_pred, sample_weight, plan.task_names)
                if plan.num_tasks > 1 else None
            )
        model._validate_target_and_loss(y, loss)
        # What `optimizer.minimize(loss, vars, tape=tape)` differentiates.
        with tape:
            target = loss
            loss_scale = tf.constant(1.0, tf.float32)
            if lso is not None:
                loss_scale = tf.cast(tf.identity(lso.loss_scale), tf.float32)
                target = lso.get_scaled_loss(target)
            inner = lso.inner_optimizer if lso is not None else optimizer
            transform = getattr(inner, "_transform_loss", None)  # legacy optimizers
            if transform is not None:
                target = transform(target)
        trainable = model.trainable_variables
        emb_outputs = [out for _, _, out, _ in capture.records]
        gradients = tape.gradient(target, list(trainable) + watched + emb_outputs)
        n_w = len(trainable)
        weight_grads = list(gradients[:n_w])
        rows = self._group_rows(ids, watched, capture.records, gradients[n_w:])
        task_rows = None
        if task_losses:
            task_rows = []
            for task_loss in task_losses:
                if lso is not None:
                    task_loss = lso.get_scaled_loss(task_loss)
                g = tape.gradient(task_loss, watched + emb_outputs)
                task_rows.append(tf.add_n(self._group_rows(ids, watched, capture.records, g)))
        if plan.num_tasks > 1:
            del tape
        step_ok = None
        if lso is not None:
            weight_grads = lso.get_unscaled_gradients(weight_grads)
            # The optimizer skips a step whose gradients overflowed: not counted.
            step_ok = tf.reduce_all(
                [tf.reduce_all(tf.math.is_finite(g)) for g in weight_grads if g is not None]
            )
        scale = _own_scale(ids, loss_scale, plan.reduction, divided_by_replicas=True)
        self.buffer.accumulate(self._slots(ids), rows, scale, task_rows, step_ok=step_ok)
        optimizer.apply_gradients(zip(weight_grads, trainable))
        return model.compute_metrics(x, y, y_pred, sample_weight)

    def _fused_tfrs_step(self, data):
        """`tfrs.models.Model.train_step` with the input gradients from its own tape."""
        model = self.model
        plan = self.plan
        inputs, ids, x, _, _ = _without_ids(data, plan.id_key)
        self.check_ids(ids)
        leaves = tf.nest.flatten(x)
        capture = EmbeddingCapture([layer for layer, _ in plan.layer_groups])
        watched = [leaves[i] for i in self.watched_leaves]
        with tf.GradientTape() as tape:
            for leaf in watched:
                tape.watch(leaf)
            with capture.active():
                loss = model.compute_loss(inputs, training=True)

            # Handle regularization losses as well.
            regularization_loss = tf.reduce_sum(
                [tf.reduce_sum(loss) for loss in model.losses]
            )

            total_loss = loss + regularization_loss

        trainable = model.trainable_variables
        emb_outputs = [out for _, _, out, _ in capture.records]
        gradients = tape.gradient(total_loss, list(trainable) + watched + emb_outputs)
        n_w = len(trainable)
        rows = self._group_rows(ids, watched, capture.records, gradients[n_w:])
        scale = _own_scale(ids, 1.0, plan.reduction, divided_by_replicas=False)
        self.buffer.accumulate(self._slots(ids), rows, scale)
        model.optimizer.apply_gradients(zip(gradients[:n_w], trainable))

        metrics = {metric.name: metric.result() for metric in model.metrics}
        metrics["loss"] = loss
        metrics["regularization_loss"] = regularization_loss
        metrics["total_loss"] = total_loss

        return metrics

    def record(self, sample_ids, input_gradients, loss_scale=1.0) -> None:
        """The `keras_sie.record` path for models with a `train_step` of their own.

        The gradients are of the batch-mean loss (or batch-sum, with a `sum`
        reduction) over the replica's batch, as the Keras 3 route documents.
        """
        self.check_ids(sample_ids)
        leaves = tf.nest.flatten(input_gradients)
        scale = _own_scale(sample_ids, loss_scale, self.plan.reduction, divided_by_replicas=True)
        self.buffer.accumulate(self._slots(sample_ids), [row_abs_sum(g) for g in leaves], scale)


def _per_output_losses(model, y, y_pred, sample_weight, task_names) -> list[tf.Tensor] | None:
    """loss_weight * batch loss of each output, as tf_keras's compiled loss sums them.

    The compiled per-output loss objects are called again (not the
    `compiled_loss` container, which would update its loss metrics twice).
    """
    container = getattr(model, "compiled_loss", None)
    losses = getattr(container, "_losses", None)
    if not losses:
        return None
    compile_utils = _private("tf_keras.src.engine.compile_utils")
    losses_utils = _private("tf_keras.src.utils.losses_utils")
    y_true = container._conform_to_outputs(y_pred, y)
    sample_weight = container._conform_to_outputs(y_pred, sample_weight)
    names = sorted(y_pred) if isinstance(y_pred, dict) else list(
        getattr(model, "output_names", None) or [])
    flat_pred = tf.nest.flatten(y_pred)
    flat_true = tf.nest.flatten(y_true)
    flat_sw = tf.nest.flatten(sample_weight)
    if len(flat_sw) != len(flat_pred):
        flat_sw = [flat_sw[0] if flat_sw else None] * len(flat_pred)
    if len(names) != len(flat_pred):
        names = [f"output_{k}" for k in range(len(flat_pred))]
    out = []
    for name, y_t, y_p, sw, loss_obj, loss_weight in zip(
        names, flat_true, flat_pred, flat_sw, losses, container._loss_weights
    ):
        if y_t is None or loss_obj is None:
            continue
        y_t, y_p, sw = compile_utils.match_dtype_and_rank(y_t, y_p, sw)
        sw = losses_utils.apply_mask(y_p, sw, losses_utils.get_mask(y_p))
        value = loss_obj(y_t, y_p, sample_weight=sw)
        if loss_weight is not None:
            value = value * loss_weight
        if _REDUCTION_NAMES.get(str(loss_obj.reduction)) == "sum_over_batch_size":
            value = losses_utils.scale_loss_for_distribution(value)
        out.append((name, tf.cast(value, tf.float32)))
    if len(out) == len(task_names) and all(name in task_names for name, _ in out):
        out.sort(key=lambda item: list(task_names).index(item[0]))
    return [value for _, value in out]


def _recording_call(call, found: list):
    """`call`, recording the arguments it is called with (by parameter name).

    A closure, not default arguments: autograph converts the wrapper (as
    Keras does every layer's call) and would lose class-mangled parameter names.
    """
    signature = inspect.signature(call)

    def wrapped(*args, **kwargs):
        try:
            found.append(dict(signature.bind(*args, **kwargs).arguments))
        except TypeError:
            pass
        return call(*args, **kwargs)

    return wrapped


class TfKerasAdapter(Keras3Adapter):
    """Everything keras_sie needs from a tf_keras (Keras 2) model, in one place.

    Inherits what both generations do alike (callback list, strategy, layer
    walk, input names); every tf_keras touch point is overridden here.

    Args:
        model: A `tf_keras.Model` (Sequential, functional, subclassed, or a
            `tfrs.models.Model`).
    """

    supported = SUPPORTED

    generation = "tf_keras"

    def check_key_mapping(self, plan) -> None:
        """tf_keras maps hash keys inside the step: one replica, no XLA."""
        if plan.step.stream_capacity:
            raise NotImplementedError(
                "stream=True is not supported for tf_keras models yet; use stream=False "
                "(the default), or Keras 3."
            )
        if plan.mapping != "hash":
            return
        if self.strategy.num_replicas_in_sync > 1:
            raise NotImplementedError(
                "key_mapping='hash' with a tf_keras model is not supported with more than one "
                "replica (the key table would be shared across replicas). Map keys to 0..N-1 "
                "ids in your input pipeline (e.g. with a tf.lookup.StaticHashTable) and use "
                "key_mapping='index', or use Keras 3, which supports it."
            )
        if getattr(self.model, "_jit_compile", None) or getattr(self.model, "jit_compile", None):
            raise ValueError(
                "key_mapping='hash' with a tf_keras model keeps a tf.lookup hash table in the "
                "step, which XLA cannot compile; compile the model with jit_compile=False, map "
                "keys to 0..N-1 ids in the input pipeline and use key_mapping='index', or use "
                "Keras 3, which supports it."
            )

    def __init__(self, model):
        self.model = model
        # Indices of inputs that only feed a TFRS task's targets (set by trace_forward).
        self.target_leaves: tuple[int, ...] = ()

    # -------------------------------------------------------------- support
    def check_supported(self) -> None:
        """Fails loudly, naming the attribute and the versions, when one is gone."""
        tf_keras = _tf_keras()
        for name in _MODEL_ATTRS:
            if not hasattr(self.model, name):
                raise RuntimeError(
                    f"keras_sie: tf_keras {tf_keras.__version__} models lack `{name}`, which "
                    f"keras_sie's tf_keras step adapter uses. keras_sie supports {SUPPORTED}. "
                    "Install a supported version, or remove the callback."
                )
        for what in (
            "tf_keras.src.engine.training.Model",
            "tf_keras.src.engine.compile_utils.match_dtype_and_rank",
            "tf_keras.src.utils.losses_utils.scale_loss_for_distribution",
            "tf_keras.src.mixed_precision.loss_scale_optimizer",
        ):
            _private(what)
        tfrs_model = _tfrs_model_class()
        if (tfrs_model is not None and type(self.model).train_step is tfrs_model.train_step
                and _sha256(tfrs_model.train_step) != TFRS_TRAIN_STEP_SHA256):
            tfrs = sys.modules["tensorflow_recommenders"]
            raise RuntimeError(
                f"keras_sie: TensorFlow Recommenders {getattr(tfrs, '__version__', '?')} "
                "has a `tfrs.models.Model.train_step` other than the one keras_sie's fused "
                f"step copies ({TFRS_TRAIN_STEP_COPIED_FROM}). keras_sie supports "
                f"{SUPPORTED}. Install a supported version, or remove the callback."
            )

    def step_kind(self) -> str:
        """"keras2" (tf_keras's own train_step), "tfrs" (TFRS's), or "custom"."""
        train_step = type(self.model).train_step
        if train_step is _model_class().train_step:
            return "keras2"
        tfrs_model = _tfrs_model_class()
        if tfrs_model is not None and train_step is tfrs_model.train_step:
            return "tfrs"
        return "custom"

    def train_step_is_default(self) -> bool:
        """Whether keras_sie fuses its own step (tf_keras's or TFRS's train_step)."""
        return self.step_kind() in ("keras2", "tfrs")

    def step_hook(self, buffer, plan: StepPlan, owner: Any, stream=None) -> TfKerasStepHook:
        """The fused step for this model (not yet installed; streaming is refused earlier)."""
        return TfKerasStepHook(self, buffer, plan, owner)

    def output_kind(self):
        raise ValueError(
            "keras_sie: signals= are not supported for tf_keras models yet; remove signals= "
            "(the input-gradient scores are recorded as usual)."
        )

    # ------------------------------------------------------------- fit frame
    def fit_locals(self) -> dict[str, Any] | None:
        return fit_locals_of(self.model)

    @staticmethod
    def data_adapter(fit_locals: dict[str, Any]):
        handler = fit_locals.get("data_handler")
        return getattr(handler, "_adapter", None)

    def adapter_element_spec(self, fit_locals: dict[str, Any]):
        """Element spec of tf_keras's own data adapter (generators, Sequence)."""
        adapter = self.data_adapter(fit_locals)
        if adapter is None:
            return None
        dataset = adapter.get_dataset()
        return dataset.element_spec if isinstance(dataset, tf.data.Dataset) else None

    def adapter_first_batch(self, fit_locals: dict[str, Any]):
        """A batch tf_keras can index without consuming anything (a `Sequence`)."""
        adapter = self.data_adapter(fit_locals)
        sequence = getattr(adapter, "_keras_sequence", None)
        if sequence is not None:
            return sequence[0]
        return None

    # ----------------------------------------------------------- the model
    def embedding_layers(self) -> list:
        embedding = _tf_keras().layers.Embedding
        return [layer for layer in self.all_layers() if isinstance(layer, embedding)]

    def _tfrs_tasks(self) -> list:
        task = _tfrs_task_class()
        if task is None:
            return []
        return [layer for layer in self.all_layers() if isinstance(layer, task)]

    def loss_reductions(self) -> list[str]:
        """Reduction of every compiled loss, or of every TFRS task's loss."""
        model = self.model
        losses = []
        if self.step_kind() == "tfrs":
            losses = [getattr(task, "_loss", None) for task in self._tfrs_tasks()]
        else:
            spec = getattr(model, "loss", None)
            losses = tf.nest.flatten(spec) if spec else []
        out = []
        for loss in losses:
            if loss is None:
                continue
            reduction = str(getattr(loss, "reduction", "auto"))
            out.append(_REDUCTION_NAMES.get(reduction, reduction))
        return out

    def overrides_compute_loss(self) -> bool:
        return type(self.model).compute_loss is not _model_class().compute_loss

    def output_names(self) -> list[str]:
        if self.step_kind() == "tfrs":
            return []  # a TFRS model's loss is its task's, not per output
        return model_output_names(self.model)

    def _forward(self, x, training: bool = True):
        """The forward pass the fused step differentiates: the model, or a TFRS loss."""
        model = self.model
        if self.step_kind() == "tfrs":
            return model.compute_loss(x, training=training)
        return model(x, training=training)

    @contextlib.contextmanager
    def _task_arguments(self, found: list):
        """Records the arguments each TFRS task is called with."""
        patched = []
        try:
            for task in self._tfrs_tasks():
                object.__setattr__(task, "call", _recording_call(task.call, found))
                patched.append(task)
            yield
        finally:
            for task in patched:
                with contextlib.suppress(AttributeError):
                    object.__delattr__(task, "call")

    def trace_forward(self, x_spec: Any) -> ForwardTrace:
        """Traces one symbolic training-mode forward pass (nothing runs).

        For a TFRS model the traced pass is `compute_loss`; inputs that only
        reach a task's targets (labels, sample weights) are remembered in
        `target_leaves` and are not scored.
        """
        flat_specs = unbatched_specs(x_spec)
        layers = self.embedding_layers()
        found: dict[str, Any] = {}
        task_calls: list[dict] = []

        def forward(*flat):
            x = tf.nest.pack_sequence_as(x_spec, list(flat))
            capture = EmbeddingCapture(layers)
            with capture.active(), self._task_arguments(task_calls):
                self._forward(x, training=True)
            found["records"] = capture.records
            return tf.constant(0)

        with self.strategy.scope():
            # autograph on, as in the compiled step: TFRS tasks use Python `len` on tensors.
            concrete = tf.function(forward).get_concrete_function(*flat_specs)
        placeholders = {t.op.name: i for i, t in enumerate(concrete.graph.inputs[: len(flat_specs)])}
        calls = []
        for layer, inputs, out, _ in found.get("records", []):
            calls.append((layer, _ancestor_leaves(inputs, placeholders), out.shape.rank is not None
                          and out.shape.rank >= 1 and out.shape[0] is None))
        targets, features = set(), set()
        for arguments in task_calls:
            for name, value in arguments.items():
                for t in tf.nest.flatten(value):
                    if not tf.is_tensor(t) or not hasattr(t, "op"):
                        continue
                    leaves = _ancestor_leaves(t, placeholders)
                    (targets if name in _TFRS_TARGET_ARGS else features).update(leaves)
        self.target_leaves = tuple(sorted(targets - features))
        return ForwardTrace(tuple(calls))

    def forward_gradients(self, x, y, sample_weight, float_leaves: list[int], layers: list):
        """Eager training-mode forward + loss gradient for the coupling probe.

        Returns (flat outputs, [d loss / d input] for float leaves and Embedding outputs).
        """
        model = self.model
        leaves = tf.nest.flatten(x)
        skip = set(self.target_leaves)
        capture = EmbeddingCapture(layers, graph_only=False)
        with tf.GradientTape() as tape:
            watched = [leaves[i] for i in float_leaves if i not in skip]
            for t in watched:
                tape.watch(t)
            with capture.active():
                if self.step_kind() == "tfrs":
                    inputs = x if y is None else (x, y) if sample_weight is None \
                        else (x, y, sample_weight)
                    loss = model.compute_loss(inputs, training=True)
                    y_pred = []
                else:
                    y_pred = model(x, training=True)
                    loss = model.compute_loss(x, y, y_pred, sample_weight)
        outs = [out for _, _, out, _ in capture.records]
        grads = tape.gradient(loss, watched + outs)
        return tf.nest.flatten(y_pred), [g for g in grads if g is not None]

    def state_variables(self) -> list:
        """Variables a forward pass may change (moving stats, metrics, RNG states)."""
        model = self.model
        candidates = list(model.non_trainable_variables)
        for metric in model.metrics:
            candidates.extend(metric.variables)
        for layer in self.all_layers() + [model]:
            generator = getattr(getattr(layer, "_random_generator", None), "_generator", None)
            state = getattr(generator, "state", None)
            if state is not None:
                candidates.append(state)
            if hasattr(layer, "_metrics"):
                for metric in layer._metrics:
                    candidates.extend(metric.variables)
        # Metrics kept as plain attributes (TFRS tasks) and anything else tracked.
        with contextlib.suppress(Exception):
            candidates.extend(
                v for v in model._flatten(predicate=lambda v: isinstance(v, tf.Variable))
                if not v.trainable
            )
        return unique_variables(candidates)
