"""Model families: each score checked against a per-sample oracle.

The oracle runs the model on one sample at a time with its own
`tf.GradientTape` (frozen weights: learning rate 0) and sums |gradient| at the
float inputs and at the Embedding outputs (padding positions masked).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close_to_max, linear_oracle, linear_problem

import keras_sie


def _take(x, i):
    return tf.nest.map_structure(lambda v: tf.constant(v[i:i + 1]), x)


def oracle(model, x, y, loss_of=None):
    """sum over float inputs and Embedding outputs of |d loss_i / d input|, per sample.

    `loss_of(y_i, y_pred_i)` defaults to the compiled loss on a batch of one.
    """
    embeddings = [layer for layer in model._flatten_layers(include_self=False)
                  if isinstance(layer, keras.layers.Embedding)]
    n = len(tf.nest.flatten(y)[0])
    out = np.zeros(n)
    for i in range(n):
        xi, yi = _take(x, i), tf.nest.map_structure(lambda v, i=i: v[i:i + 1], y)
        captured = []
        for layer in embeddings:
            def call(inputs, *a, __orig=layer.call, __layer=layer, __cap=captured, **k):
                o = __orig(inputs, *a, **k)
                mask = tf.not_equal(inputs, 0) if __layer.mask_zero else None
                __cap.append((o, mask))
                return o
            object.__setattr__(layer, "call", call)
        floats = [leaf for leaf in tf.nest.flatten(xi) if leaf.dtype.is_floating]
        try:
            with tf.GradientTape() as tape:
                for leaf in floats:
                    tape.watch(leaf)
                y_pred = model(xi, training=True)
                if loss_of is None:
                    loss = model.compute_loss(x=xi, y=yi, y_pred=y_pred, training=True)
                else:
                    loss = loss_of(yi, y_pred)
        finally:
            for layer in embeddings:
                object.__delattr__(layer, "call")
        grads = tape.gradient(loss, floats + [o for o, _ in captured])
        total = sum(np.abs(g.numpy()).sum() for g in grads[:len(floats)] if g is not None)
        for (o, mask), g in zip(captured, grads[len(floats):]):
            if g is None:
                continue
            g = np.abs(tf.convert_to_tensor(g).numpy())
            if mask is not None:
                g = g * mask.numpy()[..., None]
            total += g.sum()
        out[i] = total
    return out


def _check(model, x, y, rel=2e-5, **fit_kw):
    sie = keras_sie.SampleImportance(verbose=0)
    model.fit(keras_sie.with_ids(x), y, batch_size=fit_kw.pop("batch_size", 8), shuffle=True,
              callbacks=[sie], verbose=0, **fit_kw)
    ref = oracle(model, x, y)
    assert_close_to_max(sie.importance, ref / ref.sum(), rel=rel)
    assert (sie.visits == 1).all()
    return sie


def test_cnn_pixel_gradients():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(21, 8, 8, 1)).astype("float32")  # 21 = 2*8 + 5: partial batch
    y = rng.integers(0, 3, size=(21,))
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(3, activation="softmax"),
    ])
    model.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    _check(model, x, y)


def _history_data(n=19, length=6, vocab=30, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=(n, length))
    lengths = rng.integers(2, length + 1, size=n)
    tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0  # right padding
    y = (rng.random((n, 1)) > 0.5).astype("float32")
    return tokens.astype("int64"), y


@pytest.mark.parametrize("cell", [keras.layers.LSTM, keras.layers.GRU])
def test_recurrent_model_over_item_ids_with_padding(cell):
    tokens, y = _history_data()
    inp = keras.Input((6,), dtype="int64")
    h = keras.layers.Embedding(30, 8, mask_zero=True)(inp)
    h = cell(5)(h)
    model = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(h))
    model.compile(keras.optimizers.SGD(0.0), "binary_crossentropy")
    _check(model, tokens, y)


def test_attention_block_with_padding_mask():
    tokens, y = _history_data(seed=1)
    inp = keras.Input((6,), dtype="int64")
    e = keras.layers.Embedding(30, 8, mask_zero=True)(inp)
    a = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(e, e)
    h = keras.layers.LayerNormalization()(keras.layers.Add()([e, a]))
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(h))
    model.compile(keras.optimizers.SGD(0.0), "binary_crossentropy")
    sie = _check(model, tokens, y)
    # Padded positions really carry no weight: changing the padding token's
    # embedding row leaves every score unchanged.
    emb = model.layers[1]
    w = emb.get_weights()[0]
    w[0] = 3.0
    emb.set_weights([w])
    again = keras_sie.SampleImportance(verbose=0)
    model.fit(keras_sie.with_ids(tokens), y, batch_size=8, callbacks=[again], verbose=0)
    assert_close_to_max(again.importance, sie.importance, rel=1e-5)


def _two_head_model():
    items = keras.Input((), dtype="int64", name="item")
    num = keras.Input((3,), name="num")
    e = keras.layers.Embedding(15, 4)(items)
    shared = keras.layers.Dense(6, activation="tanh")(keras.layers.Concatenate()([e, num]))
    click = keras.layers.Dense(1, activation="sigmoid", name="click")(shared)
    buy = keras.layers.Dense(1, activation="sigmoid", name="buy")(shared)
    model = keras.Model({"item": items, "num": num}, {"click": click, "buy": buy})
    model.compile(keras.optimizers.SGD(0.0),
                  loss={"click": "binary_crossentropy", "buy": "binary_crossentropy"},
                  loss_weights={"click": 1.0, "buy": 3.0})
    return model


def test_multi_task_total_and_per_task_scores(tmp_path):
    rng = np.random.default_rng(2)
    n = 27
    x = {"item": rng.integers(0, 15, n).astype("int64"),
         "num": rng.normal(size=(n, 3)).astype("float32")}
    y = {"click": (rng.random((n, 1)) > 0.4).astype("float32"),
         "buy": (rng.random((n, 1)) > 0.8).astype("float32")}
    model = _two_head_model()
    sie = keras_sie.SampleImportance(log_dir=str(tmp_path), verbose=0)
    model.fit(keras_sie.with_ids(x), y, batch_size=8, shuffle=True, callbacks=[sie], verbose=0)
    total = oracle(model, x, y)
    assert_close_to_max(sie.importance, total / total.sum(), rel=2e-5)
    bce = keras.losses.BinaryCrossentropy()
    for name, weight in (("click", 1.0), ("buy", 3.0)):
        ref = oracle(model, x, y, loss_of=lambda yi, yp, k=name, w=weight: w * bce(yi[k], yp[k]))
        assert_close_to_max(sie.task_importance[name], ref / ref.sum(), rel=2e-5)
    run = keras_sie.load(str(tmp_path))
    assert sorted(run.task_importance) == ["buy", "click"]
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(str(tmp_path / "keras_sie"),
                                             size_guidance={"tensors": 0})
    acc.Reload()
    assert {"tasks/click/distribution", "tasks/buy/gini"} <= set(acc.Tags()["tensors"])


class SubclassedRanker(keras.Model):
    def __init__(self):
        super().__init__()
        self.emb = keras.layers.Embedding(12, 3)
        self.hidden = keras.layers.Dense(5, activation="relu")
        self.out = keras.layers.Dense(1)

    def call(self, inputs):
        h = keras.ops.concatenate([self.emb(inputs["cat"]), inputs["num"]], axis=-1)
        return self.out(self.hidden(h))


def test_subclassed_model_with_custom_call():
    rng = np.random.default_rng(4)
    x = {"cat": rng.integers(0, 12, 22).astype("int64"),
         "num": rng.normal(size=(22, 2)).astype("float32")}
    y = rng.normal(size=(22, 1)).astype("float32")
    model = SubclassedRanker()
    model.compile(keras.optimizers.SGD(0.0), "mse")
    sie = _check(model, x, y)
    # The auto-named Embedding is reported under the input that feeds it.
    assert set(sie.feature_importance) == {"num", "cat"}


class CustomStepModel(keras.Model):
    """A user model with its own train_step that records importance in one line."""

    def train_step(self, data):
        x, y = data
        x, ids = keras_sie.split_ids(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
        grads = tape.gradient(loss, self.trainable_weights + [x])
        keras_sie.record(self, ids, grads[-1])
        self.optimizer.apply_gradients(zip(grads[:-1], self.trainable_weights))
        return {"loss": loss}


def test_custom_train_step_records_with_one_line():
    x, y = linear_problem(n=37)
    inp = keras.Input((4,))
    model = CustomStepModel(inp, keras.layers.Dense(1)(inp))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    sie = keras_sie.SampleImportance(verbose=0)
    model.fit(keras_sie.with_ids(x), y, batch_size=8, shuffle=True, callbacks=[sie], verbose=0)
    s = linear_oracle(model, x, y)
    assert_close_to_max(sie.importance, s / s.sum(), rel=1e-5)


def test_custom_train_step_without_record_is_a_clear_error():
    class NoRecord(keras.Model):
        def train_step(self, data):
            x, y = data
            x, _ = keras_sie.split_ids(x)
            return super().train_step((x, y))

    x, y = linear_problem(n=16)
    inp = keras.Input((4,))
    model = NoRecord(inp, keras.layers.Dense(1)(inp))
    model.compile("sgd", "mse")
    with pytest.raises(RuntimeError, match="keras_sie.record"):
        model.fit(keras_sie.with_ids(x), y, callbacks=[keras_sie.SampleImportance(verbose=0)],
                  verbose=0)


def test_batchnorm_in_training_mode_warns_what_the_score_means():
    x, y = linear_problem(n=32)
    model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(),
                              keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.0), "mse")
    with pytest.warns(UserWarning, match="samples of a batch are coupled.*outputs"):
        model.fit(keras_sie.with_ids(x), y, callbacks=[keras_sie.SampleImportance(verbose=0)],
                  verbose=0)
    # Frozen BatchNormalization runs in inference mode: no warning, exact scores.
    model.layers[0].trainable = False
    model.compile(keras.optimizers.SGD(0.0), "mse")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _check(model, x, y)
