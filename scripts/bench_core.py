#!/usr/bin/env python
"""Benchmark of mlpcore's core: the numpy MLP against scikit-learn, and the MPI ensemble.

What it measures, in one run on this machine:

1. the machine's single-thread float32 GEMM rate (a large square sgemm, best of
   several) and the rate at the model's own GEMM shapes (batch 200, 784-128-10);
   the square rate is measured again right before each numpy fit, and each fit
   is judged against that (this VM's speed drifts by 10-20% over minutes);
2. mlpcore's sequential numpy MLP (``mlpcore.nn.train.train_sequential``) against
   scikit-learn's ``MLPClassifier`` fed float64 (the reference program: X / 255.)
   and float32, at 1 and 2 BLAS threads (threadpoolctl), same hyper-parameters;
3. the MPI ensemble, ``mpirun -n N python mpi_train.py --out <tmp> --quiet`` with
   the default settings, for N = 2 and 4, timed around the whole command;

then prints a "targets" block with PASS/FAIL and the measured value of each.

Usage (from the repository root, with the venv's bin first on PATH):

    python scripts/bench_core.py                  # full run, a few minutes
    python scripts/bench_core.py --repeats 5
    python scripts/bench_core.py --sklearn-repeats 1   # the slow sklearn float64 fits once
    python scripts/bench_core.py --quick          # small data: a smoke run, targets not judged
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlpcore.data import load_mnist, to_float  # noqa: E402
from mlpcore.nn.fpenv import status as denormal_status  # noqa: E402
from mlpcore.nn.kernels import describe, get_kernels  # noqa: E402
from mlpcore.nn.model import build_model  # noqa: E402
from mlpcore.nn.optim import Adam  # noqa: E402
from mlpcore.nn.train import train_sequential  # noqa: E402

HIDDEN, BATCH, LR, ALPHA = 128, 200, 1e-3, 1e-4


# -- helpers -----------------------------------------------------------------------------
def cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def blas_pools():
    return [f"{p['internal_api']} {p.get('version')} ({p.get('architecture')}, {p['num_threads']} threads)"
            for p in threadpool_info() if p.get("user_api") == "blas"]


def blas_threads_now():
    return max([p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"] or [1])


def stats(values):
    """(median, min, max) of a list of numbers."""
    return statistics.median(values), min(values), max(values)


def fmt_stats(values, unit="s", digits=2):
    med, lo, hi = stats(values)
    if len(values) == 1:
        return f"{med:.{digits}f} {unit} (n=1)"
    return f"{med:.{digits}f} {unit} [{lo:.{digits}f}-{hi:.{digits}f}] (n={len(values)})"


def mlp_flops(n_samples, epochs, n_in=784, hidden=HIDDEN, n_out=10):
    """Forward + weight gradients + hidden-layer input gradients (biases, softmax, Adam not counted)."""
    per_sample = 2 * (n_in * hidden + hidden * n_out) * 2 + 2 * hidden * n_out
    return n_samples * epochs * per_sample


def time_call(fn, min_time=0.2, rounds=5):
    """Best seconds per call of ``fn`` over ``rounds`` rounds of about ``min_time`` each."""
    fn()
    n, t = 1, 0.0
    while True:  # calls per round
        start = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - start
        if t >= min_time / 4 or n > 1 << 20:
            break
        n *= 4
    n = max(1, int(n * min_time / max(t, 1e-9)))
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best


# -- 1. GEMM rates -----------------------------------------------------------------------
def gemm_rates(threads, size, quick):
    rng = np.random.default_rng(0)
    out = {}
    with threadpool_limits(threads):
        a = rng.random((size, size), dtype=np.float32)
        b = rng.random((size, size), dtype=np.float32)
        c = np.empty((size, size), dtype=np.float32)
        t = time_call(lambda: np.dot(a, b, out=c), min_time=0.5 if not quick else 0.2, rounds=5 if not quick else 3)
        out["square"] = 2 * size ** 3 / t

        # The model's GEMMs for one batch of 200, with the operands laid out as mlpcore's
        # forward/backward pass them (transposed views where backprop uses .T).
        X = rng.random((BATCH, 784), dtype=np.float32)
        W1 = rng.random((784, HIDDEN), dtype=np.float32)
        H = rng.random((BATCH, HIDDEN), dtype=np.float32)
        W2 = rng.random((HIDDEN, 10), dtype=np.float32)
        Z2 = np.empty((BATCH, 10), dtype=np.float32)
        D2 = rng.random((BATCH, 10), dtype=np.float32)
        D1 = rng.random((BATCH, HIDDEN), dtype=np.float32)
        G1 = np.empty((784, HIDDEN), dtype=np.float32)
        G2 = np.empty((HIDDEN, 10), dtype=np.float32)
        Z1 = np.empty((BATCH, HIDDEN), dtype=np.float32)
        shapes = [
            ("forward 1   200x784 @ 784x128", lambda: np.dot(X, W1, out=Z1), 2 * BATCH * 784 * HIDDEN),
            ("forward 2   200x128 @ 128x10", lambda: np.dot(H, W2, out=Z2), 2 * BATCH * HIDDEN * 10),
            ("wgrad 2     128x200 @ 200x10 (A^T)", lambda: np.dot(H.T, D2, out=G2), 2 * BATCH * HIDDEN * 10),
            ("input grad  200x10 @ 10x128 (B^T)", lambda: np.dot(D2, W2.T, out=Z1), 2 * BATCH * 10 * HIDDEN),
            ("wgrad 1     784x200 @ 200x128 (A^T)", lambda: np.dot(X.T, D1, out=G1), 2 * BATCH * 784 * HIDDEN),
        ]
        per_shape, total_t, total_f = [], 0.0, 0
        for name, fn, flops in shapes:
            t = time_call(fn, min_time=0.2 if not quick else 0.05, rounds=5 if not quick else 3)
            per_shape.append((name, flops / t, t))
            total_t += t
            total_f += flops
        out["shapes"] = per_shape
        out["model_mix"] = total_f / total_t  # the epoch's GEMM mix, as if nothing else ran
        out["threads"] = blas_threads_now()
    return out


# -- 2. sequential trainers --------------------------------------------------------------
def square_gemm_rate(size, threads):
    """The square-sgemm rate now (a short measurement, taken next to each timed fit)."""
    rng = np.random.default_rng(1)
    a, b = rng.random((size, size), dtype=np.float32), rng.random((size, size), dtype=np.float32)
    c = np.empty_like(a)
    with threadpool_limits(threads):
        return 2 * size ** 3 / time_call(lambda: np.dot(a, b, out=c), min_time=0.3, rounds=3)


def run_numpy(data, threads, epochs, x_test32, kernels="auto", flush=True, gemm_size=None):
    """One fit of mlpcore's MLP: (seconds, accuracy, BLAS threads, final params, GEMM rate just before).

    This VM's speed drifts by 10-20% over minutes, so the GEMM rate a fit is
    compared with is measured right before that fit (``gemm_size``; None: not).
    """
    rate = square_gemm_rate(gemm_size, threads) if gemm_size else None
    with threadpool_limits(threads):
        used = blas_threads_now()
        model, losses, seconds = train_sequential(data.x_train, data.y_train, hidden=(HIDDEN,), epochs=epochs,
                                                  batch_size=BATCH, seed=0, dtype=np.float32, lr=LR, alpha=ALPHA,
                                                  kernels=kernels, flush=flush)
        acc = float(np.mean(model.predict(x_test32) == data.y_test))
    return seconds, acc, used, model.params.copy(), rate


def run_sklearn(x_train, y_train, x_test, y_test, threads, epochs):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=(HIDDEN,), activation="relu", solver="adam", alpha=ALPHA,
                        batch_size=BATCH, learning_rate_init=LR, max_iter=epochs, shuffle=True, random_state=0)
    with threadpool_limits(threads), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        used = blas_threads_now()
        start = time.perf_counter()
        clf.fit(x_train, y_train)
        seconds = time.perf_counter() - start
        acc = float(np.mean(clf.predict(x_test) == y_test))
    return seconds, acc, used, clf.coefs_[0].dtype


# -- 3. MPI ensemble ---------------------------------------------------------------------
def run_mpi(n, extra, timeout):
    bin_dir = REPO / ".venv" / "bin"
    bin_dir = bin_dir if bin_dir.is_dir() else Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    mpirun = shutil.which("mpirun", path=env["PATH"])
    if mpirun is None:
        raise RuntimeError("mpirun not found: pip install -e .[mpi]")
    with tempfile.TemporaryDirectory(prefix="bench-core-") as tmp:
        out = Path(tmp) / "run"
        cmd = [mpirun, "-n", str(n), sys.executable, str(REPO / "mpi_train.py"), "--out", str(out), "--quiet",
               *extra]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
        results = json.loads((out / "results.json").read_text())
    return wall, results


# -- main --------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each measurement (median and spread)")
    p.add_argument("--sklearn-repeats", type=int, default=None,
                   help="runs of each scikit-learn fit (default: --repeats); 1 saves minutes")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 10000 train / 2000 test images, 2 epochs, small GEMM; targets not judged")
    p.add_argument("--ranks", default="2,4", help="MPI world sizes to run")
    p.add_argument("--no-mpi", action="store_true", help="skip the MPI ensemble runs")
    p.add_argument("--threads", default="1,2", help="BLAS thread counts of the sequential runs")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    sk_repeats = args.sklearn_repeats or args.repeats
    thread_counts = [int(t) for t in args.threads.split(",")]
    ranks = [] if args.no_mpi else [int(r) for r in args.ranks.split(",")]
    n_cores = cores()
    train_limit, test_limit, epochs = (10000, 2000, 2) if args.quick else (None, None, 10)
    gemm_size = 1024 if args.quick else 2048

    data = load_mnist(train_limit=train_limit, test_limit=test_limit)
    x_test32 = to_float(data.x_test, np.float32)
    # Build a model and its optimizer once before any thread limit, so every BLAS
    # library mlpcore loads (lazily or not) exists when threadpoolctl sets the limits.
    Adam(build_model("mlp", n_features=4, n_classes=2, hidden=(3,), dtype=np.float32, rng=np.random.default_rng(0)))
    import sklearn  # noqa: F401  (likewise)
    import sklearn.neural_network  # noqa: F401

    load0 = os.getloadavg()
    print("=" * 100)
    print("mlpcore core benchmark")
    print("=" * 100)
    print(f"machine     : {cpu_model()}, {n_cores} cores visible (os.sched_getaffinity), {platform.platform()}")
    print(f"software    : python {platform.python_version()}, numpy {np.__version__}, "
          f"scikit-learn {sklearn.__version__}")
    print(f"numpy MLP   : elementwise kernels {describe(get_kernels('auto'))} (default, --kernels auto); "
          f"denormals {denormal_status()}")
    print(f"BLAS pools  : {'; '.join(blas_pools())}")
    print(f"load average: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} at start "
          f"(other processes on these {n_cores} cores slow every number below)")
    if load0[0] > 0.5 * n_cores:
        print(f"WARNING: load average {load0[0]:.1f} on {n_cores} cores: the machine is busy, timings are pessimistic")
    print(f"data        : {data.n_train} train / {data.n_test} test images ({data.origin}), {epochs} epochs, "
          f"784-{HIDDEN}-10, batch {BATCH}, Adam lr {LR}, alpha {ALPHA}, seed 0")
    print(f"repeats     : {args.repeats} (scikit-learn fits: {sk_repeats}); times are median [min-max] over them")
    if args.quick:
        print("QUICK MODE  : small data, small GEMM; the targets block is informational only")
    print()

    # 1. GEMM -------------------------------------------------------------------------------
    print(f"1. float32 GEMM rate (np.dot into a preallocated output; best of several rounds)")
    gemm = {t: gemm_rates(t, gemm_size, args.quick) for t in thread_counts}
    print(f"   {'':<40} " + " ".join(f"{f'{t} thread(s)':>14}" for t in thread_counts))
    print(f"   {f'square {gemm_size}^3 sgemm':<40} " +
          " ".join(f"{gemm[t]['square'] / 1e9:>9.1f} GF/s" for t in thread_counts))
    for i, (name, _, _) in enumerate(gemm[thread_counts[0]]["shapes"]):
        print(f"   {name:<40} " + " ".join(f"{gemm[t]['shapes'][i][1] / 1e9:>9.1f} GF/s" for t in thread_counts))
    print(f"   {'model mix (flop-weighted, per batch)':<40} " +
          " ".join(f"{gemm[t]['model_mix'] / 1e9:>9.1f} GF/s" for t in thread_counts))
    print()

    # 2. sequential --------------------------------------------------------------------------
    flops = mlp_flops(data.n_train, epochs)
    print(f"2. sequential training, fit only (data preloaded; numpy: train_sequential's loop incl. per-batch")
    print(f"   uint8->float32 scaling; scikit-learn: MLPClassifier.fit incl. its input checks). FLOPs counted:")
    print(f"   forward + weight grads + hidden input grads = {data.n_train}*{epochs}*(2*(784*{HIDDEN}+{HIDDEN}*10)*2"
          f" + 2*{HIDDEN}*10) = {flops:.3e}")
    x_tr64 = data.x_train.reshape(data.n_train, -1) / 255.0
    x_te64 = data.x_test.reshape(data.n_test, -1) / 255.0
    x_tr32, x_te32 = x_tr64.astype(np.float32), x_te64.astype(np.float32)
    seq = {}
    for t in thread_counts:
        runs = [run_numpy(data, t, epochs, x_test32, gemm_size=gemm_size) for _ in range(args.repeats)]
        seq[("numpy f32", t)] = {"times": [r[0] for r in runs], "acc": runs[0][1], "threads": runs[0][2],
                                 "of_gemm": [flops / r[0] / r[4] for r in runs]}
        for label, xtr, xte in (("sklearn f64", x_tr64, x_te64), ("sklearn f32", x_tr32, x_te32)):
            runs = [run_sklearn(xtr, data.y_train, xte, data.y_test, t, epochs) for _ in range(sk_repeats)]
            seq[(label, t)] = {"times": [r[0] for r in runs], "acc": runs[0][1], "threads": runs[0][2],
                               "dtype": str(runs[0][3])}
            print(f"   ... {label} at {t} thread(s) done", flush=True)
    mix_rate = gemm[1]["model_mix"] if 1 in gemm else None
    print()
    print(f"   {'trainer':<13} {'threads':>7} {'fit time (median [min-max])':>30} {'GFLOP/s':>8} "
          f"{'% sq GEMM':>9} {'% mix':>6} {'accuracy':>9} {'numpy is':>16}")
    for t in thread_counts:
        base = statistics.median(seq[("numpy f32", t)]["times"])
        for label in ("numpy f32", "sklearn f64", "sklearn f32"):
            r = seq[(label, t)]
            med = statistics.median(r["times"])
            rate = flops / med
            sq = gemm[t]["square"]
            mix = gemm[t]["model_mix"]
            ratio = "" if label == "numpy f32" else f"{med / base:.2f}x faster"
            note = f" [{r['dtype']}]" if "dtype" in r else ""
            print(f"   {label:<13} {r['threads']:>7} {fmt_stats(r['times']):>30} {rate / 1e9:>8.1f} "
                  f"{100 * rate / sq:>8.0f}% {100 * rate / mix:>5.0f}% {r['acc']:>9.4f} {ratio:>16}{note}")
    print("   (% sq GEMM / % mix: achieved rate over the square-sgemm / model-shape GEMM rate of section 1)")
    for t in thread_counts:
        ratios = seq[("numpy f32", t)]["of_gemm"]
        print(f"   numpy f32 at {t} thread(s) against the sgemm rate measured just before each fit: "
              f"{', '.join(f'{100 * r:.0f}%' for r in ratios)} (median {100 * statistics.median(ratios):.0f}%)")
    print()

    # 2b. what each part of the numpy MLP's speed comes from (1 thread, the same seed: same model) ------
    ablation = {}
    if 1 in thread_counts:
        variants = [("numpy kernels, denormals kept", "numpy", False),
                    ("numpy kernels, denormals flushed", "numpy", True)]
        if get_kernels("auto").name == "numba":
            variants.append(("numba kernels, denormals flushed (default)", "numba", True))
        print("2b. where the numpy MLP's speed comes from, 1 thread (same seed, so the same model each time):")
        for label, kernels, flush in variants:
            runs = [run_numpy(data, 1, epochs, x_test32, kernels=kernels, flush=flush, gemm_size=gemm_size)
                    for _ in range(args.repeats)]
            ablation[label] = runs
            med_t = statistics.median([r[0] for r in runs])
            of_gemm = statistics.median([flops / r[0] / r[4] for r in runs])
            print(f"   {label:<44} {fmt_stats([r[0] for r in runs]):>30} {flops / med_t / 1e9:>6.1f} GF/s "
                  f"{100 * of_gemm:>4.0f}% of sq GEMM  accuracy {runs[0][1]:.4f}")
        params = [runs[0][3] for runs in ablation.values()]
        diff = float(np.max(np.abs(params[0] - params[1])))
        print(f"   flushing changes the final weights by at most {diff:.1e} (values below 1.2e-38 become 0)")
        if len(params) > 2:
            print(f"   numba and numpy kernels give bitwise identical final weights: "
                  f"{np.array_equal(params[1], params[2])}")
    if len(thread_counts) > 1 and max(thread_counts) > n_cores:
        print(f"   WARNING: {max(thread_counts)} threads > {n_cores} cores")
    print()

    # 3. MPI ensemble -----------------------------------------------------------------------
    mpi = {}
    if ranks:
        extra = ["--train-limit", str(train_limit), "--test-limit", str(test_limit), "--epochs", str(epochs)] \
            if args.quick else []
        print(f"3. MPI ensemble: mpirun -n N python mpi_train.py --out <tmp> --quiet {' '.join(extra)}".rstrip())
        print("   (defaults otherwise: soft vote, 1-thread sequential baseline in the same run, figures written).")
        print("   wall = the whole mpirun command (start-up, load, train, baseline, report, figures);")
        print("   train = slowest rank's training phase; baseline = 1-thread sequential training in that run.")
        for n in ranks:
            if n > n_cores:
                print(f"   WARNING: {n} ranks > {n_cores} cores: ranks time-share cores, the speed-up is capped "
                      f"at {n_cores}x")
            runs = [run_mpi(n, extra, timeout=600) for _ in range(args.repeats)]
            mpi[n] = runs
            print(f"   ... n={n} done", flush=True)
        print()
        print(f"   {'N':>2} {'thr/rank':>8} {'wall (mpirun)':>27} {'train':>27} {'baseline T1':>27} "
              f"{'speed-up':>8} {'effic.':>6} {'soft':>7} {'hard':>7} {'members':>s}")
        for n, runs in mpi.items():
            walls = [w for w, _ in runs]
            res = [r for _, r in runs]
            trains = [r["timings"]["parallel_train_s"] for r in res]
            bases = [r["timings"]["baseline_train_s"] for r in res]
            sps = [r["speedup"]["train"] for r in res]
            m = res[0]["metrics"]
            thr = ",".join(map(str, sorted(set(res[0]["environment"]["threads_per_worker"]))))
            print(f"   {n:>2} {thr:>8} {fmt_stats(walls):>27} {fmt_stats(trains):>27} {fmt_stats(bases):>27} "
                  f"{statistics.median(sps):>7.2f}x {statistics.median(sps) / n:>6.2f} "
                  f"{m['vote_soft_accuracy']:>7.4f} {m['vote_hard_accuracy']:>7.4f} "
                  f"{', '.join(f'{a:.4f}' for a in m['member_accuracy'])}")
        print("   (speed-up = baseline T1 / train, each from the same run's results.json, median over runs)")
        print()

    # targets --------------------------------------------------------------------------------
    load1 = os.getloadavg()
    print(f"load average at end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    print()
    print("TARGETS" + (" (quick mode: informational, not judged)" if args.quick else ""))
    rows = []

    def target(name, ok, value):
        rows.append((name, ok, value))

    med = {k: statistics.median(v["times"]) for k, v in seq.items()}
    for t in thread_counts:
        r = med[("sklearn f64", t)] / med[("numpy f32", t)]
        target(f"numpy >= 2x faster than sklearn float64 at {t} thread(s)", r >= 2.0, f"{r:.2f}x")
    for t in thread_counts:
        r = med[("sklearn f32", t)] / med[("numpy f32", t)]
        target(f"numpy faster than sklearn float32 at {t} thread(s)", r > 1.0, f"{r:.2f}x")
    if 1 in thread_counts:
        rate = flops / med[("numpy f32", 1)]
        ratios = seq[("numpy f32", 1)]["of_gemm"]
        of_gemm = statistics.median(ratios)
        target(f"numpy 1 thread >= 60% of the 1-thread {gemm_size}^3 sgemm rate", of_gemm >= 0.6,
               f"{100 * of_gemm:.0f}% (median over {len(ratios)} fits, each against the sgemm rate measured just "
               f"before it: {', '.join(f'{100 * r:.0f}%' for r in ratios)}; {rate / 1e9:.1f} GF/s; "
               f"{100 * rate / mix_rate:.0f}% of the model-shape rate {mix_rate / 1e9:.1f} GF/s)")
    if 2 in mpi:
        sp = statistics.median([r["speedup"]["train"] for _, r in mpi[2]])
        target("ensemble n=2 training >= 1.8x faster than the 1-thread baseline", sp >= 1.8, f"{sp:.2f}x")
    if 4 in mpi:
        wall = statistics.median([w for w, _ in mpi[4]])
        target("default mpirun -n 4 wall time < 10 s", wall < 10.0, f"{wall:.2f} s")
    acc_seq = seq[("numpy f32", 1 if 1 in thread_counts else thread_counts[0])]["acc"]
    target("sequential numpy accuracy >= 0.975", acc_seq >= 0.975, f"{acc_seq:.4f}")
    if 4 in mpi:
        soft = statistics.median([r["metrics"]["vote_soft_accuracy"] for _, r in mpi[4]])
        target("4-way soft vote accuracy >= 0.955", soft >= 0.955, f"{soft:.4f}")
    width = max(len(name) for name, _, _ in rows)
    for name, ok, value in rows:
        verdict = "info" if args.quick else ("PASS" if ok else "FAIL")
        print(f"  [{verdict}] {name:<{width}}  {value}")
    failed = [name for name, ok, _ in rows if not ok]
    if not args.quick:
        print(f"\n{len(rows) - len(failed)}/{len(rows)} targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
