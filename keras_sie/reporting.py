"""Epoch-end reporting: the npz file, the manifest, TensorBoard and the data map.

`EpochReporter.report` turns one recorded epoch into files. It owns the
fail-open policy: a fault in reporting during a long job warns once, turns
reporting off for the rest of the run and lets training go on
(`strict=True` re-raises instead). Scores in memory are kept either way.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import time
import warnings
from typing import Any

import numpy as np

from keras_sie import storage
from keras_sie.datamap import render_data_map
from keras_sie.score_record import ScoreRecord
from keras_sie.summaries import SummaryWriter

_DATA_MAP_SHARE = 0.02  # data_map="auto": share of epoch time the picture may take
# From this many samples on, epoch files and events are written by a background
# thread while the next epoch trains (at 10^8 samples writing took 14 s).
ASYNC_MIN_SAMPLES = 1 << 20


class EpochReporter:
    """Writes each recorded epoch under `<log_dir>/keras_sie`.

    Args:
        log_dir: The user's log folder (None: keep scores in memory only).
        save_arrays: Write the per-epoch npz and the manifest.
        top_k: Rows of the top-k table.
        data_map: True, False or "auto" (see `SampleImportance`).
        strict: Re-raise reporting faults instead of warning once.
    """

    def __init__(
        self,
        log_dir: str | None,
        *,
        save_arrays: bool = True,
        top_k: int = 20,
        data_map: bool | str = "auto",
        strict: bool = False,
    ):
        self.log_dir = log_dir
        self.save_arrays = save_arrays
        self.top_k = top_k
        self.data_map = data_map
        self.strict = strict
        self.disabled = False
        self._writer: SummaryWriter | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: concurrent.futures.Future | None = None
        self._pending_number: int | None = None
        self._map_budget = 0.0
        self._map_cost: float | None = None

    # ------------------------------------------------------------ folders
    def prepare(self) -> None:
        """Fails fast when the log folder is not writable."""
        if self.log_dir is not None:
            storage.check_writable(self.log_dir)

    def replace_old_run(self) -> None:
        """A fresh run into a folder that holds an old run: replace it, loudly."""
        saved = storage.list_epochs(self.log_dir) if self.log_dir else []
        if not saved:
            return
        warnings.warn(
            f"keras_sie: {storage.run_dir(self.log_dir)} holds {len(saved)} epoch(s) of an "
            "earlier run; they are replaced by this run.",
            stacklevel=4,
        )
        self.close()
        shutil.rmtree(storage.run_dir(self.log_dir), ignore_errors=True)
        storage.check_writable(self.log_dir)

    def saved_record(self) -> ScoreRecord | None:
        """The run stored in the log folder, if any."""
        if not self.log_dir or not storage.list_epochs(self.log_dir):
            return None
        return storage.read_record(self.log_dir)

    def drop_files_from(self, first: int) -> None:
        """Deletes stored epochs numbered `first` and later (a resume cuts them)."""
        if not self.log_dir:
            return
        for e in storage.list_epochs(self.log_dir):
            if e >= first:
                os.unlink(storage.epoch_path(self.log_dir, e))

    # ------------------------------------------------------------- report
    @contextlib.contextmanager
    def fail_open(self, number: int):
        """Runs epoch-end bookkeeping; a fault warns once and disables reporting.

        With `strict=True` the fault is re-raised instead.
        """
        try:
            yield
        except Exception as e:  # noqa: BLE001 - fail open: warn once, training goes on
            self._fault(number, e)

    def _fault(self, number: int, error: BaseException) -> None:
        if self.strict:
            raise error
        if self.disabled:
            return  # warned once already
        self.disabled = True
        warnings.warn(
            f"keras_sie: importance reporting failed at record {number} "
            f"({type(error).__name__}: {error}); it is disabled for the rest of this run. "
            "Training is unaffected. Pass strict=True to SampleImportance to raise instead.",
            RuntimeWarning,
            stacklevel=5,
        )

    def report(self, record: ScoreRecord, number: int, epoch_seconds: float | None,
               config: dict[str, Any]) -> None:
        """Writes record `number` (call inside `fail_open`).

        Large runs (`ASYNC_MIN_SAMPLES` samples or more) are written by a
        background thread; the previous write is always finished (and its
        fault reported) before the next one starts, and `close` waits for it.
        """
        self.wait()
        if self.disabled or self.log_dir is None:
            return
        snapshot = record.snapshot(number)  # the worker never sees later epochs
        if record.num_samples < ASYNC_MIN_SAMPLES:
            self._write(snapshot, number, epoch_seconds, config)
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="keras_sie_report"
            )
        self._pending_number = number
        self._pending = self._pool.submit(self._write, snapshot, number, epoch_seconds, config)

    def wait(self) -> None:
        """Waits for a background write; its fault warns once (or raises if strict)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        error = pending.exception()
        if error is not None:
            self._fault(self._pending_number, error)

    def _write(self, record: ScoreRecord, number: int, epoch_seconds: float | None,
               config: dict[str, Any]) -> None:
        scores = record.epoch(number)
        if self.save_arrays:
            keys = record._keys  # hash mode: keys by slot; None for index ids
            storage.write_epoch(self.log_dir, number, storage.epoch_arrays(scores, keys))
            storage.write_manifest(
                self.log_dir,
                dict(
                    config,
                    epochs=record.epochs,
                    keras_epochs={str(e): record.epoch(e).keras_epoch for e in record.epochs},
                    num_samples=record.num_samples,
                    feature_names=list(scores.feature_names),
                    aggregate_epochs=record.aggregate_epochs,
                ),
            )
        visited = int((scores.visits > 0).sum())
        rows = [
            (key, score, vis, score * visited)
            for key, score, vis in record.top_k(self.top_k, epoch=number)
        ]
        self.summary_writer().write_epoch(
            step=number,
            importance=scores.importance,
            visits=scores.visits,
            summary=scores.summary,
            faults=scores.faults,
            top_rows=rows,
            feature_shares=scores.feature_importance,
            images=self._data_map_images(record, number, epoch_seconds),
        )
        if scores.task_importance:
            self._writer.write_tasks(number, scores.task_importance, scores.visits)
        if record.signals:
            visited = scores.visits > 0
            self._writer.write_signals(number, {
                name: np.where(visited, record.signal(name, epoch=number), np.nan)
                for name in record.signals
            })

    def summary_writer(self) -> SummaryWriter:
        """The run's TensorBoard writer (created on first use, closed by `close`)."""
        if self._writer is None:
            self._writer = SummaryWriter(self.log_dir, storage.RUN_SUBDIR)
        return self._writer

    def _data_map_images(self, record: ScoreRecord, number: int,
                         epoch_seconds: float | None) -> dict[str, np.ndarray]:
        """The epoch's data map image; a drawing failure only turns the image off."""
        if not self.data_map:
            return {}
        if self.data_map == "auto":
            # Amortized budget: 2 % of each epoch's wall time may go to drawing.
            if epoch_seconds is not None:
                self._map_budget += _DATA_MAP_SHARE * epoch_seconds
            if self._map_cost is not None and self._map_budget < self._map_cost:
                return {}
        try:
            t0 = time.perf_counter()
            history = {e: v for e, v in record.history.items() if e <= number}
            cartography = None
            if "confidence" in record.signals:  # dataset cartography
                # Samples never visited are NaN in every epoch: their mean stays
                # NaN, without numpy's "Mean of empty slice" warning.
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    means = np.stack([record.signal("confidence", epoch=e) for e in history])
                    mean = np.nanmean(means, axis=0)
                cartography = (mean, record.signal("confidence_std", epoch=number))
            image = render_data_map(history, record.epoch(number).visits, number,
                                    cartography=cartography)
            self._map_cost = time.perf_counter() - t0
            self._map_budget -= self._map_cost
        except Exception as e:  # a picture must not stop the scores
            if self.strict:
                raise
            self.data_map = False
            warnings.warn(
                f"keras_sie: drawing the data map failed ({type(e).__name__}: {e}); "
                "it is turned off for this run. The scores are unaffected.",
                RuntimeWarning,
                stacklevel=4,
            )
            return {}
        return {} if image is None else {"importance/data_map": image}

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            self._close_writer()

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()  # flushes; a later fit reopens lazily
            self._writer = None


class StreamReporter:
    """Streaming mode's reporting: Parquet shards per ring flush, TensorBoard per epoch.

    The ring (`keras_sie.buffer.StreamRing`) calls `rows` with each flush;
    rows go to a `keras_sie.streaming.ShardWriter` (written off the training
    thread). At epoch end, `end_epoch` writes the epoch's summary file and
    TensorBoard tags: `stream/*` counters, a histogram of a bounded sample of
    per-visit scores (relative to the epoch's mean visit), the top visits,
    fault counts and feature shares. Faults go through the `EpochReporter`'s
    fail-open policy (warn once and stop writing; `strict=True` raises).

    Args:
        reporter: The run's `EpochReporter` (fail-open policy, log folder).
        manifest: The stream manifest (`ShardWriter`).
        num_samples: Index ids: rows with an id outside `0..num_samples-1`
            are left out and counted (0: unknown range, only negative ids
            are left out). Ignored for hash keys.
        top_k: Rows of the top-visits table.
    """

    SAMPLE_ROWS = 1 << 18  # per-visit scores kept for the epoch's histogram

    def __init__(self, reporter: EpochReporter, manifest: dict[str, Any], num_samples: int,
                 top_k: int = 20):
        from keras_sie.streaming import ShardWriter

        self.reporter = reporter
        self.writer = ShardWriter(reporter.log_dir, manifest)
        self.index_ids = manifest.get("key_mapping") == "index"
        self.num_samples = int(num_samples or 0)
        self.top_k = top_k
        self._epoch = 0
        self._number = 0
        self._rng = np.random.default_rng(0)
        self._clear()

    def _clear(self) -> None:
        self.invalid_rows = 0
        self.invalid_example: int | None = None
        self._sample = np.zeros(0, np.float32)
        self._top_keys = np.zeros(0, dtype=object)
        self._top_scores = np.zeros(0, np.float32)
        self._seconds = 0.0
        self._found: tuple[int, int] | None = None

    def start_fit(self, first: int) -> None:
        """A fit's first epoch is `first`: epochs after it in the folder are stale."""
        with self.reporter.fail_open(first):
            gone = self.writer.discard_epochs_after(first)
            if gone:
                warnings.warn(
                    f"keras_sie: deleted epochs {gone} of an earlier streaming run in "
                    f"{self.reporter.log_dir}: this fit starts at epoch {first}.",
                    stacklevel=4,
                )

    def begin_epoch(self, epoch: int, number: int) -> None:
        """Starts epoch `epoch` (record `number`): reads what a killed job left of it."""
        self._epoch, self._number = int(epoch), int(number)
        self._clear()
        if self.reporter.disabled:
            return
        with self.reporter.fail_open(number):
            self.writer.begin_epoch(epoch)
            parts, through = self.writer.finished(epoch)
            self._found = (parts, through) if parts else None

    def rows(self, keys: np.ndarray, scores: np.ndarray, steps: np.ndarray) -> None:
        """One ring flush: checks index ids, queues a shard, keeps the epoch's sample."""
        if self.index_ids:
            bad = keys < 0
            if self.num_samples:
                bad |= keys >= self.num_samples
            if bad.any():
                self.invalid_rows += int(bad.sum())
                self.invalid_example = int(keys[bad][np.argmax(np.abs(keys[bad]))])
                keep = ~bad
                keys, scores, steps = keys[keep], scores[keep], steps[keep]
        self._keep_sample(keys, scores)
        if self.reporter.disabled or not keys.size:
            return
        started = time.perf_counter()
        with self.reporter.fail_open(self._number):
            self.writer.write(self._epoch, keys, scores, steps)
            self._say_what_was_found()
        self._seconds += time.perf_counter() - started

    def _say_what_was_found(self) -> None:
        """After the first write over shards already there: resumed, or replaced."""
        found, self._found = self._found, None
        replaced, self.writer.replaced_from = self.writer.replaced_from, None
        where = self.reporter.log_dir
        if replaced is not None:
            warnings.warn(
                f"keras_sie: {where} held another streaming run (epoch {self._epoch} there does "
                "not match this run's rows); its rows from the first step that differs on "
                "were deleted and are written anew. Use a new log_dir per run.",
                stacklevel=5,
            )
        elif found is not None:
            warnings.warn(
                f"keras_sie: resuming the streaming run in {where}: epoch {self._epoch} has "
                f"{found[0]} finished shard(s) through step {found[1]} with the same rows; "
                "those steps are not written again.",
                stacklevel=5,
            )

    def _keep_sample(self, keys: np.ndarray, scores: np.ndarray) -> None:
        if not scores.size:
            return
        sample = np.concatenate([self._sample, scores])
        if sample.size > self.SAMPLE_ROWS:
            sample = self._rng.choice(sample, self.SAMPLE_ROWS, replace=False)
        self._sample = sample
        k = min(self.top_k, scores.size)
        if k:
            best = np.argpartition(-scores, k - 1)[:k]
            top = keys[best].astype(object)
            if top.size and isinstance(top[0], bytes):
                top = np.array([k.decode("utf-8", "replace") for k in top], dtype=object)
            all_keys = np.concatenate([self._top_keys, top])
            all_scores = np.concatenate([self._top_scores, scores[best]])
            order = np.argsort(-all_scores, kind="stable")[: self.top_k]
            self._top_keys, self._top_scores = all_keys[order], all_scores[order]

    def end_epoch(self, snap, feature_names: list[str], keras_epoch: int,
                  flush_seconds: float) -> dict[str, Any]:
        """Writes the epoch's summary file and TensorBoard tags (call after the last flush).

        Args:
            snap: The buffer's `BufferSnapshot` at epoch end (counters, feature sums).
            feature_names: Names of the feature groups, in the buffer's order.
            keras_epoch: The epoch number Keras used.
            flush_seconds: Time the ring's device reads took this epoch.

        Returns:
            What `ShardWriter.end_epoch` wrote ({} when reporting is off).
        """
        if self.reporter.disabled:
            return {}
        sums = snap.feature_sums[: len(feature_names)]
        total = float(sums.sum())
        feature_shares = {n: float(s) / total if total > 0 else 0.0
                          for n, s in zip(feature_names, sums)}
        faults = {"nonfinite_rows": snap.nonfinite_rows, "invalid_id_rows": self.invalid_rows,
                  "skipped_steps": snap.skipped_steps}
        summary = {"feature_names": list(feature_names), "feature_sums": sums.tolist(),
                   "steps": snap.steps, "keras_epoch": keras_epoch}
        out: dict[str, Any] = {}
        with self.reporter.fail_open(self._number):
            out = self.writer.end_epoch(self._epoch, dict(summary, **faults))
            if self.writer.replaced_from is not None:
                self._say_what_was_found()
            rows, total = int(out["rows"]), float(out["score_sum"])
            relative = (self._sample.astype(np.float64) * rows / total
                        if total > 0 else np.zeros(0))
            shares = [float(s) / total if total > 0 else 0.0 for s in self._top_scores]
            top = [(k, share, 1, share * rows)
                   for k, share in zip(self._top_keys.tolist(), shares)]
            scalars = {
                "stream/rows": rows,
                "stream/shards": int(out["parts"]),
                "stream/score_sum": total,
                "stream/skipped_rows": int(out.get("skipped_rows", 0)),
                "stream/flush_seconds": flush_seconds,
                "stream/write_wait_seconds": self._seconds,
            }
            self.reporter.summary_writer().write_stream_epoch(
                self._number, relative, scalars, faults, feature_shares, top)
        return out

    def close(self) -> None:
        with self.reporter.fail_open(self._number):
            self.writer.close()
