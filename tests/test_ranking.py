"""Ranked lists (issue 15): per-item and per-query importance.

Exact oracles for a linear item scorer s_(q,i) = w.x_(q,i) + b with frozen
weights (lr = 0), where S_(q,i) = |dJ_q/ds_(q,i)| * sum_f |w_f|:

* listwise softmax cross-entropy over the list (one-hot labels):
  dJ_q/ds_(q,i) = p_i - y_i (J_q = l_q: Keras divides by the number of lists);
* keras-rs pairwise logistic loss: l_q = sum_{i,j: y_i > y_j}
  log(1 + exp(-(s_i - s_j))), and the default reduction divides by
  batch x list size, so J_q = l_q / L.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
from conftest import assert_close_to_max

import keras_sie

N, L, D = 37, 5, 3
BATCH = 8  # 37 lists: a partial last batch of 5


def _lists(seed=0, graded=False):
    rng = np.random.default_rng(seed)
    items = rng.normal(size=(N, L, D)).astype("float32")
    lengths = rng.integers(2, L + 1, size=N)
    lengths[-1] = L  # the last list is full: num_samples = N * L
    mask = np.arange(L)[None, :] < lengths[:, None]
    if graded:
        labels = rng.integers(0, 4, size=(N, L)).astype("float32")
        labels = np.where(mask, labels, -1.0).astype("float32")
    else:
        pick = (rng.random(N) * lengths).astype(int)
        labels = np.zeros((N, L), "float32")
        labels[np.arange(N), pick] = 1.0
    return items, mask, labels


def _scorer(masked: bool):
    """Linear item scorer (a shared Dense over the list axis); padded items masked."""
    items = keras.Input((L, D), name="items")
    inputs = {"items": items}
    s = keras.layers.Reshape((L,))(keras.layers.Dense(1, name="item_dense")(items))
    if masked:
        m = keras.Input((L,), name="mask")
        inputs["mask"] = m
        s = keras.layers.Lambda(lambda t: t[0] + (t[1] - 1.0) * 1e9)([s, m])
    model = keras.Model(inputs, s)
    rng = np.random.default_rng(7)
    model.get_layer("item_dense").set_weights(
        [rng.normal(size=(D, 1)).astype("float32"), np.array([0.3], "float32")])
    return model


def _softmax_ce_oracle(model, items, mask, labels):
    w, b = model.get_layer("item_dense").get_weights()
    s = items @ w[:, 0] + b[0]
    s = np.where(mask, s, -np.inf).astype(np.float64)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return np.abs(p - labels) * np.abs(w).sum()


def _pairwise_logistic_oracle(model, items, labels):
    w, b = model.get_layer("item_dense").get_weights()
    s = (items @ w[:, 0] + b[0]).astype(np.float64)
    valid = labels >= 0
    ds = np.zeros_like(s)
    for q in range(s.shape[0]):
        for i in range(L):
            for j in range(L):
                if valid[q, i] and valid[q, j] and labels[q, i] > labels[q, j]:
                    g = 1.0 / (1.0 + np.exp(s[q, i] - s[q, j]))  # sigmoid(s_j - s_i)
                    ds[q, i] -= g
                    ds[q, j] += g
    return np.abs(ds / L) * np.abs(w).sum()


def _fit(model, x, labels, epochs=1, **kwargs):
    sie = keras_sie.SampleImportance(verbose=0, **kwargs)
    model.fit(x, labels, batch_size=BATCH, epochs=epochs, shuffle=True, verbose=0,
              callbacks=[sie])
    return sie


def _per_item(record, mask):
    """The run's per-visit sums laid out [N, L] (with_ids numbering n*L + i)."""
    e = record.epoch()
    visits = e.visits.reshape(N, L)
    np.testing.assert_array_equal(visits, mask.astype(np.int64))  # padding never visited
    return np.where(mask, e.sums.reshape(N, L) / np.maximum(visits, 1), 0.0)


def test_listwise_softmax_ce_exact_per_item():
    items, mask, labels = _lists()
    model = _scorer(masked=True)
    model.compile(keras.optimizers.SGD(0.0),
                  keras.losses.CategoricalCrossentropy(from_logits=True))
    x = keras_sie.with_ids({"items": items, "mask": mask.astype("float32")}, list_axis=1,
                           mask=mask)
    sie = _fit(model, x, labels, epochs=2, features=["items"])
    assert sie.record.num_samples == N * L and sie.record.list_size == L
    expected = _softmax_ce_oracle(model, items, mask, labels)
    assert_close_to_max(_per_item(sie.record, mask), expected)
    assert sie.faults["invalid_id_rows"] == 0
    # Per-query record: the sum over the list's items (no query-level feature here).
    queries = sie.queries
    assert queries.num_samples == N
    np.testing.assert_array_equal(queries.visits, np.ones(N, np.int64))
    assert_close_to_max(queries.epoch().sums, expected.sum(axis=1))
    np.testing.assert_array_equal(sie.record.item_queries.reshape(N, L),
                                  np.where(mask, np.arange(N)[:, None], -1))


def test_pairwise_logistic_exact_per_item():
    keras_rs = pytest.importorskip("keras_rs")
    items, mask, labels = _lists(seed=1, graded=True)
    model = _scorer(masked=False)
    model.compile(keras.optimizers.SGD(0.0), keras_rs.losses.PairwiseLogisticLoss())
    sie = _fit(model, keras_sie.with_ids({"items": items}, list_axis=1, mask=mask), labels)
    expected = _pairwise_logistic_oracle(model, items, labels)
    assert_close_to_max(_per_item(sie.record, mask), expected)
    assert_close_to_max(sie.queries.epoch().sums, expected.sum(axis=1))


def test_padding_never_appears_and_padded_features_change_nothing(tmp_path):
    items, mask, labels = _lists(seed=2)
    runs = []
    for k, fill in enumerate((0.0, 1e3)):
        keras.utils.set_random_seed(0)
        model = _scorer(masked=True)
        model.compile(keras.optimizers.SGD(0.0),
                      keras.losses.CategoricalCrossentropy(from_logits=True))
        x_items = np.where(mask[..., None], items, fill).astype("float32")
        x = keras_sie.with_ids({"items": x_items, "mask": mask.astype("float32")},
                               list_axis=1, mask=mask)
        sie = _fit(model, x, labels, features=["items"], log_dir=str(tmp_path / f"r{k}"))
        runs.append(sie)
        padded = np.flatnonzero(~mask.reshape(-1))
        assert not set(padded) & {key for key, _, _ in sie.top_k(N * L)}
        assert not set(padded) & {item for _, item, _, _ in sie.top_pairs(N * L)}
        assert (sie.visits[padded] == 0).all() and (sie.importance[padded] == 0).all()
        assert sie.faults["invalid_id_rows"] == 0
        loaded = keras_sie.load(str(tmp_path / f"r{k}"))
        np.testing.assert_array_equal(loaded.importance, sie.importance)
        np.testing.assert_array_equal(loaded.query_importance, sie.query_importance)
        np.testing.assert_array_equal(loaded.item_queries, sie.record.item_queries)
        assert loaded.list_size == L and loaded.top_pairs(5) == sie.top_pairs(5)
    np.testing.assert_array_equal(runs[0].record.epoch().sums, runs[1].record.epoch().sums)
    np.testing.assert_array_equal(runs[0].queries.epoch().sums, runs[1].queries.epoch().sums)


def _coupling_warnings(caught):
    return [w for w in caught if "coupled" in str(w.message)]


@pytest.mark.parametrize("loss_name", ["PairwiseLogisticLoss", "PairwiseHingeLoss",
                                       "PairwiseSoftZeroOneLoss", "PairwiseMeanSquaredError",
                                       "softmax_ce"])
def test_keras_rs_model_losses_and_downstream(loss_name, tmp_path):
    """keras-rs layers (FeatureCross, DotInteraction) in a scored model, item embeddings
    [B, L, d], a query-level feature; every pairwise loss and listwise softmax CE; no
    coupling warning; load, to_sample_weight [N, L], export and the CLI."""
    keras_rs = pytest.importorskip("keras_rs")
    items, mask, labels = _lists(seed=3, graded=loss_name != "softmax_ce")
    rng = np.random.default_rng(3)
    item_ids = np.where(mask, rng.integers(1, 50, size=(N, L)), 0)
    query_feat = rng.normal(size=(N, 4)).astype("float32")

    f_items = keras.Input((L, D), name="items")
    f_ids = keras.Input((L,), dtype="int64", name="item_id")
    f_query = keras.Input((4,), name="query_feat")
    emb = keras.layers.Embedding(50, 6, mask_zero=True, name="item_emb")(f_ids)  # [B, L, 6]
    tower = keras.layers.Dense(6, activation="relu", name="item_tower")(f_items)  # shared
    x = keras.layers.Concatenate()([emb, tower])
    x = keras_rs.layers.FeatureCross(name="cross")(x, x)
    q = keras.layers.Dense(12, name="query_tower")(f_query)
    pooled = keras.layers.GlobalAveragePooling1D()(x)
    dot = keras_rs.layers.DotInteraction()([q, pooled])  # query-level interaction
    qs = keras.layers.Dense(1, name="query_score")(keras.layers.Concatenate()([dot, q]))
    s = keras.layers.Reshape((L,))(keras.layers.Dense(1, name="score")(x))
    s = keras.layers.Add()([s, qs])
    m = keras.Input((L,), name="mask")
    inputs = {"items": f_items, "item_id": f_ids, "query_feat": f_query}
    if loss_name == "softmax_ce":
        inputs["mask"] = m
        s = keras.layers.Lambda(lambda t: t[0] + (t[1] - 1.0) * 1e9)([s, m])
        loss = keras.losses.CategoricalCrossentropy(from_logits=True)
        y = labels
    else:
        loss = getattr(keras_rs.losses, loss_name)()
        y = labels  # label -1: padding, a mask the loss takes
    model = keras.Model(inputs, s)
    model.compile(keras.optimizers.Adam(1e-2), loss)
    data = {"items": items, "item_id": item_ids, "query_feat": query_feat}
    if loss_name == "softmax_ce":
        data["mask"] = mask.astype("float32")
    x_ids = keras_sie.with_ids(data, list_axis=1, mask=mask)
    log_dir = str(tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sie = _fit(model, x_ids, y, epochs=2, log_dir=log_dir,
                   features=["items", "item_emb", "query_feat"])
    assert not _coupling_warnings(caught), [str(w.message) for w in caught]
    imp = sie.importance
    assert np.isfinite(imp).all() and imp.shape == (N * L,)
    np.testing.assert_array_equal(sie.visits.reshape(N, L), mask.astype(np.int64))
    # (A pairwise list whose real items share one grade has no pair: zero gradient.)
    assert (imp.reshape(N, L)[mask] > 0).mean() > 0.5 and (imp.reshape(N, L)[~mask] == 0).all()
    # The query-level feature goes to the per-query record only.
    assert sie.feature_importance["query_feat"] == 0.0
    assert sie.queries.feature_importance["query_feat"] > 0.0
    names = list(sie.record.epoch().feature_names)
    item_groups = [names.index("items"), names.index("item_emb")]
    np.testing.assert_allclose(sie.queries.epoch().feature_sums[item_groups],
                               sie.record.epoch().feature_sums[item_groups], rtol=1e-4)
    # load, to_sample_weight [N, L], select, export and the CLI.
    loaded = keras_sie.load(log_dir)
    np.testing.assert_array_equal(loaded.importance, sie.importance)
    np.testing.assert_array_equal(loaded.query_importance, sie.query_importance)
    w = keras_sie.to_sample_weight(sie, for_keys=x_ids["sample_id"]["item"], epoch=None)
    assert w.shape == (N, L) and (w[~mask] == 0).all() and (w[mask] > 0).all()  # smoothing
    top = keras_sie.select(loaded, top=10, epoch=None)
    assert mask.reshape(-1)[top].all()
    out = keras_sie.export_run(loaded, str(tmp_path / "items.csv"))
    with open(out) as f:
        assert "query" in f.readline().strip().split(",")
    keras_sie.export_run(loaded, str(tmp_path / "queries.npz"), queries=True)
    with np.load(str(tmp_path / "queries.npz")) as z:
        assert z["importance"].shape == (2, N)
    from keras_sie import cli

    assert cli.main(["report", log_dir, "--queries", "--json"]) == 0
    assert cli.main(["export", log_dir, "--queries", "--format", "csv",
                     "-o", str(tmp_path / "q.csv")]) == 0
    assert os.path.isdir(os.path.join(log_dir, "keras_sie", "ranking"))


def test_row_ids_with_list_model_are_unchanged():
    """Without list ids the default single-row path scores whole lists, as before."""
    items, mask, labels = _lists(seed=4)
    model = _scorer(masked=True)
    model.compile(keras.optimizers.SGD(0.0),
                  keras.losses.CategoricalCrossentropy(from_logits=True))
    sie = _fit(model, keras_sie.with_ids({"items": items, "mask": mask.astype("float32")}),
               labels, features=["items"])
    expected = _softmax_ce_oracle(model, items, mask, labels).sum(axis=1)
    assert sie.record.list_size == 0 and sie.queries is None
    assert_close_to_max(sie.record.epoch().sums, expected)


def test_list_ids_refuse_signals():
    items, _, labels = _lists(seed=5)
    model = _scorer(masked=False)
    model.compile("sgd", keras.losses.CategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="ranked lists"):
        _fit(model, keras_sie.with_ids({"items": items}, list_axis=1), labels,
             signals=("loss",))


def test_mirrored_equals_single_device_for_lists(tmp_path):
    """MirroredStrategy over 2 logical CPUs gives the single-device per-item scores."""
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ranking_worker.py")
    outs = {}
    for mode in ("single", "mirrored"):
        path = str(tmp_path / f"{mode}.npz")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        subprocess.run([sys.executable, worker, mode, path], env=env, timeout=240,
                       check=True, capture_output=True)
        with np.load(path) as z:
            outs[mode] = {k: z[k] for k in z.files}
    a, b = outs["single"], outs["mirrored"]
    assert int(b["replicas"]) == 2
    np.testing.assert_array_equal(a["visits"], b["visits"])
    np.testing.assert_array_equal(a["query_visits"], b["query_visits"])
    np.testing.assert_array_equal(a["item_query"], b["item_query"])
    assert_close_to_max(b["sums"], a["sums"])
    assert_close_to_max(b["query_sums"], a["query_sums"])
