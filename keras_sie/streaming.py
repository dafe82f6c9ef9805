"""Streaming runs: one Parquet row per visit, written off the training thread.

With `SampleImportance(log_dir=..., stream=True)` the callback hands the rows
it read from its device ring buffer to a `ShardWriter`, which writes them as
Parquet shards under `<log_dir>/keras_sie/stream/`:

* `_manifest.json` – the run: `key_mapping`, `key_dtype`, `num_samples`,
  `id_key`, `stream_capacity`.
* `epoch=E/part-00000.parquet`, `part-00001.parquet`, ... – columns `key`
  (int64 or string), `score` (float32, the row's raw score
  sum_j |dJ_i/dX_ij|) and `step` (int64, the batch number within the epoch).
  Each shard's key-value metadata holds `first_step`, `last_step`, `rows` and
  `score_sum`. Hive partitioning: DuckDB, Spark and pyarrow read `epoch` as a
  column.
* `epoch=E/_epoch.json` – written when the epoch ends: the callback's summary
  plus `rows`, `score_sum`, `parts` and `skipped_rows` over all its shards.
  An epoch without it did not finish; `load_stream` leaves it out.

Every file is written to a temporary name, fsynced and renamed, so a file that
exists is complete. A job that is killed and replays epoch E from step 0
writes no row whose step a finished shard of E already holds: its first write
is compared with those shards step by step (`ShardWriter._first_difference`):
the steps that match are skipped; from the first step that differs (another
run in the same folder) the old rows are deleted and written anew. What a kill loses is
at most the rows that had not been written yet.

pyarrow is imported only when a shard is written or read:
`pip install "keras_sie[parquet]"`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import threading
import time
from typing import Any

import numpy as np

from keras_sie import scores as scores_lib
from keras_sie import storage
from keras_sie.score_record import EpochScores, ScoreRecord

STREAM_SUBDIR = "stream"
MANIFEST = "_manifest.json"
EPOCH_SUMMARY = "_epoch.json"
FORMAT_VERSION = 1
_PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")
_EPOCH_DIR_RE = re.compile(r"^epoch=(\d+)$")
_TMP_PREFIX = ".tmp-"  # storage.atomic_write_bytes's temporary names
_KEY_MAPPINGS = ("index", "hash")
_KEY_DTYPES = ("int64", "string")
# Faults the callback may report in an epoch summary (the names of `EpochScores.faults`).
_FAULT_NAMES = ("nonfinite_rows", "invalid_id_rows", "dropped_key_rows", "skipped_steps")


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(
            "keras_sie's streaming mode writes and reads Parquet with pyarrow, which is not "
            'installed: pip install "keras_sie[parquet]" (or pip install pyarrow).'
        ) from e
    return pa, pq


def stream_dir(log_dir: str) -> str:
    """`<log_dir>/keras_sie/stream`."""
    return os.path.join(storage.run_dir(log_dir), STREAM_SUBDIR)


def epoch_dir(log_dir: str, epoch: int) -> str:
    """`<log_dir>/keras_sie/stream/epoch=E`."""
    return os.path.join(stream_dir(log_dir), f"epoch={int(epoch)}")


def _part_name(number: int) -> str:
    return f"part-{number:05d}.parquet"


def _finished_parts(directory: str) -> list[tuple[int, str]]:
    """`(part number, path)` of every finished shard in one epoch folder, in order."""
    if not os.path.isdir(directory):
        return []
    out = []
    for name in os.listdir(directory):
        m = _PART_RE.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(out)


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise storage.CorruptRunError(f"{path} is not valid JSON ({e}).") from e
    if not isinstance(data, dict):
        raise storage.CorruptRunError(f"{path} does not hold a JSON object.")
    return data


def _write_json(path: str, data: dict[str, Any], durable: bool) -> None:
    payload = json.dumps(data, indent=1, sort_keys=True, default=_jsonable).encode()
    storage.atomic_write_bytes(path, lambda f: f.write(payload), durable=durable)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def read_stream_manifest(log_dir: str) -> dict[str, Any]:
    """The run manifest `stream/_manifest.json` ({} if there is none)."""
    path = os.path.join(stream_dir(log_dir), MANIFEST)
    return _read_json(path) if os.path.exists(path) else {}


@dataclasses.dataclass
class _EpochState:
    next_part: int = 0
    covered_through: int = -1  # last step held by a shard that existed at begin_epoch
    rows: int = 0
    score_sum: float = 0.0
    parts: int = 0
    skipped_rows: int = 0
    last_seen: int = -1  # last step this writer was given rows of (a replay's extent)


def _part_totals(path: str) -> tuple[int, int, int, float]:
    """`(first_step, last_step, rows, score_sum)` of one finished shard."""
    pa, pq = _pyarrow()
    try:
        meta = pq.read_metadata(path).metadata or {}
        values = {k.decode(): v.decode() for k, v in meta.items() if not k.startswith(b"ARROW:")}
        if all(k in values for k in ("first_step", "last_step", "rows", "score_sum")):
            return (int(values["first_step"]), int(values["last_step"]), int(values["rows"]),
                    float(values["score_sum"]))
        table = pq.read_table(path, columns=["score", "step"])  # a shard written by hand
    except (OSError, ValueError, pa.ArrowException) as e:
        raise storage.CorruptRunError(
            f"{path} is not a readable keras_sie stream shard ({type(e).__name__}: {e}). "
            "Delete it, then re-run that epoch."
        ) from e
    steps = table["step"].to_numpy()
    scores = table["score"].to_numpy().astype(np.float64)
    if steps.size == 0:
        return (0, -1, 0, 0.0)
    return int(steps.min()), int(steps.max()), int(steps.size), float(scores.sum())


class ShardWriter:
    """Writes the rows of a streaming run as Parquet shards, one background write at a time.

    The rows are `(key, score, step)`: one visit of one sample in training
    step `step` of an epoch, with its raw score. `write` filters and queues
    one shard and returns; a single background thread writes it atomically
    (temporary name, fsync, rename). `write` first waits for the previous
    shard, so at most one shard is in flight, and an error of the background
    write is raised by the next `write`, `wait`, `end_epoch` or `close`.

    Restarts: `begin_epoch(E)` reads the shards a killed job left in
    `epoch=E/` (and deletes its temporary files); rows whose step is at or
    before the last step they hold are dropped and counted (`skipped_rows`),
    so replaying the epoch from step 0 never writes a row twice, and part
    numbers continue. Every such row is first compared with those shards,
    step by step: from the first step that differs (another run in the same
    folder) the old rows are deleted (`discard_steps_from`) and the new ones
    written; steps the replay never reaches are deleted at `end_epoch`. A
    step should not span two shards: the rest of a split step would be
    dropped on replay.

    Args:
        log_dir: The run folder; shards go to `<log_dir>/keras_sie/stream/`.
        manifest: The run's configuration, written to
            `stream/_manifest.json` (merged into an existing one):
            `key_mapping` (`"index"` or `"hash"`), `key_dtype` (`"int64"` or
            `"string"`), `num_samples` (int or None), `id_key`,
            `stream_capacity`.
        durable: fsync every shard and summary before renaming it. With
            False a rename still makes a file appear whole or not at all,
            but a power loss may lose the latest files. Defaults to True.

    Raises:
        ImportError: pyarrow is not installed (raised here, before training).
        ValueError: `key_mapping` or `key_dtype` is not one of the above.
        OSError: the folder cannot be created or written.

    Example:

    ```python
    writer = ShardWriter("logs", {"key_mapping": "index", "key_dtype": "int64",
                                  "num_samples": 4, "id_key": "sample_id",
                                  "stream_capacity": 1024})
    writer.begin_epoch(0)
    writer.write(0, np.array([0, 1]), np.array([0.5, 1.5], np.float32), np.array([0, 0]))
    writer.end_epoch(0, {"steps": 1})
    writer.close()
    ```
    """

    def __init__(self, log_dir: str, manifest: dict[str, Any], durable: bool = True):
        _pyarrow()
        manifest = dict(manifest)
        if manifest.get("key_mapping", "index") not in _KEY_MAPPINGS:
            raise ValueError(f"key_mapping must be one of {_KEY_MAPPINGS}, got "
                             f"{manifest.get('key_mapping')!r}.")
        if manifest.get("key_dtype", "int64") not in _KEY_DTYPES:
            raise ValueError(f"key_dtype must be one of {_KEY_DTYPES}, got "
                             f"{manifest.get('key_dtype')!r}.")
        self.log_dir = os.fspath(log_dir)
        self.durable = bool(durable)
        self._key_dtype = str(manifest.get("key_dtype", "int64"))
        directory = stream_dir(self.log_dir)
        os.makedirs(directory, exist_ok=True)
        merged = dict(read_stream_manifest(self.log_dir))
        merged.update(manifest, format_version=FORMAT_VERSION, layout="stream")
        merged.setdefault("key_mapping", "index")
        merged.setdefault("key_dtype", self._key_dtype)
        _write_json(os.path.join(directory, MANIFEST), merged, self.durable)
        self.manifest = merged
        self._epochs: dict[int, _EpochState] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="keras_sie-stream"))
        self._pending: concurrent.futures.Future | None = None
        self._lock = threading.Lock()
        self.replaced_from: int | None = None  # set when another run's epochs were deleted
        self._rows_written = 0
        self._bytes_written = 0
        self._seconds_writing = 0.0

    # ------------------------------------------------------------ counters
    @property
    def rows_written(self) -> int:
        """Rows in the shards this writer finished."""
        with self._lock:
            return self._rows_written

    @property
    def bytes_written(self) -> int:
        """Bytes of the shards this writer finished."""
        with self._lock:
            return self._bytes_written

    @property
    def seconds_writing(self) -> float:
        """Seconds the background thread spent building and writing shards."""
        with self._lock:
            return self._seconds_writing

    @property
    def skipped_rows(self) -> int:
        """Rows dropped because a shard of an earlier job already covers their step."""
        return sum(s.skipped_rows for s in self._epochs.values())

    # ------------------------------------------------------------- writing
    def begin_epoch(self, epoch: int) -> None:
        """Prepares `epoch=E/`: deletes leftover temporary files, reads finished shards.

        Args:
            epoch: The Keras epoch number.

        Raises:
            keras_sie.CorruptRunError: a finished shard cannot be read.
        """
        self._collect()
        directory = epoch_dir(self.log_dir, epoch)
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):
            if name.startswith(_TMP_PREFIX):
                try:
                    os.unlink(os.path.join(directory, name))
                except FileNotFoundError:
                    pass
        state = _EpochState()
        for number, path in _finished_parts(directory):
            _, last, rows, score_sum = _part_totals(path)
            state.next_part = number + 1
            state.covered_through = max(state.covered_through, last)
            state.rows += rows
            state.score_sum += score_sum
            state.parts += 1
        self._epochs[int(epoch)] = state

    def finished(self, epoch: int) -> tuple[int, int]:
        """`(shards, last step they hold)` of `epoch` found or written so far ((0, -1): none)."""
        state = self._epochs.get(int(epoch))
        return (state.parts, state.covered_through) if state is not None else (0, -1)

    def write(self, epoch: int, keys: np.ndarray, scores: np.ndarray, steps: np.ndarray) -> None:
        """Queues one shard of rows; returns once the previous shard is written.

        The arrays are read by the background thread: do not change them
        after the call (fresh arrays from a device read are fine).

        Args:
            epoch: The Keras epoch number (`begin_epoch` is called if needed).
            keys: [n] int64 keys, or numpy str / bytes / object array of
                strings for `key_dtype="string"`.
            scores: [n] raw scores (stored as float32).
            steps: [n] step numbers within the epoch (0-based).

        Raises:
            Exception: the previous background write failed (its exception).
            ValueError: the arrays are not 1-D of one length.
            TypeError: the keys do not match the manifest's `key_dtype`.
        """
        self._collect()
        if self._executor is None:
            raise RuntimeError("ShardWriter.write after close().")
        keys, scores, steps = np.asarray(keys), np.asarray(scores), np.asarray(steps)
        if not (keys.ndim == scores.ndim == steps.ndim == 1
                and keys.shape == scores.shape == steps.shape):
            raise ValueError(f"keys, scores and steps must be 1-D of one length, got shapes "
                             f"{keys.shape}, {scores.shape}, {steps.shape}.")
        if keys.dtype.kind not in ("iu" if self._key_dtype == "int64" else "USO"):
            raise TypeError(f"key_dtype {self._key_dtype!r} cannot store keys of dtype "
                            f"{keys.dtype}.")
        if keys.size == 0:
            return
        epoch = int(epoch)
        if epoch not in self._epochs:
            self.begin_epoch(epoch)
        state = self._epochs[epoch]
        state.last_seen = max(state.last_seen, int(steps.max()))
        covered = steps <= state.covered_through
        if covered.any():
            # A replay over finished shards must give the same rows, step by step.
            differs = self._first_difference(epoch, keys[covered], scores[covered],
                                             steps[covered])
            if differs is not None:
                self.discard_steps_from(epoch, differs)
                state = self._epochs[epoch]
        keep = steps > state.covered_through
        if not keep.all():
            state.skipped_rows += int(keep.size - keep.sum())
            keys, scores, steps = keys[keep], scores[keep], steps[keep]
            if keys.size == 0:
                return
        path = os.path.join(epoch_dir(self.log_dir, epoch), _part_name(state.next_part))
        state.next_part += 1
        self._pending = self._executor.submit(
            self._write_part, state, epoch, path, keys, scores, steps)

    def _first_difference(self, epoch: int, keys: np.ndarray, scores: np.ndarray,
                          steps: np.ndarray) -> int | None:
        """The first step whose rows differ from the finished shards' (None: a replay).

        Rows match when a step has the same keys in the same order and the
        same scores to 1e-3 of the largest (a restart from the same weights
        recomputes them). Another run into the same folder (another model,
        data, data order or learning rate) differs at some step.
        """
        first, last = int(steps.min()), int(steps.max())
        old_keys, old_scores, old_steps = read_steps(self.log_dir, epoch, first, last)
        if self._key_dtype == "string":
            keys = np.array([k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)
                             for k in keys.tolist()], dtype=object)
            old_keys = old_keys.astype(object)
        else:
            keys, old_keys = keys.astype(np.int64), old_keys.astype(np.int64)
        scores = scores.astype(np.float64)
        scale = max(float(np.abs(old_scores).max(initial=0.0)),
                    float(np.abs(scores).max(initial=0.0)), 1e-30)
        # Both sides are in step order. Steps present on both sides with the
        # same row count line up row for row up to the first step where the
        # step sets or counts part; compare those rows in one pass.
        new_steps, new_counts = np.unique(steps, return_counts=True)
        old_steps_u, old_counts = np.unique(old_steps, return_counts=True)
        n = min(new_steps.size, old_steps_u.size)
        apart = np.flatnonzero((new_steps[:n] != old_steps_u[:n])
                               | (new_counts[:n] != old_counts[:n]))
        k = int(apart[0]) if apart.size else n
        candidates = []
        if k < max(new_steps.size, old_steps_u.size):
            candidates.append(min(int(a[k]) for a in (new_steps, old_steps_u) if k < a.size))
        rows = int(new_counts[:k].sum())
        bad = np.flatnonzero((keys[:rows] != old_keys[:rows])
                             | (np.abs(scores[:rows] - old_scores[:rows]) > 1e-3 * scale))
        if bad.size:
            candidates.append(int(steps[bad[0]]))
        return min(candidates) if candidates else None

    def discard_steps_from(self, epoch: int, step: int) -> None:
        """Deletes the rows of steps `step` and later from the finished shards of `epoch`.

        Whole shards past `step` are deleted; the shard that holds `step` is
        rewritten (atomically) with its earlier rows. Records the epoch in
        `replaced_from` so the caller can say so.
        """
        _, pq = _pyarrow()
        self._collect()
        directory = epoch_dir(self.log_dir, epoch)
        for _, path in _finished_parts(directory):
            lo, hi, _, _ = _part_totals(path)
            if lo >= step:
                os.unlink(path)
            elif hi >= step:
                table = pq.read_table(path)
                keep = table["step"].to_numpy() < step
                table = table.filter(keep)
                steps = table["step"].to_numpy()
                scores = table["score"].to_numpy()
                meta = dict(table.schema.metadata or {})
                meta.update({b"last_step": str(int(steps.max())).encode(),
                             b"rows": str(int(steps.size)).encode(),
                             b"score_sum": repr(float(scores.sum(dtype=np.float64))).encode()})
                table = table.replace_schema_metadata(meta)
                storage.atomic_write_bytes(path, lambda f, t=table: pq.write_table(t, f),
                                           durable=self.durable)
        summary = os.path.join(directory, EPOCH_SUMMARY)
        if os.path.exists(summary):
            os.unlink(summary)
        old = self._epochs.get(int(epoch))
        self.begin_epoch(epoch)
        if old is not None:
            state = self._epochs[int(epoch)]
            state.skipped_rows, state.last_seen = old.skipped_rows, old.last_seen
        self.replaced_from = int(epoch)

    def discard_epochs_after(self, epoch: int) -> list[int]:
        """Deletes the folders of epochs after `epoch` (a new fit starting at `epoch`).

        Returns:
            The epochs deleted.
        """
        self._collect()
        gone = []
        for e, directory in sorted(_epoch_dirs(self.log_dir).items()):
            if e > epoch:
                for name in os.listdir(directory):
                    os.unlink(os.path.join(directory, name))
                os.rmdir(directory)
                self._epochs.pop(e, None)
                gone.append(e)
        return gone

    def _key_column(self, keys: np.ndarray):
        pa, _ = _pyarrow()
        if self._key_dtype == "int64":
            return pa.array(keys.astype(np.int64, copy=False))
        if keys.dtype.kind == "S":
            keys = np.char.decode(keys, "utf-8")
        if keys.dtype.kind == "O" and keys.size and isinstance(keys[0], bytes):
            # Raw bytes from the device ring: decoded here, on the writer's
            # thread (about 0.1 s per 10^6 keys), not on the training thread.
            try:
                return pa.array(keys, type=pa.binary()).cast(pa.string())
            except pa.ArrowInvalid:  # not UTF-8: replace, as index runs do
                keys = np.array([k.decode("utf-8", "replace") for k in keys], dtype=object)
        return pa.array(keys, type=pa.string())

    def _write_part(self, state: _EpochState, epoch: int, path: str, keys: np.ndarray,
                    scores: np.ndarray, steps: np.ndarray) -> None:
        pa, pq = _pyarrow()
        start = time.perf_counter()
        scores = scores.astype(np.float32, copy=False)
        steps = steps.astype(np.int64, copy=False)
        score_sum = float(scores.sum(dtype=np.float64))
        metadata = {
            "first_step": str(int(steps.min())),
            "last_step": str(int(steps.max())),
            "rows": str(int(steps.size)),
            "score_sum": repr(score_sum),
            "epoch": str(epoch),
            "keras_sie_stream_format": str(FORMAT_VERSION),
        }
        table = pa.table({"key": self._key_column(keys), "score": pa.array(scores),
                          "step": pa.array(steps)}).replace_schema_metadata(metadata)
        size = [0]

        def writer(f):
            pq.write_table(table, f)
            size[0] = f.tell()

        storage.atomic_write_bytes(path, writer, durable=self.durable)
        with self._lock:
            state.rows += int(steps.size)
            state.score_sum += score_sum
            state.parts += 1
            self._rows_written += int(steps.size)
            self._bytes_written += size[0]
            self._seconds_writing += time.perf_counter() - start

    def _collect(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # re-raises the background thread's exception

    def wait(self) -> None:
        """Blocks until the shard in flight is written; raises its error, if any."""
        self._collect()

    def end_epoch(self, epoch: int, summary: dict[str, Any]) -> dict[str, Any]:
        """Waits for the last shard, then writes `epoch=E/_epoch.json` atomically.

        Args:
            epoch: The Keras epoch number.
            summary: JSON-able facts of the epoch from the callback (e.g.
                `feature_names`, `feature_sums`, `nonfinite_rows`, `steps`,
                `keras_epoch`; numpy values are converted). Fault counts named
                like `EpochScores.faults` (`nonfinite_rows`, ...) are read
                back as the record's faults.

        Returns:
            The dict written: `summary` plus `epoch`, `rows` and `score_sum`
            (over every finished shard of the epoch, including shards of an
            earlier, killed job), `parts` and `skipped_rows`.
        """
        self._collect()
        epoch = int(epoch)
        if epoch not in self._epochs:
            self.begin_epoch(epoch)
        state = self._epochs[epoch]
        if state.covered_through > state.last_seen:
            # The finished shards hold steps this epoch never reached: another run's.
            self.discard_steps_from(epoch, state.last_seen + 1)
            state = self._epochs[epoch]
        out = dict(summary)
        out.setdefault("keras_epoch", epoch)
        out.update(epoch=epoch, rows=state.rows, score_sum=state.score_sum, parts=state.parts,
                   skipped_rows=state.skipped_rows)
        _write_json(os.path.join(epoch_dir(self.log_dir, epoch), EPOCH_SUMMARY), out,
                    self.durable)
        return json.loads(json.dumps(out, default=_jsonable))

    def close(self) -> None:
        """Waits for the shard in flight and stops the background thread (idempotent)."""
        if self._executor is None:
            return
        try:
            self._collect()
        finally:
            self._executor.shutdown(wait=True)
            self._executor = None


# --------------------------------------------------------------------------- reading


def _resolve(log_dir: str | os.PathLike) -> str:
    log_dir = os.fspath(log_dir)
    norm = os.path.normpath(log_dir)
    if os.path.basename(norm) == storage.RUN_SUBDIR and not os.path.isdir(
            storage.run_dir(log_dir)):
        return os.path.dirname(norm)
    return log_dir


def _epoch_dirs(log_dir: str) -> dict[int, str]:
    directory = stream_dir(log_dir)
    if not os.path.isdir(directory):
        return {}
    out = {}
    for name in os.listdir(directory):
        m = _EPOCH_DIR_RE.match(name)
        if m and os.path.isdir(os.path.join(directory, name)):
            out[int(m.group(1))] = os.path.join(directory, name)
    return out


def is_stream_run(log_dir: str) -> bool:
    """Whether `log_dir` holds a streaming run (`keras_sie/stream/`).

    Args:
        log_dir: The `log_dir` given to `SampleImportance` (or its `keras_sie`
            subfolder).

    Returns:
        True when `keras_sie/stream/` has a manifest or an `epoch=E` folder.
    """
    log_dir = _resolve(log_dir)
    return (os.path.exists(os.path.join(stream_dir(log_dir), MANIFEST))
            or bool(_epoch_dirs(log_dir)))


def stream_epochs(log_dir: str, *, complete: bool = True) -> list[int]:
    """Epoch numbers of a streaming run, in order.

    Args:
        log_dir: The run folder.
        complete: Only epochs that finished (with `_epoch.json`); False also
            lists epochs a killed job left unfinished. Defaults to True.

    Returns:
        Sorted Keras epoch numbers.
    """
    dirs = _epoch_dirs(_resolve(log_dir))
    return sorted(e for e, d in dirs.items()
                  if not complete or os.path.exists(os.path.join(d, EPOCH_SUMMARY)))


def read_steps(log_dir: str | os.PathLike, epoch: int, first: int, last: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows of steps `first..last` of one epoch, in the order they were written.

    Reads only the shards whose step range overlaps (from their metadata).

    Returns:
        `(keys, scores, steps)`: keys as int64 or an object array of str,
        scores as float64.
    """
    _, pq = _pyarrow()
    keys, scores, steps = [], [], []
    for _, path in _finished_parts(epoch_dir(_resolve(log_dir), epoch)):
        lo, hi, _, _ = _part_totals(path)
        if hi < first or lo > last:
            continue
        table = pq.read_table(path)
        s = table["step"].to_numpy()
        keep = (s >= first) & (s <= last)
        keys.append(np.asarray(table["key"].to_numpy(zero_copy_only=False))[keep])
        scores.append(table["score"].to_numpy().astype(np.float64)[keep])
        steps.append(s[keep])
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)
    return np.concatenate(keys), np.concatenate(scores), np.concatenate(steps)


def read_stream_epoch(log_dir: str, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows of one epoch's shards, grouped by key.

    Reads one shard at a time and reduces it before the next, so memory
    grows with the number of distinct keys, not with the rows. Unfinished
    epochs are read too (whatever shards they have).

    Args:
        log_dir: The run folder.
        epoch: The Keras epoch number.

    Returns:
        `(keys, score_sums, visits)`: the distinct keys in sorted order
        (int64, or numpy str), the float64 sum of their scores and the int64
        number of their rows (visits).
    """
    log_dir = _resolve(log_dir)
    pa, pq = _pyarrow()
    keys, sums, counts = [], [], []
    for _, path in _finished_parts(epoch_dir(log_dir, epoch)):
        try:
            table = pq.read_table(path, columns=["key", "score"])
        except (OSError, ValueError, pa.ArrowException) as e:
            raise storage.CorruptRunError(
                f"{path} is not a readable keras_sie stream shard ({type(e).__name__}: {e})."
            ) from e
        table = table.set_column(1, "score", table["score"].cast(pa.float64()))
        grouped = table.group_by("key").aggregate([("score", "sum"), ("score", "count")])
        keys.append(_to_numpy(grouped["key"]))
        sums.append(grouped["score_sum"].to_numpy())
        counts.append(grouped["score_count"].to_numpy())
    if not keys:
        string = read_stream_manifest(log_dir).get("key_dtype") == "string"
        return (np.zeros(0, dtype=str if string else np.int64), np.zeros(0, np.float64),
                np.zeros(0, np.int64))
    unique, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    inverse = inverse.reshape(-1)
    return (unique,
            np.bincount(inverse, weights=np.concatenate(sums), minlength=unique.size),
            np.bincount(inverse, weights=np.concatenate(counts),
                        minlength=unique.size).astype(np.int64))


def _to_numpy(column) -> np.ndarray:
    import pyarrow as pa

    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return np.asarray(column.to_pylist(), dtype=str)
    return column.to_numpy().astype(np.int64, copy=False)


def load_stream(log_dir: str | os.PathLike) -> ScoreRecord:
    """Reads a streaming run back as a `ScoreRecord`, like `keras_sie.load`.

    Only finished epochs (with `epoch=E/_epoch.json`) become records; an
    epoch a killed job left unfinished is skipped (`read_stream_epoch` still
    reads its shards). Records are numbered by Keras epoch. A key's
    importance is its mean score per visit, normalized to sum to 1 over the
    epoch's keys (`keras_sie.scores.normalize`), as for an in-memory run;
    when every sample is visited once per epoch that is its score divided by
    the epoch's `score_sum`.

    Index runs (`key_mapping="index"`) give arrays of `num_samples` entries
    indexed by id (unvisited ids: importance 0, 0 visits; ids outside the
    range are counted as `faults["invalid_id_rows"]`). Hash runs give one
    entry per key seen in any epoch, in sorted order, in `record.keys`.

    Args:
        log_dir: The `log_dir` given to `SampleImportance` (or its `keras_sie`
            subfolder).

    Returns:
        A `keras_sie.ScoreRecord`.

    Raises:
        FileNotFoundError: no streaming run, or no finished epoch.
        ImportError: pyarrow is not installed.
        keras_sie.CorruptRunError: a shard or JSON file cannot be read.
    """
    log_dir = _resolve(log_dir)
    if not is_stream_run(log_dir):
        raise FileNotFoundError(f"No keras_sie streaming run under {log_dir!r}: no "
                                f"{storage.RUN_SUBDIR}/{STREAM_SUBDIR}/ folder.")
    epochs = stream_epochs(log_dir)
    if not epochs:
        raise FileNotFoundError(
            f"No finished epoch in the streaming run under {log_dir!r}: no "
            f"epoch=E/{EPOCH_SUMMARY}. Epochs a killed job did not finish can be read with "
            "keras_sie.streaming.read_stream_epoch."
        )
    manifest = read_stream_manifest(log_dir)
    grouped = {e: read_stream_epoch(log_dir, e) for e in epochs}
    summaries = {e: _read_json(os.path.join(epoch_dir(log_dir, e), EPOCH_SUMMARY))
                 for e in epochs}
    mapping = manifest.get("key_mapping")
    if mapping not in _KEY_MAPPINGS:
        string = any(g[0].dtype.kind == "U" for g in grouped.values())
        mapping = "hash" if string or manifest.get("key_dtype") == "string" else "index"

    keys = None
    if mapping == "index":
        n = manifest.get("num_samples")
        if not isinstance(n, int) or n <= 0:
            n = 1 + max((int(g[0].max()) for g in grouped.values() if g[0].size), default=-1)
    else:
        keys = np.unique(np.concatenate([g[0] for g in grouped.values()]))
        n = keys.size

    aggregate = manifest.get("aggregate_epochs", 3)
    record = ScoreRecord(
        n,
        keys=keys,
        aggregate_epochs=int(aggregate) if isinstance(aggregate, int) and aggregate > 0 else None,
        id_key=str(manifest.get("id_key", "sample_id")),
        key_mapping=mapping,
        log_dir=log_dir,
        manifest=manifest,
    )
    for e in epochs:
        epoch_keys, score_sums, visits = grouped[e]
        summary = summaries[e]
        faults = {k: int(summary[k]) for k in _FAULT_NAMES if isinstance(summary.get(k), int)}
        if mapping == "index":
            ids = epoch_keys.astype(np.int64)
            valid = (ids >= 0) & (ids < n)
            if not valid.all():
                faults["invalid_id_rows"] = (faults.get("invalid_id_rows", 0)
                                             + int(visits[~valid].sum()))
            slots = ids[valid]
            score_sums, visits = score_sums[valid], visits[valid]
        else:
            slots = np.searchsorted(keys, epoch_keys)
        sums = np.zeros(n, np.float64)
        counts = np.zeros(n, np.int64)
        sums[slots] = score_sums
        counts[slots] = visits
        importance = scores_lib.normalize(sums, counts).astype(np.float32)
        names = tuple(str(s) for s in summary.get("feature_names", ()))
        keras_epoch = summary.get("keras_epoch", e)
        record.add(e, EpochScores(
            importance=importance,
            visits=counts,
            sums=sums.astype(np.float32),
            feature_names=names,
            feature_sums=np.asarray(summary.get("feature_sums", ()), np.float64),
            summary=scores_lib.summarize(importance, counts),
            faults=faults,
            keras_epoch=int(keras_epoch) if isinstance(keras_epoch, int) else e,
        ))
    return record
