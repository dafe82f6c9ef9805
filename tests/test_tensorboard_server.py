"""What a user sees in TensorBoard: read back with TensorBoard itself.

One real `fit` (dict inputs: a float input and an Embedding, 3 epochs) writes
the run; the tests read it back (1) with TensorBoard's own event reader and
(2) through the HTTP data endpoints of a real `tensorboard` server started on
127.0.0.1, and check every value against what the callback computed.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator as ea

import keras_sie
from keras_sie import scores as scores_lib
from keras_sie.datamap import render_data_map

RUN = "keras_sie"  # the run folder under log_dir
EPOCHS = 3
N = 300
BUCKETS = 60  # summaries.py logs the distribution with 60 buckets
SUMMARY_TAGS = [
    "importance/gini",
    "importance/top1pct_share",
    "importance/effective_sample_size",
    "importance/entropy",
    "importance/visited_samples",
    "importance/unvisited_samples",
]
FAULT_TAGS = ["faults/nonfinite_rows", "faults/invalid_id_rows", "faults/dropped_key_rows",
              "faults/skipped_steps"]
FEATURES = ["num", "cat_emb"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real fit with a log_dir; returns (log_dir, expected values per epoch)."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(7)
    rng = np.random.default_rng(0)
    x = {
        "num": rng.normal(size=(N, 3)).astype("float32"),
        "cat": rng.integers(0, 5, size=(N, 1)),
    }
    y = (x["num"][:, 0] + 0.3 * rng.normal(size=N) > 0).astype("float32")
    num = keras.Input((3,), name="num")
    cat = keras.Input((1,), name="cat", dtype="int32")
    emb = keras.layers.Flatten()(keras.layers.Embedding(5, 2, name="cat_emb")(cat))
    h = keras.layers.Dense(8, activation="relu")(keras.layers.Concatenate()([num, emb]))
    model = keras.Model({"num": num, "cat": cat}, keras.layers.Dense(1, activation="sigmoid")(h))
    model.compile(keras.optimizers.Adam(0.01), "binary_crossentropy")
    log_dir = tmp_path_factory.mktemp("tb") / "logs"
    sie = keras_sie.SampleImportance(log_dir=str(log_dir), top_k=5, verbose=0, data_map=True)
    model.fit(keras_sie.with_ids(x), y, epochs=EPOCHS, batch_size=32, callbacks=[sie], verbose=0)

    saved = keras_sie.load(str(log_dir))
    assert saved.epochs == list(range(EPOCHS))
    expected = {}
    for e in saved.epochs:
        imp, vis = saved.epoch(e).importance, saved.epoch(e).visits
        assert (vis == 1).all()  # one full pass per epoch
        rel = (imp[vis > 0] * int((vis > 0).sum())).astype(np.float32)
        expected[e] = {
            "summary": scores_lib.summarize(imp, vis),
            "features": saved.epoch(e).feature_importance,
            "top": saved.top_k(5, epoch=e),
            "rel": rel,
            "image": render_data_map(sie.history, vis, e),
        }
    assert expected[EPOCHS - 1]["summary"] == pytest.approx(sie.summary)
    return log_dir, expected


def _histogram_oracle(rel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bucket edges and counts exactly as tf.summary.histogram computes them."""
    d = rel.astype(np.float64)
    lo, hi = d.min(), d.max()
    idx = np.minimum(np.floor((d - lo) / ((hi - lo) / BUCKETS)).astype(int), BUCKETS - 1)
    return np.linspace(lo, hi, BUCKETS + 1), np.bincount(idx, minlength=BUCKETS)


def _check_histogram(buckets, rel) -> None:
    buckets = np.asarray(buckets, dtype=np.float64)  # [[left, right, count], ...]
    edges, counts = _histogram_oracle(rel)
    assert buckets.shape == (BUCKETS, 3)
    assert buckets[:, 2].sum() == rel.size  # every visited sample is counted
    np.testing.assert_array_equal(buckets[:, 2], counts)
    np.testing.assert_allclose(buckets[:, 0], edges[:-1], rtol=1e-12)
    np.testing.assert_allclose(buckets[:, 1], edges[1:], rtol=1e-12)


def _top_k_rows(markdown: str) -> list[list[str]]:
    lines = markdown.strip().splitlines()
    assert lines[0].startswith("| rank | sample key | importance |"), lines[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


# ------------------------------------------------------ TensorBoard's own reader
def test_event_files_hold_every_tag_with_the_computed_values(run):
    log_dir, expected = run
    acc = ea.EventAccumulator(str(log_dir / RUN), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    plugin = {tag: acc.SummaryMetadata(tag).plugin_data.plugin_name for tag in acc.Tags()["tensors"]}
    assert plugin == {
        "importance/distribution": "histograms",
        **{t: "scalars" for t in SUMMARY_TAGS + FAULT_TAGS},
        "importance/top_k": "text",
        **{f"features/{f}": "scalars" for f in FEATURES},
        "features/table": "text",
        "importance/data_map": "images",
    }

    def by_step(tag):
        events = acc.Tensors(tag)
        assert [ev.step for ev in events] == list(range(EPOCHS)), tag
        return [tf.make_ndarray(ev.tensor_proto) for ev in events]

    for tag in SUMMARY_TAGS:
        name = tag.split("/")[1]
        got = [float(v) for v in by_step(tag)]
        assert got == [float(np.float32(expected[e]["summary"][name])) for e in range(EPOCHS)]
    for tag in FAULT_TAGS:
        assert [float(v) for v in by_step(tag)] == [0.0] * EPOCHS
    for f in FEATURES:
        got = [float(v) for v in by_step(f"features/{f}")]
        want = [expected[e]["features"][f] for e in range(EPOCHS)]
        np.testing.assert_allclose(got, want, rtol=1e-6)
    for e, hist in enumerate(by_step("importance/distribution")):
        _check_histogram(hist, expected[e]["rel"])
    for e, text in enumerate(by_step("importance/top_k")):
        rows = _top_k_rows(text.item().decode())
        top = expected[e]["top"]
        assert [r[0] for r in rows] == [str(i) for i in range(1, len(top) + 1)]
        assert [r[1] for r in rows] == [str(k) for k, _, _ in top]  # keys, best first
        np.testing.assert_allclose([float(r[2]) for r in rows], [s for _, s, _ in top], rtol=1e-5)
        assert [int(r[4]) for r in rows] == [v for _, _, v in top]
    for e, text in enumerate(by_step("features/table")):
        md = text.item().decode()
        for f, share in expected[e]["features"].items():
            assert f"| {f} | {share:.4f}" in md
    for e, image in enumerate(by_step("importance/data_map")):
        width, height, png = image  # the image plugin's layout: [w, h, png...]
        decoded = tf.io.decode_png(png).numpy()
        want = expected[e]["image"]
        assert (int(width), int(height)) == (want.shape[1], want.shape[0])
        np.testing.assert_array_equal(decoded, want)


# ------------------------------------------------------ a real TensorBoard server
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tensorboard_command() -> list[str]:
    exe = Path(sys.executable).with_name("tensorboard")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "tensorboard.main"]


def _get(base: str, route: str, **params) -> bytes:
    url = f"{base}{route}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def _json(base: str, route: str, **params):
    return json.loads(_get(base, route, **params))


def test_tensorboard_server_serves_run_scalars_histogram_text_and_image(run, tmp_path):
    log_dir, expected = run
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = _tensorboard_command() + [
        "--logdir", str(log_dir), "--host", "127.0.0.1", "--port", str(port),
        "--load_fast=false", "--reload_interval", "2",
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    server_log = tmp_path / "tensorboard.log"
    with open(server_log, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        # Bounded wait: the server is up and has read the last event (epoch 2's image).
        deadline = time.monotonic() + 120
        images = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited with {proc.returncode}:\n{server_log.read_text()}")
            try:
                images = _json(base, "/data/plugin/images/images", run=RUN,
                               tag="importance/data_map", sample=0)
                if len(images) == EPOCHS:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"tensorboard not ready within 120 s:\n{server_log.read_text()}")

        assert RUN in _json(base, "/data/runs")
        listing = _json(base, "/data/plugins_listing")
        for name in ("scalars", "histograms", "distributions", "text", "images"):
            assert listing[name]["enabled"], name

        scalar_tags = _json(base, "/data/plugin/scalars/tags")[RUN]
        assert set(scalar_tags) == set(SUMMARY_TAGS + FAULT_TAGS + [f"features/{f}" for f in FEATURES])
        for tag in SUMMARY_TAGS:
            series = _json(base, "/data/plugin/scalars/scalars", run=RUN, tag=tag)
            name = tag.split("/")[1]
            assert [s[1] for s in series] == list(range(EPOCHS))
            assert [s[2] for s in series] == [
                float(np.float32(expected[e]["summary"][name])) for e in range(EPOCHS)
            ]
        for f in FEATURES:
            series = _json(base, "/data/plugin/scalars/scalars", run=RUN, tag=f"features/{f}")
            np.testing.assert_allclose(
                [s[2] for s in series], [expected[e]["features"][f] for e in range(EPOCHS)],
                rtol=1e-6,
            )

        hist = _json(base, "/data/plugin/histograms/histograms", run=RUN,
                     tag="importance/distribution")
        assert [h[1] for h in hist] == list(range(EPOCHS))
        for e, (_, _, buckets) in enumerate(hist):
            _check_histogram(buckets, expected[e]["rel"])

        text = _json(base, "/data/plugin/text/text", run=RUN, tag="importance/top_k")
        assert [t["step"] for t in text] == list(range(EPOCHS))
        for e, t in enumerate(text):
            html = t["text"]
            assert "<table>" in html  # markdown rendered as a table
            cells = re.findall(r"<td[^>]*>(.*?)</td>", html)
            top = expected[e]["top"]
            assert cells[:2] == ["1", str(top[0][0])]  # rank 1 is the top-1 id
            assert cells[5 * (len(top) - 1) + 1] == str(top[-1][0])
        table = _json(base, "/data/plugin/text/text", run=RUN, tag="features/table")
        assert "cat_emb" in table[-1]["text"] and "num" in table[-1]["text"]

        assert [i["step"] for i in images] == list(range(EPOCHS))
        for e, item in enumerate(images):
            png = _get(base, "/data/plugin/images/individualImage?" + item["query"])
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
            np.testing.assert_array_equal(tf.io.decode_png(png).numpy(), expected[e]["image"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
    assert proc.poll() is not None
