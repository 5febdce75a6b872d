"""report.md: the summary, environment, per-rank phase times, classification reports and figures."""

from __future__ import annotations


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
