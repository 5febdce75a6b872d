"""How would a measured run scale on a real cluster? The alpha-beta-gamma projection.

A run folder gives what one rank does in a step (its compute at the batch it
had, Adam, the bucket plan) and the 1-thread sequential baseline; a
:class:`Cluster` gives the links (latency ``alpha``, seconds per byte
``beta``, reduction seconds per byte ``gamma``, within and between nodes).
:func:`project` combines them into the training time at N ranks.

What it models, per strategy (``steps`` = optimiser steps of the run):

* **allreduce**: ``steps x (compute(B/N) + Adam + exposed communication)``.
  ``compute(b) = c0 + c1*b`` is the line through the two measured points (the
  baseline at the global batch B, the run at its per-rank batch), so the
  per-step fixed cost that does not shrink with the batch is kept. Exposed
  communication: ``none`` waits for every bucket after backprop; ``nonblocking``
  and ``thread`` (wait-free backprop) post each bucket when backprop has
  produced it (the backward pass is split over the layers by their gradient
  FLOPs) and wait only for what outlasts the backward pass, the buckets going
  one after another on one channel. A collective is rounds of messages:
  ``thread`` starts each as the last one ends, ``nonblocking`` only when the
  rank next calls into MPI (a hand-over of backprop, or the final wait:
  MPICH's progress rule). Nothing is hidden on a link whose
  transfers are copies by the computing cores (shared memory, emulated
  nodes: ``Link.host_cpu``). ``--shard-optimizer``: reduce-scatter per
  bucket, Adam on 1/N, an allgather of the parameters after it.
  ``--node-shm``: the node's ranks sum through shared memory, the leaders
  allreduce the node sums (hierarchical), Adam on 1/L.
* **localsgd**: ``steps x compute(B/N)`` and one allreduce of the parameters
  every K steps (K = 0: once).
* **ensemble**: each member trains 1/N of the data at batch B; the shards are
  scattered and the test probabilities gathered once.

Collectives (the formulas of Thakur, Rabenseifner and Gropp, "Optimization of
collective communication operations in MPICH", IJHPCA 19(1), 2005, which
MPICH's ``allreduce_intra_*.c`` comments restate): ring, recursive doubling,
Rabenseifner (reduce-scatter + allgather) and hierarchical (node reduce,
allreduce of the leaders, node broadcast). The default is MPICH's own choice
(``MPIR_Allreduce_intra_auto``): recursive doubling up to 2048 bytes,
Rabenseifner above. Recursive doubling and Rabenseifner are costed step by
step: with ranks placed node by node, a step whose partner is on the same node
uses the intra-node link. The ring goes at the pace of its slowest link.

Kept from the run: what its ranks waited in communication beyond the model's
cost of the run's own communication (:func:`unexplained_wait`: a straggler's
lag, a comm thread's hand-over), as a fixed cost per step or per sync. With
more ranks than cores, communication on a ``host_cpu`` link is stretched like
the compute.

Left out, on purpose: contention of several ranks for one NIC or a shared
switch, how stragglers grow with the rank count, the OS, the handshakes
within one round of messages, and any effect of the batch size on accuracy
or on the number of epochs needed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mlpcore.errors import UsageError

ALGORITHMS = ("mpich", "ring", "recursive_doubling", "rabenseifner", "hierarchical")
MPICH_SHORT_ALLREDUCE = 2048        # MPIR_CVAR_ALLREDUCE_SHORT_MSG_SIZE: recursive doubling up to here
MPICH_SHORT_ALLGATHER = 81920       # MPIR_CVAR_ALLGATHER_SHORT_MSG_SIZE: recursive doubling below, ring above


# --------------------------------------------------------------------------- links and clusters
@dataclass(frozen=True)
class Link:
    """One kind of link in the Hockney / alpha-beta-gamma model.

    A message of ``n`` bytes costs ``alpha + n * beta``; reducing ``n`` bytes
    into a buffer costs ``n * gamma`` (that is the CPU's work, so it belongs
    to the node rather than the wire; it is kept per link because netbench
    fits it per link).
    """

    name: str
    alpha_s: float
    beta_s_per_byte: float
    gamma_s_per_byte: float
    source: str = ""
    host_cpu: bool = False          # its transfers are copies by the cores that also compute
    large: "Link | None" = None     # the parameters of messages of ``large_from`` bytes and more
    large_from: int = 0
    measured: bool = False          # fitted to measurements of this link (netbench), not assumed

    def at(self, n):
        """The parameters that hold for a message of ``n`` bytes (eager and rendezvous protocols differ)."""
        return self.large if self.large is not None and n >= self.large_from else self

    def send(self, n):
        link = self.at(n)
        return link.alpha_s + n * link.beta_s_per_byte

    def reduce(self, n):
        return n * self.at(n).gamma_s_per_byte


@dataclass(frozen=True)
class Cluster:
    """Nodes of ``ranks_per_node`` ranks: ``intra`` between ranks of a node, ``inter`` between nodes.

    ``cores_per_node``: when a node holds more ranks than cores, they share
    them and each rank's compute and Adam take ``ranks_per_node /
    cores_per_node`` times longer, and so does communication on a link whose
    transfers are the cores' own copies (``Link.host_cpu``). None: one core per rank.
    """

    name: str
    intra: Link
    inter: Link
    ranks_per_node: int = 1
    cores_per_node: int | None = None
    source: str = ""

    def nodes(self, ranks):
        return math.ceil(ranks / self.ranks_per_node)

    def per_node(self, ranks):
        return min(ranks, self.ranks_per_node)

    def oversubscription(self, ranks):
        cores = self.cores_per_node
        return max(1.0, self.per_node(ranks) / cores) if cores else 1.0


# Shared memory inside a node: a typical two-socket server's MPI shared-memory
# transport (about half a microsecond, 10 GB/s for a copy) and one core
# summing float32 arrays out of cache (about 4 GB/s). Assumed, not measured:
# netbench.py measures them on your nodes.
NODE_SHM = Link("shm", 0.5e-6, 1 / 10e9, 1 / 4e9,
                "assumed: typical MPI shared-memory latency and copy rate of a server node", host_cpu=True)
GAMMA = NODE_SHM.gamma_s_per_byte

# Bandwidths are line rates less framing; latencies are typical MPI small-message
# latencies of the technology (they are what a preset is least sure of).
PRESET_LINKS = {
    "1gbe": Link("1gbe", 50e-6, 1 / 117.7e6, GAMMA,
                 "1000BASE-T (IEEE 802.3ab), 125 MB/s on the wire; TCP/IPv4 with timestamps in 1500-byte "
                 "frames carries 1448 of every 1538 bytes: 117.7 MB/s. Latency 50 us: kernel TCP through "
                 "a switch, assumed"),
    "10gbe": Link("10gbe", 20e-6, 1 / 1.177e9, GAMMA,
                  "10GBASE (IEEE 802.3ae), 1.25 GB/s on the wire; same TCP framing: 1.18 GB/s. "
                  "Latency 20 us: kernel TCP on a 10 GbE NIC, assumed"),
    "ib100": Link("ib100", 1.0e-6, 1 / 12.1e9, GAMMA,
                  "InfiniBand EDR 4x: 4 lanes of 25.78125 Gb/s, 64b/66b coded: 100 Gb/s = 12.5 GB/s of data; "
                  "12.1 GB/s after packet headers (4 KB MTU). Latency 1 us: MPI over RDMA verbs, assumed"),
}
PRESETS = tuple(PRESET_LINKS)


def preset(name, *, ranks_per_node=1, cores_per_node=None, intra=NODE_SHM):
    """The named cluster: ``"1gbe"``, ``"10gbe"`` or ``"ib100"`` between nodes, ``intra`` inside them."""
    if name not in PRESET_LINKS:
        raise UsageError(f"unknown cluster preset {name!r}: choose one of {', '.join(PRESETS)}, "
                         "or give a netbench JSON file")
    link = PRESET_LINKS[name]
    return Cluster(name, intra, link, ranks_per_node, cores_per_node, link.source)


LARGE_FROM = 16384     # bytes: where MPICH/UCX leave the eager protocol on the links measured here


def fit_alpha_beta_gamma(rows, p):
    """Weighted least squares of (alpha, beta, gamma) to netbench rows; returns them and the relative residuals.

    ``rows``: ``{"op": "p2p" | "allreduce", "bytes", "seconds"}``. A
    point-to-point message costs ``alpha + n beta``; an allreduce over ``p``
    ranks ``2 log2(p) alpha + 2 (p-1)/p n beta + (p-1)/p n gamma``
    (Rabenseifner). Each row is weighted by ``1/t``: the fit minimises
    relative errors, so small messages count as much as large ones.
    """
    lg = math.log2(p) if p > 1 else 0.0
    A = np.array([[1.0, r["bytes"], 0.0] if r["op"] == "p2p"
                  else [2 * lg, 2 * (p - 1) / p * r["bytes"], (p - 1) / p * r["bytes"]] for r in rows])
    y = np.array([r["seconds"] for r in rows])
    w = 1.0 / y
    coef, *_ = np.linalg.lstsq(A * w[:, None], y * w, rcond=None)
    return (*(float(c) for c in coef), (A @ coef - y) / y)


def links_from_netbench(path):
    """``{name: Link}`` from a ``scripts/netbench.py`` JSON file (links ``shm``, ``tcp``, ``inter-node``, ...).

    Each link is fitted twice from its measurements: below :data:`LARGE_FROM`
    bytes and from there up (``Link.large``), because the eager and the
    rendezvous protocols have different latencies and rates, and one line
    through both is 20-30% off in the middle (netbench's single fit; checked
    on the emulated TCP link). Emulated links (``machine.emulated``) and
    shared memory are ``host_cpu``: their transfers are copies by the cores
    (not so a link shaped by ``tc``: its time is spent waiting for tokens).
    """
    try:
        doc = json.loads(Path(path).read_text())
        emulated = bool(doc.get("machine", {}).get("emulated"))
        links = {}
        for name, r in doc["links"].items():
            p, rows = int(r["ranks"]), r["measurements"]
            regimes = []
            for part in ([m for m in rows if m["bytes"] < LARGE_FROM], [m for m in rows if m["bytes"] >= LARGE_FROM]):
                if len(part) < 3:
                    part = rows
                alpha, beta, gamma, rel = fit_alpha_beta_gamma(part, p)
                regimes.append((max(alpha, 0.0), max(beta, 0.0), max(gamma, 0.0), float(np.sqrt(np.mean(rel ** 2)))))
            source = (f"measured by netbench.py ({path}); rms fit residual {100 * regimes[0][3]:.0f}% below "
                      f"{LARGE_FROM} B, {100 * regimes[1][3]:.0f}% above")
            # a shaped link's time is the token bucket's, not the cores'
            cpu = name == "shm" or (emulated and not r.get("shaped"))
            large = Link(name, *regimes[1][:3], source, cpu, measured=True)
            links[name] = Link(name, *regimes[0][:3], source, cpu, large, LARGE_FROM, measured=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path}: not a netbench.py JSON file ({exc})") from None
    return links


def cluster_from_netbench(path, *, ranks_per_node=1, cores_per_node=None):
    """A cluster whose links netbench measured: its shared-memory link inside a node, its other link between."""
    links = links_from_netbench(path)
    intra = links.get("shm", NODE_SHM)
    others = [link for name, link in links.items() if name != "shm"]
    inter = others[0] if others else intra
    return Cluster(Path(path).stem, intra, inter, ranks_per_node, cores_per_node,
                   f"intra: {intra.source}; inter ({inter.name}): {inter.source}")


# --------------------------------------------------------------------------- collectives
def _pof2(p):
    return 1 << (p.bit_length() - 1)


def _step_link(distance, cluster):
    """The link a step with partners ``distance`` ranks apart crosses (ranks placed node by node)."""
    return cluster.intra if distance < cluster.ranks_per_node else cluster.inter


def _nodes_link(ranks, cluster):
    return cluster.inter if cluster.nodes(ranks) > 1 else cluster.intra


def _fold(n, p, cluster):
    """MPICH's extra steps for a rank count that is not a power of two: fold the extra ranks in, and out."""
    if p == _pof2(p):
        return 0.0
    link = _step_link(1, cluster)
    return 2 * link.send(n) + link.reduce(n)


def _halving(n, p, cluster):
    """The steps of recursive halving: (link, bytes each partner sends), partners 1, 2, 4, ... apart."""
    d, m = 1, n / 2
    while d < _pof2(p):
        yield _step_link(d, cluster), m
        d, m = d * 2, m / 2


def recursive_doubling(n, p, cluster):
    """Allreduce: log2(p) exchanges of all ``n`` bytes, each followed by a reduction."""
    t, d = _fold(n, p, cluster), 1
    while d < _pof2(p):
        link = _step_link(d, cluster)
        t += link.send(n) + link.reduce(n)
        d *= 2
    return t


def rabenseifner(n, p, cluster):
    """Allreduce as reduce-scatter (recursive halving) then allgather (recursive doubling).

    ``2 log2(p) alpha + 2 (p-1)/p n beta + (p-1)/p n gamma`` on one link; the
    message halves at every step of the reduce-scatter and doubles back in the
    allgather, so the big first messages stay within a node.
    """
    # each reduce-scatter step, and the allgather step that mirrors it
    return _fold(n, p, cluster) + sum(2 * link.send(m) + link.reduce(m) for link, m in _halving(n, p, cluster))


def ring(n, p, cluster):
    """Allreduce around a ring: ``2 (p-1)`` steps of ``n/p`` bytes, at the pace of the slowest link."""
    if p == 1:
        return 0.0
    link = _nodes_link(p, cluster)
    return 2 * (p - 1) * link.send(n / p) + (p - 1) * link.reduce(n / p)


def _binomial(n, p, link, reduce):
    steps = math.ceil(math.log2(p)) if p > 1 else 0
    return steps * (link.send(n) + (link.reduce(n) if reduce else 0.0))


def hierarchical(n, p, cluster, inter_algorithm="mpich"):
    """Node reduce (binomial) + allreduce among the node leaders + node broadcast (binomial)."""
    local, nodes = cluster.per_node(p), cluster.nodes(p)
    leaders = replace(cluster, ranks_per_node=1)
    return (_binomial(n, local, cluster.intra, True) + allreduce_time(n, nodes, leaders, inter_algorithm)
            + _binomial(n, local, cluster.intra, False))


def allreduce_time(n, p, cluster, algorithm="mpich"):
    """Seconds for an allreduce of ``n`` bytes over ``p`` ranks of ``cluster``."""
    if p <= 1 or n <= 0:
        return 0.0
    if algorithm == "mpich":
        count = n // 4                        # float32 elements: MPICH also wants at least one per rank
        algorithm = "recursive_doubling" if n <= MPICH_SHORT_ALLREDUCE or count < _pof2(p) else "rabenseifner"
    if algorithm == "recursive_doubling":
        return recursive_doubling(n, p, cluster)
    if algorithm == "rabenseifner":
        return rabenseifner(n, p, cluster)
    if algorithm == "ring":
        return ring(n, p, cluster)
    if algorithm == "hierarchical":
        return hierarchical(n, p, cluster)
    raise UsageError(f"unknown allreduce algorithm {algorithm!r}: choose one of {', '.join(ALGORITHMS)}")


def reduce_scatter_time(n, p, cluster):
    """Recursive halving: ``log2(p) alpha + (p-1)/p n (beta + gamma)`` (each rank keeps ``n/p`` sums)."""
    return _fold(n, p, cluster) + sum(link.send(m) + link.reduce(m) for link, m in _halving(n, p, cluster))


def allgather_time(n, p, cluster):
    """``n`` bytes in all, ``n/p`` from each rank: recursive doubling when short, a ring when long (MPICH)."""
    if p <= 1:
        return 0.0
    if n < MPICH_SHORT_ALLGATHER and p == _pof2(p):
        t, d, m = 0.0, 1, n / p
        while d < p:
            t += _step_link(d, cluster).send(m)
            d, m = d * 2, m * 2
        return t
    return (p - 1) * _nodes_link(p, cluster).send(n / p)


def scatter_time(n, p, cluster):
    """Binomial scatter of ``n`` bytes in all from one root: ``log2(p) alpha + (p-1)/p n beta``."""
    if p <= 1:
        return 0.0
    link = _nodes_link(p, cluster).at(n / p)
    return math.ceil(math.log2(p)) * link.alpha_s + (p - 1) / p * n * link.beta_s_per_byte


gather_time = scatter_time      # the same tree, the other way


# --------------------------------------------------------------------------- the run's profile
@dataclass(frozen=True)
class RunProfile:
    """What :func:`project` needs of a measured run (:func:`load_profile` reads it from a run folder)."""

    run_dir: str
    strategy: str
    mode: str                         # overlap mode, or "sync every K", or "vote"
    shard_optimizer: bool
    node_shm: bool
    sync_every: int
    world_size: int
    ranks_per_node: int
    batch_size: int
    epochs: int
    n_train: int
    n_test: int
    n_features: int
    n_classes: int
    value_bytes: int
    n_params: int
    buckets: tuple                    # ((start, stop), ...) in gradient values, backprop order
    bucket_ready: tuple               # fraction of the backward pass done when each bucket is ready
    handover_ready: tuple             # the same for every hand-over: where `nonblocking` calls into MPI
    backward_share: float             # share of a step's compute that is the backward pass
    compute_c0_s: float               # compute(b) = c0 + c1 * b, Adam excluded, seconds per step
    compute_c1_s: float
    adam_s: float                     # Adam over all the parameters, seconds per step
    seq_train_s: float                # the 1-thread sequential baseline's training time
    measured_train_s: float
    local_batch: float                # the run's batch per rank
    notes: tuple = ()
    model: str = "mlp"
    # What the run's ranks waited in communication, seconds per step (allreduce) or per sync
    # (localsgd); None where the strategy counts its waits otherwise (ensemble, zero1, node-shm)
    measured_wait_s: float | None = None

    def compute(self, batch):
        return max(0.0, self.compute_c0_s + self.compute_c1_s * batch)

    @property
    def steps(self):
        """Optimiser steps of the sequential run (and of every data-parallel rank)."""
        return self.epochs * math.ceil(self.n_train / self.batch_size)

    @property
    def label(self):
        extra = [s for s, on in (("zero1", self.shard_optimizer), ("node-shm", self.node_shm)) if on]
        return " ".join([self.strategy, self.mode, *extra])


def _layer_times(model):
    """Per layer in backprop order: (first value, last value, weight-gradient share, input-gradient share)."""
    shape, work = model.layers[0].in_shape(), []
    for layer in model.layers:
        forward, weights, inputs = layer.flops(tuple(shape))
        work.append((forward, weights, inputs if layer.needs_input_grad else 0))
        shape = layer.out_shape(tuple(shape))
    backward = sum(w + x for _, w, x in work)
    total = backward + sum(f for f, _, _ in work)
    spans = {}
    for s in model.layout:
        lo, hi = spans.get(s.layer, (s.start, s.stop))
        spans[s.layer] = (min(lo, s.start), max(hi, s.stop))
    rows = [(spans.get(i, (0, 0)), work[i][1] / backward, work[i][2] / backward)
            for i in range(len(model.layers) - 1, -1, -1)]
    return rows, backward / total


def ready_fractions(model, counts):
    """When backprop has made the first ``c`` gradient values final, for each ``c``, as a fraction of the pass."""
    rows, _ = _layer_times(model)
    marks, t = [], 0.0          # (gradient values final, time)
    for (lo, hi), w, x in rows:
        if hi > lo:
            marks.append((lo, t))
        t += w
        if hi > lo:
            marks.append((hi, t))
        t += x
    values = np.array([m[0] for m in marks], dtype=float)
    times = np.array([m[1] for m in marks])
    return tuple(float(np.interp(c, values, times)) for c in counts)


def bucket_ready_fractions(model, buckets):
    """When each bucket is complete, as a fraction of the backward pass.

    Backprop runs the layers last to first; a layer's weight gradient takes
    its share of the backward FLOPs, its values becoming final evenly over
    it, and then its input gradient takes its share (work without FLOPs,
    such as pooling, is spread in proportion).
    """
    return ready_fractions(model, [stop for _, stop in buckets]), _layer_times(model)[1]


def load_profile(run_dir):
    """The :class:`RunProfile` of a run folder written by ``mpi_train.py`` (its ``results.json``)."""
    path = Path(run_dir) / "results.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{run_dir}: no readable results.json ({exc})") from None
    cfg, env, tim, strat = doc["config"], doc["environment"], doc["timings"], doc["strategy"]
    name, n = strat["name"], int(env["world_size"])
    baselines = [b for b in tim.get("baselines", []) if b.get("threads") == 1] or tim.get("baselines", [])
    if not baselines:
        raise UsageError(f"{run_dir}: the run has no sequential baseline (it ran with --no-baseline); "
                         "the projection needs it for the compute at the full batch")
    if name not in ("allreduce", "localsgd", "ensemble"):
        raise UsageError(f"{run_dir}: cannot project strategy {name!r}")
    placement = env.get("placement") or {}
    ppn = max((len(r) for r in (placement.get("ranks_per_node") or {}).values()), default=n)
    B, epochs, n_train = int(cfg["batch_size"]), int(cfg["epochs"]), int(doc["data"]["n_train"])
    seq_train = float(baselines[0]["train_s"])
    steps = epochs * math.ceil(n_train / B)
    per_rank = tim["per_rank"]
    overlap = strat.get("overlap") or {}
    notes = []

    from mlpcore.nn.model import build_model
    from mlpcore.strategies.zero import bucket_bounds, handovers

    n_features = 784
    model = build_model(cfg["model"], n_features=n_features, n_classes=10, hidden=tuple(cfg["hidden"]),
                        dtype=np.dtype(cfg["dtype"]), rng=np.random.default_rng(0), kernels="numpy")
    value_bytes = model.grads.itemsize
    bucket_values = int(cfg["bucket_kb"]) * 1024 // value_bytes
    buckets = tuple(bucket_bounds(model, bucket_values, n_features))
    ready, share = bucket_ready_fractions(model, buckets)
    progress = ready_fractions(model, handovers(model, bucket_values, n_features))

    adam = 0.0          # localsgd and the ensemble step Adam inside their compute: kept in it
    wait = None
    if name == "allreduce":
        rows = overlap["breakdown_per_rank"]
        local_batch = B / n
        run_steps = int(overlap["steps"])
        work = float(np.mean([(r["train_s"] - r["reduce_s"]) / run_steps for r in rows]))     # compute + Adam
        if not (cfg["shard_optimizer"] or cfg["node_shm"]):
            wait = float(np.mean([r["reduce_s"] / run_steps for r in rows]))
        adam = float(np.mean([r["optimizer_s"] / run_steps for r in rows]))
        if cfg["shard_optimizer"] or cfg["node_shm"]:
            adam *= n if cfg["shard_optimizer"] else ppn      # each rank stepped its slice only
        mode = cfg["overlap"]
    elif name == "localsgd":
        local_batch, run_steps = B / n, steps
        work = float(np.mean([(r["train_s"] - (r.get("comm_exposed_s") or 0.0)) / run_steps for r in per_rank]))
        syncs = run_steps // int(cfg["sync_every"]) if cfg["sync_every"] else 1
        if n > 1 and syncs:
            wait = float(np.mean([(r.get("comm_exposed_s") or 0.0) for r in per_rank])) / syncs
        mode = f"K={cfg['sync_every']}"
    else:
        local_batch = B
        run_steps = epochs * math.ceil(math.ceil(n_train / n) / B)
        work = float(np.mean([r["train_s"] / run_steps for r in per_rank]))
        mode = "vote"
    seq_step = seq_train / steps
    # compute(b) = c0 + c1 b through (B, baseline) and (b, run): Adam out of both.
    if n > 1 and local_batch != B:
        c1 = ((seq_step - adam) - (work - adam)) / (B - local_batch)
        c0 = (work - adam) - c1 * local_batch
        if c0 < 0 or c1 < 0:
            notes.append(f"compute line through the two points is not increasing and positive "
                         f"(c0 {c0 * 1e3:.3f} ms, c1 {c1 * 1e6:.3f} us/sample): proportional to the batch instead")
            c0, c1 = 0.0, (work - adam) / local_batch
    else:
        c0, c1 = 0.0, (work - adam) / local_batch
        if name != "ensemble":      # the ensemble keeps the full batch: its line is never needed
            notes.append("one batch size measured: compute taken as proportional to the batch (no fixed cost)")

    return RunProfile(str(run_dir), name, mode, bool(cfg.get("shard_optimizer")), bool(cfg.get("node_shm")),
                      int(cfg.get("sync_every") or 0), n, ppn, B, epochs, n_train, int(doc["data"]["n_test"]),
                      n_features, 10, value_bytes, model.n_params, buckets, ready, progress, share, c0, c1, adam,
                      seq_train, float(tim["parallel_train_s"]), local_batch, tuple(notes), cfg["model"],
                      wait if n > 1 else None)


# --------------------------------------------------------------------------- projecting
def exposed_comm(profile, ranks, cluster, backward_s, algorithm="mpich"):
    """Per step: (seconds of gradient communication the rank waits for, seconds it all takes, bytes, calls)."""
    if ranks <= 1:
        return 0.0, 0.0, 0, 0
    sizes = [(stop - start) * profile.value_bytes for start, stop in profile.buckets]
    if profile.node_shm:
        local, nodes = cluster.per_node(ranks), cluster.nodes(ranks)
        leaders = replace(cluster, ranks_per_node=1)
        # Each rank sums its 1/L of every local block (reads L/L of a bucket, writes 1/L) between two
        # node barriers; the leaders then allreduce (or reduce-scatter) the node sums.
        def cost(n):
            intra, t = cluster.intra.at(n), 0.0
            if local > 1:
                t = (2 * math.ceil(math.log2(local)) * intra.alpha_s
                     + n * (local - 1) / local * (intra.beta_s_per_byte + intra.gamma_s_per_byte))
            if nodes > 1:
                t += (reduce_scatter_time(n, nodes, leaders) if profile.shard_optimizer
                      else allreduce_time(n, nodes, leaders, algorithm))
            return t
    elif profile.shard_optimizer:
        def cost(n):
            return reduce_scatter_time(n, ranks, cluster)
    else:
        def cost(n):
            return allreduce_time(n, ranks, cluster, algorithm)
    times = [cost(n) * _copy_stretch(ranks, cluster) for n in sizes]
    total = float(sum(times))
    if profile.mode == "none" or _nodes_link(ranks, cluster).host_cpu:
        # Nothing to overlap with: either backprop is over before the first bucket goes, or
        # the transfers are copies by the very cores that run backprop (shared memory, or
        # emulated nodes whose "wire" is the kernel copying between namespaces).
        return total, total, int(sum(sizes)), len(sizes)
    # One channel: a bucket starts when it is ready and the previous one is done. A
    # collective is a few rounds of messages; with `thread` each round starts as soon as
    # the last one ends (the thread is inside MPI), with `nonblocking` only when the rank
    # next calls into MPI: at a hand-over of backprop (its Testall), or once backprop is
    # over and it waits. A round, once started, runs on (the kernel sends what it was given).
    calls = sorted(f * backward_s for f in profile.handover_ready) if profile.mode == "nonblocking" else None
    free = 0.0
    for ready, t, n in zip(profile.bucket_ready, times, sizes):
        now = max(free, ready * backward_s)
        rounds = _rounds(n, ranks, cluster, profile)
        for _ in range(rounds):
            if calls is not None and now < backward_s:
                now = next((c for c in calls if c >= now - 1e-12), backward_s)
            now += t / rounds
        free = now
    return max(0.0, free - backward_s), total, int(sum(sizes)), len(sizes)


def unexplained_wait(profile, cluster, algorithm="mpich"):
    """What the measured run's ranks waited beyond what the model gives its communication: seconds.

    The run itself is costed on ``cluster``'s links with its own placement
    (``world_size`` ranks, ``ranks_per_node`` a node). What its ranks waited
    beyond that (a straggler's lag, a comm thread's hand-over, the
    interpreter's lock) is no transfer, so it does not change with the link:
    it is kept, per step (allreduce) or per sync (localsgd), at every rank
    count above 1. Never negative: a model that costs the run's communication
    above its measured wait has nothing to add. Only on a measured link
    (``Link.measured``, from netbench): an assumed link (a preset's) cannot
    tell the run's transfers from its lags, so nothing is kept there.
    """
    p = profile
    own = replace(cluster, ranks_per_node=p.ranks_per_node)
    if p.measured_wait_s is None or p.world_size < 2 or not _nodes_link(p.world_size, own).measured:
        return 0.0
    over = own.oversubscription(p.world_size)
    if p.strategy == "localsgd":
        modelled = allreduce_time(p.n_params * p.value_bytes, p.world_size, own, algorithm) * _copy_stretch(
            p.world_size, own)
    else:
        modelled = exposed_comm(p, p.world_size, own, p.backward_share * p.compute(p.local_batch) * over,
                                algorithm)[0]
    return max(0.0, p.measured_wait_s - modelled)


def _copy_stretch(ranks, cluster):
    """How much longer communication takes because its copies share oversubscribed cores.

    On a ``host_cpu`` link the cores copy the bytes; with more ranks than
    cores they take turns at that as at the compute. Otherwise 1.
    """
    return cluster.oversubscription(ranks) if _nodes_link(ranks, cluster).host_cpu else 1.0


def _rounds(n, ranks, cluster, profile):
    """Rounds of messages in one bucket's collective (each one needs MPI's progress to start)."""
    p = cluster.nodes(ranks) if profile.node_shm else ranks
    steps = max(1, math.ceil(math.log2(p))) if p > 1 else 1
    if profile.shard_optimizer:
        return steps                               # recursive halving
    return steps if n <= MPICH_SHORT_ALLREDUCE else 2 * steps    # recursive doubling / Rabenseifner


def _row(ranks, cluster, train_s, once_s=0.0, **extra):
    return {"ranks": ranks, "nodes": cluster.nodes(ranks), "ranks_per_node": cluster.per_node(ranks),
            "train_s": train_s, "once_s": once_s, "time_s": None if train_s is None else train_s + once_s,
            **extra}


def _scatter_shards(profile, ranks, cluster, samples):
    """Rank 0 scatters ``samples`` images (uint8) and labels: once per run, before training."""
    return scatter_time(samples * (profile.n_features + 1), ranks, cluster)


def _split(profile, ranks, scaling):
    """Data-parallel (and local SGD) work at ``ranks``: (batch per rank, steps, samples scattered)."""
    p = profile
    if scaling == "weak":           # every rank keeps the measured run's shard and per-rank batch
        shard = math.ceil(p.n_train / p.world_size)
        batch = p.local_batch
        return batch, round(p.epochs * math.ceil(shard / batch)), shard * ranks
    return p.batch_size / ranks, p.steps, p.n_train


def project(profile, ranks, cluster, *, scaling="strong", algorithm="mpich"):
    """One row: the projected training time of ``profile``'s strategy at ``ranks`` ranks of ``cluster``.

    ``scaling="strong"``: the run's data and global batch, split over the
    ranks. ``"weak"``: every rank keeps the measured run's shard and per-rank
    batch, so the data grows with the ranks. A row carries ``train_s``,
    ``once_s`` (the scatter of the shards, and the ensemble's gather),
    ``time_s`` (their sum) and the per-step parts; ``train_s`` is None, with
    a ``note``, where the strategy cannot run (fewer samples in a global
    batch than ranks). :func:`projection_rows` adds speed-up and efficiency.
    """
    if scaling not in ("strong", "weak"):
        raise UsageError(f"scaling must be 'strong' or 'weak', got {scaling!r}")
    if ranks < 1:
        raise UsageError(f"ranks must be >= 1, got {ranks}")
    p, B = profile, profile.batch_size
    over = cluster.oversubscription(ranks)
    if p.strategy == "ensemble":    # a member per rank on 1/N of the data at the full batch
        shard = math.ceil(p.n_train / (p.world_size if scaling == "weak" else ranks))
        steps = p.epochs * math.ceil(shard / B)
        compute = p.compute(B) * over
        once = (_scatter_shards(p, ranks, cluster, shard * ranks if scaling == "weak" else p.n_train)
                + gather_time(p.n_test * p.n_classes * p.value_bytes * ranks, ranks, cluster))
        return _row(ranks, cluster, steps * compute, once, steps=steps, batch_per_rank=B,
                    compute_step_s=compute, shard=shard)
    batch, steps, samples = _split(p, ranks, scaling)
    if batch < 1:
        return _row(ranks, cluster, None, note=f"a global batch of {B} cannot be split over {ranks} ranks")
    compute = p.compute(batch) * over
    once = _scatter_shards(p, ranks, cluster, samples)
    if p.strategy == "localsgd":
        syncs = 0 if ranks == 1 else (steps // p.sync_every if p.sync_every else 1)
        sync = allreduce_time(p.n_params * p.value_bytes, ranks, cluster, algorithm) * _copy_stretch(ranks, cluster)
        sync += unexplained_wait(p, cluster, algorithm) if ranks > 1 else 0.0
        return _row(ranks, cluster, steps * compute + syncs * sync, once, steps=steps, batch_per_rank=batch,
                    compute_step_s=compute, syncs=syncs, sync_s=sync, exposed_step_s=syncs * sync / steps)
    adam_ranks = ranks if p.shard_optimizer else (cluster.per_node(ranks) if p.node_shm else 1)
    adam = p.adam_s * over / adam_ranks
    exposed, total, nbytes, calls = exposed_comm(p, ranks, cluster, p.backward_share * compute, algorithm)
    gather = 0.0
    if p.shard_optimizer and ranks > 1:       # the stepped slices come back bucket by bucket
        group, among = ((replace(cluster, ranks_per_node=1), cluster.nodes(ranks)) if p.node_shm
                        else (cluster, ranks))
        gather = sum(allgather_time((stop - start) * p.value_bytes, among, group)
                     for start, stop in p.buckets) * _copy_stretch(ranks, cluster)
        calls *= 2
    step = compute + adam + exposed + gather + (unexplained_wait(p, cluster, algorithm) if ranks > 1 else 0.0)
    return _row(ranks, cluster, steps * step, once, steps=steps, batch_per_rank=batch, compute_step_s=compute,
                adam_step_s=adam, comm_step_s=total, exposed_step_s=exposed + gather, bytes_step=nbytes,
                calls_step=calls)


def projection_rows(profile, ranks_list, cluster, *, scaling="strong", algorithm="mpich"):
    """:func:`project` at every rank count, with speed-up and efficiency.

    Both count ``time_s``: training plus the one-off scatter of the shards
    (and the ensemble's gather). Strong scaling divides the measured
    sequential training time by it; weak scaling gives the scaled speed-up
    ``N * T(1) / T(N)`` of the same strategy at one rank.
    """
    one = project(profile, 1, cluster, scaling=scaling, algorithm=algorithm)["time_s"]
    rows = []
    for n in ranks_list:
        row = project(profile, n, cluster, scaling=scaling, algorithm=algorithm)
        t = row["time_s"]
        if scaling == "strong":
            ref = profile.seq_train_s      # the measured sequential run, as every report's speed-up
            row["speedup"] = ref / t if t else None
            row["efficiency"] = ref / t / n if t else None
        else:
            row["speedup"] = n * one / t if t else None       # scaled speed-up: N times the work
            row["efficiency"] = one / t if t else None
        rows.append({"strategy": profile.label, "scaling": scaling, **row})
    return rows


def default_ranks():
    return [2 ** k for k in range(11)]        # 1 .. 1024
