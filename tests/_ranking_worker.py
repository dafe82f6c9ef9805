"""Subprocess side of `test_ranking.test_mirrored_equals_single_device_for_lists`.

    python _ranking_worker.py single|mirrored OUT.npz

Trains a small list scorer (listwise softmax CE, padded lists) with
`keras_sie.with_ids(x, list_axis=1)` under no strategy or a MirroredStrategy
over two logical CPUs and writes the per-item and per-query sums.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import tensorflow as tf

N, L, D = 44, 4, 3  # a partial last batch of 12 lists, 6 per replica


def main(mode: str, out: str) -> None:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    import keras_sie

    rng = np.random.default_rng(0)
    items = rng.normal(size=(N, L, D)).astype("float32")
    lengths = rng.integers(2, L + 1, size=N)
    mask = np.arange(L)[None, :] < lengths[:, None]
    labels = np.zeros((N, L), "float32")
    labels[np.arange(N), (rng.random(N) * lengths).astype(int)] = 1.0
    w1 = rng.normal(size=(D, 8)).astype("float32")
    w2 = rng.normal(size=(8, 1)).astype("float32")
    strategy = (tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]) if mode == "mirrored"
                else tf.distribute.get_strategy())
    with strategy.scope():
        f = keras.Input((L, D), name="items")
        m = keras.Input((L,), name="mask")
        h = keras.layers.Dense(8, activation="tanh", name="h")(f)
        s = keras.layers.Reshape((L,))(keras.layers.Dense(1, name="s")(h))
        s = keras.layers.Lambda(lambda t: t[0] + (t[1] - 1.0) * 1e9)([s, m])
        model = keras.Model({"items": f, "mask": m}, s)
        model.get_layer("h").set_weights([w1, np.zeros(8, "float32")])
        model.get_layer("s").set_weights([w2, np.zeros(1, "float32")])
        model.compile(keras.optimizers.SGD(0.05),
                      keras.losses.CategoricalCrossentropy(from_logits=True))
    keras_sie.prepare_distributed(model)
    sie = keras_sie.SampleImportance(verbose=0, features=["items"])
    x = keras_sie.with_ids({"items": items, "mask": mask.astype("float32")}, list_axis=1,
                           mask=mask)
    model.fit(x, labels, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[sie])
    e = sie.record.epoch()
    q = sie.queries.epoch()
    np.savez(out, sums=e.sums, visits=e.visits, query_sums=q.sums, query_visits=q.visits,
             item_query=sie.record.item_queries,
             replicas=np.array(strategy.num_replicas_in_sync))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
