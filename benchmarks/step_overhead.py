"""Per-step cost of the fused step, measured finely interleaved (resolves ~1 %).

`overhead.py` times whole `fit`s; on a shared 2-core VM two identical fits a
few seconds apart differ by up to ±10 % in CPU time, so it cannot see 1 %.
This script removes the drift by interleaving at a much finer grain: it times
*blocks of K training steps*, alternating between configurations hundreds of
times in one process, and reports the median over blocks of each paired ratio.

Configurations, per model (M1, M2 of `overhead.py`, identical initial weights):

* (a)  plain `model.train_function` on batches of the user's inputs;
* (a2) the same on a second identical model: the A/A check;
* (b)  the train function that a real `fit(..., callbacks=[SampleImportance])`
  runs: the measuring loop runs inside that `fit` (in a callback's
  `on_train_begin`, after SampleImportance installed its step), on batches
  that carry the ids;
* (b_signals) the same with all five `signals=`.

Every configuration reads its own `tf.data` iterator over the same cached,
batched data (ids added for b; rows permuted once, so a batch's ids are
scattered over the buffer as in a shuffled `fit`), so input work is alike. TensorFlow is pinned
to one intra-op and one inter-op thread; the clock is the process CPU time
(`time.process_time`), and wall time is kept next to it. Per-epoch work (the
callback's `on_epoch_end`) is not in a step: it is reported by `overhead.py`
(`epoch_end_seconds`) and added here from its own measurement to give an
epoch-level figure (`--epoch-end`).

Usage:
    python benchmarks/step_overhead.py --json benchmarks/results/step_overhead.json  # ~4 min
    python benchmarks/step_overhead.py --quick          # smoke run, < 1 min
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras
import numpy as np
import overhead
import tensorflow as tf

import keras_sie

ALL_SIGNALS = ("loss", "el2n", "margin", "confidence", "forgetting")
CONFIGS = ("a", "a2", "b", "b_signals")
LABEL = {
    "a": "plain train step",
    "a2": "plain train step, second identical model (A/A)",
    "b": "train step of fit + SampleImportance (defaults)",
    "b_signals": "train step of fit + SampleImportance(signals=all five)",
    # Diagnosis only (--configs): overhead.diagnosis_accumulate stands in for
    # the buffer update of this callback instance, before the step is traced.
    "b_noacc": "train step of fit + SampleImportance, buffer update removed (diagnosis)",
    "b_floor": "train step, buffer update replaced by one sum of the row sums (diagnosis)",
    "b_scatter": "train step, buffer update replaced by one unchecked scatter (diagnosis)",
}


def dataset(x: Any, y: np.ndarray, batch: int) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True)
    return ds.cache().repeat()


class _Measure(keras.callbacks.Callback):
    """Runs the interleaved loop from inside a fit, once its step is installed."""

    def __init__(self, run):
        super().__init__()
        self._run = run

    def on_train_begin(self, logs=None):
        self._run(self.model.train_function)


def measure(key: str, n: int, blocks: int, steps: int, configs: tuple[str, ...],
            log, jit_compile: bool = False) -> dict:
    title, make_data, build = overhead.MODELS[key]
    x, y = make_data(n)
    # Ids are attached in the original order, then the rows are permuted once
    # (fixed seed): each batch scatters into random buffer rows, as a shuffled
    # `fit` does. Every configuration sees the same permuted rows.
    x_ids = keras_sie.with_ids(x)
    perm = np.random.default_rng(1).permutation(n)
    x, x_ids, y = (tf.nest.map_structure(lambda v: v[perm], t) for t in (x, x_ids, y))
    models = {c: build(seed=7).model for c in configs}
    if jit_compile:  # Keras's "auto" is off on a CPU-only machine
        for m in models.values():
            m.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy", jit_compile=True)
    iters = {c: iter(dataset(x_ids if c.startswith("b") else x, y, overhead.BATCH))
             for c in configs}
    functions: dict[str, Any] = {}
    for c in configs:
        if not c.startswith("b"):
            models[c].make_train_function()
            functions[c] = models[c].train_function
    cpu: dict[str, list[float]] = {c: [] for c in configs}
    wall: dict[str, list[float]] = {c: [] for c in configs}

    def loop() -> None:
        order = list(configs)
        rng = random.Random(0)
        for c in configs:  # warm-up: trace and touch every function
            for _ in range(steps):
                functions[c](iters[c])
        for blk in range(blocks):
            rng.shuffle(order)
            for c in order:
                fn, it = functions[c], iters[c]
                w0, t0 = time.perf_counter(), time.process_time()
                for _ in range(steps):
                    fn(it)
                cpu[c].append(time.process_time() - t0)
                wall[c].append(time.perf_counter() - w0)
            if (blk + 1) % max(1, blocks // 4) == 0:
                log(f"  {key} block {blk + 1}/{blocks}: " + "  ".join(
                    f"{c}/a={statistics.median(r):.3f}" for c, r in ratios(cpu).items()))

    # Each (b) configuration's function is the one its real fit installs; the
    # loop runs once every (b) function exists, inside the last such fit.
    b_configs = [c for c in configs if c.startswith("b")]
    tmp = tempfile.mkdtemp(prefix=f"sie_step_{key}_")

    def fit_b(i: int) -> None:
        c = b_configs[i]
        kwargs = {"signals": ALL_SIGNALS} if c == "b_signals" else {}
        sie = keras_sie.SampleImportance(log_dir=os.path.join(tmp, c), verbose=0,
                                         num_samples=n, **kwargs)

        def grab(train_function) -> None:
            functions[c] = train_function
            if c in overhead.DIAGNOSIS_CONFIGS:  # before the first call traces the step
                sie._buffer.accumulate = overhead.diagnosis_accumulate(sie._buffer, c)
            if i + 1 < len(b_configs):
                fit_b(i + 1)  # nested: every hook stays installed while we measure
            else:
                loop()

        models[c].fit(dataset(x_ids, y, overhead.BATCH), steps_per_epoch=1, epochs=1,
                      verbose=0, callbacks=[sie, _Measure(grab)])

    if b_configs:
        fit_b(0)
    else:
        loop()
    step_s = {c: {"cpu_min": min(cpu[c]) / steps, "cpu_median": statistics.median(cpu[c]) / steps,
                  "wall_median": statistics.median(wall[c]) / steps} for c in configs}
    out = {
        "title": title,
        "num_samples": n,
        "batch_size": overhead.BATCH,
        "blocks": blocks,
        "steps_per_block": steps,
        "jit_compile": jit_compile,
        "configs": {c: LABEL[c] for c in configs},
        "seconds_per_step": step_s,
        "cpu": summarize(ratios(cpu)),
        "wall": summarize(ratios(wall)),
    }
    return out


def ratios(times: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per block, each configuration's time over (a)'s in the same block."""
    a = times["a"]
    return {f"{c}/a": [t / s for t, s in zip(v, a)] for c, v in times.items()
            if c != "a" and v}


def summarize(r: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    out = {}
    for k, v in r.items():
        q = np.quantile(v, [0.25, 0.5, 0.75])
        # Standard error of the median by bootstrap over blocks (fixed seed).
        rng = np.random.default_rng(0)
        boot = [float(np.median(rng.choice(v, len(v)))) for _ in range(500)]
        out[k] = {"median": float(q[1]), "q25": float(q[0]), "q75": float(q[2]),
                  "median_ci95": [float(np.quantile(boot, 0.025)),
                                  float(np.quantile(boot, 0.975))],
                  "n": len(v)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="m1,m2")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--num-samples", type=int, default=100_000)
    p.add_argument("--blocks", type=int, default=150, help="interleaved blocks per config")
    p.add_argument("--steps", type=int, default=20, help="train steps per block")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jit-compile", action="store_true",
                   help="compile every model with jit_compile=True (XLA)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.quick:
        args.blocks, args.steps, args.num_samples = 8, 5, 20_000
    threads = overhead.set_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    configs = tuple(c for c in args.configs.split(",") if c)
    if configs[0] != "a":
        raise SystemExit("--configs must start with a")
    res: dict[str, Any] = {
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
        "machine": overhead.machine_info(),
        "threads": threads,
        "loadavg_start": list(os.getloadavg()),
        "models": {},
    }
    for key in args.models.split(","):
        res["models"][key] = measure(key, args.num_samples, args.blocks, args.steps, configs, log,
                                     jit_compile=args.jit_compile)
        m = res["models"][key]
        log(f"{key}: " + "  ".join(
            f"{k} {v['median']:.3f} [{v['median_ci95'][0]:.3f}-{v['median_ci95'][1]:.3f}]"
            for k, v in m["cpu"].items())
            + f"  (a: {m['seconds_per_step']['a']['cpu_median'] * 1e3:.2f} ms/step)")
    res["loadavg_end"] = list(os.getloadavg())
    if args.json:
        overhead.write_json(args.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
