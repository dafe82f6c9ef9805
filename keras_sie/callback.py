"""`SampleImportance`: the Keras callback. Lifecycle only.

* `set_model` (inside `fit`): inspects the fit before any compute
  (`inspection`), creates the device buffer (`buffer`) and installs the fused
  step through the model's step adapter (`adapters`);
* `on_epoch_begin`: zeroes the buffer (and, at a fit's first epoch, decides
  whether to resume a stored run);
* `on_epoch_end`: reads the buffer once, adds the epoch to the record
  (`record`) and reports it (`reporting`);
* `on_train_end`: takes the step off the model.

Anything keras_sie raises after it installed its step first takes the step
off the model again. No batch-level hooks are overridden, so Keras keeps its
asynchronous batch dispatch.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_sie import ids as ids_lib
from keras_sie import inspection, storage, streaming
from keras_sie import scores as scores_lib
from keras_sie import signals as signals_lib
from keras_sie.adapters import Keras2CallbackCompat, adapter_for
from keras_sie.buffer import ImportanceBuffer, StreamRing
from keras_sie.reporting import EpochReporter, StreamReporter
from keras_sie.score_record import EpochScores, ScoreRecord

_KEY_MAPPINGS = ("auto", "index", "hash")
_ON_INVALID = ("raise", "skip")
_SUPPORTED_STRATEGIES = (
    tf.distribute.OneDeviceStrategy,
    tf.distribute.MirroredStrategy,
    tf.distribute.MultiWorkerMirroredStrategy,
)
# Per-fit objects: never copied or pickled (a copy gets fresh ones).
_TRANSIENT = ("_model", "_hook", "_buffer", "_reporter", "_plan", "_adapter", "_stream",
              "_ring")
DEFAULT_STREAM_CAPACITY = 1 << 20  # ring rows: 8 MB of device buffer + the keys held


def _check_strategy(adapter) -> None:
    """Fails before training under a strategy the buffer was not built for."""
    strategy = adapter.strategy
    if isinstance(strategy, _SUPPORTED_STRATEGIES) or adapter.is_default_strategy():
        return
    raise NotImplementedError(
        f"SampleImportance does not support {type(strategy).__name__}. Supported: no "
        "strategy (one device), OneDeviceStrategy, MirroredStrategy (several GPUs or "
        "CPUs of one machine) and MultiWorkerMirroredStrategy (several machines). "
        "(Keras 3's `model.fit` has no ParameterServerStrategy support either.) Train "
        "under one of these, or remove the callback."
    )


def _is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    cluster = resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and "chief" not in cluster


class SampleImportance(keras.callbacks.Callback, Keras2CallbackCompat):
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

    Calling `fit` again with the same callback continues the record: record
    numbers are contiguous (0, 1, 2, ... in the order epochs finished, whatever
    `initial_epoch` says), and each record keeps the epoch number Keras gave
    it (`record.epoch(n).keras_epoch`). A new callback whose `fit` starts at
    `initial_epoch=k > 0` with a run already under `log_dir` (a restarted job)
    resumes that run's first k records. One model takes one
    `SampleImportance` per `fit`. The callback can be deep-copied and
    pickled (as KerasTuner does for every trial): a copy is independent and
    works on its own.

    Scores are exact when samples do not interact within a batch. Before
    training, the callback checks that numerically on the first batch (any
    cause: BatchNormalization in training mode, in-batch negatives, layers or
    losses that mix rows) and warns with what the scores then mean.

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
            int64 or string keys, mapped to slots in first-come order by a
            host-side table before the compiled step, so it works under
            `jit_compile=True`, `MirroredStrategy` and, for int64 keys,
            `MultiWorkerMirroredStrategy`) or `"auto"` (hash for string ids,
            else index).
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
        signals: Training-dynamics signals to record in the same step, by
            name: `"loss"` (the sample's own loss, before sample weights),
            `"el2n"`, `"margin"`, `"confidence"` (also gives
            `"confidence_std"`) and `"forgetting"`; read them with
            `signal(name)`. The input-gradient score is always recorded.
            The last four need a single classification output (sparse or
            one-hot softmax, or one sigmoid); others are refused before
            training. Each adds 4-8 bytes per sample of device memory
            (docs/usage.md). Defaults to `()`.
        stream: Streaming mode for single-pass or very large runs: each
            visit's raw score goes to a device ring of `stream_capacity` rows,
            written as Parquet shards under
            `<log_dir>/keras_sie/stream/epoch=E/` whenever the ring fills and
            at epoch end (needs `log_dir` and pyarrow; docs/streaming.md).
            Device memory is the ring's, whatever the number of samples;
            `num_samples` is then only the id range to check (index ids) and
            is not needed for hash keys. Scores are read back with
            `keras_sie.load(log_dir)` (or DuckDB / Spark at any size); the
            live properties (`importance`, `top_k`, ...) read the same files.
            Not with `signals=`, `per_task=True`, ranked lists or tf_keras.
            Defaults to False.
        stream_capacity: Rows of the ring, one per visit: 8 bytes each in
            the device buffer, plus the batches' key tensors, held (not
            copied) until the flush. Defaults to 2^20.

    Example:

    ```python
    sie = keras_sie.SampleImportance(log_dir="logs")
    x_ids = keras_sie.with_ids(x_train)
    model.fit(x_ids, y_train, epochs=3, callbacks=[sie])
    print(sie.top_k(10))              # [(id, importance, visits), ...]
    scores = sie.importance           # numpy [num_samples], latest epoch
    model.evaluate(keras_sie.without_ids(x_ids), y_train)  # ids off for evaluate
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
        signals: Sequence[str] = (),
        stream: bool = False,
        stream_capacity: int | None = None,
    ):
        super().__init__()
        signals = signals_lib.check_requested(signals, None, 1)
        if stream_capacity is not None and (
            not isinstance(stream_capacity, (int, np.integer)) or stream_capacity <= 0
        ):
            raise ValueError(f"stream_capacity must be a positive int, got {stream_capacity!r}.")
        if stream_capacity is not None and not stream:
            raise ValueError("stream_capacity is the ring size of stream=True; pass stream=True "
                             "or leave stream_capacity out.")
        if stream:
            if log_dir is None:
                raise ValueError("stream=True writes Parquet shards under log_dir; pass a log_dir.")
            if signals:
                raise ValueError("stream=True records the input-gradient score only; remove "
                                 "signals= or use stream=False.")
            if per_task:
                raise ValueError("stream=True records the total-loss score only; remove "
                                 "per_task=True or use stream=False.")
        if key_mapping not in _KEY_MAPPINGS:
            raise ValueError(f"key_mapping must be one of {_KEY_MAPPINGS}, got {key_mapping!r}.")
        if on_invalid_id not in _ON_INVALID:
            raise ValueError(f"on_invalid_id must be one of {_ON_INVALID}, got {on_invalid_id!r}.")
        if num_samples is not None and (
            not isinstance(num_samples, (int, np.integer)) or num_samples <= 0
        ):
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
        if aggregate_epochs is not None and (
            not isinstance(aggregate_epochs, (int, np.integer)) or aggregate_epochs < 1
        ):
            raise ValueError(
                f"aggregate_epochs must be a positive int or None, got {aggregate_epochs!r}."
            )
        if data_map not in (True, False, "auto"):
            raise ValueError(f"data_map must be True, False or 'auto', got {data_map!r}.")
        self.log_dir = os.fspath(log_dir) if log_dir is not None else None
        self.num_samples = int(num_samples) if num_samples is not None else None
        self.id_key = id_key
        self.features = features
        self.top_k_rows = int(top_k)
        self.key_mapping = key_mapping
        self.on_invalid_id = on_invalid_id
        self.save_arrays = save_arrays
        self.per_task = per_task
        self.aggregate_epochs = aggregate_epochs
        self.strict = strict
        self.verbose = verbose
        self.data_map = data_map
        self.signals = signals
        self.stream = bool(stream)
        self.stream_capacity = (int(stream_capacity) if stream_capacity is not None
                                else DEFAULT_STREAM_CAPACITY) if stream else 0
        self._record: ScoreRecord | None = None
        self._warned_coupled = False
        self._reset_transient()

    def _reset_transient(self) -> None:
        self._adapter = None
        self._hook = None  # the adapter's step hook while a fit runs
        self._buffer: ImportanceBuffer | None = None
        self._plan: inspection.FitPlan | None = None
        self._reporter = EpochReporter(
            self.log_dir, save_arrays=self.save_arrays, top_k=self.top_k_rows,
            data_map=self.data_map, strict=self.strict,
        )
        self._in_fit = False
        self._first_epoch_of_fit = True
        self._is_chief = True
        self._epoch_started: float | None = None
        self._stream: StreamReporter | None = None  # streaming mode: shards and TensorBoard
        self._ring: StreamRing | None = None

    # Streaming runs keep their scores on disk: the record is read from there
    # when asked for after an epoch wrote new shards.
    @property
    def _record(self) -> ScoreRecord | None:
        if self.__dict__.get("_stream_unread"):
            self.__dict__["_stream_unread"] = False
            try:
                self.__dict__["_record_value"] = streaming.load_stream(self.log_dir)
            except Exception:
                if self.strict:
                    raise  # the last good record stays otherwise
        return self.__dict__.get("_record_value")

    @_record.setter
    def _record(self, value: ScoreRecord | None) -> None:
        self.__dict__["_stream_unread"] = False
        self.__dict__["_record_value"] = value

    # ---------------------------------------------------- copy and pickle
    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in _TRANSIENT}
        state["_model"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_transient()
        self._model = None

    def __deepcopy__(self, memo: dict) -> SampleImportance:
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    # ------------------------------------------------------------ public API
    @property
    def record(self) -> ScoreRecord | None:
        """The scores recorded so far (`keras_sie.ScoreRecord`), or None before any epoch.

        The same class `keras_sie.load(log_dir)` returns, with the same names.
        """
        return self._record

    @property
    def epochs(self) -> list[int]:
        """Record numbers, in order (see `ScoreRecord.epochs`)."""
        return self._record.epochs if self._record else []

    @property
    def importance(self) -> np.ndarray | None:
        """Normalized importance of the latest epoch (numpy [num_samples]), or None."""
        return self._record.importance if self._record else None

    @property
    def history(self) -> dict[int, np.ndarray]:
        """Importance of every recorded epoch, keyed by record number."""
        return self._record.history if self._record else {}

    @property
    def aggregate(self) -> np.ndarray | None:
        """Mean importance over the first `aggregate_epochs` epochs, renormalized."""
        return self._record.aggregate if self._record else None

    @property
    def visits(self) -> np.ndarray | None:
        """Visits per sample in the latest epoch."""
        return self._record.visits if self._record else None

    @property
    def keys(self) -> np.ndarray | None:
        """Key of every slot: 0..N-1 for index ids, the original keys in hash mode."""
        return self._record.keys if self._record else None

    @property
    def feature_importance(self) -> dict[str, float]:
        """Latest epoch's share of sum_i |g_ij| per feature group."""
        return self._record.feature_importance if self._record else {}

    @property
    def summary(self) -> dict[str, float]:
        """Latest epoch's summary scalars (gini, top1pct_share, ...)."""
        return self._record.summary if self._record else {}

    @property
    def faults(self) -> dict[str, int]:
        """Latest epoch's counted faults (rows left out, skipped steps, ...)."""
        return self._record.faults if self._record else {}

    @property
    def task_importance(self) -> dict[str, np.ndarray]:
        """Latest epoch's importance per output of a multi-output model ({} otherwise)."""
        return self._record.task_importance if self._record else {}

    # ------------------------------------------------ ranked lists (issue 15)
    @property
    def queries(self) -> ScoreRecord | None:
        """Ranked lists with query ids: per-query scores (see `ScoreRecord.queries`)."""
        return self._record.queries if self._record else None

    @property
    def query_importance(self) -> np.ndarray | None:
        """Ranked lists: normalized per-query importance of the latest epoch, or None."""
        return self._record.query_importance if self._record else None

    def top_pairs(self, k: int = 10, *, largest: bool = True,
                  epoch: int | str | None = None) -> list[tuple]:
        """Ranked lists: `(query, item, importance, visits)` rows (see `ScoreRecord.top_pairs`)."""
        return self._record.top_pairs(k, largest=largest, epoch=epoch) if self._record else []

    def _list_fields(self, snap, names, keras_epoch: int) -> dict:
        """Ranked lists: the EpochScores fields of the per-query record and item queries."""
        if not self._plan.list_size:
            return {}
        from keras_sie.score_record import query_epoch_scores

        queries = (query_epoch_scores(snap.queries, names, int(keras_epoch))
                   if snap.queries is not None else None)
        return {"queries": queries, "item_query": snap.item_query,
                "list_size": self._plan.list_size}

    def _report_lists(self, number: int) -> None:
        """Ranked lists: TensorBoard (query, item) table and per-query histogram."""
        if self._plan.list_size and self.log_dir and not self._reporter.disabled:
            from keras_sie import summaries

            summaries.write_ranking(self.log_dir, self._record, number, self.top_k_rows)

    def signal(self, name: str, *, epoch: int | str | None = None) -> np.ndarray:
        """One training-dynamics signal per sample (see `ScoreRecord.signal`).

        Args:
            name: A signal requested with `signals=` (`"loss"`, `"el2n"`,
                `"margin"`, `"confidence"`, `"forgetting"`) or
                `"confidence_std"`.
            epoch: Record number, None for the latest, or `"aggregate"`.
                Defaults to None.

        Returns:
            numpy [num_samples], in the slot order of `importance`.
        """
        if self._record is None:
            raise ValueError("No epoch has been recorded yet: call fit with this callback.")
        return self._record.signal(name, epoch=epoch)

    def top_k(
        self, k: int = 10, *, largest: bool = True, epoch: int | str | None = None
    ) -> list[tuple]:
        """The k most (or least) important visited samples (see `ScoreRecord.top_k`).

        Args:
            k: Number of samples. Defaults to 10.
            largest: True for the most important, False for the least.
                Defaults to True.
            epoch: Record number, None for the latest, or `"aggregate"`.
                Defaults to None.

        Returns:
            A list of `(key, importance, visits)`, most extreme first.
        """
        return self._record.top_k(k, largest=largest, epoch=epoch) if self._record else []

    # ------------------------------------------------------------- lifecycle
    @contextlib.contextmanager
    def _restoring_on_error(self):
        """Anything raised here leaves the model as keras_sie found it."""
        try:
            yield
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self._hook is not None:
            self._hook.uninstall()
        elif self._adapter is not None:
            self._adapter.restore()
        self._hook = None
        self._buffer = None
        self._in_fit = False
        with contextlib.suppress(Exception):  # the error being raised matters more
            if self._stream is not None:
                self._stream.close()
            self._reporter.close()

    def set_model(self, model: keras.Model) -> None:
        super().set_model(model)
        adapter = adapter_for(model)
        fit_locals = adapter.fit_locals()
        self._in_fit = fit_locals is not None
        if not self._in_fit:
            return  # evaluate / predict: nothing to record
        self._adapter = adapter
        with self._restoring_on_error():
            adapter.check_supported()
            _check_strategy(adapter)
            others = [
                cb for cb in adapter.fit_callbacks(fit_locals)
                if isinstance(cb, SampleImportance) and cb is not self
            ]
            if others:
                raise ValueError(
                    f"keras_sie: this fit has {len(others) + 1} SampleImportance callbacks; one "
                    "model can feed only one (they would share the model's train step). Pass a "
                    "single SampleImportance to fit."
                )
            config = inspection.FitConfig(
                id_key=self.id_key, num_samples=self.num_samples, key_mapping=self.key_mapping,
                on_invalid_id=self.on_invalid_id, features=inspection.listed(self.features),
                per_task=self.per_task, signals=self.signals,
                stream_capacity=self.stream_capacity,
            )
            plan = inspection.inspect_fit(config, adapter, fit_locals)
            adapter.check_key_mapping(plan)
            if self._record is not None and self._record.num_samples != plan.num_samples:
                raise ValueError(
                    f"keras_sie: this callback recorded {self._record.num_samples} samples in "
                    f"an earlier fit; this fit has num_samples={plan.num_samples}. Use a new "
                    "SampleImportance for different data."
                )
            self._plan = plan
            self._buffer = self._make_buffer(adapter, plan)
            if self.stream:
                self._start_stream(plan)
            if not self._warned_coupled:
                self._check_coupling(adapter, plan)
            self._hook = adapter.step_hook(self._buffer, plan.step, owner=self, stream=self._ring)
            self._hook.install()

    def _start_stream(self, plan: inspection.FitPlan) -> None:
        """Streaming mode: the shard writer (fails here without pyarrow) and the ring."""
        if self._record is None and storage.list_epochs(self.log_dir):
            self._reporter.replace_old_run()  # a normal run there: replaced, loudly
        manifest = {
            "key_mapping": plan.mapping, "num_samples": plan.num_samples or None,
            "key_dtype": "string" if plan.key_dtype == tf.string else "int64",
            "id_key": self.id_key, "stream_capacity": self.stream_capacity,
            "feature_names": list(plan.feature_names),
        }
        self._reporter.prepare()
        self._stream = StreamReporter(self._reporter, manifest, plan.num_samples,
                                      top_k=self.top_k_rows)
        self._ring = StreamRing(self._buffer, self._stream.rows)

    def _make_buffer(self, adapter, plan: inspection.FitPlan) -> ImportanceBuffer:
        if self.stream:  # the ring: one row per visit, positions as ids
            with adapter.strategy.scope():
                return ImportanceBuffer(self.stream_capacity, "index", ring=True)
        with adapter.strategy.scope():
            buffer = ImportanceBuffer(
                plan.num_samples, plan.mapping, plan.key_dtype, num_tasks=len(plan.task_names),
                signals=plan.step.signals,
            )
        self._restore_state(buffer, self._record)
        return buffer

    @staticmethod
    def _restore_state(buffer: ImportanceBuffer, record: ScoreRecord | None) -> None:
        """Carries hash keys and forgetting flags over from earlier epochs."""
        if record is None or not len(record):
            return
        if record._keys is not None:
            buffer.restore_keys(record._keys)  # keys keep their slots across fits
        buffer.restore_forgetting(record.epoch().last_correct)

    def _check_coupling(self, adapter, plan: inspection.FitPlan) -> None:
        try:
            found = inspection.check_coupling(adapter, plan)
        except Exception as e:  # our own diagnostic must not stop training
            if self.strict:
                raise
            warnings.warn(
                f"keras_sie: the batch-coupling check could not run ({type(e).__name__}: {e}); "
                "scores assume samples do not interact within a batch.",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        if found:
            self._warned_coupled = True
            warnings.warn(inspection.coupling_warning(found), UserWarning, stacklevel=3)

    def on_train_begin(self, logs=None) -> None:
        if not self._in_fit:
            return
        with self._restoring_on_error():
            self._is_chief = _is_chief(self._adapter.strategy)
            if self._is_chief:
                self._reporter.prepare()
            self._first_epoch_of_fit = True

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        if not self._in_fit:
            return
        with self._restoring_on_error():
            self._epoch_started = time.perf_counter()
            if self.stream:
                if self._first_epoch_of_fit:
                    # Record numbers go on across fits of this callback (a
                    # second fit from epoch 0 must not land on the first's).
                    self._first_epoch_of_fit = False
                    done = self.__dict__.setdefault("_stream_numbers", [])
                    self._stream_offset = max(done) + 1 - epoch if done else 0
                    self._stream.start_fit(epoch + self._stream_offset)
                self._ring.begin_epoch()
                self._stream.begin_epoch(epoch + self._stream_offset, epoch + self._stream_offset)
                self._buffer.reset()
                return
            if self._first_epoch_of_fit:
                self._first_epoch_of_fit = False
                self._start_or_resume(epoch)
            self._buffer.reset()

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if not self._in_fit:
            return
        if self.stream:
            self._end_stream_epoch(epoch, logs)
            return
        with self._restoring_on_error():
            snap = self._buffer.read()
            # Keras returns no metrics for an epoch that saw no batch.
            trained = logs is None or any(not str(k).startswith("sie_") for k in logs)
            self._check_epoch(snap, trained)
        number = self._record.next_number
        # The scores are kept in memory even after a reporting fault turned
        # the files off; a fault warns once (strict=True raises).
        with self._restoring_on_error(), self._reporter.fail_open(number):
            self._add_epoch(number, epoch, snap)
            summary = self._record.epoch(number).summary
            if logs is not None:
                logs["sie_gini"] = summary["gini"]
                logs["sie_top1pct_share"] = summary["top1pct_share"]
                logs["sie_ess"] = summary["effective_sample_size"]
                logs["sie_entropy"] = summary["entropy"]
        if self._is_chief and not self._reporter.disabled and number in self._record.epochs:
            with self._restoring_on_error(), self._reporter.fail_open(number):
                seconds = (time.perf_counter() - self._epoch_started
                           if self._epoch_started is not None else None)
                self._reporter.report(self._record, number, seconds, {
                    "id_key": self.id_key, "key_mapping": self._plan.mapping,
                })
                self._report_lists(number)

    def _end_stream_epoch(self, epoch: int, logs) -> None:
        """Streaming mode: last flush, checks, the epoch's summary file and tags."""
        stream = self._stream
        with self._restoring_on_error():
            self._ring.flush()
            snap = self._buffer.read()
            trained = logs is None or any(not str(k).startswith("sie_") for k in logs)
            self._check_epoch(snap, trained)
            if stream.invalid_rows and self.on_invalid_id == "raise":
                raise ValueError(
                    f"SampleImportance: {stream.invalid_rows} training rows had a sample id "
                    f"outside 0..{self._plan.num_samples - 1} (e.g. id "
                    f"{stream.invalid_example}); they were not written. Fix the ids, pass a "
                    "larger num_samples, use key_mapping='hash' for arbitrary keys, or "
                    "on_invalid_id='skip' to leave such rows out."
                )
        stream.end_epoch(snap, inspection.feature_names_for(self._plan, snap.num_groups),
                         int(epoch), self._ring.seconds_flushing)
        self.__dict__["_stream_unread"] = True
        self._stream_numbers.append(epoch + self._stream_offset)
        if stream.invalid_rows:  # on_invalid_id="skip"
            warnings.warn(
                f"keras_sie: skipped {stream.invalid_rows} rows with ids outside "
                f"0..{self._plan.num_samples - 1} in epoch {epoch} (e.g. id "
                f"{stream.invalid_example}).",
                RuntimeWarning, stacklevel=3,
            )
        if snap.nonfinite_rows:
            warnings.warn(
                f"keras_sie: {snap.nonfinite_rows} training rows had a NaN/Inf input gradient "
                f"in epoch {epoch}; they were not written (other rows are unaffected).",
                RuntimeWarning, stacklevel=3,
            )

    def on_train_end(self, logs=None) -> None:
        if not self._in_fit:
            return
        self._hook.uninstall()
        self._hook = None
        self._in_fit = False
        if self._stream is not None:
            self._stream.close()
        self._reporter.close()
        if self.verbose and self.log_dir and self._record and self._is_chief:
            print(
                f"keras_sie: {len(self._record)} epoch(s) of sample importance in "
                f"{storage.run_dir(self.log_dir)}  ->  tensorboard --logdir {self.log_dir}"
            )

    # ------------------------------------------------------------- internals
    def _new_record(self) -> ScoreRecord:
        return ScoreRecord(
            self._plan.num_samples, aggregate_epochs=self.aggregate_epochs,
            id_key=self.id_key, key_mapping=self._plan.mapping, log_dir=self.log_dir,
        )

    def _start_or_resume(self, first_epoch: int) -> None:
        """At a fit's first epoch: continue in memory, resume from disk, or start."""
        if self._record is not None:
            return  # a later fit of this callback continues its record
        self._record = self._new_record()
        if self.log_dir is None or not self._is_chief:
            return
        if first_epoch == 0:
            self._reporter.replace_old_run()
            return
        saved = self._reporter.saved_record()
        if saved is None:
            return
        # Restarted at epoch k > 0 (BackupAndRestore / initial_epoch): resume
        # the records of Keras epochs before k.
        if saved.num_samples != self._plan.num_samples:
            raise ValueError(
                f"Cannot resume: the run in {storage.run_dir(self.log_dir)} has "
                f"{saved.num_samples} samples, this run has num_samples="
                f"{self._plan.num_samples}. Use another log_dir, or start at epoch 0."
            )
        keep = 0
        for e in saved.epochs:
            keras_epoch = saved.epoch(e).keras_epoch
            if e != keep or (keras_epoch if keras_epoch is not None else e) >= first_epoch:
                break
            self._record.add(e, saved.epoch(e))
            keep += 1
        self._reporter.drop_files_from(keep)
        if saved._keys is not None:
            self._record._keys = saved._keys
        self._restore_state(self._buffer, self._record)

    def _check_epoch(self, snap, trained: bool) -> None:
        """Configuration/data errors found at epoch end: raised, never swallowed."""
        if snap.steps == 0 and trained:  # Keras trained, but not through our step
            if self._hook is not None and not self._hook.fused:
                raise RuntimeError(
                    "SampleImportance recorded nothing this epoch: the model overrides "
                    "`train_step`, so the fused step could not be installed. Call "
                    "`keras_sie.record(self, ids, input_gradients)` inside your train_step "
                    "(see its docstring), or remove the callback."
                )
            raise RuntimeError(
                "SampleImportance recorded nothing this epoch although its step was installed: "
                "Keras did not run keras_sie's train step (another callback or library "
                "replaced the model's train step or train function, or this Keras version "
                f"dispatches steps differently; keras_sie supports {self._supported()}). No "
                "scores were saved."
            )
        # The worst id sees every row, also one counted as non-finite (a NaN
        # gradient wins over an unknown id), so it refuses bad ids on its own.
        bad_ids = snap.invalid_rows or (not self._plan.list_size
                                        and snap.invalid_example is not None)
        if bad_ids and self.on_invalid_id == "raise":
            raise ValueError(
                f"SampleImportance: {snap.invalid_rows or 'some'} training rows had a sample "
                "id outside "
                f"0..{self._plan.num_samples - 1} (e.g. id {snap.invalid_example}); the buffer "
                f"holds num_samples={self._plan.num_samples}. Fix the ids, pass a larger "
                "num_samples, use key_mapping='hash' for arbitrary keys, or "
                "on_invalid_id='skip' to leave such rows out (they are counted and logged)."
            )

    def _supported(self) -> str:
        from keras_sie.adapters.keras3 import SUPPORTED

        return getattr(self._adapter, "supported", SUPPORTED)

    def _add_epoch(self, number: int, keras_epoch: int, snap) -> None:
        importance = scores_lib.normalize(snap.sums, snap.visits).astype(np.float32)
        names = inspection.feature_names_for(self._plan, snap.num_groups)
        tasks = {}
        if snap.task_sums is not None:
            for k, name in enumerate(self._plan.task_names):
                tasks[name] = scores_lib.normalize(
                    snap.task_sums[:, k], snap.visits).astype(np.float32)
        faults = {
            "nonfinite_rows": snap.nonfinite_rows,
            "invalid_id_rows": snap.invalid_rows,
            "dropped_key_rows": snap.dropped_rows,
            "skipped_steps": snap.skipped_steps,
        }
        self._record.add(number, EpochScores(
            importance=importance,
            visits=snap.visits,
            sums=snap.sums,
            feature_names=tuple(names),
            feature_sums=snap.feature_sums[: len(names)],
            summary=scores_lib.summarize(importance, snap.visits),
            faults=faults,
            task_importance=tasks,
            keras_epoch=int(keras_epoch),
            signal_sums=snap.signal_sums,
            last_correct=self._buffer.last_correct_flags(),
            **self._list_fields(snap, names, keras_epoch),
        ), keys=snap.keys)
        if snap.nonfinite_rows:
            warnings.warn(
                f"keras_sie: {snap.nonfinite_rows} training rows had a NaN/Inf input gradient "
                f"in record {number}; they were left out of the scores (other samples are "
                "unaffected).",
                RuntimeWarning,
                stacklevel=3,
            )
        if snap.invalid_rows:
            warnings.warn(
                f"keras_sie: skipped {snap.invalid_rows} rows with ids outside "
                f"0..{self._plan.num_samples - 1} in record {number} (e.g. id "
                f"{snap.invalid_example}).",
                RuntimeWarning,
                stacklevel=3,
            )
        if snap.dropped_rows:
            warnings.warn(
                f"keras_sie: the key buffer is full ({self._plan.num_samples} keys); "
                f"{snap.dropped_rows} rows with new keys were not counted in record {number}. "
                "Pass a larger num_samples.",
                RuntimeWarning,
                stacklevel=3,
            )
