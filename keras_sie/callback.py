"""`SampleImportance`: the Keras callback that ties the pieces together.

Lifecycle (see `keras.Model.fit`): `set_model` checks the configuration and the
training data (before any compute) and installs the fused step; `on_train_begin`
creates the device buffer; `on_epoch_begin` zeroes it; `on_epoch_end` reads it
once, normalizes, keeps the scores and reports them; `on_train_end` removes the
step again. No batch-level hooks are overridden, so Keras keeps its
asynchronous batch dispatch.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_sie import ids as ids_lib
from keras_sie import scores as scores_lib
from keras_sie import storage
from keras_sie.buffer import ImportanceBuffer
from keras_sie.datamap import render_data_map
from keras_sie.step_hook import StepHook, fit_call_locals
from keras_sie.summaries import SummaryWriter

_KEY_MAPPINGS = ("auto", "index", "hash")
_DATA_MAP_SHARE = 0.02  # data_map="auto": share of epoch time the picture may take
_ON_INVALID = ("raise", "skip")


def _fit_arguments(model: keras.Model) -> dict[str, Any] | None:
    """The arguments of the `model.fit` call that is setting up callbacks.

    Callbacks never see the data; reading the caller's frame lets us check ids
    and infer `num_samples` before any compute is spent. Returns None when
    `set_model` is not called from `fit` (evaluate/predict/custom loops).
    """
    return fit_call_locals(model, max_depth=17)  # the 16 frames above set_model, as before


_SUPPORTED_STRATEGIES = (
    tf.distribute.OneDeviceStrategy,
    tf.distribute.MirroredStrategy,
    tf.distribute.MultiWorkerMirroredStrategy,
)


def _check_strategy(model: keras.Model) -> None:
    """Fails before training under a strategy the buffer was not built for."""
    strategy = model.distribute_strategy
    if isinstance(strategy, _SUPPORTED_STRATEGIES):
        return
    if type(strategy).__name__ == "_DefaultDistributionStrategy":  # no strategy
        return
    raise NotImplementedError(
        f"SampleImportance does not support {type(strategy).__name__}. Supported: no "
        "strategy (one device), OneDeviceStrategy, MirroredStrategy (several GPUs or "
        "CPUs of one machine) and MultiWorkerMirroredStrategy (several machines). "
        "(Keras 3's `model.fit` has no ParameterServerStrategy support either.) Train "
        "under one of these, or remove the callback."
    )


def _is_chief(model: keras.Model) -> bool:
    strategy = model.distribute_strategy
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    cluster = resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and "chief" not in cluster


class SampleImportance(keras.callbacks.Callback):
    """Scores every training sample by the gradient of its loss w.r.t. its inputs.

    For each training batch, the per-sample input gradients
    g_ij = dJ_i/dX_ij are taken from the same gradient tape that produces the
    weight update (no second forward/backward pass); S_i += sum_j |g_ij| is
    accumulated per sample id in a device-resident `tf.Variable`. At each
    epoch end the buffer is read once and normalized,
    I_i = S_i / sum_k S_k (S_i: mean per visit), and the scores are kept,
    logged to TensorBoard and saved under `log_dir`.

    J_i is the sample's own loss as the optimizer sees it (`sample_weight`
    and `class_weight` included), independent of batch size. Float inputs use
    their own gradient; integer/string inputs use the gradient at the output of
    the `keras.layers.Embedding` that looks them up (padded positions of
    `mask_zero` embeddings count zero). Training itself is unchanged: the
    weight update is exactly Keras's.

    Samples must carry an id: wrap inputs with `keras_sie.with_ids(x)` or put
    an id feature (`id_key`) in dict inputs. The id never reaches the model.

    Calling `fit` again with the same callback continues the record: its
    epochs are stored after the previous fit's, and the cross-epoch aggregate
    covers both. A job restarted with `keras.callbacks.BackupAndRestore`
    resumes the epochs already saved under `log_dir`.

    Args:
        log_dir: Folder for TensorBoard events and per-epoch arrays (written to
            `<log_dir>/keras_sie`). `None` keeps scores in memory only.
            Defaults to `None`.
        num_samples: Buffer size. With `key_mapping="index"`, ids must be
            `0..num_samples-1`; with `"hash"`, the number of distinct keys the
            buffer can hold. Inferred from in-memory ids when not given;
            required for `tf.data` inputs. Defaults to `None`.
        id_key: Name of the id entry in dict inputs. Defaults to `"sample_id"`.
        features: Input names and/or Embedding layer names to score. `None`
            scores every float input and every Embedding output. Defaults to
            `None`.
        top_k: Rows of the top-k table logged per epoch. Defaults to 20.
        key_mapping: `"index"` (ids are buffer slots), `"hash"` (arbitrary
            int64 or string keys mapped to slots on the device as batches
            arrive) or `"auto"` (hash for string ids, else index).
            Defaults to `"auto"`.
        on_invalid_id: `"raise"` to stop with an error naming an id outside
            `0..num_samples-1`, or `"skip"` to leave such rows out, count them
            and log the count. Defaults to `"raise"`.
        save_arrays: Write each epoch's arrays to `log_dir`. Defaults to True.
        aggregate_epochs: The cross-epoch aggregate (`aggregate`, and the
            `"aggregate"` choice of `select` / `to_sample_weight`) averages the
            first `aggregate_epochs` epochs of the record; `None` averages all
            of them. The default, 3, won our quality benchmark: the early-epoch
            mean found flipped labels better than the last epoch in 12 of 12
            comparisons (README, "Quality"). Defaults to 3.
        per_task: Keep one score per output of a multi-output model (each
            output's share of the total loss, `loss_weights` included), at the
            cost of one extra input-only backward pass per output. `None`
            turns it on for models with more than one output. Defaults to
            `None`.
        strict: Re-raise faults in the callback's own reporting instead of
            warning once and disabling reporting. Defaults to False.
        verbose: 0 = silent, 1 = one line at the end of training saying where
            the run is. Defaults to 1.
        data_map: Log an `importance/data_map` image (mean importance
            against its variability across epochs; needs matplotlib, skipped
            with a one-line notice without it). `True` draws it every epoch
            (0.2-0.4 s each with matplotlib on our CPUs, whatever the data
            size); `"auto"` draws the first epoch and then only as often as
            keeps its cost within 2 % of the training time; `False` never.
            Defaults to `"auto"`.

    Example:

    ```python
    sie = keras_sie.SampleImportance(log_dir="logs")
    model.fit(keras_sie.with_ids(x_train), y_train, epochs=3, callbacks=[sie])
    print(sie.top_k(10))              # [(id, importance, visits), ...]
    scores = sie.importance           # numpy [num_samples], latest epoch
    # tensorboard --logdir logs
    ```
    """

    def __init__(
        self,
        log_dir: str | os.PathLike | None = None,
        num_samples: int | None = None,
        id_key: str = ids_lib.DEFAULT_ID_KEY,
        features: Sequence[str] | None = None,
        top_k: int = 20,
        key_mapping: str = "auto",
        on_invalid_id: str = "raise",
        save_arrays: bool = True,
        per_task: bool | None = None,
        aggregate_epochs: int | None = 3,
        strict: bool = False,
        verbose: int = 1,
        data_map: bool | str = "auto",
    ):
        super().__init__()
        if key_mapping not in _KEY_MAPPINGS:
            raise ValueError(f"key_mapping must be one of {_KEY_MAPPINGS}, got {key_mapping!r}.")
        if on_invalid_id not in _ON_INVALID:
            raise ValueError(f"on_invalid_id must be one of {_ON_INVALID}, got {on_invalid_id!r}.")
        if num_samples is not None and (not isinstance(num_samples, (int, np.integer)) or num_samples <= 0):
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}.")
        if not isinstance(top_k, (int, np.integer)) or top_k < 0:
            raise ValueError(f"top_k must be a non-negative int, got {top_k!r}.")
        if not isinstance(id_key, str) or not id_key:
            raise ValueError(f"id_key must be a non-empty string, got {id_key!r}.")
        if features is not None:
            if isinstance(features, str) or not all(isinstance(f, str) for f in features):
                raise TypeError("features must be a list of input / Embedding layer names.")
            features = list(features)
            if not features:
                raise ValueError("features=[] selects nothing; pass None to score every input.")
        self.log_dir = os.fspath(log_dir) if log_dir is not None else None
        self.num_samples = int(num_samples) if num_samples is not None else None
        self.id_key = id_key
        self.features = features
        self.top_k_rows = int(top_k)
        self.key_mapping = key_mapping
        self.on_invalid_id = on_invalid_id
        self.save_arrays = save_arrays
        self.per_task = per_task
        if aggregate_epochs is not None and (
            not isinstance(aggregate_epochs, (int, np.integer)) or aggregate_epochs < 1
        ):
            raise ValueError(
                f"aggregate_epochs must be a positive int or None, got {aggregate_epochs!r}."
            )
        self.aggregate_epochs = aggregate_epochs
        self._task_history: dict[int, dict[str, np.ndarray]] = {}
        self.strict = strict
        self.verbose = verbose
        if data_map not in (True, False, "auto"):
            raise ValueError(f"data_map must be True, False or 'auto', got {data_map!r}.")
        self.data_map = data_map
        self._map_budget = 0.0  # seconds of drawing the "auto" mode may still spend
        self._map_cost: float | None = None
        self._epoch_started: float | None = None

        self._hook = StepHook(id_key, features, lambda: self._buffer)
        self._hook.owner = weakref.ref(self)
        self._buffer: ImportanceBuffer | None = None
        self._writer: SummaryWriter | None = None
        self._in_fit = False
        self._resolved_mapping = "index"
        self._key_dtype = tf.int64
        self._history: dict[int, np.ndarray] = {}
        self._visits: np.ndarray | None = None
        self._keys: np.ndarray | None = None
        self._feature_importance: dict[str, float] = {}
        self._summary: dict[str, float] = {}
        self._faults: dict[str, int] = {}
        self._epoch_offset = 0
        self._next_record = 0
        self._first_epoch_of_fit = True
        self._reporting_disabled = False
        self._is_chief = True

    # ------------------------------------------------------------ public API
    @property
    def importance(self) -> np.ndarray | None:
        """Normalized importance of the latest epoch (numpy [num_samples]), or None."""
        if not self._history:
            return None
        return self._history[max(self._history)]

    @property
    def history(self) -> dict[int, np.ndarray]:
        """Per-epoch importance, keyed by the record's epoch number."""
        return dict(self._history)

    @property
    def aggregate(self) -> np.ndarray | None:
        """Cross-epoch aggregate: mean of the first `aggregate_epochs` epochs' importance."""
        if not self._history:
            return None
        return scores_lib.aggregate(
            [self._history[e] for e in sorted(self._history)], first=self.aggregate_epochs
        )

    @property
    def visits(self) -> np.ndarray | None:
        """Visits per sample in the latest epoch."""
        return self._visits

    @property
    def keys(self) -> np.ndarray | None:
        """Key of every buffer slot: original keys in hash mode, else 0..N-1."""
        if self._keys is not None:
            return self._keys
        if self._buffer is None:
            return None
        return np.arange(self._buffer.num_samples, dtype=np.int64)

    @property
    def feature_importance(self) -> dict[str, float]:
        """Latest epoch's share of sum_i |g_ij| per input / embedding group."""
        return dict(self._feature_importance)

    @property
    def summary(self) -> dict[str, float]:
        """Latest epoch's summary scalars (gini, top1pct_share, ...)."""
        return dict(self._summary)

    @property
    def task_importance(self) -> dict[str, np.ndarray]:
        """Latest epoch's importance per output of a multi-output model ({} otherwise).

        Each output's scores are normalized like `importance`; `importance`
        itself stays the score of the total loss.
        """
        if not self._task_history:
            return {}
        return dict(self._task_history[max(self._task_history)])

    def top_k(self, k: int = 10, largest: bool = True, epoch: int | None = None) -> list[tuple]:
        """The k most (or least) important visited samples.

        Args:
            k: Number of samples.
            largest: True for the most important, False for the least.
            epoch: Record epoch; the latest by default.

        Returns:
            A list of `(key, importance, visits)`, most extreme first.
        """
        if not self._history:
            return []
        epoch = max(self._history) if epoch is None else epoch
        imp = self._history[epoch]
        vis = self._visits if self._visits is not None else np.ones_like(imp, dtype=np.int64)
        keys = self.keys if self.keys is not None else np.arange(imp.size, dtype=np.int64)
        return scores_lib.top_k_rows(imp, vis, keys, k, largest)

    # ------------------------------------------------------------- lifecycle
    def set_model(self, model: keras.Model) -> None:
        super().set_model(model)
        fit_args = _fit_arguments(model)
        self._in_fit = fit_args is not None
        if not self._in_fit:
            return
        _check_strategy(model)
        self._configure_from_data(fit_args)
        if self._resolved_mapping == "hash" and getattr(model, "jit_compile", False) is True:
            raise ValueError(
                "key_mapping='hash' keeps a tf.lookup hash table, which XLA cannot compile; "
                "compile the model with jit_compile=False, or map keys to 0..N-1 ids in the "
                "input pipeline and use key_mapping='index'."
            )
        self._hook.num_tasks = self._count_tasks(model, fit_args)
        self._warn_if_samples_are_coupled(model)
        self._hook.install(model)

    def on_train_begin(self, logs=None) -> None:
        if not self._in_fit:
            return
        self._is_chief = _is_chief(self.model)
        if self.log_dir is not None and self._is_chief:
            storage.check_writable(self.log_dir)
            if self._writer is None:
                self._writer = SummaryWriter(self.log_dir, storage.RUN_SUBDIR)
        need_new = (
            self._buffer is None
            or self._buffer.num_samples != self.num_samples
            or self._buffer.key_mapping != self._resolved_mapping
            or self._buffer.num_tasks != self._hook.num_tasks
        )
        if need_new:
            with self.model.distribute_strategy.scope():
                self._buffer = ImportanceBuffer(
                    self.num_samples, self._resolved_mapping, self._key_dtype,
                    num_tasks=self._hook.num_tasks,
                )
        if self._resolved_mapping == "hash" and self.model.distribute_strategy.num_replicas_in_sync > 1:
            raise NotImplementedError(
                "key_mapping='hash' is not supported with more than one replica (the key table "
                "is shared across replicas). Map keys to 0..N-1 ids in your input pipeline "
                "(e.g. with a tf.lookup.StaticHashTable) and use key_mapping='index'."
            )
        self._first_epoch_of_fit = True
        self._epoch_offset = self._next_record

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        if not self._in_fit or self._buffer is None:
            return
        self._epoch_started = time.perf_counter()
        if self._first_epoch_of_fit:
            self._first_epoch_of_fit = False
            self._start_or_resume(epoch)
        self._buffer.reset()

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if not self._in_fit or self._buffer is None:
            return
        snap = self._buffer.read()
        # Configuration/data errors: always raised, never swallowed.
        if not self._hook.fused and not self._hook.traced:
            raise RuntimeError(
                "SampleImportance recorded nothing this epoch: the model overrides "
                "`train_step`, so the fused step could not be installed. Call "
                "`keras_sie.record(self, ids, input_gradients)` inside your train_step "
                "(see its docstring), or remove the callback."
            )
        if snap.invalid_rows and self.on_invalid_id == "raise":
            raise ValueError(
                f"SampleImportance: {snap.invalid_rows} training rows had a sample id outside "
                f"0..{self.num_samples - 1} (e.g. id {snap.invalid_example}); the buffer holds "
                f"num_samples={self.num_samples}. Fix the ids, pass a larger num_samples, use "
                "key_mapping='hash' for arbitrary keys, or on_invalid_id='skip' to leave such "
                "rows out (they are counted and logged)."
            )
        if self._reporting_disabled:
            return
        try:
            self._report(self._epoch_offset + epoch, snap, logs)
        except Exception as e:
            if self.strict:
                raise
            self._reporting_disabled = True
            warnings.warn(
                f"keras_sie: importance reporting failed at epoch {epoch} "
                f"({type(e).__name__}: {e}); it is disabled for the rest of this run. Training "
                "is unaffected. Pass strict=True to SampleImportance to raise instead.",
                RuntimeWarning,
                stacklevel=2,
            )

    def on_train_end(self, logs=None) -> None:
        if not self._in_fit:
            return
        self._hook.uninstall()
        self._in_fit = False
        if self._writer is not None:
            self._writer.close()  # flushes; a later fit reopens lazily
        if self.verbose and self.log_dir and self._history and self._is_chief:
            print(
                f"keras_sie: {len(self._history)} epoch(s) of sample importance in "
                f"{storage.run_dir(self.log_dir)}  ->  tensorboard --logdir {self.log_dir}"
            )

    # ------------------------------------------------------------- internals
    def _configure_from_data(self, fit_args: dict[str, Any]) -> None:
        x = fit_args.get("x")
        val = fit_args.get("validation_data")
        val_x = None
        if isinstance(val, (tuple, list)) and val:
            val_x = val[0]
        elif isinstance(val, tf.data.Dataset):
            val_x = ids_lib.dataset_x_spec(val)
        val_has_ids = ids_lib.has_ids(val_x, self.id_key)

        ids = None
        id_dtype = None
        checkable = True
        if isinstance(x, tf.data.Dataset):
            spec = ids_lib.dataset_x_spec(x)
            if not ids_lib.has_ids(spec, self.id_key):
                self._raise_no_ids(val_has_ids)
            id_dtype = spec[self.id_key].dtype
        elif isinstance(x, dict):
            if self.id_key not in x:
                self._raise_no_ids(val_has_ids)
            ids = np.asarray(x[self.id_key])
            id_dtype = tf.as_dtype(ids.dtype) if ids.dtype.kind not in "USO" else tf.string
        elif x is None or isinstance(x, (np.ndarray, list, tuple)) or tf.is_tensor(x):
            self._raise_no_ids(val_has_ids)
        else:
            checkable = False  # generators / PyDataset: checked when the step is traced

        mapping = self.key_mapping
        if mapping == "auto":
            mapping = "hash" if id_dtype == tf.string else "index"
        if id_dtype is not None:
            if id_dtype.is_floating or id_dtype == tf.bool:
                raise TypeError(
                    f"Sample ids ({self.id_key!r}) have dtype {id_dtype.name}; they must be "
                    "integers (or strings with key_mapping='hash'). keras_sie.with_ids(x) "
                    "makes int64 ids."
                )
            if mapping == "index" and id_dtype == tf.string:
                raise TypeError(
                    f"Sample ids ({self.id_key!r}) are strings; use key_mapping='hash' (or "
                    "'auto')."
                )
        self._resolved_mapping = mapping
        self._key_dtype = tf.string if id_dtype == tf.string else tf.int64

        if ids is not None:
            if ids.dtype.kind == "O":
                ids = ids.astype(str)
            implied = ids_lib.infer_from_arrays(ids, mapping)
            val_ids = val_x.get(self.id_key) if isinstance(val_x, dict) else None
            if mapping == "index" and val_ids is not None and not tf.is_tensor(val_ids) \
                    and not isinstance(val_ids, tf.TensorSpec):
                # validation_split: size the buffer like the user's full array, so
                # scores line up with x (validation rows stay unvisited, scored 0).
                implied = max(implied, ids_lib.infer_from_arrays(np.asarray(val_ids), mapping))
            if self.num_samples is None:
                self.num_samples = implied
            elif mapping == "index" and implied > self.num_samples:
                bad = int(np.asarray(ids).max())
                if self.on_invalid_id == "raise":
                    raise ValueError(
                        f"Sample id {bad} does not fit num_samples={self.num_samples} (ids "
                        f"must be 0..{self.num_samples - 1}). Pass num_samples>={implied}, "
                        "or on_invalid_id='skip' to leave such rows out."
                    )
        elif self.num_samples is None and checkable:
            raise ValueError(
                "SampleImportance needs num_samples for this input (it cannot be read from a "
                "tf.data pipeline before training). Pass num_samples=<number of distinct "
                "sample ids> (ids 0..num_samples-1, or the key capacity with "
                "key_mapping='hash')."
            )
        elif self.num_samples is None:
            raise ValueError(
                "SampleImportance needs num_samples for generator / PyDataset inputs. Pass "
                "num_samples=<number of distinct sample ids>."
            )

    def _warn_if_samples_are_coupled(self, model: keras.Model) -> None:
        """Per-sample exactness needs samples that do not interact within a batch."""
        coupled = [
            layer.name for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
        ]
        if coupled and not getattr(self, "_warned_coupled", False):
            self._warned_coupled = True
            warnings.warn(
                f"keras_sie: BatchNormalization in training mode ({', '.join(coupled[:3])}) "
                "couples the samples of a batch (each output depends on the batch mean and "
                "variance). Scores are then row i of d(batch loss)/d(inputs): sample i's "
                "input gradient including its effect on the batch statistics, not the "
                "gradient of its own loss alone. Rankings are usually close, but not exact; "
                "freeze the BatchNormalization layers (trainable=False) for exact scores.",
                UserWarning,
                stacklevel=3,
            )

    def _count_tasks(self, model: keras.Model, fit_args: dict[str, Any]) -> int:
        """Number of outputs to score separately (0 = total loss only)."""
        if self.per_task is False:
            return 0
        n = 0
        try:
            n = len(model.outputs or [])
        except (AttributeError, ValueError):
            n = 0
        if n == 0:  # subclassed: the targets tell how many outputs there are
            y = fit_args.get("y")
            x = fit_args.get("x")
            if y is None and isinstance(x, tf.data.Dataset):
                spec = x.element_spec
                y = spec[1] if isinstance(spec, tuple) and len(spec) >= 2 else None
            n = len(tf.nest.flatten(y)) if y is not None else 0
        if n <= 1:
            if self.per_task:
                warnings.warn("per_task=True: the model has a single output; nothing to split.",
                              stacklevel=3)
            return 0
        return n

    def _raise_no_ids(self, val_has_ids: bool) -> None:
        where = (
            "The validation data carries ids but the training data does not: ids are "
            "needed on the training data. " if val_has_ids else ""
        )
        raise ValueError(
            f"SampleImportance: {where}no {self.id_key!r} entry found in the training inputs, "
            "so scores cannot be tied to samples. Wrap the inputs: "
            "model.fit(keras_sie.with_ids(x), y, ...), use keras_sie.with_ids(dataset) before "
            f"batching, or add an int64 {self.id_key!r} feature to your dict inputs (or pass "
            "the name of yours as id_key=...)."
        )

    def _start_or_resume(self, first_epoch: int) -> None:
        """Decides, at the first epoch of a fit, whether to resume saved epochs."""
        if self._history or self.log_dir is None or not self._is_chief:
            return  # a later fit of this instance: continue in memory
        saved = storage.list_epochs(self.log_dir)
        if not saved:
            return
        if first_epoch == 0:
            # A fresh run into a folder with an old run: replace it, loudly.
            warnings.warn(
                f"keras_sie: {storage.run_dir(self.log_dir)} holds {len(saved)} epoch(s) of an "
                "earlier run; they are replaced by this run.",
                stacklevel=3,
            )
            shutil.rmtree(storage.run_dir(self.log_dir), ignore_errors=True)
            storage.check_writable(self.log_dir)
            return
        # Restarted at epoch > 0 (BackupAndRestore / initial_epoch): resume.
        for e in saved:
            if e >= first_epoch:
                continue
            arrays = storage.read_epoch(self.log_dir, e)
            if arrays["importance"].shape[0] != self.num_samples:
                raise ValueError(
                    f"Cannot resume: saved epoch {e} has {arrays['importance'].shape[0]} "
                    f"samples, this run has num_samples={self.num_samples}."
                )
            self._history[e] = arrays["importance"].astype(np.float32)
            self._visits = arrays["visits"]
            if "keys" in arrays:
                self._keys = arrays["keys"]
        if self._keys is not None and self._buffer is not None:
            self._buffer.restore_keys(self._keys)

    def _report(self, record: int, snap, logs: dict | None) -> None:
        importance = scores_lib.normalize(snap.sums, snap.visits)
        self._history[record] = importance.astype(np.float32)
        self._next_record = record + 1
        self._visits = snap.visits
        if snap.keys is not None:
            self._keys = snap.keys
        names = self._hook.feature_names
        fsums = snap.feature_sums[: len(names)]
        total = float(fsums.sum())
        self._feature_importance = {
            n: (float(s) / total if total > 0 else 0.0) for n, s in zip(names, fsums)
        }
        self._summary = scores_lib.summarize(importance, snap.visits)
        task_scores: dict[str, np.ndarray] = {}
        if snap.task_sums is not None and self._hook.task_names:
            for k, name in enumerate(self._hook.task_names):
                task_scores[name] = scores_lib.normalize(
                    snap.task_sums[:, k], snap.visits).astype(np.float32)
            self._task_history[record] = task_scores
        self._faults = {
            "nonfinite_rows": snap.nonfinite_rows,
            "invalid_id_rows": snap.invalid_rows,
            "dropped_key_rows": snap.dropped_rows,
        }
        if snap.nonfinite_rows:
            warnings.warn(
                f"keras_sie: {snap.nonfinite_rows} training rows had a NaN/Inf input gradient "
                f"in epoch {record}; they were left out of the scores (other samples are "
                "unaffected).",
                RuntimeWarning,
                stacklevel=3,
            )
        if snap.invalid_rows:
            warnings.warn(
                f"keras_sie: skipped {snap.invalid_rows} rows with ids outside "
                f"0..{self.num_samples - 1} in epoch {record} (e.g. id {snap.invalid_example}).",
                RuntimeWarning,
                stacklevel=3,
            )
        if snap.dropped_rows:
            warnings.warn(
                f"keras_sie: the key buffer is full ({self.num_samples} keys); "
                f"{snap.dropped_rows} rows with new keys were not counted in epoch {record}. "
                "Pass a larger num_samples.",
                RuntimeWarning,
                stacklevel=3,
            )
        if logs is not None:
            logs["sie_gini"] = self._summary["gini"]
            logs["sie_top1pct_share"] = self._summary["top1pct_share"]
            logs["sie_ess"] = self._summary["effective_sample_size"]
            logs["sie_entropy"] = self._summary["entropy"]
        if self.log_dir is None or not self._is_chief:
            return
        if self.save_arrays:
            arrays = {
                "importance": importance,
                "sums": snap.sums,
                "visits": snap.visits,
                "feature_sums": fsums,
                "feature_names": np.array(names, dtype=str),
                "summary_names": np.array(list(self._summary), dtype=str),
                "summary_values": np.array(list(self._summary.values()), dtype=np.float64),
            }
            if snap.keys is not None:
                arrays["keys"] = snap.keys
            if task_scores:
                arrays["task_names"] = np.array(list(task_scores), dtype=str)
                arrays["task_importance"] = np.stack(list(task_scores.values()), axis=1)
            storage.write_epoch(self.log_dir, record, arrays)
            storage.write_manifest(
                self.log_dir,
                {
                    "epochs": sorted(self._history),
                    "num_samples": self.num_samples,
                    "id_key": self.id_key,
                    "key_mapping": self._resolved_mapping,
                    "feature_names": names,
                    "aggregate_epochs": self.aggregate_epochs,
                },
            )
        visited = int((snap.visits > 0).sum())
        rows = [
            (key, score, vis, score * visited)
            for key, score, vis in self.top_k(self.top_k_rows, epoch=record)
        ]
        self._writer.write_epoch(
            step=record,
            importance=importance,
            visits=snap.visits,
            summary=self._summary,
            faults=self._faults,
            top_rows=rows,
            feature_shares=self._feature_importance,
            images=self._data_map_images(record, snap.visits),
        )
        if task_scores:
            self._writer.write_tasks(record, task_scores, snap.visits)

    def _data_map_images(self, record: int, visits: np.ndarray) -> dict[str, np.ndarray]:
        """The epoch's data map image; a drawing failure only turns the image off."""
        if not self.data_map:
            return {}
        if self.data_map == "auto":
            # Amortized budget: 2 % of each epoch's wall time may go to drawing.
            started = self._epoch_started
            if started is not None:
                self._map_budget += _DATA_MAP_SHARE * (time.perf_counter() - started)
            if self._map_cost is not None and self._map_budget < self._map_cost:
                return {}
        try:
            t0 = time.perf_counter()
            image = render_data_map(self._history, visits, record)
            self._map_cost = time.perf_counter() - t0
            self._map_budget -= self._map_cost
        except Exception as e:  # a picture must not stop the scores
            if self.strict:
                raise
            self.data_map = False
            warnings.warn(
                f"keras_sie: drawing the data map failed ({type(e).__name__}: {e}); "
                "it is turned off for this run. The scores are unaffected.",
                RuntimeWarning,
                stacklevel=3,
            )
            return {}
        return {} if image is None else {"importance/data_map": image}
