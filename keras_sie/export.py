"""Exporting a run to CSV, `.npz` or Parquet, with the original sample keys.

Pure numpy (pyarrow only for Parquet, imported when asked for): usable
without TensorFlow, e.g. from the `keras-sie` command line.

Two layouts:

* CSV and Parquet hold a long table, one row per (epoch, sample):
  `epoch, key, importance, visits, grad_sum` (`grad_sum`: the epoch's sum
  over visits of sum_j |dJ_i/dX_ij|).
* `.npz` holds wide arrays: `keys [M]`, `epochs [E]`, `importance [E, M]`,
  `visits [E, M]`, `grad_sum [E, M]`, plus `feature_names [F]` and
  `feature_importance [E, F]` when recorded. Read it with
  `np.load(path, allow_pickle=False)`.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any

import numpy as np

from keras_sie import storage
from keras_sie.score_record import ScoreRecord

FORMATS = ("csv", "npz", "parquet")
_EXTENSIONS = {".csv": "csv", ".npz": "npz", ".parquet": "parquet", ".pq": "parquet"}

__all__ = ["export_run", "to_columns"]


def _as_run(run: ScoreRecord | str | os.PathLike) -> ScoreRecord:
    if isinstance(run, ScoreRecord):
        return run
    record = getattr(run, "record", None)  # a SampleImportance after fit
    if isinstance(record, ScoreRecord):
        return record
    return storage.load(os.fspath(run))


def _epochs(run: ScoreRecord, epoch: int | None) -> list[int]:
    if epoch is None:
        return list(run.epochs)
    if epoch not in run.epochs:
        raise KeyError(f"epoch {epoch} is not in the run (epochs: {run.epochs})")
    return [int(epoch)]


def _keys(run: ScoreRecord) -> np.ndarray:
    return run.keys[: run.slots_used]  # hash mode: used slots


def _wide(run: ScoreRecord, epochs: list[int]) -> dict[str, np.ndarray]:
    keys = _keys(run)
    m = len(keys)
    out = {
        "keys": keys,
        "epochs": np.asarray(epochs, dtype=np.int64),
        "importance": np.stack(
            [np.asarray(run.epoch(e).importance, np.float64)[:m] for e in epochs]
        ),
        "visits": np.stack([np.asarray(run.epoch(e).visits, np.int64)[:m] for e in epochs]),
        "grad_sum": np.stack([np.asarray(run.epoch(e).sums, np.float64)[:m] for e in epochs]),
    }
    if run.item_queries is not None:  # ranked lists: each item's query
        out["query"] = np.asarray(run.item_queries, np.int64)[:m]
    for name in run.signals:
        out[f"signal_{name}"] = np.stack(
            [np.asarray(run.signal(name, epoch=e), np.float64)[:m] for e in epochs]
        )
    names = list(run.epoch().feature_names)
    if names:
        shares = [run.epoch(e).feature_importance for e in epochs]
        if all(list(s) == names for s in shares):
            out["feature_names"] = np.asarray(names, dtype=str)
            out["feature_importance"] = np.asarray(
                [[s[n] for n in names] for s in shares], dtype=np.float64
            )
    return out


def to_columns(run: ScoreRecord | str | os.PathLike, epoch: int | None = None) -> dict[str, np.ndarray]:
    """A run as a long table: one row per (epoch, sample).

    Args:
        run: A `keras_sie.ScoreRecord`, a `SampleImportance` after `fit`, or
            the `log_dir` of a run.
        epoch: One epoch number, or `None` for all epochs.

    Returns:
        Dict of equal-length numpy columns `epoch`, `key`, `importance`,
        `visits`, `grad_sum`, and one column per recorded signal (`loss`,
        `el2n`, `margin`, `confidence`, `confidence_std`, `forgetting`; NaN
        for unvisited samples), ordered by epoch, then by slot. Ranked lists
        with query ids add a `query` column (each item's query id; -1 for
        an item never seen).

    Example:

    ```python
    from keras_sie.export import to_columns
    cols = to_columns("logs", epoch=2)
    ```
    """
    run = _as_run(run)
    w = _wide(run, _epochs(run, epoch))
    e, m = w["importance"].shape
    cols = {
        "epoch": np.repeat(w["epochs"], m),
        "key": np.tile(w["keys"], e),
        "importance": w["importance"].reshape(-1),
        "visits": w["visits"].reshape(-1),
        "grad_sum": w["grad_sum"].reshape(-1),
    }
    if "query" in w:
        cols["query"] = np.tile(w["query"], e)
    for name in run.signals:
        cols[name] = w[f"signal_{name}"].reshape(-1)
    return cols


def _queries_of(run: ScoreRecord) -> ScoreRecord:
    queries = run.queries
    if queries is None:
        raise ValueError(
            "This run has no per-query record (ranked lists with query ids: "
            "keras_sie.with_ids(x, list_axis=1), or an {'item', 'query'} id entry)."
        )
    return queries


def _format_for(path: str, fmt: str | None) -> str:
    if fmt is None:
        ext = os.path.splitext(path)[1].lower()
        if ext not in _EXTENSIONS:
            raise ValueError(
                f"Cannot tell the format from {path!r}; pass format= one of {FORMATS} "
                "(or use a .csv, .npz or .parquet file name)."
            )
        return _EXTENSIONS[ext]
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}.")
    return fmt


def _csv_bytes(cols: dict[str, np.ndarray]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    names = list(cols)
    writer.writerow(names)
    # repr of Python floats round-trips exactly.
    lists = [cols[n].tolist() for n in names]
    writer.writerows(zip(*lists))
    return buf.getvalue().encode("utf-8")


def _parquet_writer(cols: dict[str, np.ndarray]):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(
            "Parquet export needs pyarrow: pip install 'keras_sie[parquet]' (or pip install "
            "pyarrow), or export to csv / npz instead."
        ) from e
    table = pa.table({n: pa.array(v) for n, v in cols.items()})
    return lambda f: pq.write_table(table, f)


def export_run(
    run: ScoreRecord | str | os.PathLike,
    path: str | os.PathLike,
    format: str | None = None,
    epoch: int | None = None,
    queries: bool = False,
) -> str:
    """Writes a run's scores to a CSV, `.npz` or Parquet file.

    Every row carries the sample's original key (its id; the key fed to `fit`
    in `key_mapping="hash"` runs). The file is written to a temporary name and
    renamed, so a file that exists is complete.

    Args:
        run: A `keras_sie.ScoreRecord`, a `SampleImportance` after `fit`, or
            the `log_dir` of a run.
        path: Output file.
        format: `"csv"`, `"npz"` or `"parquet"`; inferred from the extension
            of `path` when None. Parquet needs pyarrow
            (`pip install 'keras_sie[parquet]'`).
        epoch: One epoch number, or `None` for all epochs.
        queries: Ranked lists: write the per-query record (keys are query
            ids) instead of the per-item one. Defaults to False.

    Returns:
        The path written.

    Example:

    ```python
    keras_sie.export_run("logs", "scores.csv")              # all epochs
    keras_sie.export_run("logs", "last.npz", epoch=4)
    ```
    """
    path = os.fspath(path)
    fmt = _format_for(path, format)
    run = _as_run(run)
    if queries:
        run = _queries_of(run)
    epochs = _epochs(run, epoch)
    if fmt == "npz":
        arrays = _wide(run, epochs)
        writer: Any = lambda f: np.savez(f, **arrays)
    else:
        cols = to_columns(run, epoch)
        if fmt == "csv":
            data = _csv_bytes(cols)
            writer = lambda f: f.write(data)
        else:
            writer = _parquet_writer(cols)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"Output folder {directory!r} does not exist.")
    storage.atomic_write_bytes(os.path.abspath(path), writer)
    return path
