"""Speed and memory overhead of `keras_sie.SampleImportance`.

One process, interleaved paired runs (a, a2, b, a, a2, b, ...; the order
rotates each round) so that the machine's load swings hit every configuration
alike. For each model:

* (a) plain `model.fit` on the user's numpy arrays (M2: the same dict of
  arrays), exactly as without keras_sie;
* (a2) the same again on a second, identical model: an A/A check. (a2)/(a)
  shows how well this run can resolve a difference; an A/B figure smaller
  than the A/A spread means nothing;
* (b) `model.fit(keras_sie.with_ids(x), ...)` with `SampleImportance`
  (log_dir set: npz + TensorBoard are written every epoch), so carrying the
  ids through Keras's adapter is part of what is measured;
* optional (`--configs`): (b_nomap) the same with `data_map=False`, and (c)
  plain `model.fit` plus the baseline a user would otherwise write: a
  callback that, at each epoch end, runs a separate `tf.function`-compiled
  pass over the training set with its own `tf.GradientTape` and gets the same
  per-sample input gradients (float inputs, and for M2 the Embedding outputs).

Each round calls `fit(epochs=W+E)` per configuration and keeps the last E epoch
times (the first W are warm-up: tracing, and re-tracing after SampleImportance
installs its step). An epoch is timed from the first callback's
`on_epoch_begin` to the last callback's `on_epoch_end`, so the callback's own
epoch-end work is inside it. Two clocks: CPU time of the process
(`time.process_time`, all threads) and wall time. By default TensorFlow is
pinned to one intra-op and one inter-op thread (`--threads 1`), so CPU time
measures the work done and hardly moves when other jobs share the machine;
it is the figure of record. Reported per clock: min and median epoch of each
configuration, the ratio of minima and of medians against (a), and the paired
per-epoch and per-round ratios.

Also measured:
* peak resident memory of (a) and (b), each in a fresh child process
  (`--only a|b --model m1|m2`): the child's own high-water mark `VmHWM`
  from /proc/self/status after `fit`, next to its RSS before `fit`;
* device bytes of the buffer's variables (read off the `tf.Variable`s);
* epoch-end cost: the callback's `on_epoch_end` wrapped with a timer;
* a scaling run: a real `fit` of a one-layer model on N rows with ids, for N
  from 10^4 to 10^6 (10^7 when memory allows), timing `on_epoch_end` and its
  parts (device read, normalize, summary statistics, npz write, TensorBoard).
  Its share of an epoch is given against M1/M2 epoch times extrapolated
  linearly in N from the measured (b) epochs.

Usage:
    python benchmarks/overhead.py --rounds 8 --epochs 3 --no-memory --no-scaling \
        --json benchmarks/results/overhead_cpu.json    # CPU-time A/A + A/B, ~6 min
    python benchmarks/overhead.py --configs a,a2,b,b_nomap,c --json benchmarks/results/overhead.json
    python benchmarks/overhead.py --quick          # smoke run, < 1 min
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import tensorflow as tf

import keras_sie
from keras_sie import buffer as buffer_lib
from keras_sie import scores as scores_lib
from keras_sie import storage as storage_lib
from keras_sie.summaries import SummaryWriter

BATCH = 512
CONFIG_LABEL = {
    "a": "plain fit",
    "a2": "plain fit, a second identical model (A/A check)",
    "b": "fit + SampleImportance (defaults)",
    "b_nomap": "fit + SampleImportance(data_map=False)",
    "b_signals": "fit + SampleImportance(signals=all five: loss, el2n, margin, confidence, "
                 "forgetting)",
    "c": "fit + separate GradientTape pass",
    # Diagnosis (not in ALL_CONFIGS; ask with --configs): SampleImportance's
    # buffer update replaced on its own instance before the step is traced.
    "b_noacc": "fit + SampleImportance, buffer update removed (diagnosis)",
    "b_floor": "fit + SampleImportance, buffer update = one sum of the row sums (diagnosis)",
    "b_scatter": "fit + SampleImportance, buffer update = b_floor + one unchecked scatter "
                 "(diagnosis)",
}
DIAGNOSIS_CONFIGS = ("b_noacc", "b_floor", "b_scatter")
# (b) with the per-epoch data map picture turned off, where keras_sie has one.
HAS_DATA_MAP = "data_map" in inspect.signature(keras_sie.SampleImportance).parameters
ALL_CONFIGS = (("a", "a2", "b", "b_signals", "b_nomap", "c") if HAS_DATA_MAP
               else ("a", "a2", "b", "b_signals", "c"))
# Default: the A/A pair and the defaults of the callback (b); add b_nomap / c
# with --configs.
DEFAULT_CONFIGS = ("a", "a2", "b", "b_signals")
CLOCKS = ("cpu", "wall")


# ----------------------------------------------------------------- data/models
def make_m1_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 64)).astype(np.float32)
    w = rng.normal(size=(64,)).astype(np.float32)
    logit = x @ w / 8.0 + 0.5 * rng.normal(size=n).astype(np.float32)
    y = (logit > 0).astype(np.float32)[:, None]
    return x, y


def make_m2_data(n: int, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    x: dict[str, np.ndarray] = {}
    logit = np.zeros(n, np.float32)
    for i in range(8):
        # Zipf-like ids, as in click logs: a few frequent categories, a long tail.
        ids = (rng.zipf(1.3, size=n) - 1) % 10_000
        x[f"cat_{i}"] = ids.astype(np.int64)
        effect = rng.normal(size=10_000).astype(np.float32) * 0.3
        logit += effect[ids]
    dense = rng.normal(size=(n, 13)).astype(np.float32)
    x["numeric"] = dense
    logit += dense @ rng.normal(size=13).astype(np.float32) * 0.3
    y = (logit + rng.logistic(size=n) > 0).astype(np.float32)[:, None]
    return x, y


class Bench:
    """A compiled model plus the pieces the separate-pass baseline needs."""

    def __init__(self, model: keras.Model, sources_and_pred: Callable):
        self.model = model
        # (x_batch) -> (list of tensors to differentiate, prediction); runs
        # under the baseline's tape.
        self.sources_and_pred = sources_and_pred


def build_m1(seed: int) -> Bench:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((64,), name="x")
    h = keras.layers.Dense(256, activation="relu", name="mlp_256a")(inp)
    h = keras.layers.Dense(256, activation="relu", name="mlp_256b")(h)
    out = keras.layers.Dense(1, activation="sigmoid", name="out")(h)
    model = keras.Model(inp, out, name="m1")
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")

    def sources_and_pred(xb, tape):
        tape.watch(xb)
        return [xb], model(xb, training=False)

    return Bench(model, sources_and_pred)


def build_m2(seed: int) -> Bench:
    keras.utils.set_random_seed(seed)
    cat_inputs = [keras.Input((), dtype="int64", name=f"cat_{i}") for i in range(8)]
    dense_in = keras.Input((13,), name="numeric")
    embs = [keras.layers.Embedding(10_000, 16, name=f"emb_{i}") for i in range(8)]
    concat = keras.layers.Concatenate(name="concat")
    d1 = keras.layers.Dense(256, activation="relu", name="mlp_256")
    d2 = keras.layers.Dense(128, activation="relu", name="mlp_128")
    d3 = keras.layers.Dense(1, activation="sigmoid", name="out")

    def head(emb_outs, dense):
        return d3(d2(d1(concat(list(emb_outs) + [dense]))))

    out = head([e(c) for e, c in zip(embs, cat_inputs)], dense_in)
    inputs = {t.name: t for t in cat_inputs}
    inputs["numeric"] = dense_in
    model = keras.Model(inputs, out, name="m2")
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")

    def sources_and_pred(xb, tape):
        # What a user writes to get d loss / d (embedding outputs, dense):
        # look the embeddings up outside the tape's watch list, then watch them.
        emb_outs = [e(xb[f"cat_{i}"]) for i, e in enumerate(embs)]
        dense = xb["numeric"]
        tape.watch(emb_outs)
        tape.watch(dense)
        return emb_outs + [dense], head(emb_outs, dense)

    return Bench(model, sources_and_pred)


MODELS = {
    "m1": ("M1 dense MLP 64-256-256-1", make_m1_data, build_m1),
    "m2": ("M2 CTR 8x emb(10k,16) + 13 dense, MLP 256-128-1", make_m2_data, build_m2),
}


# ---------------------------------------------------------------- callbacks
def diagnosis_accumulate(buffer, kind: str):
    """A stand-in for `ImportanceBuffer.accumulate` (diagnosis configurations).

    Every kind counts the step (so the callback sees its step ran); then
    `b_noacc` adds nothing (TensorFlow prunes the input gradients), `b_floor`
    adds the total of the row sums into one variable (keeps the input
    gradients and their row sums alive), `b_scatter` adds that total and a
    visit per row at the ids with one unchecked scatter.
    """
    def accumulate(ids, per_feature_rows, scale, *args, **kwargs):
        groups = len(per_feature_rows)
        counts = np.zeros(len(buffer_lib._COUNTERS), np.int64)
        counts[buffer_lib._COUNTER["steps"]] = 1
        counts[buffer_lib._COUNTER["group_steps"]] = groups
        tf.raw_ops.AssignAddVariableOp(resource=buffer.counters.handle, value=tf.constant(counts))
        if kind == "b_noacc":
            return
        total = tf.add_n([tf.cast(r, tf.float32) for r in per_feature_rows]) * scale
        if kind == "b_floor":
            tf.raw_ops.AssignAddVariableOp(
                resource=buffer.feature_sums.handle,
                value=tf.pad(tf.reshape(tf.reduce_sum(total), [1]),
                             [[0, buffer.feature_sums.shape[0] - 1]]))
        else:
            tf.raw_ops.ResourceScatterAdd(
                resource=buffer.sums_visits.handle, indices=tf.reshape(ids, [-1]),
                updates=tf.stack([total, tf.ones_like(total)], axis=1))
    return accumulate


class DiagnosisHook(keras.callbacks.Callback):
    """Put after `sie`: swaps its buffer update before the first step traces."""

    def __init__(self, sie, kind: str):
        super().__init__()
        self.sie, self.kind = sie, kind

    def on_train_begin(self, logs=None):
        self.sie._buffer.accumulate = diagnosis_accumulate(self.sie._buffer, self.kind)


class EpochClock:
    """Two callbacks: `first` stamps on_epoch_begin, `last` stamps on_epoch_end.

    Records wall time (`perf_counter`) in `times` and the process's CPU time
    (`process_time`: every thread of this process, user + system) in
    `cpu_times`. With TensorFlow pinned to one intra-op and one inter-op thread
    the CPU time is close to the work done, whatever else runs on the machine.
    """

    def __init__(self):
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self._start = 0.0
        self._cpu_start = 0.0
        clock = self

        class _First(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                clock._start = time.perf_counter()
                clock._cpu_start = time.process_time()

        class _Last(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                clock.cpu_times.append(time.process_time() - clock._cpu_start)
                clock.times.append(time.perf_counter() - clock._start)

        self.first = _First()
        self.last = _Last()


class SeparatePassBaseline(keras.callbacks.Callback):
    """(c): per-sample input gradients from a separate pass at each epoch end.

    The pass is what a user writes without keras_sie: a `tf.function` over the
    training set in batches, a `tf.GradientTape` on the per-sample losses
    (reduction none; summing them makes row i of the gradient sample i's own),
    and sum_j |g_ij| per row, normalized to I_i.
    """

    def __init__(self, bench: Bench, x, y, batch_size: int = BATCH):
        super().__init__()
        self.bench = bench
        self.ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).prefetch(2)
        self.importance: np.ndarray | None = None
        self._fn = tf.function(self._rows)

    def _rows(self, xb, yb):
        with tf.GradientTape() as tape:
            sources, pred = self.bench.sources_and_pred(xb, tape)
            per_sample = keras.losses.binary_crossentropy(yb, pred)
            total = tf.reduce_sum(per_sample)
        grads = tape.gradient(total, sources)
        rows = [tf.reduce_sum(tf.reshape(tf.abs(g), [tf.shape(g)[0], -1]), axis=1) for g in grads]
        return tf.add_n(rows)

    def on_epoch_end(self, epoch, logs=None):
        parts = [self._fn(xb, yb) for xb, yb in self.ds]
        s = np.concatenate([p.numpy() for p in parts]).astype(np.float64)
        self.importance = s / s.sum()


def timed_method(obj: Any, name: str, sink: list[float]) -> None:
    """Replaces obj.name by a wrapper that appends each call's duration to sink."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - t0)

    object.__setattr__(obj, name, wrapper)


@contextmanager
def timed_parts(parts: dict[str, list[float]], targets: list[tuple[Any, str, str]]):
    """Temporarily wraps attributes (module functions / methods) with timers."""
    saved = []
    for owner, attr, label in targets:
        original = getattr(owner, attr)
        sink = parts.setdefault(label, [])

        def wrapper(*args, __f=original, __sink=sink, **kwargs):
            t0 = time.perf_counter()
            try:
                return __f(*args, **kwargs)
            finally:
                __sink.append(time.perf_counter() - t0)

        saved.append((owner, attr, original))
        setattr(owner, attr, wrapper)
    try:
        yield parts
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


def buffer_device_bytes(sie: keras_sie.SampleImportance) -> dict[str, int]:
    buf = sie._buffer  # benchmark introspection of the live buffer
    per_sample = 0
    total = 0
    variables = getattr(buf, "variables", None)
    if variables is None:  # keras_sie before the packed buffer (for A/B runs of old commits)
        variables = [v for v in vars(buf).values() if isinstance(v, tf.Variable)]
    for var in variables:
        nbytes = int(var.shape.num_elements()) * var.dtype.size
        total += nbytes
        if var.shape.rank >= 1 and var.shape[0] in (buf.num_samples, buf.num_samples + 1):
            per_sample += nbytes
    return {
        "num_samples": buf.num_samples,
        "per_sample_bytes": per_sample / buf.num_samples,
        "per_sample_total_bytes": per_sample,
        "total_bytes": total,
    }


def set_threads(n: int) -> dict[str, int]:
    """Pins TensorFlow to n intra-op and n inter-op threads (0: TF's default).

    Must run before TensorFlow executes its first op (the thread pools are
    fixed then).
    """
    if n > 0:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(n)
            tf.config.threading.set_inter_op_parallelism_threads(n)
        except RuntimeError as e:
            raise SystemExit(f"--threads {n}: TensorFlow already started its thread pools ({e})")
    return {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}


def stats(values: list[float]) -> dict[str, float]:
    return {
        "min": float(min(values)),
        "median": float(statistics.median(values)),
        "max": float(max(values)),
        "n": len(values),
    }


def paired_summary(per_round: dict[str, list[list[float]]], configs: tuple[str, ...]) -> dict:
    """Epoch statistics of one clock, and the ratios of every config to (a).

    `per_round[c][r]` are the kept epochs of config c in round r. Ratios:
    min(c)/min(a) (the least disturbed epoch of each), median(c)/median(a), and
    the paired ratios (epoch j of round r of c over the same epoch of a).
    """
    epochs = {c: stats([t for rr in per_round[c] for t in rr]) for c in configs}
    out: dict[str, Any] = {"epoch_seconds": epochs, "ratio_of_min": {}, "ratio_of_median": {},
                           "paired_ratios": {}}
    for c in configs:
        if c == "a":
            continue
        key = f"{c}/a"
        out["ratio_of_min"][key] = epochs[c]["min"] / epochs["a"]["min"]
        out["ratio_of_median"][key] = epochs[c]["median"] / epochs["a"]["median"]
        pairs = [per_round[c][r][j] / per_round["a"][r][j]
                 for r in range(len(per_round["a"])) for j in range(len(per_round["a"][r]))]
        out["paired_ratios"][key] = stats(pairs)
        # Per round: the least disturbed epoch of c over that of a (same minute).
        out.setdefault("round_min_ratios", {})[key] = stats(
            [min(per_round[c][r]) / min(per_round["a"][r]) for r in range(len(per_round["a"]))])
    return out


# -------------------------------------------------------------- paired runs
def run_model(key: str, n: int, rounds: int, warmup: int, measured: int, log,
              configs: tuple[str, ...] = DEFAULT_CONFIGS, batch_size: int = BATCH,
              jit_compile: Any = "auto") -> dict:
    title, make_data, build = MODELS[key]
    x, y = make_data(n)
    x_ids = keras_sie.with_ids(x)
    benches = {}
    for c in configs:  # identical initial weights
        benches[c] = build(seed=7)
        if jit_compile != "auto":
            benches[c].model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy",
                                     jit_compile=jit_compile)
    tmp = tempfile.mkdtemp(prefix=f"sie_bench_{key}_")
    sie = keras_sie.SampleImportance(log_dir=tmp, verbose=0)
    end_times: list[float] = []
    begin_times: list[float] = []
    timed_method(sie, "on_epoch_end", end_times)
    timed_method(sie, "on_epoch_begin", begin_times)
    sie_nomap = None
    nomap_end_times: list[float] = []
    if "b_nomap" in configs:
        sie_nomap = keras_sie.SampleImportance(log_dir=tmp + "_nomap", verbose=0, data_map=False)
        timed_method(sie_nomap, "on_epoch_end", nomap_end_times)
    sie_signals = None
    if "b_signals" in configs:
        sie_signals = keras_sie.SampleImportance(
            log_dir=tmp + "_signals", verbose=0,
            signals=("loss", "el2n", "margin", "confidence", "forgetting"))
    baseline = SeparatePassBaseline(benches["c"], x, y, batch_size) if "c" in configs else None
    diagnosis = {c: keras_sie.SampleImportance(verbose=0) for c in configs
                 if c in DIAGNOSIS_CONFIGS}
    clocks = {c: EpochClock() for c in configs}
    per_round: dict[str, dict[str, list[list[float]]]] = {
        k: {c: [] for c in configs} for k in CLOCKS}
    n_end_kept: list[float] = []
    nomap_end_kept: list[float] = []
    for r in range(rounds):
        # Rotate the order each round so that no configuration always runs first.
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for c in order:
            clock = clocks[c]
            start = len(clock.times)
            n_end_before = len(end_times)
            nomap_before = len(nomap_end_times)
            middle = {"b": [sie], "b_nomap": [sie_nomap], "b_signals": [sie_signals],
                      "c": [baseline]}.get(c, [])
            if c in diagnosis:
                middle = [diagnosis[c], DiagnosisHook(diagnosis[c], c)]
            data_x = x_ids if c.startswith("b") else x
            benches[c].model.fit(
                data_x, y, batch_size=batch_size, epochs=warmup + measured, shuffle=True,
                verbose=0, callbacks=[clock.first, *middle, clock.last],
            )
            per_round["wall"][c].append(clock.times[start + warmup:])
            per_round["cpu"][c].append(clock.cpu_times[start + warmup:])
            if c == "b":
                n_end_kept.extend(end_times[n_end_before + warmup:])
            if c == "b_nomap":
                nomap_end_kept.extend(nomap_end_times[nomap_before + warmup:])
        log(f"  {key} round {r + 1}/{rounds} cpu s/epoch: " + "  ".join(
            f"{c}={min(per_round['cpu'][c][-1]):.3f}" for c in configs
        ) + "  wall: " + " ".join(
            f"{c}={min(per_round['wall'][c][-1]):.2f}" for c in configs
        ) + f"  load={os.getloadavg()[0]:.1f}")
    clocks_out = {k: paired_summary(per_round[k], configs) for k in CLOCKS}
    res: dict[str, Any] = {
        "title": title,
        "num_samples": n,
        "batch_size": batch_size,
        "jit_compile": jit_compile,
        "rounds": rounds,
        "warmup_epochs_per_fit": warmup,
        "measured_epochs_per_fit": measured,
        "configs": {c: CONFIG_LABEL[c] for c in configs},
        "cpu": clocks_out["cpu"],
        "wall": clocks_out["wall"],
        "raw_epoch_seconds": per_round,
    }
    # Back-compatible keys (wall clock), as in earlier versions of this script.
    res["epoch_seconds"] = clocks_out["wall"]["epoch_seconds"]
    res["ratio_of_median_epochs"] = clocks_out["wall"]["ratio_of_median"]
    res["paired_ratios"] = clocks_out["wall"]["paired_ratios"]
    if "b" in configs and n_end_kept:
        end_stats = stats(n_end_kept)
        res["epoch_end_seconds"] = end_stats
        res["epoch_end_share_of_epoch"] = end_stats["median"] / res["epoch_seconds"]["b"]["median"]
        res["epoch_begin_seconds"] = stats(begin_times[1:] or begin_times)
        res["device_buffer"] = buffer_device_bytes(sie)
    if nomap_end_kept:
        res["epoch_end_seconds_data_map_off"] = stats(nomap_end_kept)
        res["epoch_end_share_of_epoch_data_map_off"] = (
            statistics.median(nomap_end_kept) / res["epoch_seconds"]["b_nomap"]["median"])
    # The score is the same quantity in (b) and (c); check they agree in rank
    # (the baseline's pass runs after the epoch's updates, so not identical).
    if baseline is not None and sie.importance is not None and baseline.importance is not None:
        from scipy.stats import spearmanr  # optional; only for the sanity check

        res["spearman_b_vs_c_last_epoch"] = float(
            spearmanr(sie.importance, baseline.importance).statistic)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(tmp + "_nomap", ignore_errors=True)
    return res


# -------------------------------------------------------------------- memory
def child_memory(key: str, config: str, n: int, epochs: int) -> dict:
    """Runs inside a fresh process: one fit, reports resident memory."""
    _, make_data, build = MODELS[key]
    x, y = make_data(n)
    bench = build(seed=7)
    callbacks = []
    tmp = None
    if config.startswith("b"):
        x = keras_sie.with_ids(x)
        tmp = tempfile.mkdtemp(prefix="sie_mem_")
        extra = {"data_map": False} if config == "b_nomap" else {}
        callbacks = [keras_sie.SampleImportance(log_dir=tmp, verbose=0, **extra)]
    rss_before = _status_kb("VmRSS")
    bench.model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, callbacks=callbacks)
    # VmHWM: this process's own peak RSS. (getrusage's ru_maxrss is no good
    # here: Linux carries the parent's maximum over fork+exec into the child.)
    peak = _status_kb("VmHWM")
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "model": key, "config": config, "num_samples": n, "epochs": epochs,
        "rss_before_fit_mib": rss_before / 1024, "peak_rss_mib": peak / 1024,
    }


def _status_kb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    return float("nan")


def measure_memory(keys: list[str], n: int, epochs: int, log, threads_arg: int = 1) -> dict:
    out: dict[str, dict] = {}
    for key in keys:
        out[key] = {}
        for config in ("a", "b", "b_nomap") if HAS_DATA_MAP else ("a", "b"):
            cmd = [sys.executable, os.path.abspath(__file__), "--only", config, "--model", key,
                   "--num-samples", str(n), "--epochs", str(epochs),
                   "--threads", str(threads_arg)]
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                log(f"  memory child {key}/{config} failed:\n{proc.stderr[-2000:]}")
                out[key][config] = None
                continue
            out[key][config] = json.loads(line[-1][len("RESULT "):])
            log(f"  memory {key}/{config}: peak RSS {out[key][config]['peak_rss_mib']:.0f} MiB")
        a, b = out[key]["a"], out[key]["b"]
        if a is None or b is None:
            continue
        out[key]["peak_delta_mib"] = b["peak_rss_mib"] - a["peak_rss_mib"]
        out[key]["peak_ratio"] = b["peak_rss_mib"] / a["peak_rss_mib"]
        if out[key].get("b_nomap"):
            out[key]["peak_delta_mib_data_map_off"] = (
                out[key]["b_nomap"]["peak_rss_mib"] - a["peak_rss_mib"])
    return out


# ------------------------------------------------------------------- scaling
def scaling_run(sizes: list[int], epochs: int, log) -> list[dict]:
    """Real fit of a one-layer model on N rows; times on_epoch_end and its parts."""
    rows = []
    for n in sizes:
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(n, 4)).astype(np.float32)
        y = rng.normal(size=(n, 1)).astype(np.float32)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(1e-3), "mse")
        tmp = tempfile.mkdtemp(prefix="sie_scale_")
        sie = keras_sie.SampleImportance(log_dir=tmp, verbose=0)
        end_times: list[float] = []
        timed_method(sie, "on_epoch_end", end_times)
        parts: dict[str, list[float]] = {}
        sie_mod = sys.modules["keras_sie.callback"]
        targets = [
            (scores_lib, "normalize", "normalize"),
            (scores_lib, "summarize", "summary statistics"),
            (storage_lib, "write_epoch", "npz write"),
            (storage_lib, "write_manifest", "manifest write"),
            (SummaryWriter, "write_epoch", "TensorBoard write"),
            (type(sie), "top_k", "top-k table"),
            (sie_mod, "render_data_map", "data map image"),
        ]
        # Only what this version of keras_sie has (the callback calls these
        # through its module globals, so patching them there times them).
        targets = [t for t in targets if hasattr(t[0], t[1])]
        batch = max(BATCH, n // 64)  # few steps: the epoch end is what is measured here
        with timed_parts(parts, targets):
            read_times: list[float] = []
            fit_start = time.perf_counter()
            # Wrap the buffer's read once it exists (created in on_train_begin).

            class _WrapRead(keras.callbacks.Callback):
                def __init__(self, sie, sink):
                    super().__init__()
                    self.sie, self.sink = sie, sink

                def on_train_begin(self, logs=None):
                    if "read" not in self.sie._buffer.__dict__:
                        timed_method(self.sie._buffer, "read", self.sink)

            model.fit(keras_sie.with_ids(x), y, batch_size=batch, epochs=epochs, verbose=0,
                      callbacks=[sie, _WrapRead(sie, read_times)])
            fit_s = time.perf_counter() - fit_start
        parts["device read (buffer.read)"] = read_times
        # Callback order: sie.on_train_begin runs before _WrapRead's, and the
        # buffer is created there, so every epoch's read is timed.
        npz_bytes = os.path.getsize(storage_lib.epoch_path(tmp, 0))
        shutil.rmtree(tmp, ignore_errors=True)
        keep = end_times[1:] if len(end_times) > 1 else end_times
        row = {
            "num_samples": n,
            "batch_size": batch,
            "epochs": epochs,
            "fit_seconds": fit_s,
            "epoch_end_seconds": stats(keep),
            "parts_median_seconds": {
                k: float(statistics.median(v[1:] if len(v) > 1 else v)) for k, v in parts.items() if v
            },
            "npz_bytes_per_epoch": npz_bytes,
            "device_buffer_bytes": buffer_device_bytes(sie),
        }
        rows.append(row)
        log(f"  scaling N={n:>9,}: on_epoch_end median {row['epoch_end_seconds']['median'] * 1e3:8.1f} ms"
            f"  load={os.getloadavg()[0]:.1f}")
        del x, y, model, sie
    return rows


# ------------------------------------------------------------------- report
def machine_info() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_total = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_total = int(line.split()[1]) // 1024
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "mem_total_mib": mem_total,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "platform": platform.platform(),
        "keras_sie": keras_sie_source(),
    }


def keras_sie_source() -> dict[str, Any]:
    """Where the measured keras_sie was imported from, and its git commit if known."""
    where = os.path.dirname(os.path.abspath(keras_sie.__file__))
    commit = None
    marker = os.path.join(os.path.dirname(where), "COMMIT")  # a `git archive` copy
    if os.path.exists(marker):
        with open(marker) as f:
            commit = f.read().strip()
    else:
        try:
            commit = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], check=False,
                                    capture_output=True, text=True, timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--", "."],
                                   check=False, capture_output=True, text=True,
                                   timeout=10).stdout.strip()
            if dirty:
                commit += " (with uncommitted changes)"
        except (OSError, subprocess.SubprocessError):
            pass
    return {"path": where, "commit": commit}


def mem_available_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return 0.0


def format_report(res: dict) -> str:
    lines = []
    m = res["machine"]
    lines.append(f"Machine: {m['nproc']} CPU(s), {m['cpu_model']}, TF {m['tensorflow']}, "
                 f"Keras {m['keras']}; load average before/after: "
                 f"{res['loadavg_start']} / {res['loadavg_end']}")
    lines.append("")
    if res["models"]:
        lines.append(f"TensorFlow threads: intra-op {res.get('threads', {}).get('intra_op')}, "
                     f"inter-op {res.get('threads', {}).get('inter_op')}. Per epoch, first epoch "
                     "of every fit dropped; ratios against (a) plain fit.")
        for clock, name in (("cpu", "CPU seconds (process time)"), ("wall", "wall seconds")):
            if not all(clock in r for r in res["models"].values()):
                continue
            lines.append("")
            lines.append(f"{name}: (a) min / median; for each config, "
                         "ratio of minima / ratio of medians [paired ratios min-max]")
            lines.append("")
            keys = list(next(iter(res["models"].values()))[clock]["ratio_of_min"])
            lines.append("| model | (a) s/epoch min / median |" + "".join(f" {k} |" for k in keys))
            lines.append("|---|---:|" + "---:|" * len(keys))
            for r in res["models"].values():
                c = r[clock]
                a = c["epoch_seconds"]["a"]
                cells = "".join(
                    f" {c['ratio_of_min'][k]:.3f} / **{c['ratio_of_median'][k]:.3f}** "
                    f"[{c['paired_ratios'][k]['min']:.2f}-{c['paired_ratios'][k]['max']:.2f}] |"
                    for k in keys)
                label = r["title"] + (f", batch {r['batch_size']}" if r["batch_size"] != BATCH
                                      else "") + (", XLA" if r.get("jit_compile") is True else "")
                lines.append(f"| {label} | {a['min']:.3f} / {a['median']:.3f} |{cells}")
        lines.append("")
        end = [f"{k.upper()} {r['epoch_end_seconds']['median'] * 1e3:.0f} ms "
               f"({100 * r['epoch_end_share_of_epoch']:.1f} % of a (b) epoch, wall)"
               for k, r in res["models"].items() if r.get("epoch_end_seconds")]
        if end:
            lines.append("SampleImportance.on_epoch_end, median: " + "; ".join(end) + ".")
        lines.append("Configurations: " + "; ".join(
            f"{k} = {v}" for k, v in next(iter(res["models"].values()))["configs"].items()) + ".")
    if res.get("memory"):
        lines.append("")
        lines.append("| model | peak RSS (a) | peak RSS (b) | b - a | device buffer |")
        lines.append("|---|---:|---:|---:|---:|")
        for key, mm in res["memory"].items():
            dev = res["models"].get(key, {}).get("device_buffer")
            dev_s = (f"{dev['per_sample_bytes']:.0f} B/sample ({dev['total_bytes'] / 1024:.0f} KiB)"
                     if dev else "")
            if not mm.get("a") or not mm.get("b"):
                continue
            b_cell = f"{mm['b']['peak_rss_mib']:.0f} MiB"
            d_cell = f"{mm['peak_delta_mib']:+.0f} MiB"
            if mm.get("b_nomap"):
                b_cell += f" (data_map=False: {mm['b_nomap']['peak_rss_mib']:.0f} MiB)"
                d_cell += f" ({mm['peak_delta_mib_data_map_off']:+.0f} MiB)"
            lines.append(f"| {key.upper()} | {mm['a']['peak_rss_mib']:.0f} MiB | {b_cell} | "
                         f"{d_cell} | {dev_s} |")
    if res.get("scaling"):
        lines.append("")
        per_sample = {k: r["epoch_seconds"]["a"]["median"] / r["num_samples"]
                      for k, r in res["models"].items()}
        head = "".join(f" share of {k.upper()} epoch* |" for k in per_sample)
        cols = [("device read (buffer.read)", "read"), ("normalize", "normalize"),
                ("summary statistics", "summary"), ("top-k table", "top-k"),
                ("npz write", "npz"), ("manifest write", "manifest"),
                ("TensorBoard write", "TensorBoard"), ("data map image", "data map")]
        cols = [(k, label) for k, label in cols
                if any(k in row["parts_median_seconds"] for row in res["scaling"])]
        lines.append("| N | on_epoch_end (median) |" + "".join(f" {label} |" for _, label in cols)
                     + head)
        lines.append("|---:|---:|" + "---:|" * (len(cols) + len(per_sample)))
        for row in res["scaling"]:
            p = row["parts_median_seconds"]
            t = row["epoch_end_seconds"]["median"]
            shares = "".join(f" {100 * t / (s * row['num_samples']):.2f} % |"
                             for s in per_sample.values())
            lines.append(f"| {row['num_samples']:,} | {t * 1e3:.1f} ms |"
                         + "".join(f" {p.get(k, 0) * 1e3:.1f} |" for k, _ in cols) + shares)
        lines.append("Parts in ms (medians; the TensorBoard write includes the histogram "
                     "and the image). * Against the model's plain-fit (a) epoch time per sample "
                     "measured above, extrapolated linearly to N.")
    return "\n".join(lines)


def write_json(path: str, obj) -> None:
    """Writes a result file (its folder created), as every benchmark here does."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (< 1 min)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    p.add_argument("--models", default="m1,m2", help="comma list of m1,m2")
    p.add_argument("--num-samples", type=int, default=None, help="rows per model (default 100000)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up epochs per fit (default 1)")
    p.add_argument("--epochs", type=int, default=None, help="measured epochs per fit (default 2)")
    p.add_argument("--no-memory", action="store_true", help="skip the child-process RSS runs")
    p.add_argument("--no-scaling", action="store_true", help="skip the scaling run")
    p.add_argument("--scaling-sizes", default=None, help="comma list of N for the scaling run")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help="comma list of " + ",".join(ALL_CONFIGS) + " (default: a,a2,b); "
                   "a is always run, as the reference")
    p.add_argument("--threads", type=int, default=1,
                   help="TF intra-op and inter-op threads (default 1: CPU time then measures "
                   "the work; 0: TensorFlow's default)")
    p.add_argument("--batch-size", type=int, default=BATCH, help=f"batch size (default {BATCH})")
    p.add_argument("--jit-compile", choices=["auto", "true", "false"], default="auto",
                   help="compile(jit_compile=...) of every model (default: Keras's auto)")
    p.add_argument("--only", choices=["a", "b", "b_nomap"], help=argparse.SUPPRESS)
    p.add_argument("--model", choices=list(MODELS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    threads = set_threads(args.threads)

    if args.only:  # memory child
        res = child_memory(args.model, args.only, args.num_samples or 100_000, args.epochs or 3)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    quick = args.quick
    n = args.num_samples or (4_096 if quick else 100_000)
    rounds = args.rounds or (2 if quick else 4)
    measured = args.epochs or (1 if quick else 2)
    keys = [k.strip() for k in args.models.split(",") if k.strip() and k.strip() != "none"]
    for k in keys:
        if k not in MODELS:
            p.error(f"unknown model {k!r}; choose from {list(MODELS)}")
    configs = tuple(dict.fromkeys(["a"] + [c.strip() for c in args.configs.split(",") if c.strip()]))
    for c in configs:
        if c not in ALL_CONFIGS + DIAGNOSIS_CONFIGS:
            p.error(f"unknown config {c!r}; choose from {list(ALL_CONFIGS + DIAGNOSIS_CONFIGS)}")
    jit = {"auto": "auto", "true": True, "false": False}[args.jit_compile]
    if args.scaling_sizes:
        sizes = [int(float(s)) for s in args.scaling_sizes.split(",")]
    elif quick:
        sizes = [10_000, 100_000]
    else:
        sizes = [10_000, 100_000, 1_000_000]
        # 10^7 rows: ~0.5 GB of inputs plus Keras's copies; only with room to spare.
        if mem_available_mib() > 8_000:
            sizes.append(10_000_000)

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_start = time.time()
    res: dict[str, Any] = {
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
        "quick": quick,
        "machine": machine_info(),
        "threads": threads,
        "clock_of_record": "cpu (process_time); wall is shown next to it",
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "models": {},
    }
    log(f"keras_sie overhead benchmark: N={n:,} rounds={rounds} epochs/fit={args.warmup}+{measured} "
        f"configs={','.join(configs)} threads={threads} load={res['loadavg_start']}")
    def checkpoint() -> None:  # keep what is measured if a later stage fails
        if args.json:
            write_json(args.json, res)

    for key in keys:
        res["models"][key] = run_model(key, n, rounds, args.warmup, measured, log, configs,
                                       args.batch_size, jit)
        checkpoint()
    if not args.no_memory and not quick and keys:
        log("peak RSS, one child process per configuration:")
        res["memory"] = measure_memory(keys, n, args.warmup + measured, log, args.threads)
        checkpoint()
    if not args.no_scaling:
        log("scaling run (epoch-end cost vs num_samples):")
        res["scaling"] = scaling_run(sizes, epochs=2 if quick else 3, log=log)
    res["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    res["wall_seconds"] = time.time() - t_start
    report = format_report(res)
    res["report_markdown"] = report
    print()
    print(report)
    if args.json:
        write_json(args.json, res)
        log(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
