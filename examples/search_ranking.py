"""Search ranking on real data: which (query, item) impressions teach the ranker most?

Data: the bundled Women's E-Commerce Clothing Reviews (CC0), offline. A query
is a department/class ("Tops / Knits"); its candidates are the products
reviewed under it, L = 8 per list (shorter classes are padded); an item's
relevance grade is its mean star rating (grades 0..4). Lists are drawn at
random from each class's products.

Noise: in 5 % of the lists the grades of two items with different grades are
swapped (a wrong relevance judgement). The script reports how strongly those
planted items are enriched among the top-scored items, for keras_sie's
per-item score and for the per-item pairwise loss at the end of training.

Model: an item tower (product-id embedding [B, L, 8] and three per-item
numeric features through a Dense shared over the list axis), a query
embedding (a query-level feature: it goes to the per-query record), trained
with keras-rs's PairwiseLogisticLoss (label -1 masks padding); without
keras-rs, a listwise softmax cross-entropy on the normalized grades.

Run:
    python examples/search_ranking.py --log-dir runs/ranking
    tensorboard --logdir runs/ranking
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import keras_sie
from keras_sie.datasets import load_clothing_reviews

L = 8


def make_lists(lists_per_query: int, noise: float, seed: int) -> dict:
    """Lists of L candidates per department/class query, with planted grade swaps."""
    data = load_clothing_reviews()
    f = data["features"]
    rng = np.random.default_rng(seed)
    item, rating = f["item"], data["rating"].astype(np.float64)
    query_of_row = f["department"] * 1000 + f["class_name"]
    products, inverse = np.unique(item, return_inverse=True)
    counts = np.bincount(inverse)
    mean_rating = np.bincount(inverse, rating) / counts
    numeric = np.stack([
        np.log1p(counts),
        np.bincount(inverse, f["numeric"][:, 0]) / counts,  # mean reviewer age (standardized)
        np.bincount(inverse, f["numeric"][:, 1]) / counts,  # mean log feedback count
    ], axis=1).astype("float32")
    grade = np.clip(np.rint(mean_rating) - 1, 0, 4)
    # The class a product is reviewed under most often is its query.
    queries, q_inverse = np.unique(query_of_row, return_inverse=True)
    home = np.zeros(len(products), np.int64)
    for p in range(len(products)):
        home[p] = np.bincount(q_inverse[inverse == p]).argmax()
    rows_item, rows_query, rows_mask = [], [], []
    for q in range(len(queries)):
        members = np.flatnonzero((home == q) & (counts >= 2))
        if len(members) < 2:
            continue
        for _ in range(lists_per_query):
            pick = rng.choice(members, size=min(L, len(members)), replace=False)
            row = np.zeros(L, np.int64)
            row[: len(pick)] = pick
            rows_item.append(row)
            rows_mask.append(np.arange(L) < len(pick))
            rows_query.append(q)
    product = np.stack(rows_item)
    mask = np.stack(rows_mask)
    labels = np.where(mask, grade[product], -1.0).astype("float32")
    # Plant noise: swap two different grades inside 5 % of the lists.
    planted = np.zeros(mask.shape, bool)
    for n in rng.permutation(len(product))[: round(noise * len(product))]:
        real = np.flatnonzero(mask[n])
        for _ in range(20):
            i, j = rng.choice(real, 2, replace=False)
            if labels[n, i] != labels[n, j]:
                labels[n, [i, j]] = labels[n, [j, i]]
                planted[n, [i, j]] = True
                break
    return {
        "x": {
            "product": np.where(mask, product + 1, 0),  # 0: padding
            "numeric": np.where(mask[..., None], numeric[product], 0.0).astype("float32"),
            "query": np.asarray(rows_query, np.int64),
        },
        "labels": labels, "mask": mask, "planted": planted,
        "num_products": len(products) + 1, "num_queries": len(queries),
    }


def build_model(num_products: int, num_queries: int, pairwise: bool) -> keras.Model:
    product = keras.Input((L,), dtype="int64", name="product")
    numeric = keras.Input((L, 3), name="numeric")
    query = keras.Input((), dtype="int64", name="query")
    item = keras.layers.Concatenate()([
        keras.layers.Embedding(num_products, 8, name="product_emb")(product),  # [B, L, 8]
        keras.layers.Dense(8, activation="relu", name="numeric_tower")(numeric),  # shared
    ])
    item = keras.layers.Dense(16, activation="relu", name="item_tower")(item)
    q = keras.layers.Embedding(num_queries, 16, name="query_emb")(query)  # [B, 16]
    scores = keras.layers.Dot(axes=(2, 1))([item, q])  # [B, L]
    scores = keras.layers.Add()([scores, keras.layers.Reshape((L,))(
        keras.layers.Dense(1, name="item_bias")(item))])
    inputs = {"product": product, "numeric": numeric, "query": query}
    if not pairwise:  # listwise softmax CE: the model masks padding with a large negative
        scores = keras.layers.Lambda(
            lambda t: keras.ops.where(keras.ops.greater(t[1], 0), t[0], -1e9))([scores, product])
    return keras.Model(inputs, scores)


def pairwise_item_loss(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per item: the logistic loss of every pair it is in (padding: label -1)."""
    valid = labels >= 0
    diff = scores[:, :, None] - scores[:, None, :]
    better = (labels[:, :, None] > labels[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    pair = np.where(better, np.logaddexp(0.0, -diff), 0.0)
    return pair.sum(axis=2) + pair.sum(axis=1)


def enrichment(score: np.ndarray, planted: np.ndarray, real: np.ndarray) -> float:
    """Share of planted items among the top-K scored items / their base rate (K = #planted)."""
    s, p = score[real], planted[real]
    k = int(p.sum())
    top = np.argsort(-s, kind="stable")[:k]
    return float(p[top].mean() / p.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-dir", default="runs/ranking")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lists-per-query", type=int, default=150)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss", choices=("pairwise", "softmax"), default=None)
    args = parser.parse_args()
    keras.utils.set_random_seed(args.seed)
    t0 = time.perf_counter()
    d = make_lists(args.lists_per_query, args.noise, args.seed)
    pairwise = args.loss != "softmax"
    if pairwise:
        try:
            import keras_rs
        except ImportError:
            pairwise = False
    model = build_model(d["num_products"], d["num_queries"], pairwise)
    if pairwise:
        loss = keras_rs.losses.PairwiseLogisticLoss()
        y = d["labels"]  # label -1: padding (a mask the loss takes)
    else:
        loss = keras.losses.CategoricalCrossentropy(from_logits=True)
        g = np.maximum(d["labels"], 0) + d["mask"] * 0.1
        y = (g / g.sum(axis=1, keepdims=True)).astype("float32")
    model.compile(keras.optimizers.Adam(3e-3), loss)
    x = keras_sie.with_ids(d["x"], list_axis=1, mask=d["mask"])
    sie = keras_sie.SampleImportance(log_dir=args.log_dir, verbose=1)
    model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, shuffle=True, verbose=0,
              callbacks=[sie])
    n, real, planted = len(d["labels"]), d["mask"].reshape(-1), d["planted"].reshape(-1)
    scores = model.predict(keras_sie.without_ids(x), batch_size=512, verbose=0)
    item_loss = pairwise_item_loss(scores, d["labels"]).reshape(-1)
    sie_score = np.zeros(n * L)
    sie_score[: sie.record.num_samples] = sie.aggregate  # ids n*L + i; trailing padding unscored
    print(f"{n} lists x {L} items ({int(real.sum())} real (query, item) pairs, "
          f"{d['num_queries']} queries), {int(planted.sum())} planted items in "
          f"{int(d['planted'].any(axis=1).sum())} lists; loss: "
          f"{'keras-rs PairwiseLogisticLoss' if pairwise else 'listwise softmax CE'}")
    print(f"enrichment of planted items in the top-{int(planted.sum())}: "
          f"keras_sie {enrichment(sie_score, planted, real):.1f}x, "
          f"per-item pairwise loss {enrichment(item_loss, planted, real):.1f}x "
          f"(1.0x = chance)")
    print("top (query, item) pairs:", [(q, i) for q, i, _, _ in sie.top_pairs(5)])
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
