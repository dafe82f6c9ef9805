"""A "data map" picture of sample importance, one per epoch.

In the spirit of dataset cartography (Swayamdipta et al. 2020, which plots a
sample's mean confidence against its variability across epochs), each visited
sample is a point placed by its mean relative importance over the epochs so
far (x, log scale; 1.0 = a uniform share) and by how much that importance
varies across epochs relative to its mean (y, coefficient of variation). Samples the model keeps struggling with sit to the
right; samples whose importance swings from epoch to epoch sit high. Colour is
the fraction of epochs in which the sample was in that epoch's top 10 %.

matplotlib is an optional extra (`pip install keras_sie[plots]`): it is
imported only when a picture is drawn, never at package import, and when it is
missing `render_data_map` returns None after a one-line notice.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np

#: Most points drawn per picture; larger runs are subsampled (uniformly, fixed seed).
MAX_POINTS = 20_000

_missing_notice_shown = False


def _notice_missing_matplotlib() -> None:
    global _missing_notice_shown
    if not _missing_notice_shown:
        _missing_notice_shown = True
        warnings.warn(
            "keras_sie: matplotlib is not installed, so the TensorBoard data map image "
            "(importance/data_map) is skipped; `pip install matplotlib` to get it.",
            stacklevel=3,
        )


def _relative(importance: np.ndarray, idx: np.ndarray, n_visited: int | None) -> np.ndarray:
    """N_visited * I_i for the rows `idx`; NaN where the sample scored 0 (not visited)."""
    if n_visited is None:
        n_visited = int(np.count_nonzero(importance > 0))
    rel = np.asarray(importance, dtype=np.float64)[idx] * max(n_visited, 1)
    rel[rel <= 0] = np.nan
    return rel


def data_map_coordinates(
    importance_history: Mapping[int, np.ndarray],
    visits: np.ndarray | None,
    epoch: int,
    max_points: int = MAX_POINTS,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """The numbers behind the data map, without drawing anything.

    For each epoch e <= `epoch`, a sample's relative importance is
    N_e * I_e,i, with N_e the number of samples visited in that epoch (those
    with I_e,i > 0 for past epochs; `visits > 0` for `epoch`). Epochs in which
    a sample scored 0 (it was not visited) are left out of its mean and spread.

    Args:
        importance_history: Per-epoch normalized importance, `{epoch: [N]}`
            (e.g. `SampleImportance.history`).
        visits: Visits per sample in `epoch` ([N]); `None` treats samples
            with a positive score in `epoch` as visited.
        epoch: The epoch the map is drawn for; later epochs are ignored.
        max_points: Most samples returned; more are subsampled uniformly with
            a fixed seed so the picture is reproducible. Defaults to 20,000.
        seed: Seed of that subsample. Defaults to 0.

    Returns:
        A dict with `index` (sample slots, ascending), `mean` and
        `variability` (mean and standard deviation of the relative importance
        over the epochs, NaN-free), `cv` (variability / mean),
        `top_fraction` (share of the epochs in which the sample was in that
        epoch's top 10 %), `latest` (relative
        importance in `epoch`), `n_visited` (int) and `epochs` (the epochs used).

    Example:

    >>> h = {0: np.array([0.5, 0.25, 0.25]), 1: np.array([0.25, 0.25, 0.5])}
    >>> data_map_coordinates(h, None, 1)["mean"]
    array([1.125, 0.75 , 1.125])
    """
    if epoch not in importance_history:
        raise KeyError(f"data map: no importance recorded for epoch {epoch}.")
    epochs = sorted(e for e in importance_history if e <= epoch)
    current = np.asarray(importance_history[epoch])
    visited = (np.asarray(visits) > 0) if visits is not None else (current > 0)
    n_visited = int(visited.sum())
    idx = np.flatnonzero(visited)
    if idx.size > max_points:
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(idx, size=max_points, replace=False))
    rel = np.stack(
        [
            _relative(importance_history[e], idx, n_visited if e == epoch else None)
            for e in epochs
        ]
    )  # [E, P], NaN where not visited / zero
    latest = rel[-1]
    keep = np.isfinite(latest)  # points need a positive score this epoch (log axis)
    rel, latest, idx = rel[:, keep], latest[keep], idx[keep]
    seen = np.isfinite(rel)
    count = seen.sum(axis=0)
    filled = np.where(seen, rel, 0.0)
    mean = filled.sum(axis=0) / count
    var = np.where(seen, (rel - mean) ** 2, 0.0).sum(axis=0) / count
    # Each epoch's top-10 % threshold, estimated on the (uniform) subsample.
    thresholds = np.array(
        [np.nanpercentile(row, 90) if np.isfinite(row).any() else np.inf for row in rel]
    )
    in_top = np.where(seen, rel >= thresholds[:, None], False)
    return {
        "index": idx,
        "mean": mean,
        "variability": np.sqrt(var),
        "cv": np.sqrt(var) / mean,
        "top_fraction": in_top.sum(axis=0) / count,
        "latest": latest,
        "n_visited": n_visited,
        "epochs": np.asarray(epochs),
    }


def render_data_map(
    importance_history: Mapping[int, np.ndarray],
    visits: np.ndarray | None,
    epoch: int,
    loss: np.ndarray | None = None,
    max_points: int = MAX_POINTS,
    width: int = 640,
    height: int = 480,
    cartography: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray | None:
    """Draws the data map of one epoch as an RGB image.

    Without `loss`: mean relative importance over the epochs so far (x, log
    scale) against its variability across epochs (y, coefficient of
    variation: std / mean, 0 = the same in every epoch), coloured by the
    fraction of epochs spent in the top 10 %. With `loss` (per-sample loss or
    error, [N]): this epoch's relative importance (x, log) against the loss
    (y), same colours. A dashed line marks 1.0, a uniform share.

    Args:
        importance_history: Per-epoch normalized importance `{epoch: [N]}`
            (e.g. `SampleImportance.history`).
        visits: Visits per sample in `epoch`, or None (positive score = visited).
        epoch: Epoch to draw.
        loss: Optional per-sample loss (or 0/1 error) for the y axis.
            Defaults to None.
        max_points: Most points drawn; larger runs are subsampled uniformly
            with a fixed seed. Defaults to 20,000.
        width: Image width in pixels. Defaults to 640.
        height: Image height in pixels. Defaults to 480.
        cartography: Optional `(mean confidence [N], confidence std [N])`
            over the visits so far (the `"confidence"` signal): draws the
            dataset-cartography map (Swayamdipta et al. 2020), confidence (y)
            against variability (x), coloured by this epoch's importance.
            Defaults to None.

    Returns:
        A `[height, width, 3]` uint8 array, or None when matplotlib is not
        installed (a one-line notice is emitted once).

    Example:

    ```python
    image = keras_sie.datamap.render_data_map(sie.history, sie.visits, epoch=2)
    ```
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        _notice_missing_matplotlib()
        return None

    c = data_map_coordinates(importance_history, visits, epoch, max_points=max_points)
    n_epochs = len(c["epochs"])
    colour, colour_label, vmin, vmax = c["top_fraction"], "share of epochs in the top 10 %", 0, 1
    if cartography is not None:
        mean_conf, std_conf = (np.asarray(a, dtype=np.float64) for a in cartography)
        x, y = std_conf[c["index"]], mean_conf[c["index"]]
        with np.errstate(divide="ignore", invalid="ignore"):
            colour = np.log10(c["latest"])
        finite = np.isfinite(colour)
        vmin = float(np.min(colour[finite])) if finite.any() else -1.0
        vmax = float(np.max(colour[finite])) if finite.any() else 1.0
        colour_label = f"log10 N·I in epoch {epoch}"
        xlabel = "variability  (std of confidence over visits)"
        ylabel = "confidence  (mean p of the assigned class)"
    elif loss is None:
        x, y = c["mean"], c["cv"]
        first = int(c["epochs"][0])
        span = f"epochs {first}-{epoch}" if n_epochs > 1 else f"epoch {epoch}"
        xlabel = f"mean N·I over {span}  (1 = uniform share)"
        ylabel = "variability across epochs  (std / mean)"
    else:
        loss = np.asarray(loss, dtype=np.float64)
        x, y = c["latest"], loss[c["index"]]
        xlabel = f"N·I in epoch {epoch}  (1 = uniform share)"
        ylabel = "per-sample loss"

    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    # Fixed margins instead of tight_layout (which costs a second full draw).
    ax = fig.add_axes((0.11, 0.12, 0.74, 0.8))
    cax = fig.add_axes((0.87, 0.12, 0.025, 0.8))
    if x.size and cartography is not None:
        points = ax.scatter(x, y, c=colour, s=8, alpha=0.6, linewidths=0, cmap="viridis",
                            vmin=vmin, vmax=vmax, rasterized=True)
        cbar = fig.colorbar(points, cax=cax)
        cbar.set_label(colour_label, fontsize=12)
    elif x.size:
        points = ax.scatter(
            x, y, c=colour, s=8, alpha=0.6, linewidths=0,
            cmap="viridis", vmin=vmin, vmax=vmax, rasterized=True,
        )
        ax.set_xscale("log")
        # Plain tick labels (0.1, 1, 10; minor ones too when less than a decade
        # is shown): no mathtext, which is slow to lay out.
        def minor(v, _):
            lo, hi = ax.get_xlim()
            return f"{v:g}" if hi < 10 * lo else ""

        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(minor))
        cbar = fig.colorbar(points, cax=cax)
        cbar.set_label(colour_label, fontsize=12)
    else:
        cax.set_axis_off()
    if cartography is None:
        ax.axvline(1.0, color="0.4", linestyle="--", linewidth=1)
    ax.set_xlabel(xlabel, fontsize=12)
    ax.set_ylabel(ylabel, fontsize=12)
    ax.tick_params(labelsize=11)
    shown = f"{x.size:,} of {c['n_visited']:,} samples"
    kind = "cartography" if cartography is not None else "data map"
    ax.set_title(f"{kind}, epoch {epoch}: {shown}", fontsize=13)
    if loss is None and cartography is None and n_epochs < 2:
        ax.text(0.02, 0.95, "variability needs 2+ epochs", transform=ax.transAxes,
                va="top", fontsize=11, color="0.3")
    ax.grid(True, which="major", alpha=0.3)
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    return image
