"""Bundled real data for the demo and examples (works offline).

Only the standard library and numpy: no pandas, no download.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
import zlib
from collections import Counter

import numpy as np

_DATA = os.path.join(os.path.dirname(__file__), "data")
REVIEWS_FILE = os.path.join(_DATA, "womens_clothing_reviews.csv.gz")
_TOKEN = re.compile(r"[a-z']+")

CATEGORICAL = ("item", "division", "department", "class_name")


def _vocab(values: list[str], min_count: int = 1) -> dict[str, int]:
    """Value -> id, 0 reserved for unknown/rare, most frequent first."""
    counts = Counter(values)
    ordered = sorted((v for v, c in counts.items() if c >= min_count), key=lambda v: (-counts[v], v))
    return {v: i + 1 for i, v in enumerate(ordered)}


def load_clothing_reviews(seq_len: int = 48, num_buckets: int = 20_000) -> dict:
    """Loads the bundled Women's E-Commerce Clothing Reviews as model-ready arrays.

    A real retailer's 23,486 reviews (CC0). The task is CTR-like: predict
    `Recommended IND` (82 % positive) from the item id, its catalogue
    categories, the reviewer's age, the review's feedback count and the review
    text. `Rating` is held out of the features (it nearly gives the label
    away) and returned separately: a review whose label disagrees with its
    star rating (rating <= 2 but recommended, or >= 4 but not) is a natural
    candidate for a noisy label.

    Args:
        seq_len: Tokens kept per review (title + text), right-padded with 0.
        num_buckets: Hash buckets for word tokens (ids 1..num_buckets-1).

    Returns:
        A dict with `features` (dict of numpy arrays: `item`, `division`,
        `department`, `class_name` int64 ids; `tokens` int64 [N, seq_len];
        `numeric` float32 [N, 2] = standardized age and log1p feedback count),
        `label` (float32 [N, 1]), `rating` (int64 [N]), `text` (list of str,
        the title and the first words of the review), `vocab_sizes` (dict) and
        `num_buckets`.

    Example:

    ```python
    data = keras_sie.datasets.load_clothing_reviews()
    x, y = data["features"], data["label"]
    ```
    """
    if not os.path.exists(REVIEWS_FILE):
        raise FileNotFoundError(
            f"Bundled dataset missing: {REVIEWS_FILE}. Reinstall keras_sie (package data)."
        )
    with gzip.open(REVIEWS_FILE, "rb") as raw:
        rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")))
    columns = {
        "item": [r["Clothing ID"] for r in rows],
        "division": [r["Division Name"] or "?" for r in rows],
        "department": [r["Department Name"] or "?" for r in rows],
        "class_name": [r["Class Name"] or "?" for r in rows],
    }
    features: dict[str, np.ndarray] = {}
    vocab_sizes = {}
    for name, values in columns.items():
        vocab = _vocab(values, min_count=2 if name == "item" else 1)
        features[name] = np.array([vocab.get(v, 0) for v in values], dtype=np.int64)
        vocab_sizes[name] = len(vocab) + 1
    tokens = np.zeros((len(rows), seq_len), dtype=np.int64)
    texts = []
    for i, r in enumerate(rows):
        text = f"{r['Title']}. {r['Review Text']}".strip(". ")
        texts.append(text)
        # An empty review still gets one token: a fully masked sequence makes
        # masked average pooling divide 0 by 0.
        words = _TOKEN.findall(text.lower())[:seq_len] or ["<empty>"]
        for j, w in enumerate(words):
            # Stable hash (crc32), not Python's salted hash(): the same ids every run.
            tokens[i, j] = 1 + zlib.crc32(w.encode()) % (num_buckets - 1)
    features["tokens"] = tokens
    age = np.array([float(r["Age"] or 0) for r in rows], dtype=np.float32)
    feedback = np.log1p(np.array([float(r["Positive Feedback Count"] or 0) for r in rows],
                                 dtype=np.float32))
    numeric = np.stack([(age - age.mean()) / age.std(), (feedback - feedback.mean()) / feedback.std()],
                       axis=1)
    features["numeric"] = numeric.astype(np.float32)
    return {
        "features": features,
        "label": np.array([[float(r["Recommended IND"])] for r in rows], dtype=np.float32),
        "rating": np.array([int(r["Rating"]) for r in rows], dtype=np.int64),
        "text": texts,
        "vocab_sizes": vocab_sizes,
        "num_buckets": num_buckets,
    }
