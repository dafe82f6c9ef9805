"""Per-epoch arrays on disk: atomic writes, pickle-free reads, `keras_sie.load`.

Layout under `<log_dir>/keras_sie/`:

* `epoch_00003.npz` – one file per finished epoch (importance, sums, visits,
  feature sums and names, keys in hash mode). Written to a temporary name,
  fsynced and renamed, so a file that exists is complete.
* `run.json` – the manifest: which epochs exist, configuration, aggregate info.
  Also replaced atomically. `load` trusts epoch files, not the manifest, so a
  crash between the two writes loses nothing.

Files are read with `allow_pickle=False`: a crafted file cannot run code.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
from typing import Any

import numpy as np

from keras_sie.score_record import EpochScores, ScoreRecord

RUN_SUBDIR = "keras_sie"
MANIFEST = "run.json"
FORMAT_VERSION = 1
_EPOCH_RE = re.compile(r"^epoch_(\d{5})\.npz$")


class CorruptRunError(ValueError):
    """A run folder or file that cannot be read back as a keras_sie run."""


def run_dir(log_dir: str) -> str:
    return os.path.join(os.fspath(log_dir), RUN_SUBDIR)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, writer, durable: bool = True) -> None:
    """Calls `writer(fileobj)` on a temp file next to `path`, then renames it.

    `durable=False` skips the fsyncs: the rename still makes the file appear
    whole or not at all, but a power loss may lose the latest version.
    """
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(directory)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def check_writable(log_dir: str) -> str:
    """Creates the run folder and proves it is writable (fail fast)."""
    path = run_dir(log_dir)
    try:
        os.makedirs(path, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".probe-", dir=path)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise PermissionError(
            f"SampleImportance cannot write to log_dir {log_dir!r} ({e}). Pass a writable "
            "log_dir, or log_dir=None to keep the scores in memory only."
        ) from e
    return path


def epoch_path(log_dir: str, epoch: int) -> str:
    return os.path.join(run_dir(log_dir), f"epoch_{epoch:05d}.npz")


def write_epoch(log_dir: str, epoch: int, arrays: dict[str, np.ndarray]) -> str:
    for k, v in arrays.items():
        if np.asarray(v).dtype == object:
            raise TypeError(f"refusing to store object array {k!r} (would need pickle)")
    path = epoch_path(log_dir, epoch)
    atomic_write_bytes(path, lambda f: np.savez(f, **arrays))
    return path


def write_manifest(log_dir: str, manifest: dict[str, Any]) -> None:
    manifest = dict(manifest, format_version=FORMAT_VERSION)
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    # The manifest is informative (`load` trusts the epoch files): atomic, not fsynced.
    atomic_write_bytes(os.path.join(run_dir(log_dir), MANIFEST), lambda f: f.write(data),
                       durable=False)


def read_manifest(log_dir: str) -> dict[str, Any]:
    path = os.path.join(run_dir(log_dir), MANIFEST)
    if not os.path.exists(path):
        return {}
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptRunError(f"{path} is not valid JSON ({e}).") from e
    if not isinstance(data, dict):
        raise CorruptRunError(f"{path} does not hold a JSON object.")
    return data


def list_epochs(log_dir: str) -> list[int]:
    path = run_dir(log_dir)
    if not os.path.isdir(path):
        return []
    out = []
    for name in os.listdir(path):
        m = _EPOCH_RE.match(name)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


_REQUIRED = ("importance", "sums", "visits")


def read_epoch(log_dir: str, epoch: int) -> dict[str, np.ndarray]:
    path = epoch_path(log_dir, epoch)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise CorruptRunError(
            f"{path} is not a readable keras_sie epoch file ({type(e).__name__}: {e}). "
            "Delete it or re-run that epoch."
        ) from e
    missing = [k for k in _REQUIRED if k not in arrays]
    if missing:
        raise CorruptRunError(f"{path} lacks arrays {missing}; not a keras_sie epoch file.")
    n = arrays["importance"].shape
    if len(n) != 1 or arrays["sums"].shape != n or arrays["visits"].shape != n:
        raise CorruptRunError(f"{path}: arrays have inconsistent shapes.")
    if not np.issubdtype(arrays["importance"].dtype, np.floating):
        raise CorruptRunError(f"{path}: importance is not a float array.")
    return arrays


def epoch_arrays(scores: EpochScores, keys: np.ndarray | None) -> dict[str, np.ndarray]:
    """The arrays of one epoch file."""
    arrays = {
        "importance": np.asarray(scores.importance, np.float32),
        "sums": np.asarray(scores.sums, np.float32),
        "visits": np.asarray(scores.visits, np.int32),  # counts < 2^31; read back as int64
        "feature_sums": np.asarray(scores.feature_sums, np.float64),
        "feature_names": np.array(list(scores.feature_names), dtype=str),
        "summary_names": np.array(list(scores.summary), dtype=str),
        "summary_values": np.array(list(scores.summary.values()), dtype=np.float64),
        "fault_names": np.array(list(scores.faults), dtype=str),
        "fault_values": np.array(list(scores.faults.values()), dtype=np.int64),
        "keras_epoch": np.array(-1 if scores.keras_epoch is None else scores.keras_epoch),
    }
    if keys is not None:
        arrays["keys"] = np.asarray(keys)
    for name, values in scores.signal_sums.items():
        arrays[f"signal_{name}"] = np.asarray(values)
    if scores.last_correct is not None:
        arrays["last_correct"] = np.asarray(scores.last_correct, np.int8)
    if scores.task_importance:
        arrays["task_names"] = np.array(list(scores.task_importance), dtype=str)
        arrays["task_importance"] = np.stack(list(scores.task_importance.values()), axis=1)
    if scores.list_size:  # ranked lists
        arrays["list_size"] = np.array(int(scores.list_size))
        if scores.item_query is not None:
            arrays["item_query"] = np.asarray(scores.item_query, np.int64)
        if scores.queries is not None:
            for k, v in epoch_arrays(scores.queries, None).items():
                if k != "keras_epoch":
                    arrays[_QUERY_PREFIX + k] = v
    return arrays


_QUERY_PREFIX = "query__"  # ranked lists: the per-query record's arrays


def epoch_from_arrays(arrays: dict[str, np.ndarray]) -> EpochScores:
    """The `EpochScores` stored in one epoch file."""
    queries = None
    query_arrays = {k[len(_QUERY_PREFIX):]: v for k, v in arrays.items()
                    if k.startswith(_QUERY_PREFIX)}
    if query_arrays:
        missing = [k for k in _REQUIRED if k not in query_arrays]
        if missing:
            raise CorruptRunError(f"per-query arrays lack {missing}.")
        query_arrays["keras_epoch"] = arrays.get("keras_epoch", np.array(-1))
        queries = epoch_from_arrays(query_arrays)
    arrays = {k: v for k, v in arrays.items() if not k.startswith(_QUERY_PREFIX)}

    def names(key):
        return tuple(str(s) for s in arrays[key]) if key in arrays else ()

    summary = dict(zip(names("summary_names"), (float(v) for v in arrays.get(
        "summary_values", np.zeros(0)))))
    faults = dict(zip(names("fault_names"), (int(v) for v in arrays.get(
        "fault_values", np.zeros(0, np.int64)))))
    tasks = {}
    if "task_names" in arrays and "task_importance" in arrays:
        for k, name in enumerate(names("task_names")):
            tasks[name] = arrays["task_importance"][:, k]
    keras_epoch = int(arrays["keras_epoch"]) if "keras_epoch" in arrays else -1
    signal_sums = {k[len("signal_"):]: arrays[k] for k in arrays if k.startswith("signal_")}
    return EpochScores(
        importance=np.asarray(arrays["importance"], np.float32),
        visits=np.asarray(arrays["visits"], np.int64),
        sums=np.asarray(arrays["sums"], np.float32),
        feature_names=names("feature_names"),
        feature_sums=np.asarray(arrays.get("feature_sums", np.zeros(0)), np.float64),
        summary=summary,
        faults=faults,
        task_importance=tasks,
        keras_epoch=None if keras_epoch < 0 else keras_epoch,
        signal_sums=signal_sums,
        last_correct=arrays.get("last_correct"),
        queries=queries,
        item_query=(np.asarray(arrays["item_query"], np.int64) if "item_query" in arrays
                    else None),
        list_size=int(arrays["list_size"]) if "list_size" in arrays else 0,
    )


def read_record(log_dir: str) -> ScoreRecord:
    """Every complete epoch file under `log_dir` as one `ScoreRecord`."""
    manifest = read_manifest(log_dir)
    epochs = list_epochs(log_dir)
    data = {e: read_epoch(log_dir, e) for e in epochs}
    last = data[epochs[-1]]
    aggregate = manifest.get("aggregate_epochs", 3)
    record = ScoreRecord(
        int(last["importance"].shape[0]),
        keys=last.get("keys"),
        aggregate_epochs=int(aggregate) if isinstance(aggregate, int) and aggregate > 0 else None,
        id_key=str(manifest.get("id_key", "sample_id")),
        key_mapping=str(manifest.get("key_mapping", "index")),
        log_dir=log_dir,
        manifest=manifest,
    )
    for e in epochs:
        if data[e]["importance"].shape != last["importance"].shape:
            raise CorruptRunError(
                f"{epoch_path(log_dir, e)} has {data[e]['importance'].shape[0]} samples, the "
                f"latest epoch has {last['importance'].shape[0]}."
            )
        record.add(e, epoch_from_arrays(data[e]))
    return record


def load(log_dir: str | os.PathLike) -> ScoreRecord:
    """Reads a run written by `SampleImportance(log_dir=...)`.

    Only complete epoch files are read (they are written atomically); files
    are opened without pickle support, so a crafted file cannot execute code.
    A streaming run (`stream=True`: Parquet shards, no epoch files) is read
    with `keras_sie.streaming.load_stream`, which needs pyarrow.

    Args:
        log_dir: The `log_dir` given to `SampleImportance` (or its `keras_sie`
            subfolder).

    Returns:
        A `keras_sie.ScoreRecord`: the same class, with the same names, as
        `SampleImportance.record` of the live callback.

    Raises:
        FileNotFoundError: no run (no epoch file) under `log_dir`.
        keras_sie.CorruptRunError: a file exists but is not a valid run file.

    Example:

    ```python
    record = keras_sie.load("logs")
    print(record.epochs, record.top_k(5))
    ```
    """
    log_dir = os.fspath(log_dir)
    if os.path.basename(os.path.normpath(log_dir)) == RUN_SUBDIR and not os.path.isdir(
        run_dir(log_dir)
    ):
        log_dir = os.path.dirname(os.path.normpath(log_dir))
    if not os.path.isdir(log_dir):
        raise FileNotFoundError(f"No such folder: {log_dir!r}.")
    epochs = list_epochs(log_dir)
    if not epochs:
        from keras_sie import streaming  # pyarrow is imported only to read shards

        if streaming.is_stream_run(log_dir):
            return streaming.load_stream(log_dir)
        raise FileNotFoundError(
            f"No keras_sie run under {log_dir!r}: no {RUN_SUBDIR}/epoch_*.npz file. Pass the "
            "log_dir given to SampleImportance, after at least one finished epoch."
        )
    return read_record(log_dir)
