"""The `keras-sie` command line: inspect, export and compare runs.

    keras-sie report LOGDIR [--epoch N | --aggregate] [-k 10] [--json]
    keras-sie export LOGDIR --format csv|npz|parquet [--epoch N] -o FILE
    keras-sie diff RUN_A RUN_B [--epoch-a N] [--epoch-b N] [-k 10] [--json]

Also `python -m keras_sie ...`. Exit codes: 0 success, 1 failure (missing,
empty or corrupt run, unknown epoch, failed write), 2 usage error.
Reads runs without TensorFlow, so it starts fast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from keras_sie import __version__, storage
from keras_sie import export as export_lib
from keras_sie import scores as scores_lib
from keras_sie.score_record import ScoreRecord
from keras_sie.storage import CorruptRunError

PROG = "keras-sie"


class _Failure(Exception):
    """An error reported as `keras-sie: error: ...` with exit code 1."""


# ---------------------------------------------------------------- helpers
def _load(path: str) -> ScoreRecord:
    if not os.path.exists(path):
        raise _Failure(f"{path!r} does not exist. Pass the log_dir given to SampleImportance.")
    if not os.path.isdir(path):
        raise _Failure(f"{path!r} is not a folder. Pass the log_dir given to SampleImportance.")
    try:
        return storage.load(path)
    except FileNotFoundError as e:
        raise _Failure(str(e)) from e
    except CorruptRunError as e:
        raise _Failure(f"corrupt run: {e}") from e


def _pick(run: ScoreRecord, epoch: int | None, aggregate: bool
          ) -> tuple[str, np.ndarray, np.ndarray]:
    """(label, importance, visits) of one epoch or of the aggregate.

    The aggregate's visits are `ScoreRecord.scores("aggregate")`'s: the same
    definition of "visited" as `keras_sie.select` uses.
    """
    if aggregate:
        n = run.aggregate_epochs
        used = run.epochs if n is None else run.epochs[:n]
        label = "aggregate of epochs " + ", ".join(str(e) for e in used)
        imp, visits = run.scores("aggregate")
        return label, np.asarray(imp, np.float64), np.asarray(visits)
    e = run.epochs[-1] if epoch is None else epoch
    if e not in run.epochs:
        raise _Failure(f"epoch {e} is not in {run.log_dir!r} (epochs: {_epoch_list(run.epochs)}).")
    imp, visits = run.scores(e)
    return f"epoch {e}", np.asarray(imp, np.float64), np.asarray(visits)


def _epoch_list(epochs: Sequence[int]) -> str:
    if len(epochs) > 12:
        return f"{epochs[0]}..{epochs[-1]} ({len(epochs)} epochs)"
    return ", ".join(str(e) for e in epochs)


def _used(run: ScoreRecord, arr: np.ndarray) -> np.ndarray:
    return arr[: run.slots_used]


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    # Text columns (the first cell of a data row is not a number) align left.
    left = [not _numeric(rows[0][i]) if rows else False for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) if lf else c.rjust(w) for c, w, lf in zip(r, widths, left))
        for r in cells
    ]
    return "\n".join("  " + line for line in lines)


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _histogram(rel: np.ndarray, bins: int, width: int, log: bool) -> list[str]:
    """Text histogram of relative scores (1.0 = the average visited sample)."""
    lines = []
    zeros = int((rel <= 0).sum())
    pos = rel[rel > 0]
    if pos.size == 0:
        return ["  (no sample has a positive score)"]
    if log:
        lo, hi = np.log10(pos.min()), np.log10(pos.max())
        vals = np.log10(pos)
    else:
        lo, hi = 0.0, float(pos.max())
        vals = pos
    if hi <= lo:
        hi = lo + 1e-12
    counts, edges = np.histogram(vals, bins=bins, range=(lo, hi))
    if log:
        edges = 10.0 ** edges
    peak = max(int(counts.max()), 1)
    label_w = max(len(f"{e:.3g}") for e in edges)
    if zeros:
        lines.append(f"  {'0':>{label_w}}   {'':<{label_w}}  {'':<{width}} {zeros}")
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        bar = "#" * round(width * c / peak)
        lines.append(f"  {a:>{label_w}.3g} - {b:<{label_w}.3g}  {bar:<{width}} {int(c)}")
    return lines


def _rows(keys: np.ndarray, imp: np.ndarray, visits: np.ndarray, idx: np.ndarray, n_vis: int):
    return [
        (rank + 1, keys[i].item(), float(imp[i]), float(imp[i] * n_vis), int(visits[i]))
        for rank, i in enumerate(idx)
    ]


# ----------------------------------------------------------------- report
def _lists(run: ScoreRecord, args: argparse.Namespace) -> ScoreRecord:
    """Ranked lists: the per-query record with --queries."""
    if not getattr(args, "queries", False):
        return run
    if run.queries is None:
        raise _Failure(f"{run.log_dir!r} has no per-query record (ranked lists with query ids).")
    return run.queries


def _report(args: argparse.Namespace) -> int:
    run = _lists(_load(args.logdir), args)
    label, imp, visits = _pick(run, args.epoch, args.aggregate)
    imp, visits = _used(run, imp), _used(run, visits)
    keys = _used(run, run.keys)
    visited = visits > 0
    n_vis = int(visited.sum())
    summary = scores_lib.summarize(imp, visits)
    k = max(0, min(args.k, n_vis))
    top = scores_lib.top_k_indices(np.where(visited, imp, -np.inf), k, largest=True)
    bottom = scores_lib.top_k_indices(np.where(visited, imp, np.inf), k, largest=False)
    per_epoch = []
    for e in run.epochs:
        ei, ev = (_used(run, a) for a in run.scores(e))
        s = scores_lib.summarize(ei, ev)
        per_epoch.append((e, int(s["visited_samples"]), s["gini"], s["top1pct_share"],
                          s["effective_sample_size"]))
    features = {} if args.aggregate else run.epoch(args.epoch).feature_importance
    if args.json:
        out = {
            "log_dir": run.log_dir,
            "epochs": run.epochs,
            "shown": label,
            "num_samples": int(keys.size),
            "key_mapping": run.manifest.get("key_mapping"),
            "summary": summary,
            "per_epoch": [
                dict(zip(("epoch", "visited", "gini", "top1pct_share", "effective_sample_size"), r))
                for r in per_epoch
            ],
            "feature_importance": features,
            "top": [dict(zip(("rank", "key", "importance", "relative", "visits"), r))
                    for r in _rows(keys, imp, visits, top, n_vis)],
            "bottom": [dict(zip(("rank", "key", "importance", "relative", "visits"), r))
                       for r in _rows(keys, imp, visits, bottom, n_vis)],
        }
        print(json.dumps(out, indent=1))
        return 0
    mapping = run.manifest.get("key_mapping", "unknown")
    print(f"keras_sie run: {storage.run_dir(run.log_dir)}")
    print(f"epochs: {_epoch_list(run.epochs)}   showing: {label}")
    print(f"samples: {keys.size} ({n_vis} scored, {keys.size - n_vis} not visited)   "
          f"key mapping: {mapping}")
    print()
    print("summary")
    ln_n = math.log(n_vis) if n_vis > 0 else 0.0
    ess = summary["effective_sample_size"]
    print(_table(["statistic", "value", "uniform would be"], [
        ("gini", summary["gini"], 0.0),
        ("top 1% share", summary["top1pct_share"], 0.01),
        ("effective sample size", ess, float(n_vis)),
        ("entropy (nats)", summary["entropy"], ln_n),
    ]))
    if len(per_epoch) > 1:
        print()
        print("per epoch")
        print(_table(["epoch", "scored", "gini", "top1%", "ESS"], per_epoch))
    if features:
        print()
        print("feature importance")
        ranked = sorted(features.items(), key=lambda kv: -kv[1])[:10]
        print(_table(["feature", "share"], ranked))
    print()
    scale = "log10 bins" if not args.linear else "linear bins"
    print(f"histogram of importance x {n_vis} (1.0 = average scored sample), {scale}")
    for line in _histogram(imp[visited] * n_vis, args.bins, args.width, not args.linear):
        print(line)
    headers = ["rank", "key", "importance", "x average", "visits"]
    print()
    print(f"top {k}")
    print(_table(headers, _rows(keys, imp, visits, top, n_vis)))
    print()
    print(f"bottom {k}")
    print(_table(headers, _rows(keys, imp, visits, bottom, n_vis)))
    return 0


# ----------------------------------------------------------------- export
def _export(args: argparse.Namespace) -> int:
    run = _lists(_load(args.logdir), args)
    if args.epoch is not None and args.epoch not in run.epochs:
        raise _Failure(f"epoch {args.epoch} is not in {run.log_dir!r} "
                       f"(epochs: {_epoch_list(run.epochs)}).")
    try:
        path = export_lib.export_run(run, args.output, format=args.format, epoch=args.epoch)
    except ImportError as e:
        raise _Failure(str(e)) from e
    except OSError as e:
        raise _Failure(f"cannot write {args.output!r}: {e}") from e
    what = f"epoch {args.epoch}" if args.epoch is not None else f"{len(run.epochs)} epoch(s)"
    print(f"wrote {what} of {len(_used(run, run.keys))} samples to {path} "
          f"({args.format})")
    return 0


# ------------------------------------------------------------------- diff
def _ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, ties get their average rank."""
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    _, first, counts = np.unique(s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, counts)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks)."""
    ra, rb = _ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64))
    ra -= ra.mean()
    rb -= rb.mean()
    denom = math.sqrt(float(np.dot(ra, ra)) * float(np.dot(rb, rb)))
    return float(np.dot(ra, rb) / denom) if denom > 0 else float("nan")


def _diff(args: argparse.Namespace) -> int:
    sides = []
    for path, epoch in ((args.run_a, args.epoch_a), (args.run_b, args.epoch_b)):
        run = _load(path)
        label, imp, visits = _pick(run, epoch, args.aggregate)
        imp, visits = _used(run, imp), _used(run, visits)
        keys = _used(run, run.keys)
        v = visits > 0
        sides.append((run, label, keys[v], imp[v]))
    (ra, la, ka, ia), (rb, lb, kb, ib) = sides
    if ka.dtype.kind != kb.dtype.kind:
        ka, kb = ka.astype(str), kb.astype(str)
    common, pa, pb = np.intersect1d(ka, kb, assume_unique=True, return_indices=True)
    n = common.size
    if n < 2:
        raise _Failure(f"the runs share {n} scored sample key(s); nothing to compare.")
    a, b = ia[pa], ib[pb]
    rho = spearman(a, b)
    k = max(1, min(args.k, n))
    top_a = set(common[scores_lib.top_k_indices(a, k, True)].tolist())
    top_b = set(common[scores_lib.top_k_indices(b, k, True)].tolist())
    bot_a = set(common[scores_lib.top_k_indices(a, k, False)].tolist())
    bot_b = set(common[scores_lib.top_k_indices(b, k, False)].tolist())
    pct_a = _ranks(a) / max(n - 1, 1)
    pct_b = _ranks(b) / max(n - 1, 1)
    move = pct_b - pct_a
    movers = np.argsort(-np.abs(move), kind="mergesort")[: min(args.movers, n)]
    result = {
        "run_a": ra.log_dir, "shown_a": la, "scored_a": int(ka.size),
        "run_b": rb.log_dir, "shown_b": lb, "scored_b": int(kb.size),
        "common": int(n),
        "spearman": rho,
        "k": k,
        "top_k_overlap": len(top_a & top_b) / k,
        "bottom_k_overlap": len(bot_a & bot_b) / k,
        "movers": [
            {"key": common[i].item(), "percentile_a": float(pct_a[i]),
             "percentile_b": float(pct_b[i])}
            for i in movers
        ],
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"A: {ra.log_dir} ({la}, {ka.size} scored)")
    print(f"B: {rb.log_dir} ({lb}, {kb.size} scored)")
    print(f"common scored samples: {n} (only in A: {ka.size - n}, only in B: {kb.size - n})")
    print()
    print(_table(["measure", "value"], [
        ("Spearman rank correlation", rho),
        (f"top-{k} overlap", f"{len(top_a & top_b)}/{k} = {len(top_a & top_b) / k:.3f}"),
        (f"bottom-{k} overlap", f"{len(bot_a & bot_b)}/{k} = {len(bot_a & bot_b) / k:.3f}"),
    ]))
    if movers.size:
        print()
        print("largest rank moves (percentile: 0 = least, 1 = most important)")
        print(_table(["key", "A", "B", "change"], [
            (common[i].item(), float(pct_a[i]), float(pct_b[i]), f"{move[i]:+.3f}")
            for i in movers
        ]))
    return 0


# ----------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect, export and compare sample-importance runs written by "
        "keras_sie.SampleImportance(log_dir=...).",
        epilog="Exit codes: 0 success, 1 failure (missing, empty or corrupt run, unknown "
        "epoch, write error), 2 usage error. LOGDIR is the log_dir given to SampleImportance "
        "(or its keras_sie/ subfolder).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    rep = sub.add_parser(
        "report", help="epochs, summary statistics, histogram, top/bottom samples",
        description="Print the epochs found, summary statistics, a histogram of the scores "
        "and the top-k / bottom-k samples of one epoch (the latest by default).",
    )
    rep.add_argument("logdir", metavar="LOGDIR")
    which = rep.add_mutually_exclusive_group()
    which.add_argument("--epoch", type=int, help="epoch to show (default: the latest)")
    which.add_argument("--aggregate", action="store_true",
                       help="show the cross-epoch aggregate instead of one epoch")
    rep.add_argument("-k", type=int, default=10, help="rows in the top/bottom tables (default 10)")
    rep.add_argument("--bins", type=int, default=12, help="histogram bins (default 12)")
    rep.add_argument("--width", type=int, default=40, help="histogram bar width (default 40)")
    rep.add_argument("--linear", action="store_true", help="linear instead of log10 bins")
    rep.add_argument("--json", action="store_true", help="print JSON instead of text")
    rep.add_argument("--queries", action="store_true",
                     help="ranked lists: show the per-query record instead of the per-item one")
    rep.set_defaults(func=_report)

    exp = sub.add_parser(
        "export", help="write scores to csv, npz or parquet",
        description="Write a run's scores with the original sample keys. csv/parquet: one row "
        "per (epoch, sample) with columns epoch,key,importance,visits,grad_sum. npz: arrays "
        "keys, epochs, importance[E,N], visits[E,N], grad_sum[E,N]. Parquet needs pyarrow.",
    )
    exp.add_argument("logdir", metavar="LOGDIR")
    exp.add_argument("--format", required=True, choices=export_lib.FORMATS)
    exp.add_argument("--epoch", type=int, help="export one epoch (default: all epochs)")
    exp.add_argument("-o", "--output", required=True, metavar="FILE", help="output file")
    exp.add_argument("--queries", action="store_true",
                     help="ranked lists: export the per-query record (keys are query ids)")
    exp.set_defaults(func=_export)

    dif = sub.add_parser(
        "diff", help="how the ranking changed between two runs",
        description="Compare the rankings of two runs (or two epochs of one run) over the "
        "sample keys scored in both: Spearman rank correlation, top-k and bottom-k overlap, "
        "largest rank moves.",
    )
    dif.add_argument("run_a", metavar="RUN_A")
    dif.add_argument("run_b", metavar="RUN_B")
    dif.add_argument("--epoch-a", type=int, help="epoch of RUN_A (default: latest)")
    dif.add_argument("--epoch-b", type=int, help="epoch of RUN_B (default: latest)")
    dif.add_argument("--aggregate", action="store_true",
                     help="compare cross-epoch aggregates instead of single epochs")
    dif.add_argument("-k", type=int, default=10, help="size of the top/bottom sets (default 10)")
    dif.add_argument("--movers", type=int, default=5, help="largest rank moves shown (default 5)")
    dif.add_argument("--json", action="store_true", help="print JSON instead of text")
    dif.set_defaults(func=_diff)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `keras-sie` console script.

    Args:
        argv: Arguments without the program name (default: `sys.argv[1:]`).

    Returns:
        The exit code: 0 success, 1 failure, 2 usage error.
    """
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on usage errors
    for name in ("k", "bins", "width", "movers"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            parser.error(f"-{'' if name == 'k' else '-'}{name} must be >= 1")
    if args.command == "diff" and args.aggregate and (args.epoch_a is not None
                                                      or args.epoch_b is not None):
        parser.error("--aggregate cannot be combined with --epoch-a/--epoch-b")
    try:
        return args.func(args)
    except _Failure as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `keras-sie report LOGDIR | head`
        # Python flushes stdout at exit; point it at devnull so that it cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (CorruptRunError, OSError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
