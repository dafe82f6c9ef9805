"""TensorBoard events for one epoch's importance.

Written to `<log_dir>/keras_sie`, a run folder of its own, so it sits beside
`keras.callbacks.TensorBoard`'s `train`/`validation` runs in the same log_dir.
The writer is created lazily: no file appears until something is logged.

Tags (see the README's table):

* `importance/distribution`  histogram of N_visited * I_i (1.0 = a uniform share)
* `importance/gini`, `importance/top1pct_share`, `importance/effective_sample_size`,
  `importance/entropy`, `importance/visited_samples`, `importance/unvisited_samples`
* `importance/top_k`  markdown table of the top-k samples (key, score, visits)
* `faults/nonfinite_rows`, `faults/invalid_id_rows`, `faults/dropped_key_rows`
* `features/<name>`  share of sum_i |g_ij| per feature group; `features/table` text
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def top_k_markdown(rows: list[tuple], title: str = "sample key") -> str:
    lines = [f"| rank | {title} | importance | x uniform | visits |", "|---:|---|---:|---:|---:|"]
    for rank, (key, score, visits, ratio) in enumerate(rows, 1):
        lines.append(f"| {rank} | {_md_escape(key)} | {score:.6g} | {ratio:.3g} | {visits} |")
    return "\n".join(lines)


def features_markdown(shares: dict[str, float]) -> str:
    lines = ["| feature group | share of input gradient |", "|---|---:|"]
    for name, share in sorted(shares.items(), key=lambda kv: -kv[1]):
        bar = "#" * int(round(share * 40))
        lines.append(f"| {_md_escape(name)} | {share:.4f} `{bar}` |")
    return "\n".join(lines)


class SummaryWriter:
    """Lazily created TensorBoard writer for the keras_sie run folder."""

    def __init__(self, log_dir: str, subdir: str = "keras_sie"):
        self.path = os.path.join(os.fspath(log_dir), subdir)
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            with tf.device("/cpu:0"):
                self._writer = tf.summary.create_file_writer(self.path)
        return self._writer

    def write_epoch(
        self,
        step: int,
        importance: np.ndarray,
        visits: np.ndarray,
        summary: dict[str, float],
        faults: dict[str, float],
        top_rows: list[tuple],
        feature_shares: dict[str, float],
        extra_scalars: dict[str, float] | None = None,
        images: dict[str, np.ndarray] | None = None,
    ) -> None:
        visited = visits > 0
        n_visited = int(visited.sum())
        rel = importance[visited] * max(n_visited, 1)
        with tf.device("/cpu:0"), self.writer.as_default(step=step):
            if rel.size:
                tf.summary.histogram(
                    "importance/distribution", rel.astype(np.float32), buckets=60,
                    description="N_visited x importance per sample (1.0 = uniform share).",
                )
            for name, value in summary.items():
                tf.summary.scalar(f"importance/{name}", float(value))
            for name, value in faults.items():
                tf.summary.scalar(f"faults/{name}", float(value))
            if top_rows:
                tf.summary.text("importance/top_k", top_k_markdown(top_rows))
            for name, share in feature_shares.items():
                tf.summary.scalar(f"features/{name}", float(share))
            if feature_shares:
                tf.summary.text("features/table", features_markdown(feature_shares))
            for name, value in (extra_scalars or {}).items():
                tf.summary.scalar(name, float(value))
            for name, image in (images or {}).items():
                tf.summary.image(name, image[None] if image.ndim == 3 else image, step=step)
        self.writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
