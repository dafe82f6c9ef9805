"""Epoch-end cost of the index-mode buffer against the number of samples.

Fills an `ImportanceBuffer` of N slots as a full epoch would (every slot
visited once), then times what the callback does at each epoch end: the one
device read, normalization, summary scalars, the record, and the reporting
(npz + manifest + TensorBoard, data map off), and compares it with an epoch
of the overhead benchmark's models at that N (their per-sample epoch time,
measured by `benchmarks/overhead.py`, scaled linearly).

Run (from the repository root):

    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/scale.py --sizes 1e5,1e6,1e7,1e8 \\
        --json benchmarks/results/scale.json

Peak host memory at 10^8 is several GB (the device arrays live in host memory
on CPU, plus numpy copies); 24 GB machines run it.

Key mappings and streaming on M2 (`--modes`): real `fit`s of overhead.py's
M2 (the CTR model, `build_m2` / `make_m2_data`) on N rows, in one process,
TensorFlow pinned to one intra-op and one inter-op thread, CPU time (process
time, all threads) per epoch as the figure of record. Every configuration
reads the same `tf.data` pipeline (Keras's own array pipeline: a permutation
per epoch, batches gathered from the arrays; string keys cannot go through
Keras's numpy adapter), with the key column left out for the plain fit:

* `plain`     plain `fit`, no callback (the reference of every ratio);
* `index`     `SampleImportance`, sample ids 0..N-1 (`key_mapping="index"`);
* `hash_str`  `key_mapping="hash"`, string keys `f"req-{i}:item-{cat_0[i]}"`;
* `hash_int`  `key_mapping="hash"`, distinct random int64 keys;
* `stream_idx` / `stream_str`  `stream=True` (ring of `--stream-capacity`
  rows, 2^20 by default), index ids / the string keys;
* `stream_idx_small`  `stream=True` with a `--small-capacity` ring (2^16),
  so that an epoch has several flushes.

Every callback has `log_dir` set and `data_map=False`. `--modes` takes groups
(`index`, `hash`, `stream`) or configuration names. Each round runs one
`fit(epochs=W+E)` per configuration (order rotated each round; a fresh
callback and log_dir per fit), the first W epochs dropped (tracing, and
filling the hash table); reported: min and median epoch, their ratios to
`plain`, the per-round ratio of minima, and each configuration's cost per
step against `index` in microseconds ((ratio − ratio of index) × the plain
step time). Also measured:

* the hash stage part by part (`mapping_micro`): `slots_for_keys` in a
  `tf.function` on batches of new keys (inserts) and known keys (lookups),
  a whole M2 batch through an identity `tf.function` and through a
  keys->slots swap in the same function (the first design of the hash
  stage; `StepHook` now passes only the key column through its
  function, `_key_slots`), eager `next(iterator)` (the
  keyed train function) against `get_next` in a `tf.function` (Keras's),
  and the host memory the table takes (RSS growth while N keys go in);
* device memory per configuration (the callback's buffer variables, read
  during `fit`; the ring's held keys) and the peak RSS of one `fit` per
  configuration in a fresh child process (`VmHWM`: `ru_maxrss` would carry
  the parent's peak over fork + exec);
* streaming: flushes per epoch, device read time per flush
  (`StreamRing.seconds_flushing / flushes`), the writer's rows per second
  (`ShardWriter.rows_written / seconds_writing`, background thread), the
  training thread's wait for the writer, shard bytes per row; and
  `ShardWriter.write` alone on synthetic arrays (`--writer-rows`).

    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/scale.py --modes index,hash,stream \\
        --rows 1e6 --json benchmarks/results/scale_stream.json

(`--keys` is short for `--modes index,hash`.) Smoke run of every path,
about 75 s: `--modes index,hash,stream --rows 2e4 --rounds 1
--small-capacity 4096 --writer-rows 1e5`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import tensorflow as tf

HERE = os.path.dirname(os.path.abspath(__file__))
# The repository's keras_sie unless PYTHONPATH (e.g. a `git archive` copy) or an
# installed one comes first; overhead.py from this folder.
sys.path.append(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import keras
import overhead  # M2 builders and data, the epoch clock, machine info

from keras_sie import SampleImportance
from keras_sie import scores as scores_lib
from keras_sie.buffer import ImportanceBuffer
from keras_sie.reporting import EpochReporter
from keras_sie.score_record import EpochScores, ScoreRecord

ID_KEY = "sample_id"
DEFAULT_CAPACITY = 1 << 20
SMALL_CAPACITY = 1 << 16
# name: (keys fed in the id column, label)
CONFIGS: dict[str, tuple[str | None, str]] = {
    "plain": (None, "plain fit, no callback"),
    "index": ("index", "index ids 0..N-1"),
    "hash_str": ("str", "key_mapping='hash', string keys 'req-{i}:item-{j}'"),
    "hash_int": ("int", "key_mapping='hash', random int64 keys"),
    "stream_idx": ("index", "stream=True, index ids"),
    "stream_str": ("str", "stream=True, string keys (hash)"),
    "stream_idx_small": ("index", "stream=True, small ring, index ids"),
}
MODE_GROUPS = {
    "index": ("index",),
    "hash": ("hash_str", "hash_int"),
    "stream": ("stream_idx", "stream_str", "stream_idx_small"),
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024.0
    return float("nan")


def _epoch_seconds_per_sample() -> dict[str, float]:
    """Plain-fit CPU seconds per sample of M1 / M2 (median epoch of overhead_cpu.json)."""
    path = os.path.join(HERE, "results", "overhead_cpu.json")
    out = {}
    try:
        with open(path) as f:
            res = json.load(f)
        for key, model in res["models"].items():
            cpu = model["cpu"]["epoch_seconds"]["a"]
            out[key.upper()] = float(cpu["median"]) / float(model["num_samples"])
    except (OSError, KeyError, ValueError, TypeError):
        pass
    return out


# ------------------------------------------------------- epoch end vs N (index)
def measure(n: int, reps: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    buffer = ImportanceBuffer(n)
    sums_visits = np.stack([rng.random(n, dtype=np.float32), np.ones(n, np.float32)], axis=1)
    buffer.sums_visits.assign(sums_visits)
    del sums_visits
    log_dir = tempfile.mkdtemp(prefix="sie_scale_")
    reporter = EpochReporter(log_dir, data_map=False)
    reporter.prepare()
    record = ScoreRecord(n)
    timings: dict[str, list[float]] = {k: [] for k in ("read", "normalize", "summarize",
                                                        "report", "total")}
    for rep in range(reps):
        t0 = time.perf_counter()
        snap = buffer.read()
        t1 = time.perf_counter()
        importance = scores_lib.normalize(snap.sums, snap.visits).astype(np.float32)
        t2 = time.perf_counter()
        summary = scores_lib.summarize(importance, snap.visits)
        t3 = time.perf_counter()
        record.add(rep, EpochScores(importance, snap.visits, snap.sums, ("input",),
                                    snap.feature_sums[:1], summary, {}))
        reporter.report(record, rep, None, {"id_key": "sample_id", "key_mapping": "index"})
        t4 = time.perf_counter()
        for key, value in (("read", t1 - t0), ("normalize", t2 - t1), ("summarize", t3 - t2),
                           ("report", t4 - t3), ("total", t4 - t0)):
            timings[key].append(value)
        record.truncate(0)  # keep one epoch in memory, as a long run keeps its own
    reporter.close()
    shutil.rmtree(log_dir, ignore_errors=True)
    out = {k: float(np.median(v)) for k, v in timings.items()}
    out["peak_rss_mb"] = _rss_mb()
    out["buffer_device_bytes"] = float(buffer.nbytes)
    return out


def run_sizes(sizes: str, reps: int, results: dict) -> None:
    per_sample = _epoch_seconds_per_sample()
    results.update({"sizes": {}, "epoch_seconds_per_sample": per_sample})
    print(f"{'N':>12} {'read':>8} {'normal.':>8} {'summary':>8} {'report':>8} {'total':>8}"
          + "".join(f" {m + ' share':>10}" for m in per_sample) + "   peak RSS")
    for text in sizes.split(","):
        n = int(float(text))
        r = measure(n, reps)
        shares = {m: r["total"] / (s * n) for m, s in per_sample.items()}
        r["share_of_epoch"] = shares
        results["sizes"][str(n)] = r
        print(f"{n:>12,} {r['read']:8.3f} {r['normalize']:8.3f} {r['summarize']:8.3f} "
              f"{r['report']:8.3f} {r['total']:8.3f}"
              + "".join(f" {100 * v:9.2f}%" for v in shares.values())
              + f"   {r['peak_rss_mb']:,.0f} MB", flush=True)


# ------------------------------------------------------------ keys and data
def string_keys(n: int, items: np.ndarray | None = None) -> np.ndarray:
    """`req-{i}:item-{j}` for i < n (j: the item id of row i), as a numpy str array."""
    items = np.arange(n) % 10_000 if items is None else items
    out = np.char.add(np.char.add("req-", np.arange(n).astype(str)), ":item-")
    return np.char.add(out, np.asarray(items).astype(str))


def int64_keys(n: int, seed: int = 1) -> np.ndarray:
    """n distinct random int64 keys in [0, 2^62), in random order."""
    rng = np.random.default_rng(seed)
    keys = np.zeros(0, np.int64)
    while keys.size < n:
        draw = np.concatenate([keys, rng.integers(0, 1 << 62, size=n + n // 100 + 16)])
        _, first = np.unique(draw, return_index=True)
        keys = draw[np.sort(first)]
    return keys[:n]


def make_keys(kind: str | None, n: int, x: dict[str, np.ndarray]) -> np.ndarray | None:
    if kind is None:
        return None
    if kind == "index":
        return np.arange(n, dtype=np.int64)
    if kind == "str":
        return string_keys(n, x["cat_0"])
    return int64_keys(n)


def make_dataset(tensors: dict[str, tf.Tensor], y: tf.Tensor, keys: tf.Tensor | None,
                 batch: int) -> tf.data.Dataset:
    """Keras's array pipeline (a permutation per epoch, gathered batches), keys in `ID_KEY`."""
    inputs = dict(tensors)
    if keys is not None:
        inputs[ID_KEY] = keys
    n = int(y.shape[0])
    full = n // batch
    partial = n - full * batch

    def permutation(_):
        return tf.random.shuffle(tf.range(n, dtype=tf.int64))

    def batches(indices):
        first = tf.reshape(tf.slice(indices, [0], [full * batch]), [full, batch])
        # Batch dimension None, as in Keras's own pipeline when N is not a
        # multiple of the batch.
        ds = tf.data.Dataset.from_tensor_slices(first).map(
            lambda i: tf.compat.v1.placeholder_with_default(i, [None]))
        if partial:
            ds = ds.concatenate(tf.data.Dataset.from_tensors(
                tf.slice(indices, [full * batch], [partial])))
        return ds

    indices = tf.data.Dataset.range(1).map(permutation).prefetch(1).flat_map(batches)
    data = (inputs, y)

    def grab(i):
        # The arrays are captured, not zipped in as dataset elements: a string
        # tensor passed through zip/map is copied whole for every batch (+2.9 ms
        # per 512-row batch at 10^6 string keys on our CPUs), a cost of that
        # pipeline shape, not of the keys.
        return tf.nest.map_structure(lambda t: tf.gather(t, i, axis=0), data)

    ds = indices.map(grab, num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    ds = ds.apply(tf.data.experimental.assert_cardinality(full + (1 if partial else 0)))
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def make_callback(config: str, n: int, log_dir: str, capacity: int,
                  small_capacity: int) -> SampleImportance | None:
    common: dict[str, Any] = {"log_dir": log_dir, "verbose": 0, "data_map": False}
    if config == "plain":
        return None
    if config == "index":
        return SampleImportance(num_samples=n, key_mapping="index", **common)
    if config in ("hash_str", "hash_int"):
        return SampleImportance(num_samples=n, key_mapping="hash", **common)
    if config == "stream_idx":
        return SampleImportance(num_samples=n, key_mapping="index", stream=True,
                                stream_capacity=capacity, **common)
    if config == "stream_str":
        return SampleImportance(key_mapping="hash", stream=True, stream_capacity=capacity,
                                **common)
    if config == "stream_idx_small":
        return SampleImportance(num_samples=n, key_mapping="index", stream=True,
                                stream_capacity=small_capacity, **common)
    raise ValueError(config)


def _variable_bytes(variables) -> int:
    return int(sum(int(v.shape.num_elements()) * v.dtype.size for v in variables))


class Probe(keras.callbacks.Callback):
    """After the callback's on_epoch_end: its buffer's bytes and the stream counters.

    Benchmark introspection of transient attributes (`_buffer`, `_ring`,
    `_stream`): they exist only while `fit` runs.
    """

    FIELDS = ("flushes", "seconds_flushing", "rows_flushed", "rows_written", "seconds_writing",
              "bytes_written")

    def __init__(self, sie: SampleImportance):
        super().__init__()
        self.sie = sie
        self.epochs: list[dict[str, float]] = []
        self.device_bytes: int | None = None
        self.table_entries: int | None = None
        self.ring_capacity: int | None = None
        self._last = dict.fromkeys(self.FIELDS, 0.0)

    def on_epoch_end(self, epoch, logs=None):
        sie = self.sie
        buf = sie._buffer
        if buf is not None:
            self.device_bytes = _variable_bytes(buf.variables)
            if buf.table is not None:
                self.table_entries = int(buf.table.size())
        ring, stream = sie._ring, sie._stream
        if ring is None or stream is None:
            return
        self.ring_capacity = ring.capacity
        writer = stream.writer
        # The ring's counters are per epoch; the writer's add up over the fit.
        row = {"flushes": float(ring.flushes), "seconds_flushing": ring.seconds_flushing,
               "rows_flushed": float(ring.rows_flushed)}
        now = {"rows_written": writer.rows_written, "seconds_writing": writer.seconds_writing,
               "bytes_written": writer.bytes_written}
        row.update({k: float(v) - self._last.get(k, 0.0) for k, v in now.items()})
        row["write_wait_seconds"] = float(stream._seconds)  # training thread, this epoch
        self._last.update({k: float(v) for k, v in now.items()})
        self.epochs.append(row)


def stats(values: list[float]) -> dict[str, float]:
    return overhead.stats(values) if values else {}


def _fit_once(model, ds, sie, clock, extra=()) -> None:
    middle = [sie, *extra] if sie is not None else []
    model.fit(ds, epochs=clock.epochs, verbose=0, shuffle=False,
              callbacks=[clock.first, *middle, clock.last])


def run_fits(configs: tuple[str, ...], n: int, rounds: int, warmup: int, measured: int,
             batch: int, capacity: int, small_capacity: int, log) -> dict[str, Any]:
    """The interleaved A/B fits: CPU and wall seconds per epoch, stream counters."""
    x, y = overhead.make_m2_data(n)
    tensors = {k: tf.constant(v) for k, v in x.items()}
    y_t = tf.constant(y)
    keys = {kind: make_keys(kind, n, x) for kind in {CONFIGS[c][0] for c in configs}}
    datasets = {c: make_dataset(tensors, y_t, None if keys[CONFIGS[c][0]] is None
                                else tf.constant(keys[CONFIGS[c][0]]), batch) for c in configs}
    models = {c: overhead.build_m2(seed=7).model for c in configs}  # identical initial weights
    clocks = {c: overhead.EpochClock() for c in configs}
    for clock in clocks.values():
        clock.epochs = warmup + measured
    per_round = {k: {c: [] for c in configs} for k in ("cpu", "wall")}
    end_seconds: dict[str, list[float]] = {c: [] for c in configs}
    fit_seconds: dict[str, list[float]] = {c: [] for c in configs}
    stream_epochs: dict[str, list[dict[str, float]]] = {c: [] for c in configs}
    device: dict[str, dict[str, Any]] = {}
    root = tempfile.mkdtemp(prefix="sie_scale_fits_")
    for r in range(rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for c in order:
            log_dir = os.path.join(root, f"{c}_{r}")
            sie = make_callback(c, n, log_dir, capacity, small_capacity)
            probe, ends = (Probe(sie), []) if sie is not None else (None, [])
            if sie is not None:
                overhead.timed_method(sie, "on_epoch_end", ends)
            clock = clocks[c]
            start = len(clock.cpu_times)
            t0 = time.perf_counter()
            _fit_once(models[c], datasets[c], sie, clock, [probe] if probe else [])
            fit_seconds[c].append(time.perf_counter() - t0)
            per_round["cpu"][c].append(clock.cpu_times[start + warmup:])
            per_round["wall"][c].append(clock.times[start + warmup:])
            end_seconds[c].extend(ends[warmup:])
            if probe is not None:
                stream_epochs[c].extend(probe.epochs[warmup:])
                device[c] = {"buffer_bytes": probe.device_bytes,
                             "table_entries": probe.table_entries,
                             "ring_capacity": probe.ring_capacity}
            shutil.rmtree(log_dir, ignore_errors=True)
        log(f"  round {r + 1}/{rounds} cpu s/epoch (min): " + "  ".join(
            f"{c}={min(per_round['cpu'][c][-1]):.3f}" for c in configs)
            + f"  load={os.getloadavg()[0]:.1f}")
    shutil.rmtree(root, ignore_errors=True)
    key_bytes = {kind: _key_bytes(v) for kind, v in keys.items() if v is not None}
    return {"per_round": per_round, "epoch_end_seconds": end_seconds, "fit_seconds": fit_seconds,
            "stream_epochs": stream_epochs, "device": device, "key_bytes": key_bytes,
            "steps_per_epoch": math.ceil(n / batch)}


def _key_bytes(keys: np.ndarray) -> dict[str, float]:
    """Bytes of one key: int64 8; strings their mean UTF-8 length."""
    if keys.dtype.kind in "iu":
        return {"mean_key_bytes": 8.0}
    lengths = np.char.str_len(keys[: min(keys.size, 100_000)])
    return {"mean_key_bytes": float(lengths.mean())}


def summarize_fits(raw: dict[str, Any], configs: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    steps = raw["steps_per_epoch"]
    for clock in ("cpu", "wall"):
        pr = raw["per_round"][clock]
        ep = {c: stats([t for rr in pr[c] for t in rr]) for c in configs}
        ratio_min = {c: ep[c]["min"] / ep["plain"]["min"] for c in configs if c != "plain"}
        ratio_med = {c: ep[c]["median"] / ep["plain"]["median"] for c in configs if c != "plain"}
        round_min = {c: stats([min(pr[c][r]) / min(pr["plain"][r]) for r in range(len(pr[c]))])
                     for c in configs if c != "plain"}
        step_s = {"min": ep["plain"]["min"] / steps, "median": ep["plain"]["median"] / steps}
        vs_index = {}
        if "index" in configs:
            for c in configs:
                if c in ("plain", "index"):
                    continue
                vs_index[c] = {
                    "us_per_step_from_min": (ratio_min[c] - ratio_min["index"])
                    * step_s["min"] * 1e6,
                    "us_per_step_from_median": (ratio_med[c] - ratio_med["index"])
                    * step_s["median"] * 1e6,
                    "us_per_step_from_round_min": (round_min[c]["median"]
                                                   - round_min["index"]["median"])
                    * step_s["min"] * 1e6,
                }
        out[clock] = {"epoch_seconds": ep, "ratio_of_min": ratio_min,
                      "ratio_of_median": ratio_med, "round_min_ratios": round_min,
                      "plain_step_seconds": step_s, "vs_index": vs_index}
    out["epoch_end_seconds"] = {c: stats(v) for c, v in raw["epoch_end_seconds"].items() if v}
    out["fit_wall_seconds"] = {c: stats(v) for c, v in raw["fit_seconds"].items()}
    stream = {}
    for c, epochs in raw["stream_epochs"].items():
        if not epochs:
            continue
        tot = {k: sum(e[k] for e in epochs) for k in epochs[0]}
        stream[c] = {
            "ring_capacity": raw["device"][c]["ring_capacity"],
            "epochs": len(epochs),
            "flushes_per_epoch": tot["flushes"] / len(epochs),
            "flush_seconds_per_flush": (tot["seconds_flushing"] / tot["flushes"]
                                        if tot["flushes"] else None),
            "flush_seconds_per_epoch": tot["seconds_flushing"] / len(epochs),
            "rows_per_epoch": tot["rows_written"] / len(epochs),
            "writer_rows_per_second": (tot["rows_written"] / tot["seconds_writing"]
                                       if tot["seconds_writing"] else None),
            "writer_seconds_per_epoch": tot["seconds_writing"] / len(epochs),
            "write_wait_seconds_per_epoch": tot["write_wait_seconds"] / len(epochs),
            "shard_bytes_per_row": (tot["bytes_written"] / tot["rows_written"]
                                    if tot["rows_written"] else None),
            "raw_epochs": epochs,
        }
    out["stream"] = stream
    return out


# --------------------------------------------------------- key->slot table alone
def _key_swapper(buf: ImportanceBuffer):
    """`data` -> `data` with its keys replaced by slots, the whole batch in one function."""

    def swap(data):
        x = dict(data[0])
        x[ID_KEY] = buf.slots_for_keys(x[ID_KEY])
        return (x,) + tuple(data[1:])

    return swap


def mapping_micro(n: int, batch: int, reps: int = 3, full_batches: int = 64) -> dict[str, Any]:
    """The hash stage's parts, CPU µs per batch (min over `reps` passes).

    * `slots_for_keys` in a tf.function on a key batch: new keys (inserts,
      one pass over N keys) and known keys (lookups); a no-op tf.function on
      the same batch (the call itself);
    * on whole M2 batches (`full_batches` of them, keys already in the
      table): the batch through an identity tf.function, and through one
      that swaps the keys for slots in the same function (the whole batch
      goes in and out: the hash stage's first design);
    * the iterator: eager `next(iterator)` (the keyed train function, hash
      and stream modes) against `get_next` inside a tf.function (Keras's own
      train function).
    """
    out: dict[str, Any] = {"rows": n, "batch_size": batch, "full_batches": full_batches}

    def per_batch(fn, items) -> float:
        best = float("inf")
        for _ in range(reps):
            c0 = time.process_time()
            for item in items:
                fn(item)
            best = min(best, (time.process_time() - c0) / len(items))
        return best * 1e6

    for kind in ("str", "int"):
        raw = string_keys(n) if kind == "str" else int64_keys(n)
        mean_len = _key_bytes(raw)
        keys = tf.constant(raw)
        batches = [keys[i:i + batch] for i in range(0, n, batch)]
        noop = tf.function(lambda k: tf.zeros(tf.shape(k), tf.int64), reduce_retracing=True)
        for b in (batches[0], batches[-1]):
            noop(b)  # trace
        rss0 = _status_mib("VmRSS")
        buf = ImportanceBuffer(n, "hash", tf.string if kind == "str" else tf.int64)
        slots = tf.function(buf.slots_for_keys, reduce_retracing=True)
        slots(batches[0])  # trace (+ the first batch's inserts, not timed)
        slots(batches[-1])
        c0 = time.process_time()
        for b in batches[1:-1]:
            slots(b)
        insert = (time.process_time() - c0) / max(1, len(batches) - 2)
        rss1 = _status_mib("VmRSS")
        row: dict[str, Any] = {
            "insert_us_per_batch": insert * 1e6,
            "lookup_us_per_batch": per_batch(slots, batches),
            "noop_call_us_per_batch": per_batch(noop, batches),
            "table_entries": int(buf.table.size()),
            "table_rss_growth_bytes": (rss1 - rss0) * 2**20,
            **mean_len,
        }
        row["table_nominal_bytes"] = row["table_entries"] * (mean_len["mean_key_bytes"] + 8)

        m = min(full_batches, n // batch)
        x, y = overhead.make_m2_data(m * batch, seed=3)
        ds = make_dataset({k: tf.constant(v) for k, v in x.items()}, tf.constant(y),
                          keys[: m * batch], batch)
        whole = list(ds)

        identity = tf.function(lambda d: d, reduce_retracing=True)
        swap_fn = tf.function(_key_swapper(buf), reduce_retracing=True)
        graph_next = tf.function(lambda it: it.get_next())
        for fn in (identity, swap_fn):
            fn(whole[0])
        graph_next(iter(ds))
        row["full_batch_identity_us_per_batch"] = per_batch(identity, whole)
        row["full_batch_map_keys_us_per_batch"] = per_batch(swap_fn, whole)
        for name, fn in (("eager_next_us_per_batch", next),
                         ("graph_next_us_per_batch", graph_next)):
            best = float("inf")
            for _ in range(reps):
                it = iter(ds)
                c0 = time.process_time()
                for _ in range(m):
                    fn(it)
                best = min(best, (time.process_time() - c0) / m)
            row[name] = best * 1e6
        out[kind] = row
        del buf, slots, batches, keys, raw, whole, ds
    return out


# ----------------------------------------------------- ShardWriter on its own
def writer_bench(sizes: list[int], batch: int) -> list[dict[str, Any]]:
    from keras_sie.streaming import ShardWriter

    rows = []
    for kind in ("int", "str"):
        root = tempfile.mkdtemp(prefix="sie_scale_writer_")
        manifest = {"key_mapping": "hash", "key_dtype": "string" if kind == "str" else "int64",
                    "num_samples": None, "id_key": ID_KEY, "stream_capacity": max(sizes)}
        warm = ShardWriter(os.path.join(root, "warm"), manifest)
        warm.write(0, string_keys(8) if kind == "str" else np.arange(8),
                   np.ones(8, np.float32), np.zeros(8, np.int64))
        warm.close()
        for n in sizes:
            keys = string_keys(n) if kind == "str" else int64_keys(n)
            scores = np.random.default_rng(0).random(n, dtype=np.float32)
            steps = np.arange(n, dtype=np.int64) // batch
            times, cpus, nbytes = [], [], 0
            for rep in range(1 if n >= 5_000_000 else 3):
                w = ShardWriter(os.path.join(root, f"{n}_{rep}"), manifest)
                t0, c0 = time.perf_counter(), time.process_time()
                w.write(0, keys, scores, steps)
                w.wait()
                times.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
                nbytes = w.bytes_written
                w.close()
                shutil.rmtree(os.path.join(root, f"{n}_{rep}"), ignore_errors=True)
            rows.append({"rows": n, "keys": kind, "seconds": min(times),
                         "cpu_seconds": min(cpus), "rows_per_second": n / min(times),
                         "shard_bytes": nbytes, "bytes_per_row": nbytes / n,
                         "durable": True, **_key_bytes(keys)})
            print(f"  writer {kind:>3} keys, {n:>11,} rows: {min(times):7.3f} s "
                  f"({n / min(times) / 1e6:.2f} M rows/s), {nbytes / n:.1f} B/row", flush=True)
            del keys, scores, steps
        shutil.rmtree(root, ignore_errors=True)
    return rows


# ------------------------------------------------------------------ memory
def child(config: str, n: int, epochs: int, batch: int, capacity: int,
          small_capacity: int) -> dict[str, Any]:
    """In a fresh process: one fit of one configuration; its peak RSS and device bytes."""
    x, y = overhead.make_m2_data(n)
    keys = make_keys(CONFIGS[config][0], n, x)
    ds = make_dataset({k: tf.constant(v) for k, v in x.items()}, tf.constant(y),
                      None if keys is None else tf.constant(keys), batch)
    model = overhead.build_m2(seed=7).model
    log_dir = tempfile.mkdtemp(prefix="sie_scale_mem_")
    sie = make_callback(config, n, log_dir, capacity, small_capacity)
    probe = Probe(sie) if sie is not None else None
    rss_before = _status_mib("VmRSS")
    model.fit(ds, epochs=epochs, verbose=0, shuffle=False,
              callbacks=[cb for cb in (sie, probe) if cb is not None])
    peak = _status_mib("VmHWM")
    shutil.rmtree(log_dir, ignore_errors=True)
    return {"config": config, "rows": n, "epochs": epochs,
            "rss_before_fit_mib": rss_before, "peak_rss_mib": peak,
            "buffer_bytes": probe.device_bytes if probe else 0,
            "table_entries": probe.table_entries if probe else None,
            "ring_capacity": probe.ring_capacity if probe else None}


def measure_memory(configs: tuple[str, ...], args, log) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in configs:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", c, "--rows", str(args.rows),
               "--memory-epochs", str(args.memory_epochs), "--batch-size", str(args.batch_size),
               "--stream-capacity", str(args.stream_capacity),
               "--small-capacity", str(args.small_capacity), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=3600)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            log(f"  memory child {c} failed:\n{proc.stderr[-3000:]}")
            out[c] = None
            continue
        out[c] = json.loads(line[-1][len("RESULT "):])
        log(f"  memory {c}: peak RSS {out[c]['peak_rss_mib']:.0f} MiB "
            f"(before fit {out[c]['rss_before_fit_mib']:.0f} MiB)")
    return out


def device_memory(configs, fits_raw, memory, micro, capacity, small_capacity) -> dict:
    """Per configuration: device buffer, held ring keys, hash table, peak RSS."""
    out = {}
    key_bytes = fits_raw["key_bytes"] if fits_raw else {}
    for c in configs:
        kind = CONFIGS[c][0]
        dev = (fits_raw or {}).get("device", {}).get(c) or {}
        mem = (memory or {}).get(c) or {}
        row: dict[str, Any] = {"buffer_bytes": dev.get("buffer_bytes", mem.get("buffer_bytes"))}
        if c == "plain":
            row["buffer_bytes"] = 0
        if c.startswith("stream"):
            cap = dev.get("ring_capacity") or (small_capacity if c.endswith("small")
                                               else capacity)
            if kind == "str":  # string tensors live on the host; TF's tstring is 24 B + text
                row["ring_keys_host_bytes"] = cap * (24 + key_bytes.get("str", {}).get(
                    "mean_key_bytes", 0))
            else:
                row["ring_keys_device_bytes"] = cap * 8
        if c.startswith("hash"):
            entries = dev.get("table_entries") or mem.get("table_entries")
            mk = key_bytes.get(kind, {}).get("mean_key_bytes")
            row["table_entries"] = entries
            if entries is not None and mk is not None:
                row["table_nominal_bytes"] = entries * (mk + 8)
            if micro and kind in micro:
                row["table_rss_growth_bytes"] = micro[kind]["table_rss_growth_bytes"]
        if mem:
            row["peak_rss_mib"] = mem["peak_rss_mib"]
            row["rss_before_fit_mib"] = mem["rss_before_fit_mib"]
        out[c] = row
    if memory and memory.get("plain"):
        for c, row in out.items():
            if "peak_rss_mib" in row:
                row["peak_rss_minus_plain_mib"] = row["peak_rss_mib"] - memory["plain"][
                    "peak_rss_mib"]
    return out


# ------------------------------------------------------------------ report
def _mb(b) -> str:
    if b is None:
        return ""
    return f"{b / 2**10:.0f} KiB" if abs(b) < 2**20 else f"{b / 2**20:.1f} MiB"


def format_report(res: dict[str, Any]) -> str:
    lines = []
    fits = res.get("fits")
    if fits:
        cpu = fits["cpu"]
        lines.append(f"M2, {res['rows']:,} rows, batch {res['batch_size']}, "
                     f"{fits['steps_per_epoch']} steps/epoch; CPU seconds per epoch "
                     f"(first {res['warmup']} epoch(s) of each fit dropped), ratios to plain")
        lines.append("")
        lines.append("| config | min / median s | ratio of min / **median** | per-round min ratio"
                     " [range] | µs/step vs index (min / median) | epoch end (median) |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for c in res["configs"]:
            ep = cpu["epoch_seconds"][c]
            if c == "plain":
                ratio = "1 / **1**"
                rnd = ""
            else:
                ratio = f"{cpu['ratio_of_min'][c]:.3f} / **{cpu['ratio_of_median'][c]:.3f}**"
                rm = cpu["round_min_ratios"][c]
                rnd = f"{rm['median']:.3f} [{rm['min']:.2f}-{rm['max']:.2f}]"
            vi = cpu["vs_index"].get(c)
            vis = (f"{vi['us_per_step_from_min']:+.0f} / {vi['us_per_step_from_median']:+.0f}"
                   if vi else "")
            end = fits["epoch_end_seconds"].get(c)
            ends = f"{end['median'] * 1e3:.0f} ms" if end else ""
            lines.append(f"| {c} | {ep['min']:.3f} / {ep['median']:.3f} | {ratio} | {rnd} | "
                         f"{vis} | {ends} |")
        step = cpu["plain_step_seconds"]
        lines.append(f"plain step: {step['min'] * 1e6:.0f} µs (min) / "
                     f"{step['median'] * 1e6:.0f} µs (median).")
    micro = res.get("mapping_micro")
    if micro:
        lines.append("")
        lines.append(f"key->slot table alone (tf.function, batch {micro['batch_size']}, "
                     f"{micro['rows']:,} keys): CPU µs per batch")
        lines.append("")
        lines.append("| keys | insert (new keys) | lookup (known) | no-op call | whole batch:"
                     " identity / keys->slots | next(): eager / in graph | table entries |"
                     " nominal (key + 8 B) | RSS growth |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for kind, label in (("str", "string"), ("int", "int64")):
            m = micro.get(kind)
            if m:
                lines.append(
                    f"| {label} | {m['insert_us_per_batch']:.0f} | "
                    f"{m['lookup_us_per_batch']:.0f} | {m['noop_call_us_per_batch']:.0f} | "
                    f"{m['full_batch_identity_us_per_batch']:.0f} / "
                    f"{m['full_batch_map_keys_us_per_batch']:.0f} | "
                    f"{m['eager_next_us_per_batch']:.0f} / {m['graph_next_us_per_batch']:.0f} |"
                    f" {m['table_entries']:,} | {_mb(m['table_nominal_bytes'])} | "
                    f"{_mb(m['table_rss_growth_bytes'])} |")
    mem = res.get("memory")
    if mem:
        lines.append("")
        lines.append("| config | device buffer | ring keys held | hash table (nominal) |"
                     " peak RSS (child) | − plain |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for c, row in mem.items():
            held = row.get("ring_keys_device_bytes", row.get("ring_keys_host_bytes"))
            where = (" (device)" if "ring_keys_device_bytes" in row
                     else " (host)" if "ring_keys_host_bytes" in row else "")
            peak = row.get("peak_rss_mib")
            delta = row.get("peak_rss_minus_plain_mib")
            lines.append(
                f"| {c} | {_mb(row.get('buffer_bytes'))} | {_mb(held)}{where} | "
                f"{_mb(row.get('table_nominal_bytes'))} | "
                f"{'' if peak is None else f'{peak:.0f} MiB'} | "
                f"{'' if delta is None else f'{delta:+.0f} MiB'} |")
    if fits and fits.get("stream"):
        lines.append("")
        lines.append("| config | ring rows | flushes/epoch | flush (device read) per flush |"
                     " writer rows/s | writer s/epoch | training-thread wait/epoch | B/row |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for c, s in fits["stream"].items():
            fl = s["flush_seconds_per_flush"]
            rps = s["writer_rows_per_second"]
            bpr = s["shard_bytes_per_row"]
            lines.append(
                f"| {c} | {s['ring_capacity']:,} | {s['flushes_per_epoch']:.1f} | "
                f"{'' if fl is None else f'{fl * 1e3:.1f} ms'} | "
                f"{'' if rps is None else f'{rps / 1e6:.2f} M'} | "
                f"{s['writer_seconds_per_epoch']:.3f} | "
                f"{s['write_wait_seconds_per_epoch'] * 1e3:.1f} ms | "
                f"{'' if bpr is None else f'{bpr:.1f}'} |")
    wr = res.get("writer")
    if wr:
        lines.append("")
        lines.append("ShardWriter.write + wait alone (one shard, durable):")
        lines.append("")
        lines.append("| rows | keys | seconds | rows/s | CPU s | B/row |")
        lines.append("|---:|---|---:|---:|---:|---:|")
        for w in wr:
            lines.append(f"| {w['rows']:,} | {'string' if w['keys'] == 'str' else 'int64'} | "
                         f"{w['seconds']:.3f} | {w['rows_per_second'] / 1e6:.2f} M | "
                         f"{w['cpu_seconds']:.3f} | {w['bytes_per_row']:.1f} |")
    return "\n".join(lines)


# -------------------------------------------------------------------- main
def parse_configs(text: str) -> tuple[str, ...]:
    out = ["plain"]
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part in MODE_GROUPS:
            out.extend(MODE_GROUPS[part])
        elif part in CONFIGS:
            out.append(part)
        else:
            raise SystemExit(f"--modes: unknown {part!r}; groups {list(MODE_GROUPS)}, "
                             f"configurations {list(CONFIGS)}")
    return tuple(dict.fromkeys(out))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=None,
                    help="comma-separated N values of the epoch-end run (default 1e5,1e6,1e7 "
                    "when --modes is not given)")
    ap.add_argument("--reps", type=int, default=3, help="epoch ends timed per N (median)")
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--modes", default=None,
                    help="fits on M2: groups index,hash,stream and/or configuration names ("
                    + ",".join(c for c in CONFIGS if c != "plain") + "); plain always runs")
    ap.add_argument("--keys", action="store_true", help="short for --modes index,hash")
    ap.add_argument("--rows", default="1e6", help="rows N of the M2 fits (default 1e6)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="epochs dropped per fit (default 1)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs kept per fit (default 2)")
    ap.add_argument("--batch-size", type=int, default=overhead.BATCH)
    ap.add_argument("--stream-capacity", type=int, default=DEFAULT_CAPACITY,
                    help="ring rows of stream_idx / stream_str (default 2^20)")
    ap.add_argument("--small-capacity", type=int, default=SMALL_CAPACITY,
                    help="ring rows of stream_idx_small (default 2^16)")
    ap.add_argument("--writer-rows", default="1e6,1e7",
                    help="synthetic ShardWriter shards, rows (default 1e6,1e7; '' skips)")
    ap.add_argument("--no-memory", action="store_true", help="skip the child-process RSS runs")
    ap.add_argument("--memory-epochs", type=int, default=2, help="epochs of each memory child")
    ap.add_argument("--no-micro", action="store_true", help="skip the key->slot table timing")
    ap.add_argument("--threads", type=int, default=1,
                    help="TF intra-op and inter-op threads (default 1)")
    ap.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.rows = int(float(args.rows))
    threads = overhead.set_threads(args.threads)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.rows, args.memory_epochs,
                                           args.batch_size, args.stream_capacity,
                                           args.small_capacity)), flush=True)
        return 0
    if args.keys:
        args.modes = ",".join(filter(None, [args.modes, "index,hash"]))
    if args.modes is None and args.sizes is None:
        args.sizes = "1e5,1e6,1e7"

    def log(msg: str) -> None:
        print(msg, flush=True)

    results: dict[str, Any] = {
        "command": "python benchmarks/scale.py " + " ".join(argv or sys.argv[1:]),
        "machine": overhead.machine_info(), "threads": threads,
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
    }
    stage_seconds: dict[str, float] = {}
    results["stage_seconds"] = stage_seconds

    def checkpoint() -> None:
        if args.json:
            overhead.write_json(args.json, results)

    if args.sizes:
        t0 = time.perf_counter()
        run_sizes(args.sizes, args.reps, results)
        stage_seconds["sizes"] = time.perf_counter() - t0
        checkpoint()
    if args.modes is not None:
        configs = parse_configs(args.modes)
        results.update({
            "model": "m2", "rows": args.rows, "batch_size": args.batch_size,
            "rounds": args.rounds, "warmup": args.warmup, "measured": args.epochs,
            "stream_capacity": args.stream_capacity, "small_capacity": args.small_capacity,
            "configs": {c: CONFIGS[c][1] for c in configs},
            "clock_of_record": "cpu (process_time, all threads); wall next to it",
        })
        log(f"M2 fits: N={args.rows:,} rounds={args.rounds} epochs/fit={args.warmup}+"
            f"{args.epochs} configs={','.join(configs)} threads={threads} "
            f"load={results['loadavg_start']}")
        t0 = time.perf_counter()
        raw = run_fits(configs, args.rows, args.rounds, args.warmup, args.epochs,
                       args.batch_size, args.stream_capacity, args.small_capacity, log)
        stage_seconds["fits"] = time.perf_counter() - t0
        fits = summarize_fits(raw, configs)
        fits["steps_per_epoch"] = raw["steps_per_epoch"]
        fits["raw_epoch_seconds"] = raw["per_round"]
        results["fits"] = fits
        checkpoint()
        micro = None
        if not args.no_micro and any(c.startswith("hash") for c in configs):
            log("key->slot table alone:")
            t0 = time.perf_counter()
            micro = mapping_micro(args.rows, args.batch_size)
            stage_seconds["mapping_micro"] = time.perf_counter() - t0
            results["mapping_micro"] = micro
            checkpoint()
        memory = None
        if not args.no_memory:
            log("peak RSS, one child process per configuration:")
            t0 = time.perf_counter()
            memory = measure_memory(configs, args, log)
            stage_seconds["memory_children"] = time.perf_counter() - t0
            results["memory_children"] = memory
        results["memory"] = device_memory(configs, raw, memory, micro, args.stream_capacity,
                                          args.small_capacity)
        checkpoint()
        if args.writer_rows and any(c.startswith("stream") for c in configs):
            log("ShardWriter alone:")
            t0 = time.perf_counter()
            results["writer"] = writer_bench(
                [int(float(s)) for s in args.writer_rows.split(",") if s.strip()],
                args.batch_size)
            stage_seconds["writer"] = time.perf_counter() - t0
        results["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
        report = format_report(results)
        results["report_markdown"] = report
        print()
        print(report)
    results["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    checkpoint()
    if args.json:
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
