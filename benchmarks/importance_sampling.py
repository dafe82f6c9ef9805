"""Does importance sampling by keras_sie scores reach a validation loss in fewer steps?

Run (from the repository root; reads `../shared/datasets/fashion-mnist`,
about 5-10 min on 2 CPU cores):

    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/importance_sampling.py --json \
        benchmarks/results/importance_sampling.json

`--quick` runs a tiny smoke version (under a minute).

Protocol (fixed before any result was looked at; not tuned afterwards)
----------------------------------------------------------------------
Data: Fashion-MNIST, 10,000 train / 5,000 validation images drawn uniformly
at random (data seed 0) from the official train / test files; pixels scaled
to [0, 1], flattened. Model: MLP 784-128(relu)-10(softmax), Adam(1e-3),
sparse categorical cross-entropy, batch 128, 79 steps per epoch (= one
pass of 10,000 samples), 8 epochs. Validation loss (unweighted) at every
epoch end.

Configurations, identical except for how batches are drawn:

* `uniform`: the usual shuffled pass without replacement (tf.data shuffle).
* `uniform_iid`: `keras_sie.ImportanceSampler` with no scores: i.i.d.
  uniform draws with replacement (weight 1) -- isolates the effect of
  drawing with replacement.
* `is_a0.1`, `is_a0.5`: `keras_sie.ImportanceSampler(source=sie,
  smoothing=a)` fed by a `SampleImportance` on the same `fit`: epoch 1 is
  uniform, later epochs draw p_i = (1-a) I_i / sum I + a/N using the
  previous epoch's scores and attach w_i = 1/(N p_i) as sample_weight.

Seeds 0, 1, 2 (weight init, shuffling, draws). Target validation loss: the
median over the `uniform` seeds of their best validation loss, plus 2 %.
Reported per configuration (median and range over seeds): steps until the
epoch-end validation loss first reaches the target, best and final
validation loss, final validation accuracy, wall time of the fit (the
`is_*` runs include the scoring callback).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import keras_sie

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "datasets", "fashion-mnist"))
CONFIGS = ("uniform", "uniform_iid", "is_a0.1", "is_a0.5")


def load_fmnist(data_dir: str, n_train: int, n_val: int, seed: int = 0):
    def read(name: str, offset: int) -> np.ndarray:
        path = os.path.join(data_dir, name)
        if not os.path.exists(path):
            sys.exit(
                f"Fashion-MNIST not found at {path}. Pass --data-dir (the folder with the "
                "IDX .gz files), e.g. /usr/share/datasets/fashion-mnist after "
                "`apt-get install dataset-fashion-mnist`."
            )
        with gzip.open(path) as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset)

    xtr = read("train-images-idx3-ubyte.gz", 16).reshape(-1, 784)
    ytr = read("train-labels-idx1-ubyte.gz", 8)
    xte = read("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 784)
    yte = read("t10k-labels-idx1-ubyte.gz", 8)
    rng = np.random.default_rng(seed)
    tr = rng.choice(len(xtr), n_train, replace=False)
    va = rng.choice(len(xte), n_val, replace=False)
    f = lambda a: (a.astype("float32") / 255.0)
    return f(xtr[tr]), ytr[tr].astype("int64"), f(xte[va]), yte[va].astype("int64")


def build_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def run_one(config: str, seed: int, data, batch_size: int, epochs: int) -> dict:
    x, y, xv, yv = data
    n = len(x)
    model = build_model(seed)
    callbacks = []
    if config == "uniform":
        ds = (tf.data.Dataset.from_tensor_slices((x, y))
              .shuffle(n, seed=seed, reshuffle_each_iteration=True)
              .batch(batch_size).prefetch(tf.data.AUTOTUNE))
    elif config == "uniform_iid":
        sampler = keras_sie.ImportanceSampler(n, seed=seed)
        ds = sampler.dataset(x, y, batch_size=batch_size)
    else:
        a = float(config.split("_a")[1])
        sie = keras_sie.SampleImportance(num_samples=n, verbose=0)
        sampler = keras_sie.ImportanceSampler(n, source=sie, smoothing=a, seed=seed)
        ds = sampler.dataset(x, y, batch_size=batch_size)
        callbacks = [sie, sampler]
    steps_per_epoch = -(-n // batch_size)
    t0 = time.perf_counter()
    hist = model.fit(ds, epochs=epochs, validation_data=(xv, yv), callbacks=callbacks,
                     shuffle=False, verbose=0)
    wall = time.perf_counter() - t0
    out = {
        "config": config,
        "seed": seed,
        "steps_per_epoch": steps_per_epoch,
        "val_loss": [float(v) for v in hist.history["val_loss"]],
        "val_accuracy": [float(v) for v in hist.history["val_accuracy"]],
        "wall_s": wall,
    }
    if config.startswith("is_"):
        w = sampler.weights
        out["final_max_weight"] = float(w.max())
        out["final_ess_fraction"] = float(1.0 / np.sum(sampler.probabilities ** 2) / n)
    return out


def steps_to(val_loss: list[float], target: float, steps_per_epoch: int) -> int | None:
    for e, v in enumerate(val_loss):
        if v <= target:
            return (e + 1) * steps_per_epoch
    return None


def summarize(runs: list[dict]) -> tuple[float, dict]:
    uni_best = [min(r["val_loss"]) for r in runs if r["config"] == "uniform"]
    target = float(np.median(uni_best)) * 1.02
    table = {}
    for config in CONFIGS:
        rs = [r for r in runs if r["config"] == config]
        if not rs:
            continue
        steps = [steps_to(r["val_loss"], target, r["steps_per_epoch"]) for r in rs]
        reached = [s for s in steps if s is not None]
        table[config] = {
            "steps_to_target": steps,
            "steps_to_target_median": float(np.median(reached)) if len(reached) == len(rs)
            else None,
            "reached": f"{len(reached)}/{len(rs)}",
            "best_val_loss": [min(r["val_loss"]) for r in rs],
            "final_val_loss": [r["val_loss"][-1] for r in rs],
            "final_val_accuracy": [r["val_accuracy"][-1] for r in rs],
            "wall_s": [r["wall_s"] for r in rs],
        }
    return target, table


def _mr(values: list[float], fmt: str = ".4f") -> str:
    v = np.asarray(values, dtype=float)
    return f"{np.median(v):{fmt}} [{v.min():{fmt}}, {v.max():{fmt}}]"


def format_table(target: float, table: dict) -> str:
    lines = [f"target validation loss: {target:.4f} (median best uniform val loss + 2 %)", ""]
    head = (f"{'config':<12} {'steps to target (per seed)':<28} {'best val loss':<26} "
            f"{'final val loss':<26} {'final val acc':<26} {'wall s':<10}")
    lines.append(head)
    lines.append("-" * len(head))
    for config, row in table.items():
        steps = ", ".join("n/r" if s is None else str(s) for s in row["steps_to_target"])
        lines.append(
            f"{config:<12} {steps:<28} {_mr(row['best_val_loss']):<26} "
            f"{_mr(row['final_val_loss']):<26} {_mr(row['final_val_accuracy']):<26} "
            f"{np.median(row['wall_s']):<10.1f}"
        )
    lines.append("")
    lines.append("values: median [min, max] over seeds; n/r = target not reached")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=DATA_DIR)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--train-size", type=int, default=10000)
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--json", metavar="FILE", help="also write all results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_size, args.val_size, args.epochs, args.seeds = 2000, 500, 3, [0]
    data = load_fmnist(args.data_dir, args.train_size, args.val_size)
    runs = []
    t0 = time.perf_counter()
    # Interleave configurations within each seed, so machine-load drift hits all alike.
    for seed in args.seeds:
        for config in args.configs:
            r = run_one(config, seed, data, args.batch_size, args.epochs)
            runs.append(r)
            print(f"[{time.perf_counter() - t0:6.0f}s] {config:<12} seed {seed}: "
                  f"val loss {' '.join(f'{v:.3f}' for v in r['val_loss'])}", flush=True)
    if "uniform" not in args.configs:
        print(json.dumps(runs, indent=1))
        return 0
    target, table = summarize(runs)
    print()
    print(format_table(target, table))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "target": target, "summary": table, "runs": runs,
                       "versions": {"tensorflow": tf.__version__, "keras": keras.__version__}},
                      f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
