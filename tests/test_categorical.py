"""Categorical inputs, arbitrary sample keys, per-feature importance, mixed precision."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close_to_max

import keras_sie

N = 70


def _data(seed=0):
    rng = np.random.default_rng(seed)
    cat = rng.integers(1, 20, size=(N,)).astype("int64")
    hist = rng.integers(0, 20, size=(N, 5)).astype("int64")
    hist[:, 3:] = 0  # padding
    num = rng.normal(size=(N, 3)).astype("float32")
    y = (rng.random((N, 1)) > 0.5).astype("float32")
    return {"cat": cat, "hist": hist, "num": num}, y


def _model(jit_compile=False, lr=0.0):
    ic = keras.Input((), dtype="int64", name="cat")
    ih = keras.Input((5,), dtype="int64", name="hist")
    inum = keras.Input((3,), name="num")
    e1 = keras.layers.Embedding(20, 4, name="cat_emb")(ic)
    e2 = keras.layers.Embedding(20, 4, mask_zero=True, name="hist_emb")(ih)
    pooled = keras.layers.GlobalAveragePooling1D()(e2)
    h = keras.layers.Concatenate()([e1, pooled, inum])
    h = keras.layers.Dense(8, activation="tanh")(h)
    out = keras.layers.Dense(1, activation="sigmoid")(h)
    model = keras.Model({"cat": ic, "hist": ih, "num": inum}, out)
    model.compile(keras.optimizers.SGD(lr), "binary_crossentropy", jit_compile=jit_compile)
    return model


def _oracle(model, x, y):
    """Per-sample sum |d loss_i / d input| with a separate tape per sample (frozen weights).

    Gradients are taken at the Embedding outputs (padding positions masked)
    and at the float input.
    """
    layers = {name: model.get_layer(name) for name in ("cat_emb", "hist_emb")}
    per_sample = np.zeros(len(y))
    per_feature = {"num": 0.0, "cat_emb": 0.0, "hist_emb": 0.0}
    for i in range(len(y)):
        xi = {k: tf.constant(v[i:i + 1]) for k, v in x.items()}
        captured = {}
        for name, layer in layers.items():
            def call(inputs, *a, __orig=layer.call, __name=name, __cap=captured, **k):
                out = __orig(inputs, *a, **k)
                __cap[__name] = out
                return out
            object.__setattr__(layer, "call", call)
        try:
            with tf.GradientTape() as tape:
                tape.watch(xi["num"])
                loss = tf.reduce_mean(keras.losses.binary_crossentropy(y[i:i + 1], model(xi, training=True)))
        finally:
            for layer in layers.values():
                object.__delattr__(layer, "call")
        g_num, g_cat, g_hist = tape.gradient(loss, [xi["num"], captured["cat_emb"], captured["hist_emb"]])
        parts = {
            "num": np.abs(g_num.numpy()).sum(),
            "cat_emb": np.abs(g_cat.numpy()).sum(),
            "hist_emb": (np.abs(g_hist.numpy()) * (x["hist"][i] != 0)[None, :, None]).sum(),
        }
        per_sample[i] = sum(parts.values())
        for k, v in parts.items():
            per_feature[k] += v
    return per_sample, per_feature


def test_embedding_output_gradient_matches_independent_tape():
    x, y = _data()
    model = _model()
    sie = keras_sie.SampleImportance(verbose=0)
    model.fit(keras_sie.with_ids(x), y, batch_size=16, shuffle=True, callbacks=[sie], verbose=0)
    ref, ref_features = _oracle(model, x, y)
    assert_close_to_max(sie.importance, ref / ref.sum(), rel=2e-5)
    total = sum(ref_features.values())
    assert set(sie.feature_importance) == {"num", "cat_emb", "hist_emb"}
    for name, share in sie.feature_importance.items():
        assert share == pytest.approx(ref_features[name] / total, rel=1e-5)


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_a_fixed_batch_size_pipeline_is_scored_at_the_embeddings(drop_remainder):
    """drop_remainder=True (or N a multiple of the batch) gives static batch shapes."""
    x, y = _data()
    model = _model()
    ds = tf.data.Dataset.from_tensor_slices((dict(x, sample_id=np.arange(N)), y)).shuffle(
        N, seed=2).batch(14, drop_remainder=drop_remainder)  # N = 70 = 5 x 14
    assert ds.element_spec[1].shape[0] == (14 if drop_remainder else None)
    sie = keras_sie.SampleImportance(num_samples=N, verbose=0)
    model.fit(ds, callbacks=[sie], verbose=0)
    ref, ref_features = _oracle(model, x, y)
    assert (sie.visits == 1).all()
    assert_close_to_max(sie.importance, ref / ref.sum(), rel=2e-5)
    total = sum(ref_features.values())
    for name, share in sie.feature_importance.items():
        assert share == pytest.approx(ref_features[name] / total, rel=1e-5)


def test_padding_positions_contribute_nothing():
    x, y = _data()
    model = _model()
    x2 = dict(x)
    # Change only the embedding rows at padded positions: their gradient is
    # masked, so the scores must not move.
    sie_a = keras_sie.SampleImportance(verbose=0)
    model.fit(keras_sie.with_ids(x), y, batch_size=16, callbacks=[sie_a], verbose=0)
    emb = model.get_layer("hist_emb")
    w = emb.get_weights()[0]
    w[0] += 5.0  # the padding id's row
    emb.set_weights([w])
    sie_b = keras_sie.SampleImportance(verbose=0)
    model.fit(keras_sie.with_ids(x2), y, batch_size=16, callbacks=[sie_b], verbose=0)
    assert_close_to_max(sie_a.importance, sie_b.importance, rel=1e-5)


def test_xla_embedding_model_matches_default():
    x, y = _data()
    ref_model = _model()
    ref = keras_sie.SampleImportance(verbose=0)
    ref_model.fit(keras_sie.with_ids(x), y, batch_size=16, callbacks=[ref], verbose=0)
    model = _model(jit_compile=True)
    model.set_weights(ref_model.get_weights())
    sie = keras_sie.SampleImportance(verbose=0)
    model.fit(keras_sie.with_ids(x), y, batch_size=16, callbacks=[sie], verbose=0)
    assert model.jit_compile is True
    assert_close_to_max(sie.importance, ref.importance, rel=1e-5)


@pytest.mark.parametrize("kind", ["int64", "string"])
def test_arbitrary_keys_land_on_the_right_samples(kind, tmp_path):
    x, y = _data()
    model = _model()
    rng = np.random.default_rng(5)
    raw = rng.choice(10**12, size=N, replace=False).astype("int64")
    keys = raw if kind == "int64" else np.array([f"imp-{k:x}" for k in raw])
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path), key_mapping="hash", verbose=0)
    ds = tf.data.Dataset.from_tensor_slices((dict(x, sample_id=keys), y)).shuffle(N, seed=1).batch(16)
    with pytest.raises(ValueError, match="num_samples"):
        model.fit(ds, callbacks=[sie], verbose=0)
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path), key_mapping="hash", num_samples=N,
                                     verbose=0)
    model.fit(ds, epochs=2, callbacks=[sie], verbose=0)
    ref, _ = _oracle(model, x, y)
    ref = ref / ref.sum()
    slot_of = {k: i for i, k in enumerate(sie.keys.tolist())}
    got = np.array([sie.importance[slot_of[k]] for k in keys.tolist()])
    assert_close_to_max(got, ref, rel=2e-5)
    # The original keys survive in the top-k table and in load().
    best = int(np.argmax(ref))
    assert sie.top_k(1)[0][0] == keys.tolist()[best]
    run = keras_sie.load(str(tmp_path))
    assert run.top_k(1)[0][0] == keys.tolist()[best]
    assert sorted(run.keys.tolist()) == sorted(keys.tolist())


def test_capacity_overflow_stops_counting_new_keys_and_says_how_many():
    x, y = _data()
    model = _model()
    keys = np.arange(N, dtype="int64") * 7 + 3
    sie = keras_sie.SampleImportance(key_mapping="hash", num_samples=50, verbose=0)
    with pytest.warns(RuntimeWarning, match=r"key buffer is full \(50 keys\); 20 rows"):
        model.fit(dict(x, sample_id=keys), y, batch_size=10, shuffle=False, callbacks=[sie],
                  verbose=0)
    assert sie.faults["dropped_key_rows"] == 20
    assert (sie.visits == 1).all()  # the first 50 keys, each counted once
    assert sie.keys.tolist() == keys[:50].tolist()


def test_mixed_precision_matches_float32():
    x, y = _data()
    ref_model = _model()
    ref = keras_sie.SampleImportance(verbose=0)
    ref_model.fit(keras_sie.with_ids(x), y, batch_size=16, callbacks=[ref], verbose=0)
    weights = ref_model.get_weights()
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = _model()
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    model.set_weights(weights)
    sie = keras_sie.SampleImportance(verbose=0)
    model.fit(keras_sie.with_ids(x), y, batch_size=16, callbacks=[sie], verbose=0)
    # Loss scale (32768 at start) is divided out; float16 forward pass -> ~1e-3.
    assert_close_to_max(sie.importance, ref.importance, rel=5e-3)
    assert sie.importance.dtype == np.float32


def test_features_selects_inputs_and_embeddings():
    x, y = _data()
    model = _model()
    sie = keras_sie.SampleImportance(features=["num", "hist"], verbose=0)
    model.fit(keras_sie.with_ids(x), y, batch_size=16, callbacks=[sie], verbose=0)
    # "hist" is an integer input: it is scored at the Embedding that looks it up.
    assert set(sie.feature_importance) == {"num", "hist_emb"}


def test_integer_input_without_embedding_is_a_clear_error():
    rng = np.random.default_rng(0)
    xi = keras.Input((2,), dtype="int64", name="ints")
    xf = keras.Input((2,), name="floats")
    h = keras.layers.Concatenate()([keras.ops.cast(xi, "float32"), xf])
    model = keras.Model({"ints": xi, "floats": xf}, keras.layers.Dense(1)(h))
    model.compile("sgd", "mse")
    x = {"ints": rng.integers(0, 5, (32, 2)), "floats": rng.normal(size=(32, 2)).astype("float32")}
    y = rng.normal(size=(32, 1)).astype("float32")
    with pytest.raises(ValueError, match="'ints'.*no Embedding"):
        model.fit(keras_sie.with_ids(x), y, callbacks=[keras_sie.SampleImportance(verbose=0)],
                  verbose=0)
    sie = keras_sie.SampleImportance(features=["floats"], verbose=0)
    model.fit(keras_sie.with_ids(x), y, callbacks=[sie], verbose=0)
    assert list(sie.feature_importance) == ["floats"]


@pytest.mark.parametrize("kind", ["int64", "string"])
def test_hash_keys_under_xla_equal_the_index_run(kind):
    """jit_compile=True: keys are mapped to slots before the compiled step."""
    x, y = _data()
    raw = np.random.default_rng(3).choice(10**12, size=N, replace=False).astype("int64")
    keys = raw if kind == "int64" else np.array([f"req-{k:x}:item" for k in raw])

    def run(ids, mapping):
        model = _model(jit_compile=True, lr=0.05)
        model.set_weights(reference_weights)
        sie = keras_sie.SampleImportance(key_mapping=mapping, num_samples=N, verbose=0)
        ds = tf.data.Dataset.from_tensor_slices((dict(x, sample_id=ids), y)).shuffle(
            N, seed=4).batch(16)
        model.fit(ds, epochs=2, callbacks=[sie], verbose=0)
        return sie, model

    keras.utils.set_random_seed(0)
    reference_weights = _model(lr=0.05).get_weights()
    index, index_model = run(np.arange(N, dtype="int64"), "index")
    hashed, hashed_model = run(keys, "hash")
    assert hashed.key_mapping == "hash"
    slot_of = {k: i for i, k in enumerate(hashed.keys.tolist())}
    for epoch in (0, 1):
        got = np.array([hashed.history[epoch][slot_of[k]] for k in keys.tolist()])
        assert_close_to_max(got, index.history[epoch], rel=1e-5)
    assert (hashed.visits[: N] == 1).all()
    for a, b in zip(hashed_model.get_weights(), index_model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
