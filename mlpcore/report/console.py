"""The console summary of a run: what was run, how long it took, what it bought and cost."""

from __future__ import annotations


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
