"""Helpers of `benchmarks/gpu_check.sh` (run by it; not meant to be called alone).

Subcommands:

* `devices OUT.json [--require-gpu]`: TensorFlow's view of the machine (GPUs,
  their names, TF build info, nvidia-smi); exits 3 when --require-gpu and no
  GPU is visible.
* `mirrored OUT.json [--cpu]`: MirroredStrategy over every GPU (or, with
  --cpu, over 2 logical CPUs) against one device: the same per-sample scores
  and the same weights after a 2-epoch fit. Skipped (recorded as such) with
  fewer than two GPUs.
* `placement OUT.json`: where the buffer's variables and the train step's
  scatter run (the step is traced and run once on a small model).
* `summarize RESULTS_DIR`: joins the step outputs (junit XML of the pytest
  selections, the benchmark JSONs, the check JSONs) into `gpu_check.json` and
  a short `summary.txt`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def _write(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def cmd_devices(out: str, require_gpu: bool) -> int:
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    details = []
    for g in gpus:
        try:
            details.append(tf.config.experimental.get_device_details(g))
        except Exception as e:  # noqa: BLE001 - informational only
            details.append({"error": str(e)})
    smi = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], check=False, capture_output=True,
                             text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    info = {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "built_with_cuda": tf.test.is_built_with_cuda(),
        "build_info": {k: str(v) for k, v in tf.sysconfig.get_build_info().items()},
        "gpus": [g.name for g in gpus],
        "gpu_details": [{k: str(v) for k, v in d.items()} for d in details],
        "nvidia_smi": smi,
        "cpu_count": os.cpu_count(),
    }
    _write(out, info)
    print(f"devices: {len(gpus)} GPU(s) {[d.get('device_name') for d in details]}; "
          f"TF {tf.__version__}, Keras {keras.__version__}")
    if require_gpu and not gpus:
        print("No GPU visible to TensorFlow. Run with --cpu for a dry run.", file=sys.stderr)
        return 3
    return 0


def _mirrored_run(strategy, x, y, seed: int, keys=None, jit_compile=False):
    """One fit; with `keys`, string hash keys (scores put back in row order)."""
    import keras
    import numpy as np

    import keras_sie

    keras.utils.set_random_seed(seed)
    with strategy.scope():
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"),
                                  keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=jit_compile)
    keras_sie.prepare_distributed(model)
    inputs = keras_sie.with_ids(x)
    if keys is not None:
        inputs = dict(inputs, sample_id=keys)
    sie = keras_sie.SampleImportance(verbose=0, key_mapping="hash" if keys is not None
                                     else "index")
    # shuffle=False: the same batches in the same order on one device and on N.
    model.fit(inputs, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
              callbacks=[sie])
    history, visits = sie.history, sie.visits
    if keys is not None:
        slot = {k: i for i, k in enumerate(sie.keys.tolist())}
        order = np.array([slot[k] for k in keys.tolist()])
        history = {e: h[order] for e, h in history.items()}
        visits = visits[order]
    return history, visits, model.get_weights()


def cmd_mirrored(out: str, cpu: bool) -> int:
    import tensorflow as tf

    if cpu:
        cpu_dev = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu_dev, [tf.config.LogicalDeviceConfiguration()] * 2)
        devices = ["/cpu:0", "/cpu:1"]
    else:
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
    if len(devices) < 2:
        _write(out, {"status": "skipped", "reason": f"{len(devices)} GPU(s); needs 2 or more",
                     "devices": devices})
        print(f"mirrored: skipped ({len(devices)} GPU)")
        return 0
    import numpy as np

    rng = np.random.default_rng(0)
    n = 32 * len(devices) * 4  # every batch splits evenly
    x = rng.normal(size=(n, 6)).astype("float32")
    y = rng.normal(size=(n, 1)).astype("float32")
    one = tf.distribute.OneDeviceStrategy(devices[0])
    many = tf.distribute.MirroredStrategy(devices)
    h1, v1, w1 = _mirrored_run(one, x, y, 7)

    def compare(h2, v2, w2):
        rel = []
        for e in h1:
            a, b = np.asarray(h1[e], np.float64), np.asarray(h2[e], np.float64)
            rel.append(float(np.abs(a - b).max() / np.abs(a).max()))
        w_rel = max(float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))
                    for a, b in zip(w1, w2))
        ok = bool(np.array_equal(v1, v2)) and max(rel) <= 1e-4 and w_rel <= 1e-4
        return ok, {"status": "passed" if ok else "failed",
                    "visits_equal": bool(np.array_equal(v1, v2)),
                    "max_rel_score_diff_per_epoch": rel, "max_rel_weight_diff": w_rel}

    ok, res = compare(*_mirrored_run(many, x, y, 7))
    res.update(devices=devices, replicas=many.num_replicas_in_sync, tolerance=1e-4)
    # String hash keys on every replica; with XLA on GPUs (Keras cannot
    # jit-compile a MirroredStrategy step over logical CPUs).
    keys = np.array([f"req-{i * 7919 % n}:item" for i in range(n)], dtype=object)
    ok_hash, res["hash_keys"] = compare(*_mirrored_run(many, x, y, 7, keys=keys,
                                                       jit_compile=not cpu))
    res["hash_keys"]["jit_compile"] = not cpu
    ok = ok and ok_hash
    res["status"] = "passed" if ok else "failed"
    _write(out, res)
    print(f"mirrored over {devices}: {res['status']} (score rel diff "
          f"{max(res['max_rel_score_diff_per_epoch']):.2e}, weights "
          f"{res['max_rel_weight_diff']:.2e}; hash keys{' + XLA' if not cpu else ''}: "
          f"{res['hash_keys']['status']})")
    return 0 if ok else 1


def cmd_placement(out: str) -> int:
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_sie

    tf.debugging.set_log_device_placement(False)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4)).astype("float32")
    y = rng.normal(size=(256, 1)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    sie = keras_sie.SampleImportance(verbose=0)
    seen: dict = {}

    class _Look(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            buf = sie._buffer  # benchmark introspection
            seen["variables"] = {v.name: v.device for v in buf.variables}
            seen["model_kernel"] = model.layers[0].kernel.value.device

    model.fit(keras_sie.with_ids(x), y, batch_size=64, epochs=1, verbose=0,
              callbacks=[sie, _Look()])
    seen["importance_finite"] = bool(np.isfinite(sie.importance).all())
    seen["visits_all_one"] = bool((sie.visits == 1).all())
    seen["status"] = "passed" if seen["importance_finite"] and seen["visits_all_one"] else "failed"
    _write(out, seen)
    print(f"placement: {seen}")
    return 0 if seen["status"] == "passed" else 1


# -------------------------------------------------------------- summarize
def _junit(path: str) -> list[dict]:
    rows = []
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        outcome = "passed"
        message = ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                message = (child.get("message") or "")[:500]
            elif child.tag == "skipped":
                outcome = "skipped"
                message = (child.get("message") or "")[:200]
        rows.append({"test": f"{case.get('classname')}::{case.get('name')}",
                     "outcome": outcome, "seconds": float(case.get("time") or 0),
                     "message": message})
    return rows


def cmd_summarize(results: str) -> int:
    steps_path = os.path.join(results, "steps.jsonl")
    steps = []
    if os.path.exists(steps_path):
        with open(steps_path) as f:
            steps = [json.loads(line) for line in f if line.strip()]
    out: dict = {"steps": steps, "tests": {}, "benchmarks": {}, "checks": {}}
    mode = next((s.get("mode") for s in steps if s.get("mode")), None)
    out["mode"] = mode
    dev = os.path.join(results, "devices.json")
    if os.path.exists(dev):
        with open(dev) as f:
            out["devices"] = json.load(f)
    for path in sorted(glob.glob(os.path.join(results, "pytest_*.xml"))):
        name = os.path.basename(path)[len("pytest_"):-len(".xml")]
        out["tests"][name] = _junit(path)
    for path in sorted(glob.glob(os.path.join(results, "bench_*.json"))):
        name = os.path.basename(path)[len("bench_"):-len(".json")]
        with open(path) as f:
            b = json.load(f)
        out["benchmarks"][name] = {
            "command": b.get("command"), "threads": b.get("threads"),
            "models": {k: {kk: m.get(kk) for kk in ("title", "num_samples", "batch_size",
                                                      "jit_compile", "rounds", "cpu", "wall",
                                                      "epoch_end_seconds")}
                       for k, m in b.get("models", {}).items()},
        }
    step_path = os.path.join(results, "step_overhead.json")
    if os.path.exists(step_path):
        with open(step_path) as f:
            b = json.load(f)
        out["benchmarks"]["step"] = {
            "command": b.get("command"), "threads": b.get("threads"),
            "models": {k: {kk: m.get(kk) for kk in ("title", "num_samples", "batch_size",
                                                      "blocks", "steps_per_block", "cpu",
                                                      "wall", "seconds_per_step")}
                       for k, m in b.get("models", {}).items()},
        }
    for name in ("mirrored", "placement"):
        path = os.path.join(results, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                out["checks"][name] = json.load(f)
    lines = [f"keras_sie gpu_check ({mode}): "
             + (", ".join(out.get("devices", {}).get("gpus", [])) or "no GPU")]
    for s in steps:
        if "step" in s:
            lines.append(f"  step {s['step']:<20} rc={s['rc']:<4} {s['seconds']:5d} s"
                         + ("  (informational)" if s.get("informational") else ""))
    for name, rows in out["tests"].items():
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        lines.append(f"tests {name}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
        for r in rows:
            if r["outcome"] in ("failed", "error"):
                lines.append(f"    {r['outcome'].upper()} {r['test']}: {r['message'][:160]}")
    for name, c in out["checks"].items():
        lines.append(f"check {name}: {c.get('status')}"
                     + (f" ({c.get('reason')})" if c.get("reason") else ""))
    for name, b in out["benchmarks"].items():
        if name == "step":  # per-step ratios (median over interleaved blocks)
            for key, m in b["models"].items():
                lines.append(f"bench step {key.upper()} (batch {m['batch_size']}): " + "; ".join(
                    f"{clock}: " + ", ".join(f"{k} {v['median']:.3f}"
                                             for k, v in (m.get(clock) or {}).items())
                    for clock in ("wall", "cpu")))
            continue
        for key, m in b["models"].items():
            cells = []
            for clock in ("wall", "cpu"):
                r = (m.get(clock) or {}).get("ratio_of_median", {})
                a = (m.get(clock) or {}).get("epoch_seconds", {}).get("a", {})
                if a:
                    cells.append(f"{clock}: a {a['median']:.3f} s/epoch, " + ", ".join(
                        f"{k} {v:.3f}" for k, v in r.items()))
            lines.append(f"bench {name} {key.upper()} (batch {m['batch_size']}, "
                         f"jit_compile={m['jit_compile']}): " + "; ".join(cells))
    bad = [s for s in steps if s.get("rc", 0) != 0 and not s.get("informational")]
    info = [s for s in steps if s.get("rc", 0) != 0 and s.get("informational")]
    if info:
        lines.append("informational steps that failed (not counted): "
                     + ", ".join(s["step"] for s in info))
    lines.append("RESULT: " + ("all steps passed" if not bad else
                               "FAILED steps: " + ", ".join(s["step"] for s in bad)))
    out["ok"] = not bad
    _write(os.path.join(results, "gpu_check.json"), out)
    with open(os.path.join(results, "summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("devices")
    d.add_argument("out")
    d.add_argument("--require-gpu", action="store_true")
    m = sub.add_parser("mirrored")
    m.add_argument("out")
    m.add_argument("--cpu", action="store_true")
    pl = sub.add_parser("placement")
    pl.add_argument("out")
    s = sub.add_parser("summarize")
    s.add_argument("results")
    args = p.parse_args(argv)
    if args.cmd == "devices":
        return cmd_devices(args.out, args.require_gpu)
    if args.cmd == "mirrored":
        return cmd_mirrored(args.out, args.cpu)
    if args.cmd == "placement":
        return cmd_placement(args.out)
    return cmd_summarize(args.results)


if __name__ == "__main__":
    sys.exit(main())
