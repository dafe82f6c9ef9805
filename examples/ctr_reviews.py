"""CTR-style demo on real data: which reviews drive a recommendation model?

Data: the bundled Women's E-Commerce Clothing Reviews (23,486 real reviews,
CC0), loaded offline by `keras_sie.datasets.load_clothing_reviews()`.

Model: embeddings for the item id, its division / department / class and the
review's word tokens (masked padding), plus two dense features, an MLP head
predicting `Recommended IND`. Input: dict features from `tf.data` that carry
their own `sample_id` feature (the row number), which the callback strips
before the model sees it.

Run:
    python examples/ctr_reviews.py --log-dir runs/demo
    tensorboard --logdir runs/demo
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import keras_sie
from keras_sie.datasets import load_clothing_reviews


def build_model(vocab_sizes: dict[str, int], num_buckets: int, seq_len: int) -> keras.Model:
    inputs, parts = {}, []
    for name, dim in (("item", 16), ("division", 2), ("department", 4), ("class_name", 4)):
        inputs[name] = keras.Input((), dtype="int64", name=name)
        parts.append(keras.layers.Embedding(vocab_sizes[name], dim, name=f"{name}_emb")(inputs[name]))
    inputs["tokens"] = keras.Input((seq_len,), dtype="int64", name="tokens")
    words = keras.layers.Embedding(num_buckets, 16, mask_zero=True, name="tokens_emb")(inputs["tokens"])
    parts.append(keras.layers.GlobalAveragePooling1D()(words))
    inputs["numeric"] = keras.Input((2,), name="numeric")
    parts.append(inputs["numeric"])
    h = keras.layers.Concatenate()(parts)
    h = keras.layers.Dense(64, activation="relu")(h)
    h = keras.layers.Dense(32, activation="relu")(h)
    out = keras.layers.Dense(1, activation="sigmoid", name="recommended")(h)
    return keras.Model(inputs, out, name="ctr_reviews")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-dir", default="runs/demo")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    keras.utils.set_random_seed(args.seed)
    t0 = time.time()

    data = load_clothing_reviews()
    x, y, rating, text = data["features"], data["label"], data["rating"], data["text"]
    n = len(y)
    order = np.random.default_rng(args.seed).permutation(n)
    n_val = n // 10
    val_idx, train_idx = order[:n_val], order[n_val:]

    def subset(idx):
        return {k: v[idx] for k, v in x.items()}, y[idx]

    # The id feature is the row's position in the full dataset, so scores line
    # up with `text` and `rating`; SampleImportance strips it before the model.
    train_x, train_y = subset(train_idx)
    train_x["sample_id"] = train_idx.astype(np.int64)
    train = tf.data.Dataset.from_tensor_slices((train_x, train_y))
    train = train.shuffle(8192, seed=args.seed).batch(args.batch_size).prefetch(2)
    val = tf.data.Dataset.from_tensor_slices(subset(val_idx)).batch(1024)

    model = build_model(data["vocab_sizes"], data["num_buckets"], x["tokens"].shape[1])
    model.compile(keras.optimizers.Adam(2e-3), "binary_crossentropy",
                  metrics=[keras.metrics.AUC(name="auc")])
    sie = keras_sie.SampleImportance(log_dir=args.log_dir, num_samples=n, top_k=25, verbose=0)
    tensorboard = keras.callbacks.TensorBoard(args.log_dir)
    model.fit(train, validation_data=val, epochs=args.epochs, callbacks=[sie, tensorboard],
              verbose=2)

    imp = sie.aggregate
    visited = sie.visits > 0
    print(f"\nScored {int(visited.sum())} training reviews over {args.epochs} epochs "
          f"(validation rows stay unscored); gini {sie.summary['gini']:.3f}, "
          f"top 1% hold {100 * sie.summary['top1pct_share']:.1f}% of the importance.")

    def show(title, rows):
        print(f"\n{title}")
        print(f"{'id':>6} {'x uniform':>9} {'label':>5} {'stars':>5}  review")
        for key, score, _ in rows:
            snippet = text[key][:70].replace("\n", " ")
            print(f"{key:>6} {score * visited.sum():>9.2f} {int(y[key, 0]):>5} "
                  f"{rating[key]:>5}  {snippet}")

    ranked = np.argsort(-np.where(visited, imp, -1))
    show("Most important samples (cross-epoch aggregate):",
         [(int(i), float(imp[i]), 0) for i in ranked[:8]])
    show("Least important samples:",
         [(int(i), float(imp[i]), 0) for i in ranked[int(visited.sum()) - 5:int(visited.sum())]])

    print("\nFeature groups by share of the input gradient (latest epoch):")
    for name, share in sorted(sie.feature_importance.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<16} {share:6.1%}  {'#' * round(share * 50)}")

    # A check anyone can repeat: reviews whose label contradicts their stars.
    disagree = ((rating <= 2) & (y[:, 0] == 1)) | ((rating >= 4) & (y[:, 0] == 0))
    train_mask = np.zeros(n, bool)
    train_mask[train_idx] = True
    k = max(1, int(0.01 * train_mask.sum()))
    top1 = ranked[:k]
    print(f"\nLabel contradicts star rating: {disagree[train_mask].mean():.2%} of training reviews, "
          f"{disagree[top1].mean():.2%} of the top 1% by importance "
          f"({disagree[top1].mean() / max(disagree[train_mask].mean(), 1e-9):.1f}x enrichment).")
    print(f"\nDone in {time.time() - t0:.0f} s. Look at the run with:\n"
          f"  tensorboard --logdir {args.log_dir}\n"
          f"  keras-sie report {args.log_dir}")


if __name__ == "__main__":
    main()
