"""Acting on sample importance: importance sampling in the same fit, then prune / weight / export.

Run from the repository root (about 1.5 minutes on 2 shared CPU cores):

    TF_CPP_MIN_LOG_LEVEL=2 python examples/importance_sampling.py

Uses Fashion-MNIST when its IDX files are found (`--data-dir`, by default
`../shared/datasets/fashion-mnist` or `/usr/share/datasets/fashion-mnist`
from `apt-get install dataset-fashion-mnist`; Zalando, MIT licence), else a
generated 10-class problem, so it runs anywhere.

1. Trains the same MLP twice, uniform shuffling vs `keras_sie.ImportanceSampler`
   fed live by `keras_sie.SampleImportance` (epoch 1 uniform, then samples
   drawn with p_i = 0.9 I_i / sum I + 0.1 / N, each weighted by 1 / (N p_i)),
   and prints the validation loss per epoch. One seed: for a real comparison
   see `benchmarks/importance_sampling.py`.
2. Acts on the saved run of the uniform model: keeps all but the 10 % least
   important samples, turns scores into `sample_weight`, exports to CSV, and
   shows the `keras-sie` commands to inspect it.
"""

from __future__ import annotations

import argparse
import gzip
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import keras_sie

HERE = os.path.dirname(os.path.abspath(__file__))
CANDIDATES = [
    os.path.join(HERE, "..", "..", "shared", "datasets", "fashion-mnist"),
    "/usr/share/datasets/fashion-mnist",
]


def load_data(data_dir: str | None, n_train: int = 6000, n_val: int = 2000):
    dirs = [data_dir] if data_dir else CANDIDATES
    for d in dirs:
        path = os.path.join(d, "train-images-idx3-ubyte.gz")
        if os.path.exists(path):
            with gzip.open(path) as f:
                x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)
            with gzip.open(os.path.join(d, "train-labels-idx1-ubyte.gz")) as f:
                y = np.frombuffer(f.read(), np.uint8, offset=8)
            idx = np.random.default_rng(0).choice(len(x), n_train + n_val, replace=False)
            x, y = x[idx].astype("float32") / 255.0, y[idx].astype("int64")
            print(f"data: Fashion-MNIST from {os.path.normpath(d)}")
            return x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    print("data: Fashion-MNIST not found; using a generated 10-class problem")
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, 64)) * 1.5
    y = rng.integers(0, 10, n_train + n_val)
    x = (centers[y] + rng.normal(size=(len(y), 64)) * 2.0).astype("float32")
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def make_model(d: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(128, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description="keras_sie importance sampling example")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    x, y, xv, yv = load_data(args.data_dir)
    n, batch = len(x), 128
    log_dir = tempfile.mkdtemp(prefix="keras_sie_example_")

    # 1a. Uniform baseline, scored (the run is saved under log_dir).
    model = make_model(x.shape[1])
    sie = keras_sie.SampleImportance(log_dir=log_dir, verbose=0)
    uni = model.fit(keras_sie.with_ids(x), y, batch_size=batch, epochs=args.epochs,
                    validation_data=(xv, yv), callbacks=[sie], verbose=0)

    # 1b. Importance sampling, fed by the scores of the previous epoch in the same fit.
    model = make_model(x.shape[1])
    sie_is = keras_sie.SampleImportance(num_samples=n, verbose=0)
    sampler = keras_sie.ImportanceSampler(n, source=sie_is, smoothing=0.1, seed=0)
    ds = sampler.dataset(x, y, batch_size=batch)  # (x + ids, y, 1/(N p)) batches
    imp = model.fit(ds, epochs=args.epochs, validation_data=(xv, yv), shuffle=False,
                    callbacks=[sie_is, sampler], verbose=0)

    print("\nvalidation loss per epoch (same steps per epoch)")
    print("epoch   uniform   importance-sampled")
    for e, (a, b) in enumerate(zip(uni.history["val_loss"], imp.history["val_loss"])):
        print(f"{e + 1:>5}   {a:.4f}    {b:.4f}")
    print(f"largest unbiasing weight now: {sampler.weights.max():.2f} (bound 1/smoothing = 10)")

    # 2. Act on the saved run of the uniform model.
    run = keras_sie.load(log_dir)
    keep = keras_sie.select(run, band=(0.1, 1.0))       # drop the 10 % least important
    hardest = keras_sie.select(run, top=5)
    print(f"\nkeep {keep.size} of {n} samples; 5 most important ids: {hardest.tolist()}")
    w = keras_sie.to_sample_weight(run, smoothing=0.2, clip=(None, 5.0))
    print(f"sample_weight: mean {w.mean():.3f}, min {w.min():.3f}, max {w.max():.3f}")
    pruned = make_model(x.shape[1])
    pruned.fit(x[keep], y[keep], batch_size=batch, epochs=1, verbose=0)
    out = keras_sie.export_run(run, os.path.join(log_dir, "scores.csv"))
    print(f"exported {out}")
    print("\ninspect it from the shell:")
    print(f"  keras-sie report {log_dir}")
    print(f"  keras-sie export {log_dir} --format npz --epoch {run.epochs[-1]} -o last.npz")
    print(f"  keras-sie diff {log_dir} {log_dir} --epoch-a 0")


if __name__ == "__main__":
    main()
