"""Where the CTR model's (M2's) extra cost goes: timing variants and a TF profile.

Two measurements, both on `overhead.py`'s M2 (8 x Embedding(10000, 16) + 13
dense, 256-128-1, batch 512), TensorFlow pinned to one intra-op and one
inter-op thread, CPU time (process time) per epoch, first epoch of every fit
dropped:

1. **Variants**, run as paired alternating rounds in one process like
   `overhead.py`. Each removes one part of the callback's work, by a public
   option or by monkeypatching from this script (nothing in `keras_sie/` is
   edited), so differences between neighbours price one part:

   * `a`     plain `fit` on the dict of arrays;
   * `a2`    the same again (A/A: the noise floor);
   * `ids`   `fit(with_ids(x))` on a model whose `train_step` only strips the
             id and calls Keras's own step: carrying the ids through Keras's
             numpy adapter;
   * `noacc` `SampleImportance(log_dir=None, data_map=False)` with
             `ImportanceBuffer.accumulate` reduced to the step counter: the
             fused step (extra gradient targets; the row sums are pruned as
             unused);
   * `lean`  the same with a minimal accumulate: row sums, one add, two
             scatters (sums, visits), no range check, no fault counters, no
             per-feature sums;
   * `full`  `SampleImportance(log_dir=None, data_map=False)` unpatched: the
             whole in-step work, and an epoch end that writes nothing;
   * `b`     `SampleImportance(log_dir=tmp)` with the defaults (npz +
             TensorBoard each epoch, data map "auto"), as `overhead.py` (b).

2. **Trace**: the TensorFlow profiler over one epoch of (a) and of (full);
   the host plane's op events are summed by op type, and the difference
   (full - a) is listed, with the op counts of the traced train functions.

Usage:
    python benchmarks/profile_m2.py --json benchmarks/results/profile_m2.json
    python benchmarks/profile_m2.py --quick          # smoke run, < 1 min
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras
import overhead
import tensorflow as tf

import keras_sie
from keras_sie import buffer as buffer_lib

VARIANTS = {
    "a": "plain fit",
    "a2": "plain fit again (A/A)",
    "ids": "ids carried through Keras's adapter, stripped in train_step; no callback",
    "noacc": "fused step, accumulate = step counter only (log_dir=None, data_map=False)",
    "lean": "fused step + minimal accumulate (row sums, 2 scatters; no checks/counters)",
    "full": "SampleImportance(log_dir=None, data_map=False), unpatched",
    "b": "SampleImportance(log_dir=tmp), defaults",
}


# --------------------------------------------------------------- patches
def _step_counter(self):
    # counters[0] counts steps (keras_sie.buffer._COUNTERS); the epoch-end guard needs it.
    one = tf.one_hot(0, len(buffer_lib._COUNTERS), dtype=tf.int64)
    buffer_lib._assign_add(self.counters, one)


def _noacc(self, ids, per_feature_rows, scale, per_task_rows=None, step_ok=None, **kwargs):
    _step_counter(self)


def _lean(self, ids, per_feature_rows, scale, per_task_rows=None, step_ok=None, **kwargs):
    _step_counter(self)
    slots = tf.cast(tf.reshape(ids, [-1]), tf.int64)
    total = tf.add_n([tf.cast(r, tf.float32) for r in per_feature_rows])
    total = total * tf.cast(scale, tf.float32)
    buffer_lib._scatter_add(self.sums_visits, slots,
                            tf.stack([total, tf.ones_like(total)], axis=1))


class PatchAccumulate(keras.callbacks.Callback):
    """Swaps ImportanceBuffer.accumulate for the duration of one fit.

    Must come before SampleImportance in the callback list only for
    on_train_end ordering; the swap itself happens in set_model, before the
    step is traced (the step is traced on the first batch).
    """

    def __init__(self, replacement):
        super().__init__()
        self.replacement = replacement
        self.saved = None

    def set_model(self, model):
        super().set_model(model)
        if self.saved is None:
            self.saved = buffer_lib.ImportanceBuffer.accumulate
            buffer_lib.ImportanceBuffer.accumulate = self.replacement

    def on_train_end(self, logs=None):
        if self.saved is not None:
            buffer_lib.ImportanceBuffer.accumulate = self.saved
            self.saved = None


def strip_ids_step(model):
    """An instance train_step that removes the id and calls Keras's own step."""
    base = type(model).train_step

    def train_step(data):
        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        x, _ = keras_sie.split_ids(x)
        return base(model, keras.utils.pack_x_y_sample_weight(x, y, sw))

    object.__setattr__(model, "train_step", train_step)
    model.train_function = None


# ---------------------------------------------------------------- variants
def run_variants(n: int, rounds: int, warmup: int, measured: int, names: list[str], log) -> dict:
    x, y = overhead.make_m2_data(n)
    x_ids = keras_sie.with_ids(x)
    tmp = tempfile.mkdtemp(prefix="sie_prof_")
    models = {v: overhead.build_m2(seed=7).model for v in names}
    if "ids" in models:
        strip_ids_step(models["ids"])
    sies = {
        "noacc": keras_sie.SampleImportance(log_dir=None, data_map=False, verbose=0),
        "lean": keras_sie.SampleImportance(log_dir=None, data_map=False, verbose=0),
        "full": keras_sie.SampleImportance(log_dir=None, data_map=False, verbose=0),
        "b": keras_sie.SampleImportance(log_dir=tmp, verbose=0),
    }
    patches = {"noacc": _noacc, "lean": _lean}
    clocks = {v: overhead.EpochClock() for v in names}
    per_round: dict[str, dict[str, list[list[float]]]] = {
        k: {v: [] for v in names} for k in overhead.CLOCKS}
    configs = tuple(names)
    for r in range(rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for v in order:
            clock = clocks[v]
            start = len(clock.times)
            middle: list = []
            if v in patches:
                middle.append(PatchAccumulate(patches[v]))
            if v in sies:
                middle.append(sies[v])
            data_x = x if v in ("a", "a2") else x_ids
            models[v].fit(data_x, y, batch_size=overhead.BATCH, epochs=warmup + measured,
                          shuffle=True, verbose=0, callbacks=[clock.first, *middle, clock.last])
            per_round["wall"][v].append(clock.times[start + warmup:])
            per_round["cpu"][v].append(clock.cpu_times[start + warmup:])
        log(f"  round {r + 1}/{rounds} cpu s/epoch (min): " + "  ".join(
            f"{v}={min(per_round['cpu'][v][-1]):.3f}" for v in names)
            + f"  load={os.getloadavg()[0]:.1f}")
    shutil.rmtree(tmp, ignore_errors=True)
    out = {k: overhead.paired_summary(per_round[k], configs) for k in overhead.CLOCKS}
    out["raw_epoch_seconds"] = per_round
    out["variants"] = {v: VARIANTS[v] for v in names}
    return out


# ------------------------------------------------------------------- trace
def _op_type(name: str) -> str:
    # Host-plane TraceMe names of executed ops are "op_name:OpType".
    return name.rsplit(":", 1)[-1] if ":" in name else name


def profile_epoch(model, x, y, callbacks, logdir: str) -> dict[str, Any]:
    """Profiles the second epoch of a 2-epoch fit; op time by op type (host plane)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    class _Prof(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                tf.profiler.experimental.start(logdir)

        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                tf.profiler.experimental.stop()

    model.fit(x, y, batch_size=overhead.BATCH, epochs=2, shuffle=True, verbose=0,
              callbacks=[*callbacks, _Prof()])
    files = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    space = xplane_pb2.XSpace()
    with open(max(files), "rb") as f:
        space.ParseFromString(f.read())
    by_type: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        meta = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            for ev in line.events:
                name = meta.get(ev.metadata_id, "")
                if ":" not in name or name.lstrip().startswith(("__inference", "Iterator")):
                    continue  # whole-function events (they contain the ops) and tf.data
                t = _op_type(name)
                if t.endswith("Dataset") or t in ("Run", "Process", "Done"):
                    continue
                by_type[t] += ev.duration_ps / 1e12
                count[t] += 1
    return {"seconds_by_op_type": dict(by_type), "events_by_op_type": dict(count)}


def graph_op_counts(model, sample) -> dict[str, int]:
    """Op types in the traced train step (the step function and its callees)."""
    fn = tf.function(model.train_step)
    concrete = fn.get_concrete_function(sample)
    gdef = concrete.graph.as_graph_def()
    counts: dict[str, int] = collections.Counter(n.op for n in gdef.node)
    for f in gdef.library.function:
        counts.update(n.op for n in f.node_def)
    return dict(counts)


def run_trace(n: int, log) -> dict:
    x, y = overhead.make_m2_data(n)
    x_ids = keras_sie.with_ids(x)
    out: dict[str, Any] = {}
    for label in ("a", "full"):
        model = overhead.build_m2(seed=7).model
        logdir = tempfile.mkdtemp(prefix=f"sie_trace_{label}_")
        cbs = [] if label == "a" else [keras_sie.SampleImportance(verbose=0, data_map=False)]
        cpu0 = time.process_time()
        out[label] = profile_epoch(model, x if label == "a" else x_ids, y, cbs, logdir)
        out[label]["fit_cpu_seconds"] = time.process_time() - cpu0
        shutil.rmtree(logdir, ignore_errors=True)
        log(f"  trace {label}: {sum(out[label]['seconds_by_op_type'].values()):.3f} s in ops")
    a, b = out["a"]["seconds_by_op_type"], out["full"]["seconds_by_op_type"]
    ea, eb = out["a"]["events_by_op_type"], out["full"]["events_by_op_type"]
    diff = {t: (b.get(t, 0.0) - a.get(t, 0.0), eb.get(t, 0) - ea.get(t, 0)) for t in set(a) | set(b)}
    out["diff_full_minus_a"] = {
        t: {"seconds": s, "events": e}
        for t, (s, e) in sorted(diff.items(), key=lambda kv: -abs(kv[1][0]))
    }
    out["total_op_seconds"] = {"a": sum(a.values()), "full": sum(b.values())}
    out["steps_per_epoch"] = -(-n // overhead.BATCH)
    return out


def step_graph_ops(log) -> dict:
    """Op counts of the train step with and without the callback's work."""
    x, y = overhead.make_m2_data(1024)
    x_ids = keras_sie.with_ids(x)
    out = {}
    # Plain step.
    model = overhead.build_m2(seed=7).model
    model.fit(x, y, batch_size=overhead.BATCH, epochs=1, verbose=0)
    spec_x = {k: tf.constant(v[:8]) for k, v in x.items()}
    out["a"] = graph_op_counts(model, (spec_x, tf.constant(y[:8])))

    # Fused step: trace model.train_step while SampleImportance has it installed.
    model = overhead.build_m2(seed=7).model
    grabbed: dict[str, Any] = {}
    spec_ids = {k: tf.constant(v[:8]) for k, v in x_ids.items()}

    class _Grab(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            grabbed["counts"] = graph_op_counts(self.model, (spec_ids, tf.constant(y[:8])))

    model.fit(x_ids, y, batch_size=overhead.BATCH, epochs=1, verbose=0,
              callbacks=[keras_sie.SampleImportance(verbose=0, data_map=False), _Grab()])
    out["full"] = grabbed["counts"]
    keys = set(out["a"]) | set(out["full"])
    out["extra_ops_by_type"] = {k: out["full"].get(k, 0) - out["a"].get(k, 0) for k in sorted(keys)
                                if out["full"].get(k, 0) != out["a"].get(k, 0)}
    out["total"] = {"a": sum(out["a"].values()), "full": sum(out["full"].values())}
    log(f"  step graph ops: a={out['total']['a']} full={out['total']['full']}")
    return out



# ------------------------------------------------------------------- micro
def run_micro(calls: int, log) -> dict:
    """CPU microseconds per step of the callback's in-step work alone.

    Each variant is one `tf.function` over M2-shaped per-step gradients
    (8 x [512, 16] embedding-output gradients and one [512, 13] dense-input
    gradient, 100,000-row buffer), called `calls` times; an empty function
    called the same way is subtracted. Variants:

    * `rows`: the row sums as `StepHook._group_rows` computes them
      (`row_abs_sum` per feature), summed into one scalar;
    * `rows_stacked`: the same row sums from one stacked [B, 8, 16] tensor
      (one Abs and one Sum for all embeddings) plus the dense leaf;
    * `full`: `rows` + `ImportanceBuffer.accumulate` as it is;
    * `lean`: `rows` + the minimal accumulate of the `lean` variant;
    * `counters_merged`: `rows` + an accumulate sketch with one int64
      counter vector (one AssignAdd), no invalid-example argmax/gather,
      one scatter of [B, 2] (sums, visits) into a float32 [N, 2] buffer.
    """
    import numpy as np

    from keras_sie.adapters.keras3 import row_abs_sum

    rng = np.random.default_rng(0)
    b, n = overhead.BATCH, 100_000
    embs = [tf.constant(rng.normal(size=(b, 16)).astype("float32")) for _ in range(8)]
    dense = tf.constant(rng.normal(size=(b, 13)).astype("float32"))
    ids = tf.constant(rng.integers(0, n, size=b).astype("int64"))
    buf = buffer_lib.ImportanceBuffer(n)
    packed = tf.Variable(tf.zeros([n, 2], tf.float32))
    counters = tf.Variable(tf.zeros([5], tf.int64))
    feature_sums = tf.Variable(tf.zeros([buffer_lib.MAX_FEATURE_GROUPS], tf.float32))
    sink = tf.Variable(0.0)
    scale = tf.constant(512.0)

    def rows_now():
        return [row_abs_sum(g) for g in embs] + [row_abs_sum(dense)]

    def merged(ids, rows, scale):
        slots = tf.reshape(ids, [-1])
        r = tf.stack(rows, axis=1) * scale
        total = tf.reduce_sum(r, axis=1)
        known = tf.logical_and(slots >= 0, slots < n)
        valid = tf.logical_and(known, tf.math.is_finite(total))
        vf = tf.cast(valid, tf.float32)
        safe = tf.where(known, slots, tf.zeros_like(slots))
        buffer_lib._scatter_add(packed, safe, tf.stack([total * vf, vf], axis=1))
        buffer_lib._assign_add(feature_sums, tf.pad(tf.reduce_sum(r * vf[:, None], axis=0),
                                                    [[0, buffer_lib.MAX_FEATURE_GROUPS - 9]]))
        n_bad = tf.reduce_sum(tf.cast(tf.logical_not(known), tf.int64))
        n_nonfinite = tf.reduce_sum(tf.cast(tf.logical_and(known, tf.logical_not(valid)), tf.int64))
        buffer_lib._assign_add(counters, tf.stack([tf.constant(1, tf.int64), n_bad, n_nonfinite,
                                                   tf.constant(0, tf.int64),
                                                   tf.constant(0, tf.int64)]))

    variants = {
        "empty": lambda: sink.assign_add(1.0),
        "rows": lambda: sink.assign_add(tf.reduce_sum(tf.add_n(rows_now()))),
        "rows_stacked": lambda: sink.assign_add(tf.reduce_sum(
            tf.reduce_sum(tf.abs(tf.stack(embs, axis=1)), axis=2)) + tf.reduce_sum(
            tf.reduce_sum(tf.abs(dense), axis=1))),
        "full": lambda: buffer_lib.ImportanceBuffer.accumulate(buf, ids, rows_now(), scale),
        "lean": lambda: _lean(buf, ids, rows_now(), scale),
        "counters_merged": lambda: merged(ids, rows_now(), scale),
    }
    fns = {k: tf.function(v) for k, v in variants.items()}
    for f in fns.values():
        for _ in range(50):
            f()
    per_call: dict[str, list[float]] = {k: [] for k in fns}
    for _rep in range(5):  # interleaved repeats; keep the minimum
        for k, f in fns.items():
            t0 = time.process_time()
            for _ in range(calls):
                f()
            per_call[k].append((time.process_time() - t0) / calls * 1e6)
    best = {k: min(v) for k, v in per_call.items()}
    out = {"calls": calls, "us_per_call_min": best, "us_per_call_all": per_call,
           "us_over_empty": {k: best[k] - best["empty"] for k in best if k != "empty"},
           "graph_ops": {k: len(f.get_concrete_function().graph.as_graph_def().node)
                         for k, f in fns.items()}}
    log("  micro (us/step over empty): " + ", ".join(
        f"{k}={v:.0f}" for k, v in out["us_over_empty"].items()))
    return out


def attributable(t: dict) -> list[tuple[str, int, float, float]]:
    """(op type, extra events, seconds per event, seconds per epoch), largest first."""
    sa, sb = t["a"]["seconds_by_op_type"], t["full"]["seconds_by_op_type"]
    ea, eb = t["a"]["events_by_op_type"], t["full"]["events_by_op_type"]
    rows = []
    for k in set(sa) | set(sb):
        extra = eb.get(k, 0) - ea.get(k, 0)
        name = k.strip()
        if extra <= 0 or name.startswith("__inference") or name in (
                "StartRegion", "StopRegion", "Record"):
            continue
        per = sb[k] / eb[k]
        rows.append((name, extra, per, extra * per))
    return sorted(rows, key=lambda r: -r[3])


def format_report(res: dict) -> str:
    lines = []
    if "variants" in res:
        v = res["variants"]
        c = v["cpu"]
        lines.append("| variant | CPU s/epoch min / median | / a: ratio of minima | ratio of medians |"
                     " paired [min-max] | wall / a: ratio of medians |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for name in v["variants"]:
            e = c["epoch_seconds"][name]
            if name == "a":
                lines.append(f"| a | {e['min']:.3f} / {e['median']:.3f} | 1 | 1 | | 1 |")
                continue
            k = f"{name}/a"
            p = c["paired_ratios"][k]
            lines.append(f"| {name} | {e['min']:.3f} / {e['median']:.3f} | {c['ratio_of_min'][k]:.3f} | "
                         f"{c['ratio_of_median'][k]:.3f} | {p['min']:.3f}-{p['max']:.3f} | "
                         f"{v['wall']['ratio_of_median'][k]:.3f} |")
        lines.append("")
        lines.append("; ".join(f"{k} = {d}" for k, d in v["variants"].items()))
    if "trace" in res:
        t = res["trace"]
        steps = t["steps_per_epoch"]
        lines.append("")
        lines.append(f"Profiled epoch ({steps} steps), ops the callback adds: extra op events "
                     "(full - a) x the mean duration of that op type in (full). Durations "
                     "include the profiler's own cost per event, and ops TensorFlow does not "
                     "trace (Abs, Reshape, ...) are missing; shared ops that merely ran slower "
                     "are left out (load noise).")
        lines.append("")
        lines.append("| op type | extra events per epoch | us per event | ms per epoch |")
        lines.append("|---|---:|---:|---:|")
        rows = attributable(t)
        for name, events, per, total in rows:
            if total >= 0.5e-3:
                lines.append(f"| {name} | {events:+d} | {per * 1e6:.1f} | {total * 1e3:.1f} |")
        lines.append(f"| all | | | {sum(r[3] for r in rows) * 1e3:.1f} |")
    if "graph" in res:
        g = res["graph"]
        lines.append("")
        lines.append(f"Train step graph: {g['total']['a']} ops plain, {g['total']['full']} with "
                     "the callback. Extra ops by type: " + ", ".join(
                         f"{k} {d:+d}" for k, d in g["extra_ops_by_type"].items()))
    if "micro" in res:
        m = res["micro"]
        lines.append("")
        lines.append("In-step work alone, CPU us per step over an empty tf.function "
                     "(ops in the graph): " + ", ".join(
                         f"{k} {v:.0f} us ({m['graph_ops'][k]} ops)"
                         for k, v in m["us_over_empty"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (< 1 min)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    p.add_argument("--num-samples", type=int, default=None, help="rows (default 60000)")
    p.add_argument("--rounds", type=int, default=None, help="paired rounds (default 5)")
    p.add_argument("--epochs", type=int, default=None, help="measured epochs per fit (default 3)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=1, help="TF intra/inter-op threads (default 1)")
    p.add_argument("--no-trace", action="store_true", help="skip the TF profiler part")
    p.add_argument("--micro-only", action="store_true", help="only the in-step micro timing")
    p.add_argument("--report", metavar="JSON",
                   help="reprint (and rewrite report_markdown of) a saved result; runs nothing")
    args = p.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            saved = json.load(f)
        saved["report_markdown"] = format_report(saved)
        overhead.write_json(args.report, saved)
        print(saved["report_markdown"])
        return 0
    threads = overhead.set_threads(args.threads)
    n = args.num_samples or (4_096 if args.quick else 60_000)
    rounds = args.rounds or (1 if args.quick else 5)
    measured = args.epochs or (1 if args.quick else 3)
    names = ["a"] + [v for v in args.variants.split(",") if v and v != "a"]
    for v in names:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}")

    def log(msg: str) -> None:
        print(msg, flush=True)

    res: dict[str, Any] = {
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
        "machine": overhead.machine_info(),
        "threads": threads,
        "num_samples": n, "rounds": rounds, "measured_epochs_per_fit": measured,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    t0 = time.time()
    log(f"M2 profile: N={n:,} rounds={rounds} epochs/fit=1+{measured} threads={threads}")
    res["micro"] = run_micro(200 if args.quick else 2000, log)
    if not args.micro_only:
        res["variants"] = run_variants(n, rounds, 1, measured, names, log)
        res["graph"] = step_graph_ops(log)
        if not args.no_trace:
            res["trace"] = run_trace(n, log)
    res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    res["wall_seconds"] = time.time() - t0
    report = format_report(res)
    res["report_markdown"] = report
    print()
    print(report)
    if args.json:
        overhead.write_json(args.json, res)
        log(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
