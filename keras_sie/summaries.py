"""TensorBoard events for one epoch's importance.

Written to `<log_dir>/keras_sie`, a run folder of its own, so it sits beside
`keras.callbacks.TensorBoard`'s `train`/`validation` runs in the same log_dir.
The writer is created lazily: no file appears until something is logged.

Tags (see the README's table):

* `importance/distribution`  histogram of N_visited * I_i (1.0 = a uniform share)
* `importance/gini`, `importance/top1pct_share`, `importance/effective_sample_size`,
  `importance/entropy`, `importance/visited_samples`, `importance/unvisited_samples`
* `importance/top_k`  markdown table of the top-k samples (key, score, visits)
* `faults/nonfinite_rows`, `faults/invalid_id_rows`, `faults/dropped_key_rows`,
  `faults/skipped_steps` (steps a loss-scale optimizer skipped for overflow)
* `features/<name>`  share of sum_i |g_ij| per feature group; `features/table` text
* `importance/data_map`  the data-map image (matplotlib extra)
* ranked lists, under the `keras_sie/ranking` run: `ranking/top_pairs` (top
  (query, item) pairs), `ranking/query_distribution` and `ranking/query_*`
  per-query scalars (see `write_ranking`)
* `tasks/<output>/distribution|gini|top1pct_share`  per-output scores (multi-output models)
* `signals/<name>/distribution|mean|median`  training-dynamics signals (`signals=`);
  for `forgetting` the count so far
"""

from __future__ import annotations

import glob
import os
import time
from typing import Any

import numpy as np
import tensorflow as tf
from tensorboard.plugins.histogram import metadata as histogram_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.plugins.text import metadata as text_metadata
from tensorflow.core.framework import summary_pb2

from keras_sie import scores as scores_lib


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
        bar = "#" * round(share * 40)
        lines.append(f"| {_md_escape(name)} | {share:.4f} `{bar}` |")
    return "\n".join(lines)


def _value(tag: str, array: np.ndarray, metadata) -> summary_pb2.Summary.Value:
    """One tag of a raw `Summary` proto (what `tf.summary.*` would write)."""
    return summary_pb2.Summary.Value(
        tag=tag, tensor=tf.make_tensor_proto(array),
        metadata=summary_pb2.SummaryMetadata.FromString(metadata.SerializeToString()),
    )


_SCALAR_METADATA = scalar_metadata.create_summary_metadata(display_name=None, description="")
_TEXT_METADATA = text_metadata.create_summary_metadata(display_name=None, description="")
_HISTOGRAM_METADATA = histogram_metadata.create_summary_metadata(
    display_name=None,
    description="N_visited x importance per sample (1.0 = uniform share).",
)


def histogram_buckets(values: np.ndarray, bucket_count: int = 60) -> np.ndarray:
    """The `[bucket_count, 3]` (left, right, count) rows `tf.summary.histogram` writes.

    Same buckets as TensorBoard's own bucketing (equal widths over
    [min, max], the last bucket closed, one-value data in the last bucket),
    computed in O(N) with numpy instead of an [N, buckets] one-hot matrix.
    Non-finite values are left out.

    Args:
        values: Data of any shape.
        bucket_count: Number of buckets. Defaults to 60.

    Returns:
        A float64 array of shape `[bucket_count, 3]`.
    """
    d = np.asarray(values, dtype=np.float64).reshape(-1)
    d = d[np.isfinite(d)]
    if d.size == 0 or bucket_count <= 0:
        return np.zeros((max(bucket_count, 0), 3), np.float64)
    lo, hi = d.min(), d.max()
    if hi == lo:
        counts = np.zeros(bucket_count, np.float64)
        counts[-1] = d.size
        edges = np.full(bucket_count, hi)
        return np.stack([edges, edges, counts], axis=1)
    width = (hi - lo) / bucket_count
    idx = np.minimum(np.floor((d - lo) / width).astype(np.int64), bucket_count - 1)
    counts = np.bincount(idx, minlength=bucket_count).astype(np.float64)
    edges = np.linspace(lo, hi, bucket_count + 1)
    edges[-1] = hi
    return np.stack([edges[:-1], edges[1:], counts], axis=1)


def create_file_writer(path: str):
    """A TensorBoard writer whose event file sorts after the folder's older ones.

    TensorBoard reads a folder's event files in name order. TensorFlow names
    them `events.out.tfevents.<second>.<host>.<pid>.<n>.v2`, where `n` counts
    the process's writers, so two files opened in the same second can sort
    out of order (".10" before ".9"): a second `fit` would then be read before
    the first. When the folder holds a file from this very second, wait for
    the next second (only sub-second fits ever wait, at most one second; a
    file stamped in the future, copied from another clock, is not waited for).
    """
    now = int(time.time())
    stamps = set()
    for name in glob.glob(os.path.join(path, "events.out.tfevents.*")):
        parts = os.path.basename(name).split(".")
        if len(parts) > 3 and parts[3].isdigit():
            stamps.add(int(parts[3]))
    if now in stamps:
        while int(time.time()) == now:
            time.sleep(0.05)
    with tf.device("/cpu:0"):
        return tf.summary.create_file_writer(path)


class SummaryWriter:
    """Lazily created TensorBoard writer for the keras_sie run folder."""

    def __init__(self, log_dir: str, subdir: str = "keras_sie"):
        self.path = os.path.join(os.fspath(log_dir), subdir)
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            self._writer = create_file_writer(self.path)
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
        values = []
        if rel.size:
            # Bucketed in numpy: tf.summary.histogram builds an [N, buckets]
            # one-hot matrix (0.5 s and 0.5 GB at N = 10^6); same buckets.
            values.append(_value("importance/distribution",
                                 histogram_buckets(rel.astype(np.float32), 60),
                                 _HISTOGRAM_METADATA))
        scalars = {f"importance/{k}": v for k, v in summary.items()}
        scalars.update({f"faults/{k}": v for k, v in faults.items()})
        scalars.update({f"features/{k}": v for k, v in feature_shares.items()})
        scalars.update(extra_scalars or {})
        values += [_value(tag, np.float32(v), _SCALAR_METADATA) for tag, v in scalars.items()]
        if top_rows:
            values.append(_value("importance/top_k", np.array(top_k_markdown(top_rows),
                                                               dtype=object), _TEXT_METADATA))
        if feature_shares:
            values.append(_value("features/table", np.array(
                features_markdown(feature_shares), dtype=object), _TEXT_METADATA))
        with tf.device("/cpu:0"), self.writer.as_default(step=step):
            # One event for every tag of the epoch: a summary op per tag cost
            # about 0.5 ms each in eager mode.
            tf.summary.experimental.write_raw_pb(
                summary_pb2.Summary(value=values).SerializeToString(), step=step
            )
            for name, image in (images or {}).items():
                tf.summary.image(name, image[None] if image.ndim == 3 else image, step=step)
        self.writer.flush()

    def write_stream_epoch(self, step: int, relative: np.ndarray, scalars: dict[str, float],
                           faults: dict[str, float], feature_shares: dict[str, float],
                           top_rows: list[tuple]) -> None:
        """A streaming epoch: one event with its counters, sample histogram and top visits.

        Args:
            step: The record number (the Keras epoch).
            relative: A sample of per-visit scores divided by the epoch's mean
                visit score (`stream/visit_score_distribution`).
            scalars: `stream/*` counters.
            faults: Fault counts (`faults/<name>`).
            feature_shares: Feature group shares (`features/<name>`).
            top_rows: `(key, share of the epoch's total, 1, share x rows)` of
                the top visits.
        """
        values = []
        if relative.size:
            values.append(_value("stream/visit_score_distribution",
                                 histogram_buckets(relative.astype(np.float32), 60),
                                 _HISTOGRAM_METADATA))
        tags = dict(scalars)
        tags.update({f"faults/{k}": v for k, v in faults.items()})
        tags.update({f"features/{k}": v for k, v in feature_shares.items()})
        values += [_value(tag, np.float32(v), _SCALAR_METADATA) for tag, v in tags.items()]
        if top_rows:
            values.append(_value("stream/top_visits", np.array(
                top_k_markdown(top_rows, title="visit key"), dtype=object),
                _TEXT_METADATA))
        with tf.device("/cpu:0"), self.writer.as_default(step=step):
            tf.summary.experimental.write_raw_pb(
                summary_pb2.Summary(value=values).SerializeToString(), step=step)
        self.writer.flush()

    def write_tasks(self, step: int, task_scores: dict[str, np.ndarray], visits: np.ndarray) -> None:
        """Per-output scores of a multi-output model: `tasks/<output>/...` tags."""
        visited = visits > 0
        n_visited = max(int(visited.sum()), 1)
        with tf.device("/cpu:0"), self.writer.as_default(step=step):
            for name, scores in task_scores.items():
                rel = scores[visited] * n_visited
                if rel.size:
                    tf.summary.write(
                        f"tasks/{name}/distribution",
                        tf.constant(histogram_buckets(rel.astype(np.float32), 60)),
                        metadata=_HISTOGRAM_METADATA,
                    )
                tf.summary.scalar(f"tasks/{name}/gini", scores_lib.gini(scores[visited]))
                tf.summary.scalar(
                    f"tasks/{name}/top1pct_share", scores_lib.top_share(scores[visited], 0.01)
                )
        self.writer.flush()

    def write_signals(self, step: int, values: dict[str, np.ndarray]) -> None:
        """Training-dynamics signals: `signals/<name>/distribution|mean|median` tags.

        Args:
            step: The record number.
            values: Per-sample values of each signal (NaN for unvisited samples).
        """
        with tf.device("/cpu:0"), self.writer.as_default(step=step):
            for name, v in values.items():
                v = np.asarray(v, np.float64)
                v = v[np.isfinite(v)]
                if not v.size:
                    continue
                tf.summary.write(
                    f"signals/{name}/distribution",
                    tf.constant(histogram_buckets(v.astype(np.float32), 60)),
                    metadata=_HISTOGRAM_METADATA,
                )
                tf.summary.scalar(f"signals/{name}/mean", float(v.mean()))
                tf.summary.scalar(f"signals/{name}/median", float(np.median(v)))
        self.writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def pairs_markdown(rows: list[tuple]) -> str:
    """Ranked lists: the top (query, item) pairs as a markdown table."""
    lines = ["| rank | query | item | importance | x uniform | visits |",
             "|---:|---|---|---:|---:|---:|"]
    for rank, (query, item, score, visits, ratio) in enumerate(rows, 1):
        lines.append(f"| {rank} | {_md_escape(query)} | {_md_escape(item)} | {score:.6g} | "
                     f"{ratio:.3g} | {visits} |")
    return "\n".join(lines)


_RANKING_WRITERS: dict[str, Any] = {}


def write_ranking(log_dir: str, record, number: int, top_k: int) -> None:
    """Ranked lists: TensorBoard summaries of record `number` under `<run>/ranking`.

    `ranking/top_pairs` (the top-k (query, item) pairs), and with query ids
    `ranking/query_distribution` (N_visited x importance per query) and the
    per-query summary scalars (`ranking/query_gini`, ...). The per-item
    histogram and table are the run's own `importance/*` summaries.
    """
    path = os.path.join(os.fspath(log_dir), "keras_sie", "ranking")
    writer = _RANKING_WRITERS.get(path)
    if writer is None:
        writer = _RANKING_WRITERS[path] = create_file_writer(path)
    scores = record.epoch(number)
    visited = int((scores.visits > 0).sum())
    rows = [(q, item, score, vis, score * visited)
            for q, item, score, vis in record.top_pairs(top_k, epoch=number)]
    with tf.device("/cpu:0"), writer.as_default(step=number):
        if rows:
            tf.summary.text("ranking/top_pairs", pairs_markdown(rows))
        queries = scores.queries
        if queries is not None:
            seen = queries.visits > 0
            rel = queries.importance[seen] * max(int(seen.sum()), 1)
            if rel.size:
                tf.summary.write("ranking/query_distribution",
                                 tf.constant(histogram_buckets(rel.astype(np.float32), 60)),
                                 metadata=_HISTOGRAM_METADATA)
            for name, value in queries.summary.items():
                tf.summary.scalar(f"ranking/query_{name}", float(value))
    writer.flush()
