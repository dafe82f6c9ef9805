"""SampleImportance under tf.distribute: the same scores as on one device.

Each strategy needs process-level TensorFlow setup (logical CPU devices,
`TF_CONFIG`, a cluster), so the distributed runs happen in subprocesses
(`_distribute_worker.py`) with hard time limits; they write what they measured
to `.npz` files and the assertions are made here. Runs on a 2-core CPU machine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import _distribute_worker as worker
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close_to_max

import keras_sie

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_distribute_worker.py")
TIMEOUT_S = 240  # per subprocess run; a healthy run takes a fraction of this
REL = 1e-4  # float32 reductions run in a different order per replica


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env.update(TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="-1")
    return env


def _tail(path) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-3000:]
    except OSError:
        return ""


def _run_one(tmp_path, *args: str) -> None:
    log = tmp_path / f"{args[0]}.log"
    with open(log, "w") as f:
        try:
            subprocess.run([sys.executable, WORKER, *args], env=_env(), stdout=f,
                           stderr=subprocess.STDOUT, timeout=TIMEOUT_S, check=True)
        except subprocess.TimeoutExpired:  # run() has killed it
            pytest.fail(f"{args[0]} run exceeded {TIMEOUT_S}s:\n{_tail(log)}")
        except subprocess.CalledProcessError as e:
            pytest.fail(f"{args[0]} run failed (exit {e.returncode}):\n{_tail(log)}")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _run_cluster(tmp_path, num_workers: int = 2) -> list[dict]:
    """Runs one MultiWorkerMirroredStrategy job on 127.0.0.1; returns each worker's results."""
    for attempt in range(2):  # a chosen port can be taken before the worker binds it
        hosts = [f"127.0.0.1:{p}" for p in _free_ports(num_workers)]
        procs, logs, outs = [], [], []
        try:
            for i in range(num_workers):
                env = _env()
                env["TF_CONFIG"] = json.dumps(
                    {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}}
                )
                outs.append(tmp_path / f"worker{i}.npz")
                logs.append(tmp_path / f"worker{i}_attempt{attempt}.log")
                with open(logs[-1], "w") as f:
                    procs.append(subprocess.Popen(
                        [sys.executable, WORKER, "multiworker", str(outs[-1]),
                         str(tmp_path / f"logs_worker{i}")],
                        env=env, stdout=f, stderr=subprocess.STDOUT,
                    ))
            deadline = time.monotonic() + TIMEOUT_S
            while any(p.poll() is None for p in procs):
                if any(p.returncode not in (None, 0) for p in procs):
                    break  # one failed: the others would wait for it forever
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        codes = [p.returncode for p in procs]
        if all(c == 0 for c in codes):
            return [dict(np.load(o)) for o in outs]
        text = "\n".join(f"--- worker {i} (exit {c}):\n{_tail(log)}"
                         for i, (c, log) in enumerate(zip(codes, logs)))
        if attempt == 0 and ("Could not start gRPC server" in text or "already in use" in text):
            continue
        pytest.fail(f"MultiWorkerMirroredStrategy run failed or exceeded {TIMEOUT_S}s:\n{text}")
    raise AssertionError("unreachable")


def _assert_same_scores(got: dict, ref: dict, prefix_got: str, prefix_ref: str, epochs: int):
    np.testing.assert_array_equal(got[f"{prefix_got}_visits"], ref[f"{prefix_ref}_visits"])
    for e in range(epochs):
        assert_close_to_max(got[f"{prefix_got}_importance_{e}"],
                            ref[f"{prefix_ref}_importance_{e}"], rel=REL)


def test_mirrored_strategy_gives_the_single_device_scores(tmp_path):
    out = tmp_path / "mirrored.npz"
    _run_one(tmp_path, "mirrored", str(out))
    r = dict(np.load(out))
    assert int(r["replicas"]) == 2
    # Sequential, n=102, batch 16: every batch splits evenly (the last, 6 rows,
    # as 3+3), so training is the same as on one device and so is every epoch's
    # score.
    assert (r["mirrored_102_visits"] == 1).all()
    _assert_same_scores(r, r, "mirrored_102", "single_102", epochs=2)
    for i in range(4):
        np.testing.assert_allclose(r[f"mirrored_102_weight_{i}"], r[f"single_102_weight_{i}"],
                                   rtol=1e-5, atol=1e-7)
    # Functional, n=97: the last batch has one row, so one replica gets none.
    # The per-sample scaling (local batch x replicas) still gives the
    # single-device score for every sample, that row included. (Only epoch 0:
    # Keras averages the replicas' mean losses, so that uneven last batch moves
    # the weights differently than on one device, and later epochs differ.)
    assert (r["mirrored_97_visits"] == 1).all()
    _assert_same_scores(r, r, "mirrored_97", "single_97", epochs=1)
    # Training-dynamics signals: the same per sample on 2 replicas as on one
    # device (n=102 splits evenly); forgetting counts exactly, its state kept
    # consistent across replicas by all-gathering each global batch.
    for e in range(3):
        for name in worker.SIGNALS + ("confidence_std",):
            got, ref = r[f"mirrored_cls_signal_{name}_{e}"], r[f"single_cls_signal_{name}_{e}"]
            if name == "forgetting":
                np.testing.assert_array_equal(got, ref)
            else:
                assert np.isfinite(ref).all()
                assert_close_to_max(got, ref, rel=REL)
    assert sum(r[f"single_cls_signal_forgetting_{e}"].sum() for e in range(3)) > 0
    # Streaming (index ids and string keys), 2 replicas, several ring flushes
    # per epoch, read back from the Parquet shards: the one-device scores.
    for kind in ("index", "string"):
        _assert_same_scores(r, r, f"stream_{kind}", "single_102", epochs=2)
    # Arbitrary keys (key_mapping="hash"), string and int64: the single-device
    # index-mode scores, sample by sample.
    for kind in ("string", "int64"):
        prefix = f"hash_{kind}"
        _assert_same_scores(r, r, prefix, "single_102", epochs=2)
        for i in range(4):
            np.testing.assert_allclose(r[f"{prefix}_weight_{i}"], r[f"single_102_weight_{i}"],
                                       rtol=1e-5, atol=1e-7)


def test_multi_worker_mirrored_strategy_gives_the_single_device_scores_and_only_the_chief_writes(
    tmp_path,
):
    results = _run_cluster(tmp_path, num_workers=2)
    sie, _ = worker.train(tf.distribute.get_strategy(), 102, 2)
    ref = {"single_visits": sie.visits}
    ref.update({f"single_importance_{e}": v for e, v in sie.history.items()})
    for r in results:
        assert int(r["replicas"]) == 2
        # Every worker reads the combined buffer (the read is a collective).
        assert (r["worker_visits"] == 1).all()
        _assert_same_scores(r, ref, "worker", "single", epochs=2)
        # int64 hash keys: the workers' tables agree, scores are the index run's.
        _assert_same_scores(r, ref, "hash", "single", epochs=2)
        assert "to_hash_bucket_fast" in str(r["string_keys_refused"])

    chief_dir, other_dir = tmp_path / "logs_worker0", tmp_path / "logs_worker1"
    assert not other_dir.exists() or not any(other_dir.rglob("*")), "a non-chief worker wrote"
    run = keras_sie.load(str(chief_dir))
    assert run.epochs == [0, 1]
    for e in (0, 1):
        assert_close_to_max(run.epoch(e).importance, ref[f"single_importance_{e}"], rel=REL)
    events = list((chief_dir / "keras_sie").rglob("events.out.tfevents.*"))
    assert events, "the chief wrote no TensorBoard events"


def test_parameter_server_strategy_fails_before_training_naming_the_supported_ones(tmp_path):
    out = tmp_path / "ps.npz"
    _run_one(tmp_path, "parameter_server", str(out))
    r = dict(np.load(out))
    # Keras 3 itself cannot start fit under ParameterServerStrategy ...
    assert str(r["keras_error_type"]) and bool(r["keras_weights_unchanged"])
    # ... and when fit reaches the callbacks, SampleImportance stops it there.
    assert str(r["callback_error_type"]) == "NotImplementedError"
    message = str(r["callback_message"])
    for name in ("ParameterServerStrategy", "MirroredStrategy", "MultiWorkerMirroredStrategy"):
        assert name in message
    assert bool(r["callback_weights_unchanged"])
