#!/usr/bin/env python3
"""Measure a link: point-to-point and allreduce latency/bandwidth, fitted to the alpha-beta-gamma model.

Two ways to run it:

* **Under MPI, 2 ranks** (any launcher): measures the link between rank 0 and rank 1,
  whatever it is, and writes JSON. On a cluster, the same under sbatch::

      sbatch --nodes=2 --ntasks-per-node=1 --wrap "srun --mpi=pmi2 python scripts/netbench.py --out netbench.json"
      mpirun -n 2 python scripts/netbench.py --out shm.json           # one node: shared memory

* **On this machine, emulated** (root; scripts/netns_cluster.py)::

      python scripts/netbench.py --emulate --out netbench.json
      python scripts/netbench.py --emulate --shape 1gbit --out netbench-1gbit.json   # tc tbf

  runs it twice: ``shm`` (one emulated node, 2 ranks: MPICH's shared memory) and ``tcp``
  (2 emulated nodes x 1 rank: UCX over TCP through the veths and the bridge), and writes
  both links into one JSON file.

Model (Hockney, with Rabenseifner's allreduce for p ranks)::

    point-to-point, n bytes, one way:   t = alpha + beta * n
    allreduce, n bytes, p ranks:        t = 2 log2(p) alpha + 2 (p-1)/p n beta + (p-1)/p n gamma

alpha (s), beta (s/byte) and gamma (reduction s/byte) are fitted per link by weighted
least squares over all the measurements at once (each row weighted by 1/t, so the fit
minimises relative errors and small messages count as much as large ones); the JSON keeps
every measurement, the fitted value of each and its relative residual, and the RMS
relative residual. Message sizes: 8 B to 16 MiB by factors of 4 (``--sizes`` to change).
Each operation is timed on its own; ``seconds`` is the median over ``--trials`` batches
(the slowest rank's, for the allreduce), ``min_seconds`` the fastest. The fit uses the
median: what a training step typically pays (the minimum of batch means, used before,
favours the luckiest batch). On a shared 2-core box treat them as indicative.

``--busy-us US`` measures the link as training loads it: US microseconds of 1-thread
compute before every timed message (untimed), after a few seconds of such traffic. A link
whose transfers are the kernel's or the cores' work (shared memory, the emulated veths)
can cost more then; a NIC with its own engine mostly doesn't. The JSON records ``busy_us`` and the BLAS threads pinned (1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from mlpcore.parallel.blas import pin_blas_threads  # noqa: E402
from mlpcore.study.projection import fit_alpha_beta_gamma  # noqa: E402
DEFAULT_SIZES = [8 * 4**k for k in range(12)]   # 8 B .. 32 MiB; trimmed to <= 16 MiB below
DEFAULT_SIZES = [n for n in DEFAULT_SIZES if n <= 16 * 2**20] + [16 * 2**20]
DEFAULT_SIZES = sorted(set(DEFAULT_SIZES))


LOADED_WARMUP_S = 3.0   # seconds of busy + 512 KB allreduces before a --busy-us measurement


def reps_for(n):
    return max(3, min(400, int(2e6 / max(n, 1e3))))      # ~2 MB per batch, 3..400 round trips


# --------------------------------------------------------------------------- measuring (under MPI)
def _timed(comm, op, reps, trials, busy):
    """Seconds of each call of ``op()`` after a warm-up batch: ``trials`` batches of ``reps``, each after a barrier.

    ``busy()`` runs, untimed, before every call: the compute a training step puts between its messages.
    """
    from mpi4py import MPI

    times = []
    for trial in range(trials + 1):                  # trial 0 warms up
        comm.Barrier()
        for _ in range(reps):
            busy()
            t0 = MPI.Wtime()
            op()
            if trial:
                times.append(MPI.Wtime() - t0)
    return np.array(times)


def busy_for(seconds):
    """A callable that keeps this core computing for ``seconds``: 1-thread GEMMs of an MLP layer's shapes.

    Back-to-back messages are not what training sends: between two of its messages a core
    computes, and then the same transfer can cost more. On the emulated TCP link (veths, the
    Intel machine) a 407 KB allreduce took 137-144 us back to back, in 12 blocks of 300, and
    290-390 us once 600 us of GEMMs ran before each, from the second block on (nstat: TCP
    fast retransmits after reordering), which is what the MLP's training paid (360 us a step).
    ``seconds <= 0``: nothing.
    """
    if seconds <= 0:
        return lambda: None
    from mpi4py import MPI

    x = np.random.default_rng(0).random((100, 784), dtype=np.float32)
    w = np.random.default_rng(1).random((784, 128), dtype=np.float32)

    def busy():
        t0 = MPI.Wtime()
        while MPI.Wtime() - t0 < seconds:
            x @ w
    return busy


def measure(comm, sizes, trials, busy_s=0.0):
    """Per size: the median one-way p2p time and the median allreduce time (the slowest rank's), and their minima."""
    from mpi4py import MPI

    rank, size = comm.Get_rank(), comm.Get_size()
    busy = busy_for(busy_s)

    def ping_pong():                                  # between ranks 0 and 1; one way = round trip / 2
        if rank == 0:
            comm.Send(a, dest=1, tag=7)
            comm.Recv(b, source=1, tag=7)
        elif rank == 1:
            comm.Recv(b, source=0, tag=7)
            comm.Send(a, dest=0, tag=7)

    if busy_s > 0:   # the link's loaded state takes a few seconds of training-like traffic to set in
        grad, summed = np.ones(2**17, np.float32), np.empty(2**17, np.float32)
        t_end = MPI.Wtime() + LOADED_WARMUP_S
        while comm.bcast(MPI.Wtime() < t_end, root=0):
            busy()
            comm.Allreduce(grad, summed, op=MPI.SUM)
    rows = []
    for n in sizes:
        count = max(1, n // 4)                            # float32 elements
        a = np.ones(count, np.float32)
        b = np.empty_like(a)
        reps = reps_for(n) if busy_s <= 0 else min(reps_for(n), 100)   # busy reps cost busy_s each
        times = _timed(comm, ping_pong, reps, trials, busy) / 2
        med, low = comm.bcast((float(np.median(times)), float(np.min(times))), root=0)
        rows.append({"op": "p2p", "bytes": count * 4, "seconds": med, "min_seconds": low, "reps": reps * trials})
        times = _timed(comm, lambda: comm.Allreduce(a, b, op=MPI.SUM), reps, trials, busy)
        med = comm.allreduce(float(np.median(times)), op=MPI.MAX)
        low = comm.allreduce(float(np.min(times)), op=MPI.MAX)
        rows.append({"op": "allreduce", "bytes": count * 4, "seconds": med, "min_seconds": low,
                     "reps": reps * trials, "ranks": size})
    return rows


def fit(rows, p):
    """Weighted least squares for (alpha, beta, gamma); returns the fit dict (rows get fitted/residual)."""
    alpha, beta, gamma, rel = fit_alpha_beta_gamma(rows, p)
    for r, e in zip(rows, rel):
        r["fitted_seconds"] = float(r["seconds"] * (1 + e))
        r["relative_residual"] = float(e)
        r["bandwidth_MBps"] = r["bytes"] / r["seconds"] / 1e6
    return {"alpha_s": alpha, "beta_s_per_byte": beta, "gamma_s_per_byte": gamma,
            "bandwidth_GBps": (1 / beta / 1e9) if beta > 0 else None,
            "rms_relative_residual": float(np.sqrt(np.mean(rel ** 2))),
            "max_abs_relative_residual": float(np.max(np.abs(rel))),
            "model": {"p2p": "alpha + beta*n",
                      "allreduce": "2*log2(p)*alpha + 2*(p-1)/p*n*beta + (p-1)/p*n*gamma (Rabenseifner)"}}


def rank_main(args):
    import mpi4py

    mpi4py.rc.thread_level = "multiple"                   # as mlpcore runs it
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_size() < 2:
        sys.exit("netbench: needs 2 ranks or more (mpirun -n 2 / srun -n 2)")
    hosts = comm.allgather(MPI.Get_processor_name())
    blas_threads = pin_blas_threads(1)                    # one BLAS thread a rank, as mlpcore pins them
    rows = measure(comm, args.sizes, args.trials, args.busy_us * 1e-6)
    if comm.Get_rank() != 0:
        return 0
    p = comm.Get_size()
    link = args.link or ("shm" if hosts[0] == hosts[1] else "inter-node")
    result = {"link": link, "ranks": p, "hosts": hosts, "mpi": MPI.Get_library_version().splitlines()[0],
              "env": {k: os.environ[k] for k in ("UCX_TLS", "UCX_NET_DEVICES", "FI_PROVIDER") if k in os.environ},
              "busy_us": args.busy_us, "blas_threads": blas_threads, "fit": fit(rows, p), "measurements": rows}
    text = json.dumps({"links": {link: result}}, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    print(summary(link, result), file=sys.stderr)
    return 0


def summary(link, r):
    f = r["fit"]
    lines = [f"{link:10s} alpha {f['alpha_s'] * 1e6:9.2f} us   beta {f['beta_s_per_byte'] * 1e9:8.4f} ns/B "
             f"({(f['bandwidth_GBps'] or float('nan')):6.2f} GB/s)   gamma {f['gamma_s_per_byte'] * 1e9:8.4f} ns/B   "
             f"rms residual {f['rms_relative_residual'] * 100:5.1f}%  ({r['ranks']} ranks on {sorted(set(r['hosts']))})"]
    for m in r["measurements"]:
        lines.append(f"    {m['op']:9s} {m['bytes']:>9d} B  {m['seconds'] * 1e6:11.2f} us  "
                     f"{m['bandwidth_MBps']:9.1f} MB/s  fit {m['relative_residual'] * 100:+6.1f}%")
    return "\n".join(lines)


# --------------------------------------------------------------------------- emulated links (root)
def emulate_main(args):
    sys.path.insert(0, str(HERE))
    import netns_cluster as nc

    python = args.python or sys.executable
    me = [python, str(Path(__file__).resolve()), "--trials", str(args.trials), "--busy-us", str(args.busy_us),
          "--sizes", ",".join(map(str, args.sizes))]
    links = {}
    with nc.EmulatedCluster(nodes=2) as cluster:
        if args.shape:
            try:
                cluster.shape_all(args.shape)
            except RuntimeError as exc:
                sys.exit(f"netbench: {exc}")
        plans = [("shm", ["node0"], 2), ("tcp", ["node0", "node1"], 1)]
        for link, hosts, ppn in plans:
            out = Path(args.out or "netbench.json").with_suffix(f".{link}.part.json")
            run = cluster.mpirun([*me, "--link", link, "--out", str(out)], ppn=ppn, hosts=hosts,
                                 timeout=args.timeout)
            if run.returncode != 0 or not out.exists():
                sys.stderr.write(run.output)
                sys.exit(f"netbench: the {link} run failed ({run.returncode})")
            part = json.loads(out.read_text())["links"]
            if args.shape and link == "tcp":
                part["tcp"]["shaped"] = f"tbf rate {args.shape} on both veths"
            links.update(part)
            out.unlink()
    text = json.dumps({"links": links, "machine": {"cores": os.cpu_count(), "emulated": True}}, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"netbench: wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    for link, r in links.items():
        print(summary(link, r), file=sys.stderr)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--emulate", action="store_true", help="run shm and tcp links on emulated nodes (root)")
    ap.add_argument("--out", help="JSON file (default: stdout)")
    ap.add_argument("--link", help="name of the link in the JSON (default: shm or inter-node from the hosts)")
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=DEFAULT_SIZES,
                    help="message sizes in bytes, comma-separated (default 8 B .. 16 MiB)")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--busy-us", type=float, default=0, metavar="US",
                    help="compute this long (1-thread GEMMs, untimed) before every timed message, as a "
                         "training step does between its messages, after %g s of such traffic; "
                         "default 0: back to back" % LOADED_WARMUP_S)
    ap.add_argument("--timeout", type=float, default=300, help="--emulate: seconds per run")
    ap.add_argument("--shape", metavar="RATE", help="--emulate: shape the TCP link with tc tbf (e.g. 1gbit)")
    ap.add_argument("--python", help="--emulate: interpreter for the ranks (default: this one)")
    args = ap.parse_args(argv)
    if args.busy_us < 0:
        ap.error(f"--busy-us must be >= 0, got {args.busy_us}")
    if args.trials < 1:
        ap.error(f"--trials must be >= 1, got {args.trials}")
    return emulate_main(args) if args.emulate else rank_main(args)


if __name__ == "__main__":
    sys.exit(main())
