"""Figures of one run: confusion matrices and the run's task graph.

Matplotlib runs on the Agg backend unless ``--show`` asks for windows, so a
run on a cluster node never blocks on a display.
"""

from __future__ import annotations

from pathlib import Path

from ..data import N_CLASSES, N_FEATURES
from ..fsio import atomic_savefig
from .console import model_label
from .metrics import confusion_matrix
from .trace import gantt


def _pyplot(show):
    import matplotlib

    if not show:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def preload():
    """Import the figures' libraries now (seaborn alone takes most of a second)."""
    _pyplot(show=False)
    import networkx  # noqa: F401
    import seaborn  # noqa: F401


def run_figures(run_dir, results, predictions, show=False):
    """Draw the run's figures into ``run_dir``; returns their file names.

    ``results``: the results.json document; ``predictions``: the arrays of
    predictions.npz plus ``y_test`` (see :func:`mlpcore.report.write.write_run`).
    """
    plt = _pyplot(show)
    run_dir = Path(run_dir)
    cfg, files = results["config"], []
    title = f"{model_label(results)}, {cfg['strategy']}" + (f" ({cfg['vote']} vote)" if cfg["strategy"] == "ensemble"
                                                            else "")
    y_test = predictions["y_test"]
    files.append(confusion_heatmap(plt, run_dir / "confusion_parallel.png", y_test, predictions["y_pred"],
                                   f"{title}, {results['environment']['world_size']} workers: "
                                   f"accuracy {results['metrics']['accuracy']:.4f}"))
    baselines = results["timings"]["baselines"]
    if baselines:
        b = baselines[0]
        files.append(confusion_heatmap(plt, run_dir / "confusion_baseline.png", y_test,
                                       predictions["baseline_y_pred"],
                                       f"{model_label(results)}, sequential baseline ({b['threads']} thread): "
                                       f"accuracy {b['accuracy']:.4f}"))
    if cfg["strategy"] == "ensemble":
        files.append(task_graph(plt, run_dir / "task_graph.png", results))
    if results.get("compare"):
        files.append(compare_plot(plt, run_dir / "compare.png", results))
    files.append(gantt(plt, run_dir / "timeline.png", results))  # the same events as trace.json
    if not show:
        plt.close("all")
    return files


def confusion_heatmap(plt, path, y_true, y_pred, title):
    """Seaborn heatmap of the confusion matrix, counts annotated."""
    import seaborn as sns

    cm = confusion_matrix(y_true, y_pred)
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    sns.heatmap(cm, annot=True, fmt="d", cmap="Blues", cbar=False, ax=ax, annot_kws={"size": 7})
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    return path.name


def _bytes(n):
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def task_graph(plt, path, results):
    """The run's real task graph: load, shards to ranks, train, predictions to the vote, baseline.

    Edges carry the bytes that moved: each rank's uint8 shard and labels, the
    broadcast test set, and each rank's float32 test probabilities.
    """
    import networkx as nx

    n = results["environment"]["world_size"]
    n_test = results["data"]["n_test"]
    n_features = N_FEATURES
    shard_sizes = results["data"]["shard_sizes"]
    G = nx.DiGraph()
    G.add_node("load", layer=0, label=f"load MNIST\n(rank 0)")
    G.add_node("vote", layer=3, label="vote\n(rank 0)")
    for r in range(n):
        G.add_node(f"train{r}", layer=1, label=f"train {results['config']['model']}\nrank {r}\n{shard_sizes[r]} imgs")
        G.add_node(f"predict{r}", layer=2, label=f"predict\nrank {r}")
        shard_bytes = shard_sizes[r] * (n_features + 1)
        test_bytes = 0 if r == 0 else n_test * n_features
        G.add_edge("load", f"train{r}", label=_bytes(shard_bytes + test_bytes))
        G.add_edge(f"train{r}", f"predict{r}", label="model")
        G.add_edge(f"predict{r}", "vote", label=_bytes(n_test * N_CLASSES * 4))
    if results["timings"]["baselines"]:
        G.add_node("baseline", layer=1.5, label="sequential\nbaseline\n(rank 0)")
        G.add_edge("load", "baseline", label="all data, on rank 0")
        G.add_edge("baseline", "vote", label="compare")
    # Columns are the stages, rows are the ranks (rank 0 on top); the baseline
    # runs on rank 0 after the parallel part, drawn in a row of its own below.
    pos = {"load": (0, -(n - 1) / 2), "vote": (3, -(n - 1) / 2), "baseline": (1.5, -n - 0.2)}
    for r in range(n):
        pos[f"train{r}"], pos[f"predict{r}"] = (1, -r), (2, -r)
    fig, ax = plt.subplots(figsize=(10, 2.2 + 1.2 * n))
    nx.draw_networkx_nodes(G, pos, ax=ax, node_size=2600, node_color="#dbe9f6", edgecolors="#2b6ca3")
    nx.draw_networkx_labels(G, pos, labels=nx.get_node_attributes(G, "label"), font_size=7, ax=ax)
    parallel = [e for e in G.edges if "baseline" not in e]
    nx.draw_networkx_edges(G, pos, edgelist=parallel, ax=ax, arrows=True, arrowsize=12, node_size=2600,
                           edge_color="#555")
    labels = nx.get_edge_attributes(G, "label")
    nx.draw_networkx_edge_labels(G, pos, edge_labels={e: labels[e] for e in parallel}, font_size=6, ax=ax)
    baseline = [e for e in G.edges if "baseline" in e]
    if baseline:  # curved below the ranks, so they don't cross the shards' edges
        nx.draw_networkx_edges(G, pos, edgelist=baseline, ax=ax, arrows=True, arrowsize=12, node_size=2600,
                               edge_color="#c07020", style="dashed", connectionstyle="arc3,rad=0.25")
    ax.set_title(f"Task graph of this run ({model_label(results)}): {n} ranks, bytes moved on each edge "
                 "(uint8 shards and test set out, float32 probabilities back)", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    return path.name


def compare_plot(plt, path, results):
    """Training time against test accuracy: one point per strategy, and the sequential run."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    n = results["environment"]["world_size"]
    for name, row in results["compare"].items():
        ax.scatter(row["parallel_train_s"], row["accuracy"], s=60, label=f"{name} ({n} ranks)")
        ax.annotate(name, (row["parallel_train_s"], row["accuracy"]), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    for b in results["timings"]["baselines"]:
        ax.scatter(b["train_s"], b["accuracy"], marker="s", s=60, color="black",
                   label=f"sequential ({b['threads']} thread{'s' if b['threads'] > 1 else ''})")
    ax.set_xlabel("training time (s), slowest rank")
    ax.set_ylabel("test accuracy")
    ax.set_title("What each strategy buys (time) and costs (accuracy)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    return path.name
