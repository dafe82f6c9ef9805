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
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_sie import scores as scores_lib
from keras_sie.buffer import ImportanceBuffer
from keras_sie.reporting import EpochReporter
from keras_sie.score_record import EpochScores, ScoreRecord

HERE = os.path.dirname(os.path.abspath(__file__))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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
    out = {k: float(np.median(v)) for k, v in timings.items()}
    out["peak_rss_mb"] = _rss_mb()
    out["buffer_device_bytes"] = float(buffer.nbytes)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1e5,1e6,1e7", help="comma-separated N values")
    ap.add_argument("--reps", type=int, default=3, help="epoch ends timed per N (median)")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args(argv)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    per_sample = _epoch_seconds_per_sample()
    results = {"sizes": {}, "epoch_seconds_per_sample": per_sample,
               "command": "python benchmarks/scale.py " + " ".join(argv or sys.argv[1:])}
    print(f"{'N':>12} {'read':>8} {'normal.':>8} {'summary':>8} {'report':>8} {'total':>8}"
          + "".join(f" {m + ' share':>10}" for m in per_sample) + "   peak RSS")
    for text in args.sizes.split(","):
        n = int(float(text))
        r = measure(n, args.reps)
        shares = {m: r["total"] / (s * n) for m, s in per_sample.items()}
        r["share_of_epoch"] = shares
        results["sizes"][str(n)] = r
        print(f"{n:>12,} {r['read']:8.3f} {r['normalize']:8.3f} {r['summarize']:8.3f} "
              f"{r['report']:8.3f} {r['total']:8.3f}"
              + "".join(f" {100 * v:9.2f}%" for v in shares.values())
              + f"   {r['peak_rss_mb']:,.0f} MB", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
