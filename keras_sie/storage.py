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

from keras_sie import scores as scores_lib

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


def atomic_write_bytes(path: str, writer) -> None:
    """Calls `writer(fileobj)` on a temp file next to `path`, then renames it."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
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
    atomic_write_bytes(os.path.join(run_dir(log_dir), MANIFEST), lambda f: f.write(data))


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


class Run:
    """A keras_sie run read back from disk (see `keras_sie.load`).

    Attributes:
        log_dir: The folder given to `load`.
        epochs: Sorted epoch numbers with a complete epoch file.
        keys: Original sample keys by slot (hash mode), else None (slot = id).
        feature_names: Feature group names of the latest epoch.
        manifest: The run's configuration as recorded.
    """

    def __init__(self, log_dir: str, epochs: dict[int, dict[str, np.ndarray]], manifest: dict):
        self.log_dir = log_dir
        self._epochs = epochs
        self.epochs = sorted(epochs)
        self.manifest = manifest
        last = epochs[self.epochs[-1]]
        self.keys = last.get("keys")
        names = last.get("feature_names")
        self.feature_names = [str(s) for s in names] if names is not None else []

    def __repr__(self) -> str:
        return f"Run({self.log_dir!r}, epochs={self.epochs}, num_samples={self.num_samples})"

    @property
    def num_samples(self) -> int:
        return int(self._epochs[self.epochs[-1]]["importance"].shape[0])

    def arrays(self, epoch: int | None = None) -> dict[str, np.ndarray]:
        """All arrays stored for one epoch (the latest by default)."""
        epoch = self.epochs[-1] if epoch is None else epoch
        if epoch not in self._epochs:
            raise KeyError(f"epoch {epoch} not in run (epochs: {self.epochs})")
        return self._epochs[epoch]

    def importance(self, epoch: int | None = None) -> np.ndarray:
        """Normalized importance of one epoch (the latest by default)."""
        return self.arrays(epoch)["importance"]

    def visits(self, epoch: int | None = None) -> np.ndarray:
        return self.arrays(epoch)["visits"]

    @property
    def aggregate_epochs(self) -> int | None:
        """How many leading epochs the aggregate averages (None: all), as recorded."""
        value = self.manifest.get("aggregate_epochs")
        return int(value) if isinstance(value, int) and value > 0 else None

    def aggregate(self, first: int | None | str = "recorded") -> np.ndarray:
        """Cross-epoch aggregate: mean of per-epoch importance, renormalized.

        Args:
            first: Average the first `first` epochs; None for all; "recorded"
                (default) uses the run's `aggregate_epochs` setting.
        """
        n = self.aggregate_epochs if first == "recorded" else first
        return scores_lib.aggregate([self.importance(e) for e in self.epochs], first=n)

    def sample_keys(self) -> np.ndarray:
        """Key of every slot: the original keys in hash mode, else 0..N-1."""
        n = self.num_samples
        if self.keys is None:
            return np.arange(n, dtype=np.int64)
        keys = self.keys
        if len(keys) < n:  # slots never used have no key
            if keys.dtype.kind in "US":
                pad = np.full(n - len(keys), "", dtype=keys.dtype)
            else:
                pad = np.full(n - len(keys), -1, dtype=keys.dtype)
            keys = np.concatenate([keys, pad])
        return keys

    def feature_importance(self, epoch: int | None = None) -> dict[str, float]:
        """Share of sum_i |g_ij| per feature group (sums to 1)."""
        a = self.arrays(epoch)
        if "feature_sums" not in a or "feature_names" not in a:
            return {}
        sums = np.asarray(a["feature_sums"], dtype=np.float64)
        total = sums.sum()
        names = [str(s) for s in a["feature_names"]]
        return {n: float(s / total) if total > 0 else 0.0 for n, s in zip(names, sums)}

    def top_k(self, k: int = 10, epoch: int | None = None, largest: bool = True) -> list[tuple]:
        """[(key, score, visits)] of the k most (or least) important visited samples."""
        return scores_lib.top_k_rows(
            self.importance(epoch), self.visits(epoch), self.sample_keys(), k, largest
        )


def load(log_dir: str) -> Run:
    """Reads a run written by `SampleImportance(log_dir=...)`.

    Only complete epoch files are read (they are written atomically); files
    are opened without pickle support, so a crafted file cannot execute code.

    Args:
        log_dir: The `log_dir` given to `SampleImportance` (or its `keras_sie`
            subfolder).

    Returns:
        A `keras_sie.Run` with per-epoch importance, visits, keys and
        per-feature importance.

    Raises:
        FileNotFoundError: no run (no epoch file) under `log_dir`.
        keras_sie.CorruptRunError: a file exists but is not a valid run file.

    Example:

    ```python
    run = keras_sie.load("logs")
    print(run.epochs, run.top_k(5))
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
        raise FileNotFoundError(
            f"No keras_sie run under {log_dir!r}: no {RUN_SUBDIR}/epoch_*.npz file. Pass the "
            "log_dir given to SampleImportance, after at least one finished epoch."
        )
    manifest = read_manifest(log_dir)
    data = {e: read_epoch(log_dir, e) for e in epochs}
    return Run(log_dir, data, manifest)
