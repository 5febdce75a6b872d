"""What a run leaves behind: the console summary, results.json, report.md and figures.

Everything is written atomically (temporary file, fsync, rename), so a run
that is killed leaves either the previous complete file or none.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from .errors import UsageError
from .metrics import classification_report


# -- the run folder ---------------------------------------------------------------
def default_run_dir(args, workers):
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = "compare" if args.compare else args.strategy
    return Path("runs") / f"{stamp}-{name}-n{workers}"


def prepare_run_dir(args, workers):
    """Create the run folder before any training, so a bad ``--out`` fails in a second, not after."""
    run_dir = Path(args.out) if args.out else default_run_dir(args, workers)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir}: exists and is not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not args.overwrite and not args.resume:
        raise UsageError(f"--out {run_dir}: the folder exists and is not empty; "
                         "pass --overwrite to write into it, or choose another --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise UsageError(f"--out {run_dir}: cannot write there ({exc.strerror or exc})") from None
    return run_dir


def discard_run_dir(run_dir):
    """After a failed run: remove the folder if the run left it empty."""
    if run_dir is not None and run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()


def _file_mode():
    """The mode ``open()`` would give a new file (mkstemp's are private, 0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


def atomic_write(path, data):
    """Write ``data`` (str or bytes) to ``path`` via a temporary file, fsync and rename."""
    path = Path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_savefig(fig, path, **kwargs):
    """Save a matplotlib figure atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        os.chmod(tmp, FILE_MODE)
        fig.savefig(tmp, **kwargs)
        with open(tmp, "rb") as f:  # on disk before the rename, as atomic_write does
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# -- writing a run ----------------------------------------------------------------
def write_run(run_dir, results, data, outcomes, baselines, args, draw=None):
    """Print the summary and write results.json, report.md and the figures into ``run_dir``.

    ``draw`` (same arguments as :func:`mlpcore.plots.run_figures`) draws the
    figures elsewhere, e.g. on an idle MPI rank; it returns their file names.
    """
    headline = outcomes[args.strategy]
    table = summary_table(results)
    reports = {f"{args.strategy} ({_headline_label(args)})": classification_report(data.y_test, headline["y_pred"])}
    if baselines:
        reports[f"sequential baseline ({baselines[0]['threads']} thread)"] = \
            classification_report(data.y_test, baselines[0]["y_pred"])

    figures = []
    if not args.no_plots:
        from . import plots

        draw = draw or plots.run_figures
        figures = draw(run_dir, results, data, headline, baselines, args)
    from . import trace

    results["files"] = sorted(["results.json", "report.md", "trace.json", "predictions.npz", *figures])
    trace.write_trace(run_dir, results)  # tiny, so every run writes it, plots or not
    atomic_write(run_dir / "predictions.npz", predictions_npz(headline, baselines))
    atomic_write(run_dir / "results.json", json.dumps(results, indent=2, default=_json_default) + "\n")
    atomic_write(run_dir / "report.md", report_markdown(results, table, reports, figures))

    out = sys.stdout
    print(table, file=out)
    for title, text in reports.items():
        print(f"\nClassification report: {title}\n{text}", file=out)
    for note in results["warnings"]:
        print(f"warning: {note}", file=sys.stderr)
    print(f"\nresults: {run_dir / 'results.json'}", file=out)
    if args.show and figures:
        import matplotlib.pyplot as plt

        plt.show()


def predictions_npz(headline, baselines):
    """The bytes of predictions.npz: the headline's test-set predictions ``y_pred``, the ensemble
    members' test-set probabilities ``member_probs`` (members, n_test, classes) and the first
    baseline's ``baseline_y_pred``, for comparing runs exactly (resumed vs uninterrupted, MPI vs joblib)."""
    import io

    import numpy as np

    arrays = {"y_pred": np.asarray(headline["y_pred"])}
    if headline.get("member_probs") is not None:
        arrays["member_probs"] = np.asarray(headline["member_probs"])
    if baselines:
        arrays["baseline_y_pred"] = np.asarray(baselines[0]["y_pred"])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _headline_label(args):
    return f"{args.vote} vote" if args.strategy == "ensemble" else "one model"


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def summary_table(results):
    """The console table: what was run, how long it took, what it bought and cost."""
    env, t, m, s = results["environment"], results["timings"], results["metrics"], results["speedup"]
    cfg = results["config"]
    threads = sorted(set(env["threads_per_worker"]))
    rows = [
        ("strategy", f"{cfg['strategy']}" + (f" ({cfg['vote']} vote)" if cfg["strategy"] == "ensemble" else "")),
        ("launcher", f"{env['launcher']}, {env['world_size']} workers x {','.join(map(str, threads))} "
                     f"BLAS thread(s), {env['cores']} cores" + (" (OVERSUBSCRIBED)" if env["oversubscribed"] else "")),
        ("model", f"{results['data']['n_train']} train / {results['data']['n_test']} test, "
                  f"hidden {cfg['hidden']}, {cfg['epochs']} epochs, batch {cfg['batch_size']}, "
                  f"{cfg['trainer']} {cfg['dtype']}"
                  + (f", {env['kernels']} kernels" if env.get("kernels", "").startswith(("numba", "numpy")) else "")),
        ("parallel train", f"{t['parallel_train_s']:.3f} s (slowest worker)"),
        ("parallel end to end", f"{t['parallel_total_s']:.3f} s (load + distribute + train + combine)"),
    ]
    for b in t["baselines"]:
        rows.append((f"sequential, {b['threads']} thread(s)",
                     f"train {b['train_s']:.3f} s, end to end {b['total_s']:.3f} s, accuracy {b['accuracy']:.4f}"))
        rows.append((f"  speed-up vs it", f"train {b['speedup_train']:.2f}x (efficiency {b['efficiency_train']:.2f}), "
                                          f"end to end {b['speedup_end_to_end']:.2f}x "
                                          f"(efficiency {b['efficiency_end_to_end']:.2f})"))
    if cfg["strategy"] == "ensemble":
        rows.append(("accuracy", f"soft vote {m['vote_soft_accuracy']:.4f}, hard vote {m['vote_hard_accuracy']:.4f}, "
                                 f"members {', '.join(f'{a:.4f}' for a in m['member_accuracy'])}"))
    else:
        rows.append(("accuracy", f"{m['accuracy']:.4f}"))
    strategy = results.get("strategy", {})
    if strategy.get("overlap"):
        o = strategy["overlap"]
        rows.append(("communication", f"{o['calls']} calls, {o['bytes'] / 1e6:.1f} MB per rank, {o['total_s']:.3f} s "
                                      f"in flight, {o['exposed_s']:.3f} s exposed, overlap {o['fraction']:.0%}"))
    elif strategy.get("comm"):
        rows.append(("communication", ", ".join(f"{k.replace('_bytes', '')} {v / 1e6:.1f} MB"
                                                for k, v in strategy["comm"].items() if k.endswith("bytes"))))
    loss = strategy.get("final_train_loss")
    if loss is not None:
        losses = loss if isinstance(loss, list) else [loss]
        rows.append(("final train loss", ", ".join(f"{v:.4f}" for v in losses if v is not None)
                     + (" (per member)" if isinstance(loss, list) else "")))
    if "baseline_accuracy" in m:
        rows.append(("accuracy cost", f"{(m['baseline_accuracy'] - m['accuracy']) * 100:+.2f} pp "
                                      "(sequential minus parallel)"))
    width = max(len(k) for k, _ in rows)
    lines = ["", "mlpcore: parallel vs sequential", "-" * (width + 60)]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    if results.get("compare"):
        lines += ["", compare_table(results)]
    return "\n".join(lines)


def compare_table(results):
    """One row per strategy (``--compare``)."""
    base = results["timings"]["baselines"][0] if results["timings"]["baselines"] else None
    n = results["environment"]["world_size"]
    head = f"{'strategy':<10} {'train s':>8} {'speed-up':>8} {'effic.':>7} {'accuracy':>8} {'MB sent':>8}"
    lines = [head, "-" * len(head)]
    for name, row in results["compare"].items():
        t = row["parallel_train_s"]
        sp = base["train_s"] / t if base and t else float("nan")
        comm = row.get("comm") or {}
        mb = sum(v for k, v in comm.items() if k.endswith("bytes")) / 1e6
        lines.append(f"{name:<10} {t:>8.3f} {sp:>8.2f} {sp / n:>7.2f} {row['accuracy']:>8.4f} {mb:>8.1f}")
    if base:
        lines.append(f"{'sequential':<10} {base['train_s']:>8.3f} {1:>8.2f} {'':>7} {base['accuracy']:>8.4f} {0:>8.1f}")
    return "\n".join(lines)


def report_markdown(results, table, reports, figures):
    env = results["environment"]
    lines = [f"# mlpcore run: {results['config']['strategy']}", "",
             "```", table.strip(), "```", "",
             "## Environment", "",
             f"- launcher: {env['launcher']}, world size {env['world_size']}, cores {env['cores']}, "
             f"BLAS threads per worker {env['threads_per_worker']}",
             f"- MPI library: {env.get('mpi_library') or 'none'}",
             f"- elementwise kernels: {env.get('kernels')}; denormals: {env.get('denormals')}",
             f"- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()), ""]
    for note in results["warnings"]:
        lines.append(f"> warning: {note}\n")
    lines += ["## Per-rank phase times (s)", "",
              "| rank | threads | load | wait | scatter | train | predict | gather |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["timings"]["per_rank"]:
        lines.append(f"| {r['rank']} | {r['threads']} | {r['load_s']:.3f} | {r['wait_s']:.3f} | {r['scatter_s']:.3f} "
                     f"| {r['train_s']:.3f} | {r['predict_s']:.3f} | {r['gather_s']:.3f} |")
    for title, text in reports.items():
        lines += ["", f"## Classification report: {title}", "", "```", text, "```"]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"
