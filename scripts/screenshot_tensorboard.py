"""Screenshots of TensorBoard showing a keras_sie run, for the README.

Runs a small demo fit into a temporary log dir (or uses `--logdir`), starts
`tensorboard` on 127.0.0.1, waits until the run is loaded, and takes PNG
screenshots of its dashboards with headless Chromium:

    python scripts/screenshot_tensorboard.py              # -> docs/tensorboard_*.png
    python scripts/screenshot_tensorboard.py --logdir logs --out /tmp/shots

The demo: 4,000 synthetic tabular rows (6 numeric columns, 2 of them
informative, and a 20-value category looked up by an Embedding), a binary
label with 5 % of the labels flipped, a small MLP, 6 epochs. The flipped rows
are the ones the data map puts on the right.

Needs Chromium (Debian: `apt-get install -y chromium`; the path can be given
with `--chromium`). Chromium runs headless with a throwaway profile, no
sandbox (it runs in containers as root) and background networking off.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parent.parent
RUN = "keras_sie"

# (file name, URL fragment, window size): TensorBoard's dashboards. The
# scalars are shown unsmoothed and without the (all-zero) faults/* charts.
SHOTS = [
    ("tensorboard_scalars.png", "#scalars&_smoothingWeight=0&tagFilter=importance%7Cfeatures",
     (1400, 1000)),
    ("tensorboard_text.png", "#text&tagFilter=top_k", (1400, 1000)),
    ("tensorboard_histograms.png", "#histograms", (1000, 440)),
    ("tensorboard_images.png", "#images", (1000, 560)),
]
DATA_MAP = "data_map.png"  # the last epoch's importance/data_map, as TensorBoard serves it


def demo_fit(log_dir: str, epochs: int = 6) -> dict[str, float]:
    """Trains the demo model with SampleImportance logging to `log_dir`."""
    import keras
    import numpy as np

    import keras_sie

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    n = 4000
    numeric = rng.normal(size=(n, 6)).astype("float32")
    category = rng.integers(0, 20, size=(n, 1))
    cat_effect = rng.normal(size=20)
    logit = 2.0 * numeric[:, 0] - 1.5 * numeric[:, 1] + cat_effect[category[:, 0]]
    y = (logit + 0.5 * rng.normal(size=n) > 0).astype("float32")
    flipped = rng.choice(n, size=n // 20, replace=False)
    y[flipped] = 1.0 - y[flipped]

    num_in = keras.Input((6,), name="numeric")
    cat_in = keras.Input((1,), name="category", dtype="int32")
    emb = keras.layers.Flatten()(keras.layers.Embedding(20, 4, name="category_emb")(cat_in))
    h = keras.layers.Concatenate()([num_in, emb])
    h = keras.layers.Dense(32, activation="relu")(h)
    out = keras.layers.Dense(1, activation="sigmoid")(h)
    model = keras.Model({"numeric": num_in, "category": cat_in}, out)
    model.compile(keras.optimizers.Adam(3e-3), "binary_crossentropy", metrics=["accuracy"])
    sie = keras_sie.SampleImportance(log_dir=log_dir, top_k=10)
    model.fit(
        keras_sie.with_ids({"numeric": numeric, "category": category}), y,
        epochs=epochs, batch_size=64, callbacks=[sie], verbose=0,
    )
    from keras_sie.datamap import data_map_coordinates

    top = {k for k, _, _ in sie.top_k(len(flipped))}
    found = len(top & set(flipped.tolist())) / len(flipped)
    print(f"demo: {found:.0%} of the {len(flipped)} flipped labels are in the top "
          f"{len(flipped)} by importance (epoch {epochs - 1})")
    c = data_map_coordinates(sie.history, sie.visits, epochs - 1)
    is_flipped = np.isin(c["index"], flipped)
    stats = {"flipped_recall_at_k": found}
    for name, rows in (("flipped", is_flipped), ("clean", ~is_flipped)):
        stats[f"{name}_median_mean"] = float(np.median(c["mean"][rows]))
        stats[f"{name}_top_half"] = float((c["top_fraction"][rows] >= 0.5).mean())
        print(f"demo data map, {name} rows: median mean N*I {stats[f'{name}_median_mean']:.2f}, "
              f"{stats[f'{name}_top_half']:.0%} in the top 10 % in at least half the epochs")
    return stats


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def tensorboard(log_dir: str, timeout: float = 120.0, cwd: str | None = None):
    """Runs `tensorboard` on 127.0.0.1 until the keras_sie run is loaded; yields its URL."""
    port = _free_port()
    exe = Path(sys.executable).with_name("tensorboard")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tensorboard.main"]
    cmd += ["--logdir", log_dir, "--host", "127.0.0.1", "--port", str(port),
            "--load_fast=false"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        try:
            _wait_until_loaded(proc, log, os.path.join(cwd or "", log_dir), base, timeout)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_until_loaded(proc, log, log_dir: str, base: str, timeout: float) -> None:
    """Polls until every epoch saved under log_dir is served (or the series stops growing)."""
    from keras_sie import storage

    want = len(storage.list_epochs(log_dir))
    url = f"{base}/data/plugin/scalars/scalars?" + urllib.parse.urlencode(
        {"run": RUN, "tag": "importance/gini"})
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"tensorboard exited:\n{log.read().decode(errors='replace')}")
        try:
            steps = len(_get_json(url))
            if steps and (steps >= want if want else steps == last):
                return
            last = steps
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"tensorboard did not load {log_dir} within {timeout:.0f} s")
        time.sleep(1.0)


def last_data_map(base: str) -> bytes:
    """The PNG of the last epoch's importance/data_map, fetched from TensorBoard."""
    items = _get_json(f"{base}/data/plugin/images/images?" + urllib.parse.urlencode(
        {"run": RUN, "tag": "importance/data_map", "sample": 0}))
    if not items:
        raise RuntimeError("the run has no importance/data_map image (is matplotlib installed?)")
    url = f"{base}/data/plugin/images/individualImage?{items[-1]['query']}"
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def find_chromium(path: str | None) -> str:
    for candidate in [path, "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")]:
        if candidate and Path(candidate).exists():
            return candidate
    raise SystemExit(
        "Chromium not found. On Debian/Ubuntu: `apt-get update && apt-get install -y chromium`, "
        "or pass --chromium /path/to/chrome."
    )


def screenshot(chromium: str, url: str, out: Path, size: tuple[int, int],
               budget_ms: int, timeout: float = 120.0) -> None:
    """One PNG of `url` taken by headless Chromium after `budget_ms` of virtual time."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--hide-scrollbars", "--mute-audio",
            f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
            f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url,
        ]
        result = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    if result.returncode != 0 or not out.exists():
        raise RuntimeError(
            f"chromium failed ({result.returncode}) on {url}:\n"
            f"{result.stderr.decode(errors='replace')[-2000:]}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", help="an existing log dir with a keras_sie run; "
                        "default: run the demo fit into a temporary folder")
    parser.add_argument("--out", default=str(REPO / "docs"), help="folder for the PNGs")
    parser.add_argument("--chromium", help="path to the Chromium binary")
    parser.add_argument("--budget-ms", type=int, default=20000,
                        help="Chromium virtual time budget per page")
    parser.add_argument("--only", nargs="*", help="file names to produce (default: all)")
    args = parser.parse_args(argv)

    chromium = find_chromium(args.chromium)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log_dir, cwd = args.logdir, None
        if log_dir is None:
            demo_fit(os.path.join(tmp, "logs"))
            log_dir, cwd = "logs", tmp  # TensorBoard shows the log dir as given
        with tensorboard(log_dir, cwd=cwd) as base:
            for name, fragment, size in SHOTS:
                if args.only and name not in args.only:
                    continue
                path = out_dir / name
                screenshot(chromium, f"{base}/{fragment}", path,
                           size, args.budget_ms)
                print(f"wrote {path} ({path.stat().st_size:,} bytes)")
            if not args.only or DATA_MAP in args.only:
                path = out_dir / DATA_MAP
                path.write_bytes(last_data_map(base))
                print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
