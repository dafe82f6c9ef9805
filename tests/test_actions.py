"""Acting on scores: select, to_sample_weight and ImportanceSampler, against exact oracles."""

import itertools

import keras
import numpy as np
import pytest
from conftest import assert_close_to_max, linear_model, linear_oracle, linear_problem

import keras_sie


# ------------------------------------------------------------------ select
def test_select_top_bottom_band_on_an_array_with_keys():
    imp = np.array([0.1, 0.4, 0.0, 0.2, 0.3])
    keys = np.array(["a", "b", "c", "d", "e"])
    assert keras_sie.select(imp, top=2, keys=keys).tolist() == ["b", "e"]
    assert keras_sie.select(imp, bottom=2, keys=keys).tolist() == ["c", "a"]
    # A fraction is rounded to the nearest count: 0.4 * 5 = 2.
    assert keras_sie.select(imp, top=0.4).tolist() == [1, 4]
    # band by rank from the least important: ranks 1..2 of 5 -> [0.2, 0.6).
    assert keras_sie.select(imp, band=(0.2, 0.6)).tolist() == [3, 0]
    assert keras_sie.select(imp, band=(0.6, 1.0)).tolist() == keras_sie.select(imp, top=2).tolist()
    # Ties broken by position, deterministic.
    assert keras_sie.select(np.ones(4), top=2).tolist() == [3, 2]
    assert keras_sie.select(np.ones(4), bottom=2).tolist() == [0, 1]


def test_select_bands_partition_the_samples():
    rng = np.random.default_rng(0)
    imp = rng.random(1001)
    edges = [0.0, 0.13, 0.5, 0.77, 1.0]
    parts = [keras_sie.select(imp, band=(a, b)) for a, b in itertools.pairwise(edges)]
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(1001))
    # Every sample of a higher band outranks every sample of a lower one.
    for lo, hi in itertools.pairwise(parts):
        assert imp[hi].min() > imp[lo].max()


def test_select_rejects_bad_arguments():
    imp = np.ones(5)
    with pytest.raises(ValueError, match="exactly one"):
        keras_sie.select(imp, top=1, bottom=1)
    with pytest.raises(ValueError, match="exactly one"):
        keras_sie.select(imp)
    with pytest.raises(ValueError, match="0 <= lo < hi <= 1"):
        keras_sie.select(imp, band=(0.5, 0.2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        keras_sie.select(imp, top=1.5)
    with pytest.raises(ValueError, match="non-negative"):
        keras_sie.select(np.array([1.0, -1.0]), top=1)


def test_select_on_a_run_and_a_callback_ranks_visited_samples_by_id(tmp_path):
    x, y = linear_problem(n=100)
    model = linear_model()
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path), verbose=0)
    model.fit(keras_sie.with_ids(x), y, batch_size=16, validation_split=0.2, shuffle=True,
              callbacks=[sie], verbose=0)
    s = linear_oracle(model, x[:80], y[:80])  # the last 20 rows are validation
    expected_top = np.argsort(-s, kind="stable")[:8]
    run = keras_sie.load(str(tmp_path))
    for source in (run, sie):
        assert keras_sie.select(source, top=8).tolist() == expected_top.tolist()
        # Fractions are of the 80 scored samples; validation rows never appear.
        bottom = keras_sie.select(source, bottom=0.5)
        assert bottom.size == 40 and bottom.max() < 80
        assert sorted(bottom.tolist()) == sorted(np.argsort(s, kind="stable")[:40].tolist())
    # Pruning: keep all but the 10 % least important.
    keep = keras_sie.select(run, band=(0.1, 1.0))
    assert keep.size == 72 and set(keep.tolist()).isdisjoint(keras_sie.select(run, bottom=8))


def test_select_returns_original_keys_of_a_hash_run(tmp_path):
    x, y = linear_problem(n=40)
    keys = np.arange(40, dtype="int64") * 7 + 10**12
    inp = keras.Input((4,), name="x")
    model = keras.Model({"x": inp}, keras.layers.Dense(1)(inp))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path), key_mapping="hash", verbose=0)
    model.fit({"x": x, "sample_id": keys}, y, batch_size=8, shuffle=True, callbacks=[sie],
              verbose=0)
    s = linear_oracle(model, x, y)
    top = keras_sie.select(keras_sie.load(str(tmp_path)), top=3)
    assert top.tolist() == keys[np.argsort(-s)[:3]].tolist()


# -------------------------------------------------------- to_sample_weight
def test_sample_weight_formula_mean_one_and_bounds():
    imp = np.array([0.0, 1.0, 2.0, 5.0])
    w = keras_sie.to_sample_weight(imp, smoothing=0.2)
    # w_i = N * ((1 - a) I_i / sum I + a / N)
    np.testing.assert_allclose(w, 4 * (0.8 * imp / 8.0 + 0.2 / 4), rtol=1e-6)
    assert w.mean() == pytest.approx(1.0, rel=1e-6)
    assert w.min() == pytest.approx(0.2)  # at least `smoothing`
    np.testing.assert_allclose(keras_sie.to_sample_weight(imp, power=0.0), np.ones(4))
    np.testing.assert_allclose(keras_sie.to_sample_weight(imp, smoothing=1.0), np.ones(4))
    sq = np.sqrt(imp)
    np.testing.assert_allclose(keras_sie.to_sample_weight(imp, power=0.5, smoothing=0.0),
                               4 * sq / sq.sum(), rtol=1e-6)
    clipped = keras_sie.to_sample_weight(imp, smoothing=0.0, clip=(0.5, 2.0))
    np.testing.assert_allclose(clipped, [0.5, 0.5, 1.0, 2.0], rtol=1e-6)
    # for_keys: weights in the caller's order, unknown keys rejected.
    w_keys = keras_sie.to_sample_weight(imp, smoothing=0.2, keys=np.array([10, 11, 12, 13]),
                                        for_keys=[13, 10])
    np.testing.assert_allclose(w_keys, [w[3], w[0]])
    with pytest.raises(KeyError, match="no score"):
        keras_sie.to_sample_weight(imp, keys=np.array([10, 11, 12, 13]), for_keys=[99])


def test_sample_weight_from_a_run_gives_unvisited_rows_weight_one_and_trains(tmp_path):
    x, y = linear_problem(n=50)
    model = linear_model()
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path), verbose=0)
    model.fit(keras_sie.with_ids(x), y, batch_size=10, validation_split=0.2, callbacks=[sie],
              verbose=0)
    s = linear_oracle(model, x[:40], y[:40])
    w = keras_sie.to_sample_weight(keras_sie.load(str(tmp_path)), smoothing=0.1)
    assert w.shape == (50,)
    np.testing.assert_allclose(w[:40], 0.9 * 40 * s / s.sum() + 0.1, rtol=1e-5)
    np.testing.assert_allclose(w[40:], 1.0)
    # The weights feed the next training run.
    hist = linear_model(lr=0.01).fit(x, y, sample_weight=w, epochs=1, verbose=0)
    assert np.isfinite(hist.history["loss"][0])


# --------------------------------------------------------- importance sampler
def test_sampler_probabilities_are_unbiased_exactly():
    rng = np.random.default_rng(1)
    imp = rng.gamma(0.5, size=300)
    imp[:10] = 0.0  # zero scores still get p >= a/N
    a = 0.2
    sampler = keras_sie.ImportanceSampler(300, imp, smoothing=a, seed=0)
    p = sampler.probabilities
    np.testing.assert_allclose(p, (1 - a) * imp / imp.sum() + a / 300, rtol=1e-12)
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    w = sampler.weights
    assert w.max() <= 1 / a + 1e-9
    f = rng.normal(size=300) * 3 + imp * 10  # any per-sample quantity (loss, gradient)
    # E_p[w f] = sum_i p_i f_i / (N p_i) = mean(f)
    assert np.sum(p * w * f) == pytest.approx(f.mean(), rel=1e-12)


def test_sampler_dataset_draws_with_p_and_attaches_the_unbiasing_weight():
    n = 50
    imp = np.linspace(0.0, 1.0, n) ** 2
    sampler = keras_sie.ImportanceSampler(n, imp, smoothing=0.1, seed=3)
    p, w_exact = sampler.probabilities, sampler.weights
    x = {"a": np.arange(n, dtype="float32")[:, None] * np.ones((1, 3), "float32"),
         "b": -np.arange(n, dtype="float32")}
    y = np.arange(n) * 10
    sw = np.full(n, 2.0, "float32")
    ds = sampler.dataset(x, y, sw, batch_size=500, steps=40, attach_ids=True)
    f = np.sin(np.arange(n)) + 1.5
    idx_all, est = [], []
    for xb, yb, wb in ds.as_numpy_iterator():
        idx = xb["sample_id"]
        # Rows travel together: features, target and id agree.
        np.testing.assert_array_equal(xb["a"][:, 0], idx)
        np.testing.assert_array_equal(xb["b"], -idx)
        np.testing.assert_array_equal(yb, idx * 10)
        np.testing.assert_allclose(wb, 2.0 * w_exact[idx], rtol=1e-6)
        idx_all.append(idx)
        est.append(np.mean(wb / 2.0 * f[idx]))
    idx_all = np.concatenate(idx_all)
    assert idx_all.size == 20000
    freq = np.bincount(idx_all, minlength=n) / idx_all.size
    # Frequencies within 5 standard errors of p.
    se = np.sqrt(p * (1 - p) / idx_all.size)
    assert np.all(np.abs(freq - p) < 5 * se + 1e-12)
    # The weighted batch mean estimates the uniform mean (unbiased).
    est = np.asarray(est)
    assert abs(est.mean() - f.mean()) < 5 * est.std(ddof=1) / np.sqrt(est.size)
    # A second pass draws new batches (fresh randomness per epoch).
    first = next(iter(ds))[0]["sample_id"].numpy()
    second = next(iter(ds))[0]["sample_id"].numpy()
    assert not np.array_equal(first, second)


def test_sampler_seed_makes_draws_reproducible():
    def draws(seed):
        s = keras_sie.ImportanceSampler(20, np.arange(20.0), seed=seed)
        ds = s.dataset(np.zeros((20, 1), "float32"), np.arange(20), batch_size=8, steps=3)
        return np.concatenate([yb for _, yb, _ in ds.as_numpy_iterator()])

    np.testing.assert_array_equal(draws(5), draws(5))
    assert not np.array_equal(draws(5), draws(6))


def test_sampler_follows_the_callback_and_divides_out_its_own_weight():
    """Live feed in one fit: p tracks the true per-sample score, not score * weight."""
    n = 64
    x, y = linear_problem(n=n)
    model = linear_model()  # lr = 0: the oracle score is constant across epochs
    s_true = linear_oracle(model, x, y)
    sie = keras_sie.SampleImportance(num_samples=n, verbose=0)
    a = 0.3
    sampler = keras_sie.ImportanceSampler(n, source=sie, smoothing=a, seed=0)
    ds = sampler.dataset(x, y, batch_size=16)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append((sampler.probabilities.copy(), None))

        def on_epoch_end(self, epoch, logs=None):
            seen[-1] = (seen[-1][0], sie.visits.copy())

    # The sampler is listed first: it still reads the previous epoch's scores.
    model.fit(ds, epochs=3, callbacks=[sampler, sie, Record()], shuffle=False, verbose=0)
    np.testing.assert_allclose(seen[0][0], np.full(n, 1 / n))  # epoch 0: uniform
    for epoch in (1, 2):
        p, _ = seen[epoch]
        visited = seen[epoch - 1][1] > 0  # drawn in the epoch that was scored
        assert 10 < visited.sum() < n
        # r_i = (p_i - a/N) / (1 - a) is proportional to the true score on visited rows:
        # r = c * s_true for one constant c (compared relative to the largest score, as
        # a per-row ratio would divide by near-zero scores).
        r = (p - a / n) / (1 - a)
        c = r[visited].sum() / s_true[visited].sum()
        assert_close_to_max(r[visited], c * s_true[visited], rel=1e-4)
        assert p.sum() == pytest.approx(1.0)
    # Epoch 2 drew non-uniformly: the weights it attached (1/(N p)) were divided out,
    # otherwise r above would follow s_true / p_i instead of s_true.
    assert seen[1][0].std() > 0


def test_sampler_validates_its_arguments():
    with pytest.raises(ValueError, match="biased"):
        keras_sie.ImportanceSampler(10, smoothing=0.0)
    with pytest.raises(ValueError, match="positive int"):
        keras_sie.ImportanceSampler(0)
    sampler = keras_sie.ImportanceSampler(4)
    with pytest.raises(ValueError, match="num_samples=4 rows"):
        sampler.dataset(np.zeros((5, 2)), np.zeros(5))
    with pytest.raises(ValueError, match="row 0..num_samples-1"):
        sampler.set_scores(np.ones(6))
