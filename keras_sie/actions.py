"""Acting on the scores: select samples, weight them, or sample by importance.

Every function takes the scores in one of three forms:

* a `keras_sie.ScoreRecord` (from `keras_sie.load(log_dir)` or `sie.record`),
* a `keras_sie.SampleImportance` callback after `fit`,
* a plain array of importances (with optional `keys`, the sample ids).

Results are keyed by the original sample ids: with `keras_sie.with_ids(x)`
the id of a sample is its row in `x`, so `x[keep]` prunes a dataset; in
`key_mapping="hash"` runs the ids are the keys that were fed to `fit`.

Samples that were never visited in the chosen epoch (rows held out by
`validation_split`, or a sample an importance sampler did not draw) have no
score. `select` leaves them out; `to_sample_weight` and `ImportanceSampler`
give them the average score (weight 1.0, neutral).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Union

import keras
import numpy as np
import tensorflow as tf

from keras_sie import ids as ids_lib
from keras_sie import signals as signals_lib
from keras_sie.score_record import ScoreRecord

# Signals that are signed or larger for easier samples: rank them, don't weight by them.
_SIGNED = ("margin", "confidence")

ScoreSource = Union[ScoreRecord, "keras.callbacks.Callback", np.ndarray, Sequence[float]]

__all__ = ["ImportanceSampler", "select", "to_sample_weight"]


@dataclasses.dataclass
class _Scores:
    importance: np.ndarray  # float64 [M]
    keys: np.ndarray  # [M]
    visited: np.ndarray  # bool [M]


def _record_of(scores: Any) -> ScoreRecord | None:
    """The `ScoreRecord` behind a record or a callback, or None for plain arrays."""
    if isinstance(scores, ScoreRecord):
        return scores
    record = getattr(scores, "record", None)
    if isinstance(record, ScoreRecord) or (
        isinstance(scores, keras.callbacks.Callback) and hasattr(scores, "record")
    ):
        if record is None:
            raise ValueError(
                "This SampleImportance has no scores yet: pass it to model.fit(callbacks=[...]) "
                "first, or load a saved run with keras_sie.load(log_dir)."
            )
        return record
    return None


def _resolve(scores: ScoreSource, keys: Any = None, epoch: int | str | None = None,
             by: str = "importance", non_negative: bool = False) -> _Scores:
    """Turns any accepted score source into (values, keys, visited).

    `by` picks the input-gradient importance (default) or a recorded signal
    (`record.signal(by)`); `non_negative` refuses signals that can be negative
    (margin) where the caller needs weights.
    """
    record = _record_of(scores)
    if record is not None:
        if keys is not None:
            raise ValueError(
                "keys= is only for plain arrays; a ScoreRecord or SampleImportance carries its "
                "own sample keys."
            )
        importance, visits = record.scores(epoch)
        m = record.slots_used  # hash mode: used slots only
        visited = np.asarray(visits)[:m] > 0
        values = np.asarray(importance, np.float64)[:m]
        if by != "importance":
            if by not in signals_lib.READABLE:
                raise ValueError(f"by must be 'importance' or a signal in "
                                 f"{signals_lib.READABLE}, got {by!r}.")
            values = np.asarray(record.signal(by, epoch=epoch), np.float64)[:m]
            visited = visited & np.isfinite(values)
            if non_negative and by in _SIGNED:
                raise ValueError(
                    f"by={by!r} can be negative or is larger for easier samples; weights need "
                    "a non-negative hardness. Use by='loss', 'el2n', 'forgetting' or "
                    "'confidence_std', or select(..., by='margin', bottom=...) to pick the "
                    "hardest samples."
                )
            values = np.where(visited, values, 0.0)
        return _Scores(values, record.keys[:m], visited)
    if by != "importance":
        raise ValueError("by= needs a ScoreRecord or a SampleImportance, not a plain array.")
    if epoch not in (None, "aggregate"):
        raise ValueError("epoch= needs a ScoreRecord or a SampleImportance, not a plain array.")
    imp = np.asarray(scores, dtype=np.float64)
    if imp.ndim != 1:
        raise ValueError(f"Expected a 1-D array of importances, got shape {imp.shape}.")
    if not np.all(np.isfinite(imp)) or np.any(imp < 0):
        raise ValueError("Importances must be finite and non-negative.")
    if keys is None:
        k = np.arange(imp.size, dtype=np.int64)
    else:
        k = np.asarray(keys)
        if k.shape != imp.shape:
            raise ValueError(f"keys has shape {k.shape}, importances have shape {imp.shape}.")
    return _Scores(imp, k, np.ones(imp.size, dtype=bool))


def _count(value: float, n: int, name: str) -> int:
    """A count (int) or a fraction of n (float in [0, 1]), rounded to nearest."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int count or a float fraction, got {value!r}.")
    if isinstance(value, (int, np.integer)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}.")
        return min(int(value), n)
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} as a fraction must be in [0, 1], got {value}.")
    return math.floor(value * n + 0.5)


def _relative(s: _Scores) -> np.ndarray:
    """Scores on a mean-1 scale over visited samples; unvisited get 1 (the mean)."""
    rel = np.ones(s.importance.size, dtype=np.float64)
    v = s.visited
    if v.any():
        mean = s.importance[v].mean()
        if mean > 0:
            rel[v] = s.importance[v] / mean
    return rel


def _lookup(keys: np.ndarray, values: np.ndarray, query: Any) -> np.ndarray:
    """values[position of each query key in keys]; a clear error for unknown keys."""
    query = np.asarray(query)
    keys = np.asarray(keys)
    if keys.dtype.kind in "US" or query.dtype.kind in "USO":
        keys_s = keys.astype(str)
        query_s = query.astype(str)
    else:
        keys_s, query_s = keys, query
    if keys_s.size == 0:
        raise KeyError("There are no scored samples to look keys up in.")
    order = np.argsort(keys_s, kind="stable")
    sorted_keys = keys_s[order]
    pos = np.minimum(np.searchsorted(sorted_keys, query_s), sorted_keys.size - 1)
    found = sorted_keys[pos] == query_s
    if not found.all():
        missing = query[~found]
        raise KeyError(
            f"{missing.size} of the requested keys have no score (e.g. {missing.flat[0]!r}). "
            "Pass keys that were seen in training, or leave for_keys out to get one value "
            "per scored sample."
        )
    return values[order[pos]]


def select(
    scores: ScoreSource,
    *,
    top: float | None = None,
    bottom: float | None = None,
    band: tuple[float, float] | None = None,
    stratified: float | None = None,
    keys: Any = None,
    epoch: int | str | None = "aggregate",
    by: str = "importance",
    hard_cutoff: float = 0.0,
    strata: int = 50,
    seed: int = 0,
) -> np.ndarray:
    """Ids of the most, least, a quantile band, or a coverage-preserving subset.

    Exactly one of `top`, `bottom`, `band` or `stratified` is given. An int is
    a number of samples, a float in [0, 1] a fraction of the scored samples
    (rounded to the nearest count). Only samples visited in the chosen epoch
    are ranked (validation rows, for instance, have no score). Ties are
    broken by position, so the result is deterministic.

    `stratified` is coverage-centric selection (Zheng et al., ICLR 2023):
    drop the hardest `hard_cutoff` fraction (highest scores), split the score
    range of the rest into `strata` equal-width strata and spend the budget
    evenly across them, smallest stratum first, drawing at random (`seed`)
    within each. Keeping only the top-scored samples fails at high pruning
    rates; this keeps easy, typical and hard samples alike.

    Args:
        scores: A `keras_sie.ScoreRecord`, a `keras_sie.SampleImportance` after `fit`,
            or a 1-D array of importances.
        top: Select the `top` most important samples (count or fraction).
        bottom: Select the `bottom` least important samples.
        band: `(lo, hi)` with `0 <= lo < hi <= 1`: the samples whose rank
            from the least important, as a fraction of the scored samples,
            lies in `[lo, hi)`. `(0.9, 1.0)` equals `top=0.1`.
        stratified: Keep this many samples (count or fraction) with
            coverage-centric selection.
        keys: Sample ids of a plain array (default: positions 0..N-1).
        epoch: Which epoch's scores: `"aggregate"` (default: the cross-epoch
            aggregate, by default the mean of the first 3 epochs, which found
            flipped labels best in our quality benchmark), an epoch number, or
            `None` for the latest. Ignored for plain arrays.
        by: `"importance"` (default) or a recorded signal (`"loss"`,
            `"el2n"`, `"margin"`, `"confidence"`, `"confidence_std"`,
            `"forgetting"`): rank by its values. Low margin and low
            confidence mean hard: pick those with `bottom=`.
        hard_cutoff: `stratified`: fraction of the hardest samples dropped
            first (highest scores; lowest for `by="margin"` / `"confidence"`).
            Defaults to 0.0: in our quality benchmark dropping the hardest
            10 % lost to random on Census, where they hold 92-97 % of the
            positives (benchmarks/README.md).
        strata: `stratified`: number of equal-width score strata. Defaults to 50.
        seed: `stratified`: seed of the draws within strata. Defaults to 0.

    Returns:
        The selected sample ids (numpy array): most important first for
        `top`, `band` and `stratified`, least important first for `bottom`.

    Example:

    ```python
    run = keras_sie.load("logs")
    hard = keras_sie.select(run, top=0.05)         # 5 % most important ids
    keep = keras_sie.select(run, band=(0.1, 1.0))  # prune the 10 % least
    model.fit(x_train[keep], y_train[keep])
    ```
    """
    given = [name for name, v in (("top", top), ("bottom", bottom), ("band", band),
                                  ("stratified", stratified)) if v is not None]
    if len(given) != 1:
        raise ValueError(
            f"Pass exactly one of top=, bottom=, band= or stratified= (got {given or 'none'})."
        )
    s = _resolve(scores, keys, epoch, by=by)
    idx = np.flatnonzero(s.visited)
    imp = s.importance[idx]
    # Ascending by importance, ties by position.
    ascending = idx[np.lexsort((idx, imp))]
    n = ascending.size
    if top is not None:
        chosen = ascending[n - _count(top, n, "top"):][::-1]
    elif bottom is not None:
        chosen = ascending[: _count(bottom, n, "bottom")]
    elif stratified is not None:
        # Hardness: the score, or minus it for signals that are larger for easier samples.
        hardness = -s.importance if by in _SIGNED else s.importance
        order = idx[np.lexsort((idx, hardness[idx]))]
        chosen = _coverage_centric(order, hardness, _count(stratified, n, "stratified"),
                                   hard_cutoff, strata, seed)
    else:
        try:
            lo, hi = (float(b) for b in band)
        except (TypeError, ValueError):
            raise ValueError(f"band must be a pair (lo, hi) of fractions, got {band!r}.") from None
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"band must satisfy 0 <= lo < hi <= 1, got {band!r}.")
        a, b = math.floor(lo * n + 0.5), math.floor(hi * n + 0.5)
        chosen = ascending[a:b][::-1]
    return s.keys[chosen]


def _coverage_centric(ascending: np.ndarray, values: np.ndarray, budget: int,
                      hard_cutoff: float, strata: int, seed: int) -> np.ndarray:
    """Coverage-centric selection (Zheng et al. 2023, Algorithm 1) over visited slots."""
    if not 0.0 <= hard_cutoff < 1.0:
        raise ValueError(f"hard_cutoff must be in [0, 1), got {hard_cutoff}.")
    if not isinstance(strata, (int, np.integer)) or strata < 1:
        raise ValueError(f"strata must be a positive int, got {strata!r}.")
    n = ascending.size
    pool = ascending[: n - math.floor(hard_cutoff * n + 0.5)]  # hardest dropped
    budget = min(budget, pool.size)
    if budget == 0 or pool.size == 0:
        return ascending[:0]
    v = values[pool]
    lo, hi = float(v.min()), float(v.max())
    width = (hi - lo) / strata if hi > lo else 1.0
    stratum = np.minimum(((v - lo) / width).astype(np.int64), strata - 1)
    groups = [pool[stratum == k] for k in range(strata)]
    groups = sorted((g for g in groups if g.size), key=lambda g: g.size)
    rng = np.random.default_rng(seed)
    chosen = []
    remaining = budget
    for i, group in enumerate(groups):
        take = min(group.size, remaining // (len(groups) - i))
        if take:
            chosen.append(rng.choice(group, size=take, replace=False))
        remaining -= take
    out = np.concatenate(chosen) if chosen else ascending[:0]
    return out[np.lexsort((out, -values[out]))]  # most important first, ties by position


def _mixed_probabilities(rel: np.ndarray, smoothing: float, power: float) -> np.ndarray:
    """p = (1 - a) r^power / sum r^power + a / N."""
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing}.")
    if not power >= 0:
        raise ValueError(f"power must be >= 0, got {power}.")
    n = rel.size
    r = np.power(rel, power)
    total = r.sum()
    if total <= 0 or not np.isfinite(total):
        return np.full(n, 1.0 / n)
    return (1.0 - smoothing) * r / total + smoothing / n


def to_sample_weight(
    scores: ScoreSource,
    *,
    smoothing: float = 0.1,
    power: float = 1.0,
    clip: tuple[float | None, float | None] | None = None,
    keys: Any = None,
    epoch: int | str | None = "aggregate",
    for_keys: Any = None,
    by: str = "importance",
) -> np.ndarray:
    """Turns importance into per-sample `sample_weight` with mean 1.

    With N scored samples and importance I (raised to `power`), the weight is

        w_i = N * p_i,   p_i = (1 - smoothing) * I_i / sum_k I_k + smoothing / N

    so the weights average exactly 1 before clipping (the overall loss scale
    and learning rate are unchanged), and every sample keeps a weight of at
    least `smoothing`. `power=0.5` tempers the scores, `power=0` gives
    uniform weights. Samples never visited in the chosen epoch get the
    average score. `clip=(lo, hi)` then bounds the weights (either side may
    be None); clipping is applied last, so clipped weights may no longer
    average exactly 1.

    Args:
        scores: A `keras_sie.ScoreRecord`, a `keras_sie.SampleImportance`, or a 1-D
            array of importances.
        smoothing: Share of the uniform distribution mixed in, in [0, 1].
            Defaults to 0.1.
        power: Exponent applied to the importance before normalizing.
            Defaults to 1.0.
        clip: Optional `(min, max)` bounds for the final weights.
        keys: Sample ids of a plain array (default: positions).
        epoch: `"aggregate"` (default, see `select`), an epoch number or
            `None` (latest). Ignored for plain arrays.
        by: `"importance"` (default) or a non-negative recorded signal
            (`"loss"`, `"el2n"`, `"forgetting"`, `"confidence_std"`) to
            weight by.
        for_keys: Optional sample ids to return weights for, in that order
            (e.g. the ids of the rows of your training arrays). Unknown ids
            raise a `KeyError`. By default one weight per scored sample, in
            the order of the run's keys (with `with_ids`: row order).
            Ranked lists: pass the `[N, L]` item ids (for
            `x = keras_sie.with_ids(x, list_axis=1)`, `x["sample_id"]["item"]`)
            to get `[N, L]` per-item weights; padding ids (negative) get
            weight 0.

    Returns:
        float32 numpy array of weights.

    Example:

    ```python
    w = keras_sie.to_sample_weight(keras_sie.load("logs"), smoothing=0.2, clip=(0.1, 10))
    model.fit(x_train, y_train, sample_weight=w)
    ```
    """
    s = _resolve(scores, keys, epoch, by=by, non_negative=True)
    p = _mixed_probabilities(_relative(s), smoothing, power)
    w = p * p.size
    if clip is not None:
        lo, hi = clip
        w = np.clip(w, -np.inf if lo is None else lo, np.inf if hi is None else hi)
    if for_keys is not None:
        for_keys = np.asarray(for_keys)
        if for_keys.ndim == 2 and for_keys.dtype.kind in "iu":  # ranked lists: [N, L]
            real = for_keys >= 0
            out = np.zeros(for_keys.shape, np.float64)
            out[real] = _lookup(s.keys, w, for_keys[real])
            return out.astype(np.float32)
        w = _lookup(s.keys, w, for_keys)
    return w.astype(np.float32)


class ImportanceSampler(keras.callbacks.Callback):
    """Draws training samples with probability proportional to their importance.

    Builds a `tf.data` pipeline that draws each batch from the probabilities

        p_i = (1 - smoothing) * I_i / sum_k I_k + smoothing / N

    and attaches the unbiasing weight w_i = 1 / (N * p_i) as `sample_weight`.
    Then E[w_i * grad_i] over a draw equals the uniform mean gradient
    (1/N) * sum_i grad_i, so the expected update is the one of uniform
    sampling (Katharopoulos & Fleuret, 2018), while high-importance samples
    are seen more often. Since p_i >= smoothing / N, the weights are bounded:
    w_i <= 1 / smoothing.

    The probabilities live in a `tf.Variable` read inside the pipeline, so
    they can change between epochs of one `fit` with no rebuild and no
    per-batch host synchronization. Pass a `SampleImportance` as `source`
    and the sampler as a callback too: at the start of each epoch it takes
    the scores of the previous epoch (samples not drawn in that epoch keep
    their previous score) and divides out the weight it attached, since the
    recorded score includes `sample_weight`. The first epoch uses `scores`
    (uniform by default).

    An epoch of the dataset is `steps` batches (default: ceil(N /
    batch_size)) of independent draws with replacement; use it without
    `steps_per_epoch` so that each epoch starts a fresh pass.

    Args:
        num_samples: Number of samples N (rows of the data given to
            `dataset`).
        scores: Optional initial scores: a `ScoreRecord`, a `SampleImportance` or an
            array of N importances (with their keys, the rows, by position).
            Defaults to uniform.
        by: What to sample by: `"importance"` (default) or a non-negative
            recorded signal (`"loss"`, `"el2n"`, `"forgetting"`,
            `"confidence_std"`).
        source: Optional `SampleImportance` watching this sampler's dataset;
            its scores update the probabilities at each epoch start.
        smoothing: Share of the uniform distribution mixed in, in (0, 1].
            Defaults to 0.1.
        power: Exponent applied to the importance. Defaults to 1.0.
        seed: Seed of the draws (None: nondeterministic).

    Example:

    ```python
    sie = keras_sie.SampleImportance(num_samples=len(x))
    sampler = keras_sie.ImportanceSampler(len(x), source=sie, smoothing=0.2, seed=0)
    ds = sampler.dataset(x, y, batch_size=128)   # yields (x + ids, y, weight)
    model.fit(ds, epochs=10, callbacks=[sie, sampler])
    ```
    """

    def __init__(
        self,
        num_samples: int,
        scores: ScoreSource | None = None,
        *,
        source: Any = None,
        smoothing: float = 0.1,
        power: float = 1.0,
        seed: int | None = None,
        by: str = "importance",
    ):
        super().__init__()
        if not isinstance(num_samples, (int, np.integer)) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}.")
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(
                f"smoothing must be in (0, 1], got {smoothing}: with 0, samples scored 0 would "
                "never be drawn and the weighted gradient would be biased."
            )
        if source is not None and not (
            isinstance(source, keras.callbacks.Callback) and hasattr(source, "record")
        ):
            raise TypeError("source must be a keras_sie.SampleImportance.")
        self.num_samples = int(num_samples)
        self.smoothing = float(smoothing)
        self.power = float(power)
        self.source = source
        if by != "importance" and (by not in signals_lib.READABLE or by in _SIGNED):
            raise ValueError(
                f"by must be 'importance' or a non-negative signal ('loss', 'el2n', "
                f"'forgetting', 'confidence_std'), got {by!r}."
            )
        self.by = by
        self._consumed: int | None = None
        self._rel = np.ones(self.num_samples, dtype=np.float64)
        with tf.init_scope(), tf.device("/CPU:0"):
            # Row 0: cumulative distribution; row 1: probabilities. One variable,
            # so a pipeline read always sees a consistent pair.
            self._table = tf.Variable(
                np.zeros((2, self.num_samples)), trainable=False, dtype=tf.float64,
                name="sie_sampler_table",
            )
            if seed is None:
                self._rng = tf.random.Generator.from_non_deterministic_state()
            else:
                self._rng = tf.random.Generator.from_seed(int(seed))
        if scores is not None:
            self.set_scores(scores)
        else:
            self._assign()

    # ------------------------------------------------------------ public API
    @property
    def probabilities(self) -> np.ndarray:
        """Current draw probabilities p (float64 [N], sums to 1)."""
        return self._table.numpy()[1].copy()

    @property
    def weights(self) -> np.ndarray:
        """Current unbiasing weights 1 / (N * p) (float64 [N], at most 1/smoothing)."""
        return 1.0 / (self.num_samples * self.probabilities)

    def set_scores(self, scores: ScoreSource, *, epoch: int | str | None = None,
                   by: str | None = None) -> None:
        """Sets the probabilities from scores (e.g. a previous run's).

        Args:
            scores: A `ScoreRecord`, a `SampleImportance`, or an array of N importances
                indexed by row. Record/callback keys must be the rows 0..N-1
                (`keras_sie.with_ids`); unscored rows get the mean score.
            epoch: Epoch number, `None` (latest) or `"aggregate"`.
            by: `"importance"` or a non-negative signal; defaults to the
                sampler's `by`.
        """
        s = _resolve(scores, None, epoch, by=by or self.by, non_negative=True)
        rel = np.ones(self.num_samples, dtype=np.float64)
        keys = np.asarray(s.keys)
        if keys.dtype.kind not in "iu" or (keys.size and (keys.min() < 0 or keys.max() >= self.num_samples)):
            raise ValueError(
                "ImportanceSampler needs scores keyed by row 0..num_samples-1 (as made by "
                "keras_sie.with_ids); map other keys to rows with to_sample_weight(..., "
                "for_keys=...) or pass an array in row order."
            )
        rel[keys] = _relative(s)
        self._rel = rel
        self._assign()

    def dataset(
        self,
        x: Any,
        y: Any,
        sample_weight: Any = None,
        *,
        batch_size: int = 32,
        steps: int | None = None,
        attach_ids: bool | None = None,
        id_key: str = ids_lib.DEFAULT_ID_KEY,
    ) -> tf.data.Dataset:
        """A batched `tf.data.Dataset` of importance-sampled `(x, y, weight)`.

        Args:
            x: Inputs with N rows: an array, or a dict / tuple of arrays.
            y: Targets with N rows.
            sample_weight: Optional per-row weights; multiplied into the
                unbiasing weight.
            batch_size: Rows per batch. Defaults to 32.
            steps: Batches per epoch. Defaults to ceil(N / batch_size).
            attach_ids: Add the drawn row as the `id_key` input, so that a
                `SampleImportance` can score the batch. Defaults to True when
                a `source` is set.
            id_key: Name of the id input. Defaults to `"sample_id"`.

        Returns:
            A finite `tf.data.Dataset`; each pass draws fresh batches from
            the probabilities current at that moment.
        """
        n = self.num_samples
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        if y is None:
            raise ValueError("ImportanceSampler.dataset needs targets y (one row per sample).")
        if attach_ids is None:
            attach_ids = self.source is not None
        with tf.device("/CPU:0"):
            data = tf.nest.map_structure(tf.convert_to_tensor, (x, y))
            if sample_weight is not None:
                sw = tf.reshape(tf.cast(tf.convert_to_tensor(sample_weight), tf.float32), [-1])
            else:
                sw = None
        for leaf in tf.nest.flatten(data) + ([sw] if sw is not None else []):
            if leaf.shape[0] != n:
                raise ValueError(
                    f"Every array must have num_samples={n} rows; one has shape {leaf.shape}."
                )
        steps = math.ceil(n / batch_size) if steps is None else int(steps)
        table, rng = self._table, self._rng

        def draw(_):
            t = table.read_value()  # one consistent snapshot of (cdf, p)
            u = rng.uniform([batch_size], dtype=tf.float64)
            idx = tf.searchsorted(t[0], u, side="right", out_type=tf.int64)
            idx = tf.minimum(idx, n - 1)  # guards u >= cdf[-1] after rounding
            w = 1.0 / (n * tf.gather(t[1], idx))
            return idx, tf.cast(w, tf.float32)

        def gather(idx, w):
            xb, yb = tf.nest.map_structure(lambda a: tf.gather(a, idx), data)
            if sw is not None:
                w = w * tf.gather(sw, idx)
            if attach_ids:
                xb = ids_lib._attach(xb, idx, id_key)
            return xb, yb, w

        ds = tf.data.Dataset.range(steps).map(draw)  # sequential: reproducible draws
        ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE)

    # ------------------------------------------------------------- callback
    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        if self.source is None or not self.source.history:
            return
        latest = max(self.source.history)
        if self._consumed is not None and latest <= self._consumed:
            return
        self._consumed = latest
        if self.by != "importance":
            # Signals are per-sample values before sample weights: use them as they are.
            self.set_scores(self.source, epoch=latest)
            return
        imp = np.asarray(self.source.history[latest], np.float64)[: self.num_samples]
        visits = self.source.visits
        visited = (np.asarray(visits)[: self.num_samples] > 0) if visits is not None else imp > 0
        if imp.size < self.num_samples or not visited.any():
            return
        # The recorded score includes the weight 1/(N p_i) this sampler attached
        # (p of the epoch just finished, still in the table): divide it out.
        raw = imp * self.probabilities
        mean = raw[visited].mean()
        if mean <= 0:
            return
        self._rel[visited] = raw[visited] / mean
        self._assign()

    # ------------------------------------------------------------- internals
    def _assign(self) -> None:
        p = _mixed_probabilities(self._rel, self.smoothing, self.power)
        cdf = np.cumsum(p)
        cdf[-1] = 1.0
        self._table.assign(np.stack([cdf, p]))
