"""Does the keras_sie score find what matters? Noisy-label and data-pruning benchmarks.

Run (from the repository root; reads `../shared/datasets/`; 31 min measured on 2 CPU cores
shared with other jobs):

    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/quality.py --json benchmarks/results/quality.json

`--quick` runs a tiny smoke version (minutes). `--datasets fmnist` runs one dataset.

Protocol (fixed before any result was looked at; not tuned afterwards)
----------------------------------------------------------------------
Datasets (real, from `../shared/datasets/`, subsampled once with data seed 0,
identical for every training seed):

* `fmnist`: Fashion-MNIST, 10,000 train / 2,000 test images drawn uniformly at
  random from the official train / test files; pixels scaled to [0, 1].
  Model: MLP 784-128(relu)-10(softmax), Adam(1e-3), batch 128, 6 epochs,
  sparse categorical cross-entropy. Test metric: accuracy.
* `census`: Census-Income (KDD), 20,000 train rows from `train.csv.gz` and
  10,000 test rows from `test.csv.gz`, drawn uniformly at random (6.2 %
  positives, `income == 50000+`). 7 numeric columns (log1p of the money
  columns, standardized on the train subsample) go in as one float input;
  the other 33 columns (all categorical or coded) are mapped to ids
  (vocabulary of the train subsample, unseen -> one OOV id per column) and
  go in as one int input through a shared `keras.layers.Embedding(., 8)`
  (dict inputs, ids attached with `keras_sie.with_ids(dict)`).
  `instance_weight` is not used. Model: [num, flattened embeddings] ->
  64(relu) -> 1(sigmoid), Adam(1e-3), batch 256, 5 epochs, binary
  cross-entropy. Test metric: ROC AUC.

All models compile with `jit_compile=False` (XLA compile time dominated
these small fits on CPU: 17-28 s vs 6.5 s per Fashion-MNIST retrain).

Seeds: 0, 1, 2. The seed sets the label noise, the weight init, Keras's
shuffling and random pruning (`keras.utils.set_random_seed(seed)` before
building each model).

Scoring run (one per dataset x noise rate x seed): the model above trained on
the (possibly noisy) training set with `SampleImportance` attached and a
companion callback that, at each epoch end, predicts on the whole training
set (inference mode, batches of 4096; that extra pass only feeds the
baselines). Scores, higher = "more suspicious / more important":

* `sie_latest`: `SampleImportance` score of the last epoch (`sie.importance`).
* `sie_early`: mean of `sie.history` over the first 3 epochs.
* `sie_mean`: mean over all epochs (`sie.aggregate`).
* `sie_xscale`: `sie_latest / mean_j |x_ij|`, x being what the score
  differentiates (pixels; numeric inputs + embedding outputs of the final
  model), i.e. normalized by the sample's input scale.
* `loss`: per-sample loss at the last epoch end.
* `el2n`: ||p_i - onehot(y_i)||_2 at the last epoch end (Paul et al. 2021);
  for a sigmoid output |p_i - y_i|.
* `el2n_early`: mean of EL2N over the first 3 epoch ends (the Data Diet
  recipe scores early in training).
* `forgetting`: number of correct -> incorrect transitions between
  consecutive epoch-end predictions (Toneva et al. 2019, measured at epoch
  ends rather than at each minibatch presentation); a sample never
  predicted correctly gets the maximum count + 1 (as in the paper).
* `input_norm`: ||x_i||_2 with x as for `sie_xscale`.
* `random`: uniform random numbers (seeded).

Part 1, noisy labels: noise rates 10 %, 20 %, 40 %. Exactly round(rate * N)
training labels are flipped (multiclass: to a uniformly drawn *different*
class; binary: 0 <-> 1). Each score ranks the training samples; we report
ROC AUC for "flipped vs not" and precision at k = number of flipped labels,
mean +- std over the 3 seeds.

Part 2, data pruning: clean labels. For each seed, the scoring run on the
clean training set gives the scores and the full-data test metric. For
X in {30, 50, 70} % and each score in PRUNE_SCORES (sie_latest, sie_early,
sie_xscale, loss, el2n_early, forgetting, input_norm) we keep the top X %
(highest scores) or the bottom X % (lowest scores), plus a random X % (once
per X and seed), retrain from scratch with the same recipe, the same seed
and the same number of epochs (so fewer steps on smaller subsets), and report
the test metric (mean +- std over seeds) against the full-data model.

Everything is printed as tables and written to `--json`. Wall time is
printed per stage.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import tensorflow as tf
from scipy.stats import rankdata

import keras_sie

DATA_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "datasets")
SEEDS = (0, 1, 2)
NOISE_RATES = (0.1, 0.2, 0.4)
KEEP_FRACTIONS = (0.3, 0.5, 0.7)
EARLY_EPOCHS = 3
DETECT_SCORES = (
    "sie_latest", "sie_early", "sie_mean", "sie_xscale",
    "loss", "el2n", "el2n_early", "forgetting", "input_norm", "random",
)
PRUNE_SCORES = (
    "sie_latest", "sie_early", "sie_xscale", "loss", "el2n_early", "forgetting", "input_norm",
)


# ----------------------------------------------------------------- datasets
def _need(path: str) -> str:
    if not os.path.exists(path):
        sys.exit(
            f"quality.py: missing {path}. This benchmark reads the real datasets under "
            "../shared/datasets/ (see ../shared/datasets.md); run it from a checkout that "
            "has them, or pass --data-root."
        )
    return path


def _idx(path: str, offset: int) -> np.ndarray:
    with gzip.open(_need(path)) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load_fmnist(root: str, n_train: int, n_test: int) -> dict[str, Any]:
    d = os.path.join(root, "fashion-mnist")
    xtr = _idx(os.path.join(d, "train-images-idx3-ubyte.gz"), 16).reshape(-1, 784)
    ytr = _idx(os.path.join(d, "train-labels-idx1-ubyte.gz"), 8)
    xte = _idx(os.path.join(d, "t10k-images-idx3-ubyte.gz"), 16).reshape(-1, 784)
    yte = _idx(os.path.join(d, "t10k-labels-idx1-ubyte.gz"), 8)
    rng = np.random.default_rng(0)
    i = rng.choice(len(xtr), n_train, replace=False)
    j = rng.choice(len(xte), n_test, replace=False)
    return {
        "name": "fmnist",
        "x_train": xtr[i].astype("float32") / 255.0,
        "y_train": ytr[i].astype("int64"),
        "x_test": xte[j].astype("float32") / 255.0,
        "y_test": yte[j].astype("int64"),
        "num_classes": 10,
    }


_CENSUS_NUMERIC = (
    "age", "wage_per_hour", "capital_gains", "capital_losses", "dividends_from_stocks",
    "num_persons_worked_for_employer", "weeks_worked_in_year",
)
_CENSUS_LOG = ("wage_per_hour", "capital_gains", "capital_losses", "dividends_from_stocks")
_CENSUS_DROP = ("instance_weight", "income")


def _read_csv(path: str) -> tuple[list[str], list[list[str]]]:
    with gzip.open(_need(path), "rt", newline="") as f:
        rows = list(csv.reader(f))
    return [h.strip() for h in rows[0]], rows[1:]


def load_census(root: str, n_train: int, n_test: int) -> dict[str, Any]:
    d = os.path.join(root, "census-income-kdd")
    header, tr = _read_csv(os.path.join(d, "train.csv.gz"))
    header_te, te = _read_csv(os.path.join(d, "test.csv.gz"))
    if header_te != header:
        raise ValueError("census-income-kdd: train and test headers differ.")
    rng = np.random.default_rng(0)
    tr = [tr[k] for k in rng.choice(len(tr), n_train, replace=False)]
    te = [te[k] for k in rng.choice(len(te), n_test, replace=False)]
    col = {h: k for k, h in enumerate(header)}
    cat_cols = [h for h in header if h not in _CENSUS_NUMERIC and h not in _CENSUS_DROP]

    def numeric(rows):
        a = np.array([[float(r[col[h]]) for h in _CENSUS_NUMERIC] for r in rows], "float64")
        for k, h in enumerate(_CENSUS_NUMERIC):
            if h in _CENSUS_LOG:
                a[:, k] = np.log1p(np.maximum(a[:, k], 0.0))
        return a

    num_tr, num_te = numeric(tr), numeric(te)
    mu, sd = num_tr.mean(0), num_tr.std(0) + 1e-6
    # One shared id space: column c uses ids offset_c + (0 = OOV, 1.. = values).
    vocabs, offset = [], 0
    for h in cat_cols:
        values = sorted({r[col[h]].strip() for r in tr})
        vocabs.append((offset, {v: k + 1 for k, v in enumerate(values)}))
        offset += len(values) + 1

    def cats(rows):
        return np.array(
            [[o + v.get(r[col[h]].strip(), 0) for h, (o, v) in zip(cat_cols, vocabs)] for r in rows],
            "int64",
        )

    def label(rows):
        return np.array([r[col["income"]].strip().startswith("50000+") for r in rows], "int64")

    return {
        "name": "census",
        "x_train": {"num": ((num_tr - mu) / sd).astype("float32"), "cat": cats(tr)},
        "y_train": label(tr),
        "x_test": {"num": ((num_te - mu) / sd).astype("float32"), "cat": cats(te)},
        "y_test": label(te),
        "num_classes": 2,
        "vocab_size": offset,
        "cat_columns": cat_cols,
    }


# ------------------------------------------------------------------- models
def _rows(x: Any, idx: np.ndarray) -> Any:
    if isinstance(x, dict):
        return {k: v[idx] for k, v in x.items()}
    return x[idx]


def _n(x: Any) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


class Task:
    """Model recipe, loss and test metric of one dataset."""

    def __init__(self, data: dict[str, Any], epochs: int):
        self.data = data
        self.epochs = epochs
        self.binary = data["num_classes"] == 2
        self.batch_size = 256 if self.binary else 128

    def build(self) -> keras.Model:
        if self.binary:
            num = keras.Input((self.data["x_train"]["num"].shape[1],), name="num")
            cat = keras.Input((self.data["x_train"]["cat"].shape[1],), dtype="int64", name="cat")
            emb = keras.layers.Embedding(self.data["vocab_size"], 8, name="emb")(cat)
            h = keras.layers.Concatenate()([num, keras.layers.Flatten()(emb)])
            h = keras.layers.Dense(64, activation="relu")(h)
            out = keras.layers.Dense(1, activation="sigmoid")(h)
            model = keras.Model({"num": num, "cat": cat}, out)
            model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy", jit_compile=False)
        else:
            model = keras.Sequential([
                keras.Input((784,)),
                keras.layers.Dense(128, activation="relu"),
                keras.layers.Dense(10, activation="softmax"),
            ])
            model.compile(
                keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", jit_compile=False
            )
        return model

    def input_repr(self, model: keras.Model, x: Any) -> np.ndarray:
        """What the score differentiates, per sample: pixels, or [num, embeddings]."""
        if not self.binary:
            return x
        emb = model.get_layer("emb").embeddings.numpy()[x["cat"]]
        return np.concatenate([x["num"], emb.reshape(len(emb), -1)], axis=1)

    def predict(self, model: keras.Model, x: Any) -> np.ndarray:
        p = model.predict(x, batch_size=4096, verbose=0)
        return p[:, 0] if self.binary else p

    def test_metric(self, model: keras.Model) -> float:
        p = self.predict(model, self.data["x_test"])
        y = self.data["y_test"]
        if self.binary:
            return auroc(p, y)
        return float((p.argmax(1) == y).mean())


class EpochEndPredictions(keras.callbacks.Callback):
    """Companion callback: predicts on the training set at each epoch end (baselines only)."""

    def __init__(self, task: Task, x: Any):
        super().__init__()
        self.task, self.x, self.probs = task, x, []

    def on_epoch_end(self, epoch, logs=None):
        self.probs.append(self.task.predict(self.model, self.x))


# ------------------------------------------------------------------- scores
def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of `score` for the boolean `positive` (ties count one half)."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    r = rankdata(score)
    return float((r[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at_k(score: np.ndarray, positive: np.ndarray, k: int) -> float:
    top = np.argsort(-score, kind="stable")[:k]
    return float(np.asarray(positive, bool)[top].mean())


def baseline_scores(task: Task, probs: list[np.ndarray], y: np.ndarray) -> dict[str, np.ndarray]:
    eps = 1e-7
    p = np.stack(probs)  # [E, N] or [E, N, C]
    if task.binary:
        py = np.where(y == 1, p, 1 - p)
        err = np.abs(p - y[None])
        correct = (p > 0.5) == (y[None] == 1)
    else:
        py = np.take_along_axis(p, y[None, :, None], axis=2)[..., 0]
        onehot = np.eye(p.shape[-1])[y]
        err = np.linalg.norm(p - onehot[None], axis=2)
        correct = p.argmax(2) == y[None]
    forget = ((correct[:-1]) & (~correct[1:])).sum(0).astype("float64")
    never = ~correct.any(0)
    forget[never] = forget.max() + 1
    return {
        "loss": -np.log(np.clip(py[-1], eps, 1.0)),
        "el2n": err[-1],
        "el2n_early": err[:EARLY_EPOCHS].mean(0),
        "forgetting": forget,
    }


def scoring_run(task: Task, y_train: np.ndarray, seed: int) -> dict[str, Any]:
    """Trains on (x_train, y_train) with SampleImportance + companion; returns all scores."""
    x = task.data["x_train"]
    keras.utils.set_random_seed(seed)
    model = task.build()
    sie = keras_sie.SampleImportance(verbose=0)
    comp = EpochEndPredictions(task, x)
    model.fit(
        keras_sie.with_ids(x), y_train, batch_size=task.batch_size, epochs=task.epochs,
        shuffle=True, callbacks=[sie, comp], verbose=0,
    )
    hist = sie.history
    epochs = sorted(hist)
    scores = {
        "sie_latest": hist[epochs[-1]].astype("float64"),
        "sie_early": np.mean([hist[e] for e in epochs[:EARLY_EPOCHS]], axis=0),
        "sie_mean": sie.aggregate.astype("float64"),
    }
    xr = task.input_repr(model, x)
    scores["sie_xscale"] = scores["sie_latest"] / (np.abs(xr).mean(1) + 1e-8)
    scores["input_norm"] = np.linalg.norm(xr, axis=1)
    scores.update(baseline_scores(task, comp.probs, y_train))
    scores["random"] = np.random.default_rng(1000 + seed).random(len(y_train))
    return {"scores": scores, "test": task.test_metric(model)}


def retrain(task: Task, keep: np.ndarray, seed: int) -> float:
    keras.utils.set_random_seed(seed)
    model = task.build()
    model.fit(
        _rows(task.data["x_train"], keep), task.data["y_train"][keep],
        batch_size=task.batch_size, epochs=task.epochs, shuffle=True, verbose=0,
    )
    return task.test_metric(model)


def flip_labels(y: np.ndarray, rate: float, num_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    k = round(rate * len(y))
    idx = rng.choice(len(y), k, replace=False)
    y2 = y.copy()
    if num_classes == 2:
        y2[idx] = 1 - y2[idx]
    else:
        y2[idx] = (y2[idx] + rng.integers(1, num_classes, k)) % num_classes
    flipped = np.zeros(len(y), bool)
    flipped[idx] = True
    return y2, flipped


# --------------------------------------------------------------- benchmark
def _ms(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, "float64")
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "values": [float(v) for v in a]}


def _fmt(d: dict[str, float]) -> str:
    return f"{d['mean']:.3f}±{d['std']:.3f}"


def run_dataset(task: Task, seeds, noise_rates, keep_fracs, log: Callable[[str], None]):
    data = task.data
    y = data["y_train"]
    n = len(y)
    out: dict[str, Any] = {"n_train": n, "n_test": _n(data["x_test"]), "epochs": task.epochs,
                           "detection": {}, "pruning": {}}
    # Part 1: noisy labels.
    for rate in noise_rates:
        per: dict[str, dict[str, list[float]]] = {s: {"auroc": [], "p_at_k": []} for s in DETECT_SCORES}
        tests = []
        for seed in seeds:
            t0 = time.time()
            y_noisy, flipped = flip_labels(y, rate, data["num_classes"], 100 + seed)
            res = scoring_run(task, y_noisy, seed)
            tests.append(res["test"])
            k = int(flipped.sum())
            for s in DETECT_SCORES:
                per[s]["auroc"].append(auroc(res["scores"][s], flipped))
                per[s]["p_at_k"].append(precision_at_k(res["scores"][s], flipped, k))
            log(f"  noise {rate:.0%} seed {seed}: test {res['test']:.4f}  ({time.time() - t0:.1f}s)")
        out["detection"][f"{rate:g}"] = {
            "test_metric": _ms(tests),
            "scores": {s: {m: _ms(v) for m, v in per[s].items()} for s in DETECT_SCORES},
        }
    # Part 2: pruning on clean labels.
    full, results = [], {}
    for seed in seeds:
        t0 = time.time()
        res = scoring_run(task, y, seed)
        full.append(res["test"])
        rng = np.random.default_rng(2000 + seed)
        for frac in keep_fracs:
            m = round(frac * n)
            key = f"{frac:g}"
            results.setdefault(key, {}).setdefault("random", []).append(
                retrain(task, np.sort(rng.choice(n, m, replace=False)), seed))
            for s in PRUNE_SCORES:
                order = np.argsort(res["scores"][s], kind="stable")
                for side, keep in (("top", order[-m:]), ("bottom", order[:m])):
                    results[key].setdefault(f"{s}:{side}", []).append(
                        retrain(task, np.sort(keep), seed))
        log(f"  pruning seed {seed}: full {res['test']:.4f}  ({time.time() - t0:.1f}s)")
    out["pruning"] = {"full": _ms(full),
                      "keep": {k: {s: _ms(v) for s, v in r.items()} for k, r in results.items()}}
    return out


def print_tables(name: str, res: dict[str, Any], metric: str) -> None:
    print(f"\n=== {name}: noisy-label detection (ROC AUC / precision@k, mean±std over seeds) ===")
    rates = list(res["detection"])
    print(f"{'score':<12}" + "".join(f" | {float(r):.0%} AUROC    P@k        " for r in rates))
    for s in DETECT_SCORES:
        row = f"{s:<12}"
        for r in rates:
            d = res["detection"][r]["scores"][s]
            row += f" | {_fmt(d['auroc'])} {_fmt(d['p_at_k'])}"
        print(row)
    print(f"model test {metric} on noisy labels: "
          + ", ".join(f"{float(r):.0%}: {_fmt(res['detection'][r]['test_metric'])}" for r in rates))
    print(f"\n=== {name}: pruning, test {metric} (full data: {_fmt(res['pruning']['full'])}) ===")
    fracs = list(res["pruning"]["keep"])
    print(f"{'kept by':<20}" + "".join(f" | keep {float(f):.0%}    " for f in fracs))
    for s in ["random"] + [f"{p}:{side}" for p in PRUNE_SCORES for side in ("top", "bottom")]:
        print(f"{s:<20}" + "".join(f" | {_fmt(res['pruning']['keep'][f][s])}" for f in fracs))


def markdown_tables(report: dict[str, Any]) -> str:
    """Markdown tables of a saved report (for the README "Quality" section)."""
    lines = []
    for name, res in report["datasets"].items():
        metric = res["metric"]
        rates = list(res["detection"])
        lines += [(f"**{name}: noisy-label detection** (ROC AUC / precision at k = #flipped; "
                  f"mean ± std over {len(report['seeds'])} seeds)"), ""]
        lines.append("| score | " + " | ".join(
            f"{float(r):.0%} AUROC | {float(r):.0%} P@k" for r in rates) + " |")
        lines.append("|---" * (1 + 2 * len(rates)) + "|")
        for s in report["detect_scores"]:
            cells = []
            for r in rates:
                d = res["detection"][r]["scores"][s]
                cells += [_fmt(d["auroc"]), _fmt(d["p_at_k"])]
            lines.append(f"| `{s}` | " + " | ".join(cells) + " |")
        lines += ["", f"Test {metric} of the scoring models trained on noisy labels: " + ", ".join(
            f"{float(r):.0%}: {_fmt(res['detection'][r]['test_metric'])}" for r in rates), ""]
        fracs = list(res["pruning"]["keep"])
        lines += [(f"**{name}: pruning**, test {metric} after retraining on the kept subset "
                  f"(full data: {_fmt(res['pruning']['full'])})"), ""]
        lines.append("| kept by | " + " | ".join(f"keep {float(f):.0%}" for f in fracs) + " |")
        lines.append("|---" * (1 + len(fracs)) + "|")
        rows = ["random"] + [f"{p}:{side}" for p in report["prune_scores"]
                             for side in ("top", "bottom")]
        for s in rows:
            lines.append(f"| `{s}` | " + " | ".join(
                _fmt(res["pruning"]["keep"][f][s]) for f in fracs) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write all results to this file")
    ap.add_argument("--datasets", default="fmnist,census")
    ap.add_argument("--data-root", default=DATA_ROOT)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (not for results)")
    ap.add_argument("--markdown-from", metavar="JSON",
                    help="print the Markdown tables of a saved --json report and exit")
    args = ap.parse_args(argv)
    if args.markdown_from:
        with open(args.markdown_from) as f:
            print(markdown_tables(json.load(f)))
        return 0
    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    if args.quick:
        seeds, rates, fracs = (0, 1), (0.2,), (0.5,)
        sizes = {"fmnist": (1000, 500, 3), "census": (2000, 1000, 3)}
    else:
        seeds, rates, fracs = SEEDS, NOISE_RATES, KEEP_FRACTIONS
        sizes = {"fmnist": (10000, 2000, 6), "census": (20000, 10000, 5)}
    loaders = {"fmnist": load_fmnist, "census": load_census}
    metrics = {"fmnist": "accuracy", "census": "ROC AUC"}
    report: dict[str, Any] = {
        "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "quick": args.quick,
        "versions": {"python": platform.python_version(), "tensorflow": tf.__version__,
                     "keras": keras.__version__, "keras_sie": keras_sie.__version__},
        "cpu_count": os.cpu_count(),
        "seeds": list(seeds), "noise_rates": list(rates), "keep_fractions": list(fracs),
        "early_epochs": EARLY_EPOCHS, "detect_scores": list(DETECT_SCORES),
        "prune_scores": list(PRUNE_SCORES), "datasets": {},
    }
    for name in args.datasets.split(","):
        n_train, n_test, epochs = sizes[name]
        log(f"{name}: loading ({n_train} train / {n_test} test, {epochs} epochs)")
        task = Task(loaders[name](args.data_root, n_train, n_test), epochs)
        t0 = time.time()
        res = run_dataset(task, seeds, rates, fracs, log)
        res["metric"] = metrics[name]
        res["wall_s"] = time.time() - t0
        report["datasets"][name] = res
        print_tables(name, res, metrics[name])
        log(f"{name}: done in {res['wall_s']:.0f}s")
    report["wall_s"] = time.time() - t_start
    log(f"total {report['wall_s']:.0f}s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
