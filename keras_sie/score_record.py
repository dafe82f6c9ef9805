"""`ScoreRecord`: the scores of a run, live (`sie.record`) or loaded (`keras_sie.load`).

One class for both, so that a script written against a live callback works
unchanged on a run read back from disk. Records are numbered 0, 1, 2, ... in
the order their epochs finished, across every `fit` of one callback (a second
`fit(initial_epoch=3)` adds records 3, 4, 5; `keras_epoch` keeps the epoch
number Keras used).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from keras_sie import scores as scores_lib
from keras_sie import signals as signals_lib


@dataclasses.dataclass(frozen=True)
class EpochScores:
    """Everything recorded for one epoch.

    Attributes:
        importance: float32 [num_samples], sums to 1 over visited samples.
        visits: int64 [num_samples], visits of each sample in the epoch.
        sums: float32 [num_samples], raw sum over visits of sum_j |g_ij|.
        feature_names: Feature group names.
        feature_sums: float64 [num_groups], sum_i |g_ij| per group.
        summary: Summary scalars (gini, top1pct_share, ...).
        faults: Counted faults (nonfinite_rows, invalid_id_rows, ...).
        task_importance: Per-output importance of multi-output models.
        keras_epoch: The epoch number Keras gave this epoch.
        signal_sums: Per-sample sums over the epoch's visits of each recorded
            signal (`"loss"`, `"el2n"`, `"margin"`, `"confidence"`,
            `"confidence_sq"`) and the epoch's forgetting events
            (`"forgetting"`).
        last_correct: int8 [num_samples] at the epoch's end (forgetting
            signal): -1 never visited, else whether the last visit was correct.
        queries: Ranked lists with query ids: the per-query scores of the
            epoch (an `EpochScores` over query ids), else None.
        item_query: Ranked lists with query ids: int64 [num_samples], the
            query each item id was last seen in (-1: never seen), else None.
        list_size: Ranked lists: items per list L; 0 for one id per row.
    """

    importance: np.ndarray
    visits: np.ndarray
    sums: np.ndarray
    feature_names: tuple[str, ...] = ()
    feature_sums: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    summary: dict[str, float] = dataclasses.field(default_factory=dict)
    faults: dict[str, int] = dataclasses.field(default_factory=dict)
    task_importance: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    keras_epoch: int | None = None
    signal_sums: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    last_correct: np.ndarray | None = None
    queries: EpochScores | None = None
    item_query: np.ndarray | None = None
    list_size: int = 0

    @property
    def feature_importance(self) -> dict[str, float]:
        """Share of sum_i |g_ij| per feature group (sums to 1)."""
        sums = np.asarray(self.feature_sums, dtype=np.float64)
        total = float(sums.sum())
        return {
            n: (float(s) / total if total > 0 else 0.0)
            for n, s in zip(self.feature_names, sums)
        }


class ScoreRecord:
    """Per-sample importance of every recorded epoch, with the same names live and loaded.

    Get one from `SampleImportance.record` during or after `fit`, or from
    `keras_sie.load(log_dir)`. Optional arguments are keyword-only.

    Args:
        num_samples: Number of buffer slots (sample ids `0..num_samples-1`,
            or key slots in hash mode).
        keys: Original keys by slot in hash mode (may be shorter than
            `num_samples`: unused slots have none); None for index ids.
        aggregate_epochs: How many leading epochs `aggregate` averages (None: all).
        id_key: Name of the id entry the run used.
        key_mapping: `"index"` or `"hash"`.
        log_dir: Where the run is stored, if anywhere.
        manifest: The run's stored configuration (loaded runs).

    Example:

    ```python
    record = sie.record                 # or keras_sie.load("logs")
    print(record.epochs, record.top_k(5))
    worst = record.top_k(5, largest=False, epoch=0)
    ```
    """

    def __init__(
        self,
        num_samples: int,
        *,
        keys: np.ndarray | None = None,
        aggregate_epochs: int | None = 3,
        id_key: str = "sample_id",
        key_mapping: str = "index",
        log_dir: str | None = None,
        manifest: dict[str, Any] | None = None,
    ):
        self.num_samples = int(num_samples)
        self._keys = None if keys is None else np.asarray(keys)
        self.aggregate_epochs = aggregate_epochs
        self.id_key = id_key
        self.key_mapping = key_mapping
        self.log_dir = log_dir
        self.manifest = dict(manifest or {})
        self._epochs: dict[int, EpochScores] = {}

    def __repr__(self) -> str:
        where = f", log_dir={self.log_dir!r}" if self.log_dir else ""
        return f"ScoreRecord(epochs={self.epochs}, num_samples={self.num_samples}{where})"

    # ------------------------------------------------------------ building
    def add(self, number: int, scores: EpochScores, keys: np.ndarray | None = None) -> None:
        """Adds (or replaces) record `number`; hash-mode keys are updated too."""
        if scores.importance.shape != (self.num_samples,):
            raise ValueError(
                f"record {number} has {scores.importance.shape[0]} samples, this record has "
                f"num_samples={self.num_samples}."
            )
        self._epochs[int(number)] = scores
        if keys is not None:
            self._keys = np.asarray(keys)

    def snapshot(self, last: int | None = None) -> ScoreRecord:
        """A shallow copy holding records up to `last` (arrays are shared, not copied)."""
        copy = ScoreRecord(
            self.num_samples, keys=self._keys, aggregate_epochs=self.aggregate_epochs,
            id_key=self.id_key, key_mapping=self.key_mapping, log_dir=self.log_dir,
            manifest=self.manifest,
        )
        copy._epochs = {e: s for e, s in self._epochs.items() if last is None or e <= last}
        return copy

    def truncate(self, first: int) -> None:
        """Drops records numbered `first` and later."""
        for e in [e for e in self._epochs if e >= first]:
            del self._epochs[e]

    @property
    def next_number(self) -> int:
        """The number the next recorded epoch gets."""
        return max(self._epochs) + 1 if self._epochs else 0

    # -------------------------------------------------------------- reading
    @property
    def epochs(self) -> list[int]:
        """Record numbers, in order."""
        return sorted(self._epochs)

    def epoch(self, number: int | None = None) -> EpochScores:
        """Everything recorded for one epoch (the latest by default)."""
        if not self._epochs:
            raise ValueError("No epoch has been recorded yet.")
        number = self.epochs[-1] if number is None else number
        if number not in self._epochs:
            raise KeyError(f"epoch {number} not recorded (epochs: {self.epochs})")
        return self._epochs[number]

    def __len__(self) -> int:
        return len(self._epochs)

    @property
    def importance(self) -> np.ndarray | None:
        """Normalized importance of the latest epoch (numpy [num_samples]), or None."""
        return self.epoch().importance if self._epochs else None

    @property
    def history(self) -> dict[int, np.ndarray]:
        """Importance of every recorded epoch, keyed by record number."""
        return {e: s.importance for e, s in sorted(self._epochs.items())}

    @property
    def visits(self) -> np.ndarray | None:
        """Visits per sample in the latest epoch."""
        return self.epoch().visits if self._epochs else None

    @property
    def feature_importance(self) -> dict[str, float]:
        """Latest epoch's share of sum_i |g_ij| per feature group ({} before any epoch)."""
        return self.epoch().feature_importance if self._epochs else {}

    @property
    def summary(self) -> dict[str, float]:
        """Latest epoch's summary scalars (gini, top1pct_share, ...)."""
        return dict(self.epoch().summary) if self._epochs else {}

    @property
    def faults(self) -> dict[str, int]:
        """Latest epoch's counted faults (rows left out, skipped steps, ...)."""
        return dict(self.epoch().faults) if self._epochs else {}

    @property
    def task_importance(self) -> dict[str, np.ndarray]:
        """Latest epoch's importance per output of a multi-output model ({} otherwise)."""
        return dict(self.epoch().task_importance) if self._epochs else {}

    @property
    def slots_used(self) -> int:
        """Slots that hold a sample: all of them for index ids, keys seen in hash mode."""
        return self.num_samples if self._keys is None else min(len(self._keys), self.num_samples)

    @property
    def keys(self) -> np.ndarray:
        """Key of every slot: 0..N-1 for index ids; the original keys in hash mode
        (unused slots: "" for string keys, -1 for integer keys)."""
        n = self.num_samples
        if self._keys is None:
            return np.arange(n, dtype=np.int64)
        keys = self._keys[:n]
        if len(keys) < n:
            fill = "" if keys.dtype.kind in "USO" else -1
            keys = np.concatenate([keys, np.full(n - len(keys), fill, dtype=keys.dtype)])
        return keys

    def _aggregated(self) -> list[int]:
        epochs = self.epochs
        if self.aggregate_epochs is not None:
            epochs = epochs[: max(int(self.aggregate_epochs), 1)]
        return epochs

    @property
    def aggregate(self) -> np.ndarray | None:
        """Mean importance over the first `aggregate_epochs` epochs, renormalized."""
        if not self._epochs:
            return None
        return scores_lib.aggregate([self._epochs[e].importance for e in self._aggregated()])

    @property
    def aggregate_visits(self) -> np.ndarray | None:
        """Visits summed over the epochs `aggregate` averages."""
        if not self._epochs:
            return None
        return np.sum([self._epochs[e].visits for e in self._aggregated()], axis=0)

    def scores(self, epoch: int | str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`(importance, visits)` of one epoch, the latest (None) or `"aggregate"`.

        A sample is visited in the aggregate when it was visited in any of the
        epochs the aggregate averages; `select`, `to_sample_weight`, the
        sampler and the command line all use this one definition.
        """
        if epoch == "aggregate":
            return self.aggregate, self.aggregate_visits
        scores = self.epoch(epoch)
        return scores.importance, scores.visits

    @property
    def signals(self) -> tuple[str, ...]:
        """Names `signal()` answers for this record (recorded signals and derived ones)."""
        if not self._epochs:
            return ()
        sums = self.epoch().signal_sums
        names = [name for name in signals_lib.SIGNALS if name in sums]
        if "confidence" in names:
            names.append("confidence_std")
        return tuple(names)

    def signal(self, name: str, *, epoch: int | str | None = None) -> np.ndarray:
        """One training-dynamics signal per sample, in the slot order of `importance`.

        Args:
            name: `"loss"`, `"el2n"`, `"margin"`, `"confidence"` (the mean over
                the sample's visits in that epoch, in their own units),
                `"confidence_std"` (population standard deviation of the
                confidence over all visits so far) or `"forgetting"` (number of
                correct -> incorrect transitions over all visits so far).
            epoch: Record number (None: the latest) or `"aggregate"` (mean of
                the per-epoch values over the epochs `aggregate` averages;
                for the cumulative `"confidence_std"` and `"forgetting"`,
                their value at the last of those epochs). AUM is
                `signal("margin", epoch="aggregate")` with `aggregate_epochs=None`.

        Returns:
            numpy [num_samples]: float64 (NaN for samples without a visit), or
            int64 counts for `"forgetting"` (0 without a visit).

        Raises:
            ValueError: the signal was not recorded (the message says how to
                request it) or is unknown.
        """
        if name not in signals_lib.READABLE:
            raise ValueError(
                f"Unknown signal {name!r}; available: {', '.join(signals_lib.READABLE)}."
            )
        if name not in self.signals:
            base = "confidence" if name == "confidence_std" else name
            raise ValueError(
                f"Signal {name!r} was not recorded. Request it with "
                f"SampleImportance(signals=({base!r},)); recorded: "
                f"{', '.join(self.signals) or 'none'}."
            )
        if not self._epochs:
            raise ValueError("No epoch has been recorded yet.")
        if epoch == "aggregate":
            epochs = self._aggregated()
            if name in ("confidence_std", "forgetting"):
                return self._cumulative(name, epochs[-1])
            with np.errstate(all="ignore"):
                stacked = np.stack([self._epoch_mean(name, e) for e in epochs])
                counts = np.sum(np.isfinite(stacked), axis=0)
                total = np.nansum(stacked, axis=0)
                return np.where(counts > 0, total / np.maximum(counts, 1), np.nan)
        number = self.epochs[-1] if epoch is None else epoch
        self.epoch(number)  # KeyError for an unknown epoch
        if name in ("confidence_std", "forgetting"):
            return self._cumulative(name, number)
        return self._epoch_mean(name, number)

    def _epoch_mean(self, name: str, number: int) -> np.ndarray:
        scores = self._epochs[number]
        sums = np.asarray(scores.signal_sums[name], np.float64)
        visits = np.asarray(scores.visits)
        return np.divide(sums, visits, out=np.full(sums.shape, np.nan), where=visits > 0)

    def _cumulative(self, name: str, last: int) -> np.ndarray:
        epochs = [e for e in self.epochs if e <= last]
        if name == "forgetting":
            return np.sum([np.asarray(self._epochs[e].signal_sums["forgetting"], np.int64)
                           for e in epochs], axis=0)
        visits = np.sum([np.asarray(self._epochs[e].visits, np.float64) for e in epochs], axis=0)
        s1 = np.sum([np.asarray(self._epochs[e].signal_sums["confidence"], np.float64)
                     for e in epochs], axis=0)
        s2 = np.sum([np.asarray(self._epochs[e].signal_sums["confidence_sq"], np.float64)
                     for e in epochs], axis=0)
        with np.errstate(all="ignore"):
            mean = s1 / visits
            var = np.maximum(s2 / visits - mean * mean, 0.0)
        return np.where(visits > 0, np.sqrt(var), np.nan)

    # ---------------------------------------------------------- ranked lists
    @property
    def list_size(self) -> int:
        """Ranked lists: items per list L (item ids of shape [N, L]); 0 for one id per row."""
        return int(self.epoch().list_size) if self._epochs else 0

    @property
    def queries(self) -> ScoreRecord | None:
        """Ranked lists with query ids: the per-query scores, as a `ScoreRecord` over query ids.

        Query q's score is sum over its items of S_(q,i) plus the gradient of
        its query-level features (inputs without the list axis). None for
        runs without query ids. Same names live and loaded.
        """
        numbers = [e for e in self.epochs if self._epochs[e].queries is not None]
        if not numbers:
            return None
        first = self._epochs[numbers[0]].queries
        out = ScoreRecord(first.importance.shape[0], aggregate_epochs=self.aggregate_epochs,
                          id_key=self.id_key, log_dir=self.log_dir, manifest=self.manifest)
        for e in numbers:
            out.add(e, self._epochs[e].queries)
        return out

    @property
    def query_importance(self) -> np.ndarray | None:
        """Ranked lists: normalized per-query importance of the latest epoch, or None."""
        queries = self.queries
        return None if queries is None else queries.importance

    @property
    def item_queries(self) -> np.ndarray | None:
        """Ranked lists: int64 [num_samples], each item id's query (-1: never seen), or None."""
        if not self._epochs:
            return None
        return self.epoch().item_query

    def top_pairs(
        self, k: int = 10, *, largest: bool = True, epoch: int | str | None = None
    ) -> list[tuple]:
        """Ranked lists: the k most (or least) important (query, item) pairs.

        Returns:
            A list of `(query, item, importance, visits)`, most extreme first
            (query -1 when the run had no query ids).
        """
        rows = self.top_k(k, largest=largest, epoch=epoch)
        item_query = self.item_queries
        return [
            (int(item_query[key]) if item_query is not None else -1, key, score, visits)
            for key, score, visits in rows
        ]

    def top_k(
        self, k: int = 10, *, largest: bool = True, epoch: int | str | None = None
    ) -> list[tuple]:
        """The k most (or least) important visited samples.

        Args:
            k: Number of samples. Defaults to 10.
            largest: True for the most important, False for the least.
                Defaults to True.
            epoch: Record number, None for the latest, or `"aggregate"`.
                Defaults to None.

        Returns:
            A list of `(key, importance, visits)`, most extreme first.
        """
        if not self._epochs:
            return []
        importance, visits = self.scores(epoch)
        return scores_lib.top_k_rows(importance, visits, self.keys, k, largest)


def query_epoch_scores(snapshot, feature_names, keras_epoch: int | None) -> EpochScores:
    """The per-query `EpochScores` of one epoch from the query buffer's snapshot."""
    importance = scores_lib.normalize(snapshot.sums, snapshot.visits).astype(np.float32)
    names = tuple(feature_names)
    return EpochScores(
        importance=importance,
        visits=snapshot.visits,
        sums=snapshot.sums,
        feature_names=names,
        feature_sums=snapshot.feature_sums[: len(names)],
        summary=scores_lib.summarize(importance, snapshot.visits),
        faults={"nonfinite_rows": snapshot.nonfinite_rows,
                "invalid_id_rows": snapshot.invalid_rows},
        keras_epoch=keras_epoch,
    )
