"""The console summary of a run: what was run, how long it took, what it bought and cost.

Also the plan ``--dry-run`` prints (:func:`plan_table`) and the lines that end
a run's output (:func:`run_footer`). Colour is for terminals only
(:func:`colour_enabled`): never in files, pipes or notebooks, never under ``NO_COLOR``.
"""

from __future__ import annotations

import os
import shlex
import sys

_STYLES = {"bold": "1", "warn": "1;33", "good": "1;32", "dim": "2"}


def colour_enabled(stream):
    """Colour on ``stream``: a terminal, and ``NO_COLOR`` unset or empty (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def paint(text, style, on=True):
    """``text`` in an ANSI style (``bold``, ``warn``, ``good``, ``dim``) when ``on``."""
    return f"\033[{_STYLES[style]}m{text}\033[0m" if on else text


def oversubscribed_rows(env, threads):
    """A row saying what to do when workers x threads exceed the cores (none otherwise)."""
    if not env.get("oversubscribed"):
        return []
    most = max(threads) if threads else 1
    fit = max(1, env["cores"] // most)
    fix = f"mpirun -n {fit} or --jobs {fit}" + (", or --threads 1" if most > 1 else "")
    return [("  what to do", f"for speed-ups that measure parallelism, use at most {env['cores']} threads in all "
                            f"on these {env['cores']} cores: {fix}")]


def model_label(results):
    """``"mlp 784-128-10 (101,770 params)"`` or ``"lenet5 (61,706 params)"``, from results.json."""
    cfg, model = results["config"], results.get("model") or {}
    name = model.get("name", cfg.get("model", "mlp"))
    if name == "mlp":
        dense = [layer for layer in model.get("layers", []) if layer.get("type") == "Dense"]
        widths = [dense[0]["in"], *(layer["out"] for layer in dense)] if dense else ["?", *cfg["hidden"], "?"]
        name = "mlp " + "-".join(map(str, widths))
    return name + (f" ({model['n_params']:,} params)" if "n_params" in model else "")


def placement_rows(env, threads):
    """A ``placement`` row when the ranks ran on more than one node: which ranks where, and threads per node."""
    placement = env.get("placement") or {}
    if placement.get("nodes", 1) < 2:
        return []
    nodes = "; ".join(f"{host}: ranks {','.join(map(str, ranks))} x {','.join(map(str, threads))} thread(s)"
                      for host, ranks in placement["ranks_per_node"].items())
    return [("placement", f"{placement['nodes']} nodes ({nodes}); every collective crossed nodes")]


def summary_table(results, colour=False):
    """The console table: what was run, how long it took, what it bought and cost (``colour``: ANSI, terminals only)."""
    env, t, m, s = results["environment"], results["timings"], results["metrics"], results["speedup"]
    cfg = results["config"]
    threads = sorted(set(env["threads_per_worker"]))
    rows = [
        ("strategy", f"{cfg['strategy']}" + (f" ({cfg['vote']} vote)" if cfg["strategy"] == "ensemble" else "")),
        ("launcher", f"{env['launcher']}, {env['world_size']} workers x {','.join(map(str, threads))} "
                     f"BLAS thread(s), {env['cores']} cores" + (" (OVERSUBSCRIBED)" if env["oversubscribed"] else "")),
        *oversubscribed_rows(env, threads),
        *placement_rows(env, threads),
        ("model", f"{model_label(results)}, {results['data']['n_train']} train / {results['data']['n_test']} test, "
                  f"{cfg['epochs']} epochs, batch {cfg['batch_size']}, {cfg['trainer']} {cfg['dtype']}"
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
    styles = {"  speed-up vs it": "good", "  what to do": "warn"}
    lines = ["", paint("mlpcore: parallel vs sequential", "bold", colour), "-" * (width + 60)]
    lines += [f"{k:<{width}}  " + (paint(v, styles[k], colour) if k in styles else
                                  v.replace("OVERSUBSCRIBED", paint("OVERSUBSCRIBED", "warn", colour)))
              for k, v in rows]
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


def open_command(path):
    """The one command that opens ``path`` here: ``open`` (macOS), ``xdg-open`` (a Linux desktop), else ``less``."""
    if sys.platform == "darwin":
        opener = "open"
    elif sys.platform.startswith("win"):
        opener = "start"
    elif os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        opener = "xdg-open"
    else:
        opener = "less"  # a cluster node or an ssh session: report.md is Markdown, readable as text
    return f"{opener} {shlex.quote(str(path))}"


def run_footer(run_dir, colour=False):
    """The last lines of a run's output: its folder, and the command that opens its report."""
    return "\n".join([f"run folder   {paint(str(run_dir), 'bold', colour)}",
                      f"open report  {open_command(os.path.join(str(run_dir), 'report.md'))}"])


def _mb(n):
    return f"{n / 1e6:.1f} MB"


def plan_table(plan, colour=False):
    """What ``--dry-run`` prints: the resolved plan of a run (:func:`mlpcore.cli.plan`), nothing trained."""
    label = model_label({"config": {"model": plan["model"]["name"], "hidden": []}, "model": plan["model"]})
    n, workers, shards = plan["data"]["n_train"], plan["workers"], plan["shards"]
    flops = plan["model"]["flops_per_sample"]
    total = flops * n * plan["epochs"]
    where = "this machine" if plan["launcher"] != "mpi" else (
        f"{plan['nodes']} node(s), {plan['workers_per_node']} rank(s) per node" if plan["nodes"] > 1 else "one node")
    unit = "ranks" if plan["launcher"] == "mpi" else "workers"
    rows = [
        ("strategy", ", ".join(f"{s} ({plan['vote']} vote)" if s == "ensemble" else s for s in plan["strategies"])),
        ("launcher", f"{plan['launcher']}: {workers} {unit} on {where}"),
        ("threads", f"{plan['threads']} BLAS thread(s) per {unit[:-1]}, {plan['cores']} cores"
                    + (f": OVERSUBSCRIBED ({plan['workers_per_node'] * plan['threads']} threads at once)"
                       if plan["oversubscribed"] else "")),
        *oversubscribed_rows({"oversubscribed": plan["oversubscribed"], "cores": plan["cores"]}, [plan["threads"]]),
    ]
    if plan.get("mpi_library"):
        rows.append(("MPI library", plan["mpi_library"]))
    rows += [
        ("model", f"{label}, {plan['model']['trainer']} {plan['model']['dtype']}: "
                  f"{flops:,} FLOPs per training sample (forward + backward)"),
        ("data", f"{n} train / {plan['data']['n_test']} test images, {plan['data']['origin']}"),
    ]
    if "allreduce" in plan["strategies"]:
        rows.append(("shards", f"allreduce: every rank holds all {n} images and computes 1/{workers} of each batch"))
    if plan["strategies"] != ["allreduce"]:
        sizes = sorted(set(shards))
        rows.append(("shards", f"{workers} x {'-'.join(map(str, sizes))} images"
                               + (f" ({', '.join(map(str, shards))})" if 1 < len(sizes) and len(shards) <= 8 else "")))
    rows.append(("training", f"{plan['epochs']} epochs, batch {plan['batch_size']}: {total:.3g} FLOPs in all, "
                             f"{total / workers:.3g} per {unit[:-1]}"))
    for strategy, moves in plan["bytes"].items():
        rows.append((f"bytes ({strategy})" if len(plan["bytes"]) > 1 else "bytes moved",
                     ", ".join(f"{k} {_mb(v)}" for k, v in moves.items()) + f" ({_mb(sum(moves.values()))} in all)"))
    for threads in plan["baselines"]:
        rows.append(("baseline", f"sequential, {threads} BLAS thread(s): the same model on all {n} images "
                                 f"({total:.3g} FLOPs)"))
    rows.append(("output", plan["out"]))
    width = max(len(k) for k, _ in rows)
    lines = [paint("mlpcore: the plan (--dry-run: nothing was trained)", "bold", colour), "-" * (width + 60)]
    lines += [f"{k:<{width}}  " + (paint(v, "warn", colour) if k == "  what to do" else
                                  v.replace("OVERSUBSCRIBED", paint("OVERSUBSCRIBED", "warn", colour)))
              for k, v in rows]
    return "\n".join(lines)
