"""The device-resident accumulator: per-sample sums and visit counts.

Everything here runs inside the compiled train step. The variables are
`ON_READ`/`SUM` (the way Keras metrics hold per-replica state): under a
distribution strategy each replica adds into its own copy with a raw resource
scatter on the replica-local handle, and a cross-replica read sums the copies.
Rows of different replicas are disjoint samples, so the sum is exact.

Scatter ops drop out-of-range indices silently on GPU and under XLA, so ids are
range-checked here: bad rows are masked out of the scatter and counted into a
variable that the host reads once per epoch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from keras_sie.signals import BYTES_PER_SAMPLE

# Per-feature sums are kept in a fixed-size vector so that the feature list can
# be discovered while the step is traced (after the variables exist).
MAX_FEATURE_GROUPS = 256

_ON_READ = tf.VariableSynchronization.ON_READ
# Per-epoch counters, in the order of the buffer's `counters` variable.
# The first four count rows by class: counted, then one per dump row (see
# `ImportanceBuffer.accumulate`), so a row's class is its dump row - (N - 1).
_COUNTERS = ("counted_rows", "unknown_rows", "nonfinite_rows", "ignored_rows", "steps",
             "skipped_steps", "group_steps")
_COUNTER = {name: i for i, name in enumerate(_COUNTERS)}  # position in `counters`
# Dump rows past the N samples of every per-sample variable: offsets from N.
_UNKNOWN, _NONFINITE, _IGNORED = 0, 1, 2
_DUMP_ROWS = 3
# `id_worst` holds max over rows of id XOR _SIGN: that order puts 0..N-1 first,
# then ids >= N, then negative ids, so the maximum is an id outside 0..N-1 as
# soon as one was seen. Its initial value decodes to id 0 (no bad id).
_SIGN = np.iinfo(np.int64).min
_SUM = tf.VariableAggregation.SUM


def _replica_variable(name: str, shape, dtype, initial=0) -> tf.Variable:
    return tf.Variable(
        tf.fill(shape, tf.constant(initial, dtype)) if shape else tf.constant(initial, dtype),
        trainable=False,
        name=name,
        dtype=dtype,
        synchronization=_ON_READ,
        aggregation=_SUM,
    )


def _first_replica_variable(name: str, shape, dtype, initial=0) -> tf.Variable:
    """State every replica updates identically; read from the first replica."""
    return tf.Variable(
        tf.fill(shape, tf.constant(initial, dtype)),
        trainable=False,
        name=name,
        dtype=dtype,
        synchronization=_ON_READ,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )


def _scatter_add(var: tf.Variable, indices: tf.Tensor, updates: tf.Tensor) -> None:
    # Raw op on the (replica-local) handle: the high-level scatter methods of
    # sync-on-read variables raise in replica context. Duplicates add up.
    tf.raw_ops.ResourceScatterAdd(resource=var.handle, indices=indices, updates=updates)


def _assign_add(var: tf.Variable, value: tf.Tensor) -> None:
    tf.raw_ops.AssignAddVariableOp(resource=var.handle, value=tf.cast(value, var.dtype))


def _read(var: tf.Variable) -> np.ndarray:
    return np.asarray(var.read_value())


def _local_variables(var: tf.Variable, strategy=None) -> list:
    strategy = strategy or tf.distribute.get_strategy()
    try:
        return list(strategy.experimental_local_results(var))
    except Exception:  # noqa: BLE001 - not a distributed variable
        return [var]


def _local_values(var: tf.Variable, strategy=None) -> list[np.ndarray]:
    return [np.asarray(v.read_value() if hasattr(v, "read_value") else v)
            for v in _local_variables(var, strategy)]


@dataclasses.dataclass
class BufferSnapshot:
    """What the host reads from the device once per epoch."""

    sums: np.ndarray  # float32 [num_samples]: sum over visits of sum_j |g_ij|
    visits: np.ndarray  # int32 [num_samples]
    feature_sums: np.ndarray  # float64 [num_features]
    invalid_rows: int  # rows whose id fell outside the buffer (index mode)
    invalid_example: int | None  # one offending id, for the error message
    nonfinite_rows: int  # rows with a NaN/Inf gradient, excluded
    dropped_rows: int  # rows with a new key after capacity was reached (hash mode)
    keys: np.ndarray | None  # original keys by slot (hash mode), else None
    task_sums: np.ndarray | None = None  # float32 [num_samples, num_tasks] (multi-output)
    queries: BufferSnapshot | None = None  # ranked lists: the per-query buffer's snapshot
    item_query: np.ndarray | None = None  # ranked lists: int64 [num_samples], -1 unknown
    signal_sums: dict = dataclasses.field(default_factory=dict)  # name -> float32 [N] sums
    steps: int = 0  # steps that reached the buffer this epoch (all replicas)
    skipped_steps: int = 0  # steps the loss-scale optimizer skipped (overflow)
    num_groups: int = 0  # feature groups the step reported


class ImportanceBuffer:
    """Per-sample importance accumulators on the device.

    Args:
        num_samples: Buffer length (index mode: ids 0..num_samples-1; hash
            mode: the number of distinct keys it can hold).
        key_mapping: `"index"` (ids are slots) or `"hash"` (arbitrary int64 or
            string keys mapped to slots as they arrive).
        key_dtype: `tf.int64` or `tf.string` for hash mode.
        num_tasks: Outputs scored separately (multi-output models).
        signals: Training-dynamics signals to record (`keras_sie.signals`).
        ring: The buffer is a `StreamRing`'s, whose rows are zeroed at every
            flush: it then adds up the per-group sums in the step even for a
            single group (otherwise one group's sum is read off the rows).
    """

    def __init__(
        self,
        num_samples: int,
        key_mapping: str = "index",
        key_dtype=tf.int64,
        num_tasks: int = 0,
        signals: Sequence[str] = (),
        ring: bool = False,
    ):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}.")
        self.num_samples = int(num_samples)
        self.ring = bool(ring)
        self.key_mapping = key_mapping
        # The strategy whose scope created the variables: per-replica reads use it.
        self.strategy = tf.distribute.get_strategy()
        self.key_dtype = key_dtype
        n = self.num_samples
        # Column 0: sum over visits of sum_j |g_ij|; column 1: visits (a float
        # count is exact below 2^24 visits of one sample in one epoch). One
        # variable, so each step scatters once. Every per-sample variable has
        # _DUMP_ROWS rows past the samples for rows that must not count.
        rows = n + _DUMP_ROWS
        self.sums_visits = _replica_variable("sie_sums_visits", [rows, 2], tf.float32)
        self.feature_sums = _replica_variable("sie_feature_sums", [MAX_FEATURE_GROUPS], tf.float32)
        # Per-epoch counters (see _COUNTERS): rows by class, steps, feature groups.
        self.counters = _replica_variable("sie_counters", [len(_COUNTERS)], tf.int64)
        # The epoch's "worst" id per replica (see _SIGN; one scatter-max of the
        # batch): any id outside 0..N-1 makes it one, so it refuses bad ids
        # even on rows counted as non-finite, and names one in the error.
        self.id_worst = _replica_variable("sie_id_worst", [1], tf.int64, _SIGN)
        # Per-output (task) sums of multi-output models: [num_samples, num_tasks].
        self.num_tasks = int(num_tasks)
        self.task_sums = (
            _replica_variable("sie_task_sums", [rows, self.num_tasks], tf.float32)
            if self.num_tasks else None
        )
        # Training-dynamics signals (keras_sie.signals). The float32 per-epoch
        # sums (loss, el2n, margin, forgetting events) are extra columns of
        # `sums_visits`, so the score and every signal share one scatter per
        # step; the confidence sums are one float64 [N, 2] variable (its
        # variance is a difference of sums). Forgetting keeps a persistent
        # last-correct flag per sample (slot N is a dump for rows that must
        # not write); every replica applies the whole global batch to it, so
        # its copies stay identical (ONLY_FIRST_REPLICA), and only replica 0
        # counts the events.
        self.signals = tuple(signals)
        self.columns = ("sum", "visits") + tuple(
            name for name in ("loss", "el2n", "margin", "forgetting") if name in self.signals
        )
        if len(self.columns) > 2:
            self.sums_visits = _replica_variable("sie_sums_visits", [rows, len(self.columns)],
                                                 tf.float32)
        self.confidence_sums = None
        if "confidence" in self.signals:
            self.confidence_sums = _replica_variable("sie_confidence_sums", [rows, 2], tf.float64)
        self.last_correct = None
        if "forgetting" in self.signals:
            self.last_correct = _first_replica_variable("sie_last_correct", [n + 1], tf.int32, -1)
        # Ranked lists (`attach_queries`): the per-query buffer and each item's query.
        self.queries: ImportanceBuffer | None = None
        self.item_query = None
        self.table = None
        if key_mapping == "hash":
            # Keys persist across epochs (a slot keeps its key for the whole run).
            # Slots are handed out 0, 1, 2, ..., so the table's size is the
            # next free slot. It lives on the host and is used outside the
            # compiled step (`slots_for_keys`).
            with tf.device("/cpu:0"):
                self.table = tf.lookup.experimental.MutableHashTable(
                    key_dtype=key_dtype, value_dtype=tf.int64, default_value=-1
                )

    def attach_queries(self, num_queries: int) -> ImportanceBuffer:
        """Ranked lists: adds a per-query buffer and each item's query id (call in scope).

        The query buffer accumulates list-level scores (`StepHook` in list
        mode); `item_query` keeps, per item slot, the query it was seen in
        (a scatter-max; -1 before its first visit), persisting across epochs.
        """
        if self.queries is None:
            self.queries = ImportanceBuffer(num_queries)
            self.item_query = _replica_variable("sie_item_query", [self.num_samples], tf.int64, -1)
        return self.queries

    @property
    def nbytes(self) -> int:
        """Device bytes of the per-sample buffers (excluding a hash table)."""
        per_sample = 4 + 4 + 4 * self.num_tasks + sum(BYTES_PER_SAMPLE[s] for s in self.signals)
        total = ((self.num_samples + _DUMP_ROWS) * per_sample + MAX_FEATURE_GROUPS * 4
                 + (len(_COUNTERS) + 2) * 8)
        if self.queries is not None:
            total += self.queries.nbytes + 8 * self.num_samples
        return total

    @property
    def variables(self) -> list[tf.Variable]:
        """Every device variable of the buffer (for memory accounting and placement)."""
        out = [self.sums_visits, self.feature_sums, self.counters, self.id_worst]
        out += [v for v in (self.task_sums, self.last_correct, self.confidence_sums)
                if v is not None]
        if self.queries is not None:
            out += [self.item_query] + self.queries.variables
        return out

    # ----------------------------------------------------------------- in-step
    def slots_for_keys(self, keys: tf.Tensor) -> tf.Tensor:
        """Maps hash keys to slots, giving new keys the next free slots (hash mode).

        Runs outside the compiled step (the table is a host-side
        `tf.lookup` resource that neither XLA nor per-replica code can
        share), on the whole global batch at once: new keys get slots in the
        order they first appear, so every run of the same data assigns the
        same slots. Keys that arrive after the buffer is full get -1.

        Args:
            keys: [n] int64 or string keys.

        Returns:
            int64 [n] slots, -1 for keys that found no room.
        """
        keys = tf.reshape(tf.cast(keys, self.key_dtype) if self.key_dtype != tf.string
                          else keys, [-1])
        slots = tf.reshape(self.table.lookup(keys), [-1])
        missing = tf.where(slots < 0)  # [m, 1] rows with a key the table lacks
        new_keys, first_of = tf.unique(tf.gather_nd(keys, missing))
        n_new = tf.size(new_keys, out_type=tf.int64)
        start = self.table.size()
        room = tf.maximum(tf.constant(self.num_samples, tf.int64) - start, 0)
        n_take = tf.minimum(n_new, room)
        insert = self.table.insert(new_keys[:n_take], start + tf.range(n_take, dtype=tf.int64))
        # New keys get start + their order of first appearance (-1 past the
        # capacity), without a second lookup.
        order = tf.cast(first_of, tf.int64)
        new_slots = tf.where(order < n_take, start + order, tf.constant(-1, tf.int64))
        with tf.control_dependencies([insert]):
            return tf.tensor_scatter_nd_update(slots, missing, new_slots)

    def accumulate(
        self,
        ids: tf.Tensor,
        per_feature_rows: Sequence[tf.Tensor],
        scale,
        per_task_rows: Sequence[tf.Tensor] | None = None,
        step_ok: tf.Tensor | None = None,
        signal_rows: dict[str, tf.Tensor] | None = None,
        correct: tf.Tensor | None = None,
        padding: bool = False,
    ) -> None:
        """Adds one batch. Runs inside the compiled step.

        Args:
            ids: [B] sample ids (index mode) or slots from `slots_for_keys`
                (hash mode; -1 for a key that found no room).
            per_feature_rows: one [B] float tensor per feature group:
                sum over that group's elements of |d batch_loss / d x|.
            scale: factor that turns a batch-loss gradient into the sample's
                own-loss gradient (global batch size / loss scale).
            per_task_rows: one [B] tensor per output (multi-output models).
            step_ok: False when the optimizer skips this step (a loss-scale
                overflow): nothing is accumulated and the step is counted as
                skipped, not as NaN/Inf rows. None means True.
            signal_rows: [B] float values per requested signal (`"loss"`,
                `"el2n"`, `"margin"`, `"confidence"`).
            correct: [B] bool, whether each row is classified correctly
                (the `"forgetting"` signal).
            padding: Negative ids mark padding (ranked lists): such rows are
                left out without being counted as invalid. Index mode only.
        """
        groups = len(per_feature_rows)
        if groups > MAX_FEATURE_GROUPS:
            raise ValueError(
                f"Too many feature groups ({groups}); at most "
                f"{MAX_FEATURE_GROUPS} are supported."
            )
        # Every op here runs on every step, so the default path (index ids, no
        # loss-scale optimizer, no signals) is kept to a few small ops
        # (benchmarks/step_overhead.py measures them against plain `fit`).
        # Rows that must not count go to dump rows past the samples, picked by
        # index arithmetic (no selects, no masks on the scatter): _UNKNOWN (an
        # id outside 0..N-1, or a hash key that found no room), _NONFINITE (a
        # NaN/Inf gradient), _IGNORED (padding, a skipped step). One scatter of
        # ones into `counters` at each row's class counts them all exactly.
        n = self.num_samples
        slots = tf.cast(tf.reshape(ids, [-1]), tf.int64)
        # An id outside 0..N-1 is >= N as an unsigned number (a negative one is huge).
        unsigned = tf.minimum(tf.bitcast(slots, tf.uint64), tf.constant(n, tf.uint64))
        scale = tf.cast(scale, tf.float32)
        flat = [tf.cast(tf.reshape(r, [-1]), tf.float32) for r in per_feature_rows]
        rows = None  # [groups, B]: a concat of contiguous rows (a stack on axis 1
        # interleaves element by element, and costs ~20 us per step at 9 groups)
        if groups == 1:
            total = flat[0] * scale
        else:
            total = tf.add_n(flat) * scale
            rows = tf.reshape(tf.concat(flat, axis=0), [groups, -1]) * scale
        finite = tf.math.is_finite(total)
        # The larger dump row wins: ignored > non-finite > unknown id.
        dump = tf.cast(tf.logical_not(finite), tf.uint64) * (n + _NONFINITE)
        if padding:  # negative ids mark padding (ranked lists)
            dump = tf.maximum(dump, tf.cast(slots < 0, tf.uint64) * (n + _IGNORED))
        ok = None if step_ok is None else tf.reshape(step_ok, [])
        if ok is not None:  # a skipped step (loss-scale overflow) adds nothing
            dump = tf.maximum(dump, tf.cast(tf.logical_not(ok), tf.uint64) * (n + _IGNORED))
        index = tf.bitcast(tf.maximum(unsigned, dump), tf.int64)
        valid = index < n
        # Each row's class (0 counted, else its dump row) into `counters`.
        _scatter_add(self.counters, tf.maximum(index - (n - 1), 0), tf.ones_like(index))
        # A dumped row's sum is never read, NaN or not: no mask on the scatter.
        columns = [total, tf.ones_like(total)]
        columns += self._signal_columns(index, valid, signal_rows or {}, correct)
        _scatter_add(self.sums_visits, index, tf.stack(columns, axis=1))
        weight = tf.cast(valid, tf.float32)  # pruned from the graph when unused
        if self.task_sums is not None and per_task_rows:
            tasks = tf.stack([tf.cast(r, tf.float32) for r in per_task_rows], axis=1)
            tasks = tf.math.multiply_no_nan(tasks * scale, weight[:, None])
            _scatter_add(self.task_sums, index, tasks)
        # Per-group sums over the counted rows (multiply_no_nan: 0 for a NaN
        # row). A single group's sum is the sum of the rows: `read` takes it
        # from them (a ring's rows are zeroed at each flush, so it adds it here).
        if rows is not None or self.ring:
            if rows is None:
                per_feature = tf.reshape(tf.reduce_sum(tf.math.multiply_no_nan(total, weight)),
                                         [1])
            else:
                per_feature = tf.reduce_sum(tf.math.multiply_no_nan(rows, weight[None, :]),
                                            axis=1)
            _scatter_add(self.feature_sums, tf.range(groups), per_feature)
        # The per-step constants (steps, feature groups) fold at trace time.
        constant = np.zeros(len(_COUNTERS), np.int64)
        constant[_COUNTER["steps"]] = 1
        constant[_COUNTER["group_steps"]] = groups
        if ok is None:
            _assign_add(self.counters, tf.constant(constant))
        else:
            skipped = tf.cast(tf.logical_not(ok), tf.int64)
            _assign_add(self.counters, tf.constant(constant) + tf.one_hot(
                _COUNTER["skipped_steps"], len(_COUNTERS), skipped, 0, dtype=tf.int64))
        if self.key_mapping != "hash":
            keyed = tf.where(slots < 0, tf.zeros_like(slots), slots) if padding else slots
            tf.raw_ops.ResourceScatterMax(  # every row into element 0
                resource=self.id_worst.handle, indices=tf.zeros_like(keyed),
                updates=tf.bitwise.bitwise_xor(keyed, tf.constant(_SIGN, tf.int64)))

    def _signal_columns(self, slots, valid, signal_rows, correct) -> list[tf.Tensor]:
        """The signals' columns of this step's scatter (and the confidence and
        forgetting updates, which have their own variables)."""
        columns = []
        for name in self.columns[2:]:
            if name == "forgetting":
                columns.append(self._forgetting_events(slots, valid, correct))
                continue
            values = tf.reshape(tf.cast(signal_rows[name], tf.float32), [-1])
            ok = tf.logical_and(valid, tf.math.is_finite(values))
            columns.append(tf.where(ok, values, tf.zeros_like(values)))
        if self.confidence_sums is not None:
            c = tf.reshape(tf.cast(signal_rows["confidence"], tf.float64), [-1])
            ok = tf.logical_and(valid, tf.math.is_finite(c))
            c = tf.where(ok, c, tf.zeros_like(c))
            _scatter_add(self.confidence_sums, slots, tf.stack([c, c * c], axis=1))
        return columns

    def _forgetting_events(self, slots, valid, correct) -> tf.Tensor:
        """Updates the last-correct flags; returns this replica's rows' events [B]."""
        correct = tf.cast(tf.reshape(correct, [-1]), tf.int32)
        dump = tf.constant(self.num_samples, slots.dtype)
        write = tf.where(valid, slots, tf.fill(tf.shape(slots), dump))
        ctx = tf.distribute.get_replica_context()
        local = tf.shape(write)[0]
        offset = tf.constant(0, tf.int32)
        if ctx is not None and ctx.num_replicas_in_sync > 1:
            # Every replica applies the global batch, in replica order, to its copy.
            sizes = ctx.all_gather(tf.reshape(local, [1]), axis=0)
            offset = tf.reduce_sum(sizes[: ctx.replica_id_in_sync_group])
            write = ctx.all_gather(write, axis=0)
            correct = ctx.all_gather(correct, axis=0)
        previous = tf.raw_ops.ResourceGather(resource=self.last_correct.handle, indices=write,
                                             dtype=tf.int32)
        counted = write < self.num_samples
        event = tf.logical_and(counted, tf.logical_and(tf.equal(previous, 1),
                                                      tf.equal(correct, 0)))
        tf.raw_ops.ResourceScatterUpdate(
            resource=self.last_correct.handle, indices=write,
            updates=tf.where(counted, correct, previous),
        )
        return tf.cast(event[offset:offset + local], tf.float32)  # this replica's rows

    # ------------------------------------------------------------------- host
    def accumulate_item_queries(self, item_ids: tf.Tensor, query_ids: tf.Tensor) -> None:
        """Records each item's query (ranked lists; in-step). Padding/unknown ids skip."""
        items = tf.reshape(tf.cast(item_ids, tf.int64), [-1])
        queries = tf.reshape(tf.broadcast_to(tf.cast(query_ids, tf.int64)[:, None],
                                             tf.shape(item_ids)), [-1])
        ok = tf.logical_and(items >= 0, items < self.num_samples)
        tf.raw_ops.ResourceScatterMax(
            resource=self.item_query.handle, indices=tf.where(ok, items, tf.zeros_like(items)),
            updates=tf.where(ok, queries, tf.fill(tf.shape(queries), tf.constant(-1, tf.int64))),
        )

    def reset(self) -> None:
        """Zeroes the per-epoch accumulators (keys of hash mode persist)."""
        if self.queries is not None:
            self.queries.reset()
        for var in (self.sums_visits, self.feature_sums, self.counters, self.task_sums,
                    self.confidence_sums):
            if var is not None:
                var.assign(tf.zeros_like(var))
        for v in _local_variables(self.id_worst, self.strategy):
            v.assign(tf.fill([1], tf.constant(_SIGN, tf.int64)))

    def read(self) -> BufferSnapshot:
        """Reads everything once (sums the replicas)."""
        worst = max(v[0] for v in _local_values(self.id_worst, self.strategy))
        worst_id = int(np.int64(worst) ^ np.int64(_SIGN))
        keys = None
        if self.table is not None:
            k, v = self.table.export()
            k, v = k.numpy(), v.numpy()
            order = np.argsort(v)
            k = k[order]
            if k.dtype == object:
                k = np.array([s.decode("utf-8", "replace") for s in k], dtype=str)
            keys = k
        n = self.num_samples
        sums_visits = _read(self.sums_visits)[:n]
        counters = dict(zip(_COUNTERS, (int(c) for c in _read(self.counters))))
        unknown = counters["unknown_rows"]
        hash_mode = self.key_mapping == "hash"
        steps = counters["steps"]
        replicas = self.strategy.num_replicas_in_sync
        return BufferSnapshot(
            sums=sums_visits[:, 0].astype(np.float32),
            visits=np.rint(sums_visits[:, 1]).astype(np.int64),
            feature_sums=self._feature_sums(sums_visits, counters),
            invalid_rows=0 if hash_mode else unknown,
            invalid_example=worst_id if not 0 <= worst_id < n else None,
            nonfinite_rows=counters["nonfinite_rows"],
            dropped_rows=unknown if hash_mode else 0,
            keys=keys,
            task_sums=_read(self.task_sums)[:n].astype(np.float32) if self.task_sums is not None
            else None,
            signal_sums=self._read_signals(sums_visits),
            queries=self.queries.read() if self.queries is not None else None,
            item_query=(np.max(_local_values(self.item_query, self.strategy), axis=0).astype(
                np.int64) if self.item_query is not None else None),
            steps=steps,
            skipped_steps=counters["skipped_steps"] // replicas,
            num_groups=counters["group_steps"] // steps if steps else 0,
        )

    def _feature_sums(self, sums_visits: np.ndarray, counters: dict) -> np.ndarray:
        """float64 [MAX_FEATURE_GROUPS] per-group sums (see `accumulate`)."""
        out = _read(self.feature_sums).astype(np.float64)
        steps = counters["steps"]
        if not self.ring and steps and counters["group_steps"] == steps:  # one group
            out[0] = float(np.sum(sums_visits[:, 0], dtype=np.float64))
        return out

    def _read_signals(self, sums_visits: np.ndarray) -> dict[str, np.ndarray]:
        out = {name: sums_visits[:, k].astype(np.int64 if name == "forgetting" else np.float32)
               for k, name in enumerate(self.columns) if k >= 2}
        if self.confidence_sums is not None:
            confidence = _read(self.confidence_sums)[: self.num_samples]
            out["confidence"], out["confidence_sq"] = confidence[:, 0], confidence[:, 1]
        return out

    def restore_forgetting(self, last_correct: np.ndarray) -> None:
        """Reloads the last-correct flags (a resumed or continued run)."""
        if self.last_correct is not None and last_correct is not None:
            self.last_correct.assign(np.concatenate([last_correct.astype(np.int32), [-1]]))

    def last_correct_flags(self) -> np.ndarray | None:
        """Per sample: -1 never visited, else whether its last visit was correct."""
        if self.last_correct is None:
            return None
        return _local_values(self.last_correct, self.strategy)[0][: self.num_samples].astype(
            np.int8)

    def restore_keys(self, keys: np.ndarray) -> None:
        """Reloads the key→slot table (resume of a hash-mode run)."""
        if self.table is None or keys is None or len(keys) == 0:
            return
        k = tf.constant(keys, dtype=self.key_dtype)
        self.table.insert(k, tf.range(len(keys), dtype=tf.int64))


class StreamRing:
    """Streaming mode's ring on the device: one buffer row per visit.

    The buffer (an index-mode `ImportanceBuffer` of `capacity` rows) receives
    each step's rows at consecutive ring positions; the keys stay in the
    tensors the input pipeline produced (held, not copied, until the flush)
    and the step number of each row is bookkept on the host. Positions are
    handed out before the compiled step (`slots`), from shapes the host
    already knows, so no step waits for the device. When the next batch
    would not fit, and at epoch end, `flush` reads the ring in one transfer,
    gives the valid rows to `sink(keys, scores, steps)` and zeroes it.
    String keys reach the sink as an object array of `bytes`.

    Args:
        buffer: The index-mode buffer the step accumulates into (its
            `num_samples` is the ring's capacity).
        sink: Called with `(keys, scores, steps)` numpy arrays per flush.
    """

    def __init__(self, buffer: ImportanceBuffer, sink):
        if not buffer.ring:
            raise ValueError("StreamRing needs a buffer made with ImportanceBuffer(..., ring=True).")
        self.buffer = buffer
        self.capacity = buffer.num_samples
        self.sink = sink
        self.begin_epoch()

    def begin_epoch(self) -> None:
        """Starts an epoch: positions, step numbers and the flush counters from 0."""
        self.pos = 0
        self.step = 0
        self.flushes = 0
        self.rows_flushed = 0
        self.seconds_flushing = 0.0
        self._keys: list[tf.Tensor] = []
        self._counts: list[int] = []
        self._steps: list[int] = []

    def slots(self, keys: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """Ring positions for one step's keys (one tensor per replica, in order).

        Args:
            keys: The step's keys, one [b_r] tensor per local replica.

        Returns:
            int64 positions, one tensor per replica, on that replica's device.
        """
        sizes = [int(k.shape[0]) for k in keys]
        n = sum(sizes)
        if n > self.capacity:
            raise ValueError(
                f"keras_sie: a batch of {n} rows does not fit stream_capacity={self.capacity}. "
                "Pass a stream_capacity of at least a few batches (the default holds 2^20 rows)."
            )
        if self.pos + n > self.capacity:
            self.flush()
        out, start = [], self.pos
        for k, size in zip(keys, sizes):
            with tf.device(k.device):
                out.append(tf.range(start, start + size, dtype=tf.int64))
            start += size
        if n:
            self._keys.extend(tf.reshape(k, [-1]) for k in keys)
            self._counts.append(n)
            self._steps.append(self.step)
        self.pos += n
        self.step += 1
        return out

    def flush(self) -> None:
        """Reads the filled part of the ring once, hands its valid rows to the sink, zeroes it."""
        if self.pos == 0:
            return
        started = time.perf_counter()
        rows = _read(self.buffer.sums_visits)[: self.pos]
        keys = tf.concat(self._keys, axis=0).numpy()
        if keys.dtype != object:  # string keys stay bytes: the sink decodes them
            keys = keys.astype(np.int64)
        steps = np.repeat(np.asarray(self._steps, np.int64), self._counts)
        self.buffer.sums_visits.assign(tf.zeros_like(self.buffer.sums_visits))
        valid = rows[:, 1] > 0.5  # NaN/Inf rows and skipped steps carry no visit
        self._keys, self._counts, self._steps = [], [], []
        self.pos = 0
        self.flushes += 1
        self.rows_flushed += int(valid.sum())
        self.seconds_flushing += time.perf_counter() - started
        self.sink(keys[valid], rows[valid, 0].astype(np.float32), steps[valid])
