#!/usr/bin/env python
"""Benchmark of LeNet-5: mlpcore against PyTorch on the same CPU, side by side in one run.

What it measures (full MNIST unless ``--train-limit``), in this order:

1. the single-thread float32 SGEMM rate (square 1024 matrices, best of several);
2. the direct numba convolutions against im2col + BLAS at LeNet's two conv shapes
   (forward, weight gradient, input gradient; batch 200): the choice mlpcore made;
3. mlpcore's LeNet-5 step, layer by layer (microseconds per step, best of many);
4. one row per measured configuration (a function each, see ``CONFIGS``):
   mlpcore LeNet-5 sequential at 1 and 2 threads, as ``--threads`` gives them (the
   conv kernels on the threads, BLAS on the calling thread; one more row with BLAS's
   own pool on 2 threads too, to show why not) and PyTorch's CPU LeNet-5
   (same architecture, Glorot-uniform init, Adam with mlpcore's L2 scaling,
   batch 200) at the same thread counts when ``torch`` imports
   (``pip install -e .[bench]``). Each row: time per epoch (median of the epochs
   after the first), achieved GFLOP/s (``Sequential.flops_per_sample()`` x samples /
   time: forward + weight gradients + input gradients of every layer but the first,
   a multiply-add counting 2), that as a share of the SGEMM rate, and on each
   mlpcore row the ratio PyTorch time / mlpcore time at the same thread count
   (> 1: mlpcore faster).

Usage (from the repository root):

    python scripts/bench_cnn.py                 # 3 epochs a configuration, a few minutes
    python scripts/bench_cnn.py --epochs 4
    python scripts/bench_cnn.py --quick         # 6000 images, 2 epochs: a smoke run

Timings on a shared machine are noisy: compare the rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlpcore.data import load_mnist  # noqa: E402
from mlpcore.nn.kernels import describe, get_kernels  # noqa: E402
from mlpcore.nn.model import build_model  # noqa: E402
from mlpcore.nn.train import train_sequential  # noqa: E402
from mlpcore.parallel.blas import pin_blas_threads  # noqa: E402
from mlpcore.strategies.ensemble import prepare_trainer  # noqa: E402

BATCH, LR, ALPHA = 200, 1e-3, 1e-4


def best_of(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def sgemm_rate(n=1024, repeats=7):
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    c = np.empty_like(a)
    with threadpool_limits(1):
        return 2 * n ** 3 / best_of(lambda: np.dot(a, a, out=c), repeats) / 1e9


# -- 2. direct numba convolutions against im2col + BLAS ---------------------------------------
def conv_choice(n=BATCH, repeats=15):
    """Rows ``(conv, pass, direct us, im2col+BLAS us)`` at LeNet's conv shapes, one thread."""
    from numpy.lib.stride_tricks import as_strided

    fns = get_kernels("numba")
    rng = np.random.default_rng(0)
    rows = []
    with threadpool_limits(1):
        for name, (H, cin, cout, pad) in (("conv1 1->6", (28, 1, 6, 2)), ("conv2 6->16", (14, 6, 16, 0))):
            hp = H + 2 * pad
            ho = hp - 4
            T = 25 * cin
            # direct, (h, w, c, lanes) layout
            x = rng.random((hp, hp, cin, n), dtype=np.float32)
            w = rng.standard_normal((cout, 5, 5, cin)).astype(np.float32)
            b = rng.standard_normal(cout).astype(np.float32)
            out = np.empty((ho, ho, cout, n), np.float32)
            g = rng.standard_normal(out.shape).astype(np.float32)
            P = np.empty((cout + cout % 2, T + T % 2, n), np.float32)
            Pb, dw, db = np.empty((cout, n), np.float32), np.empty_like(w), np.empty_like(b)
            wt = np.ascontiguousarray(w.transpose(1, 2, 3, 0))
            dx = np.empty((H, H, cin, n), np.float32)
            direct = {"forward": lambda: fns.conv2d_forward(x, w, b, out),
                      "weight grad": lambda: fns.conv2d_backward_weight(g, x, P, Pb, dw, db),
                      "input grad": lambda: fns.conv2d_backward_input(g, wt, dx, pad)}
            # im2col + BLAS, NHWC: col (n*ho*ho, 25*cin) @ W (25*cin, cout); col2im for the input gradient
            xn = rng.random((n, hp, hp, cin), dtype=np.float32)
            s = xn.strides
            view = as_strided(xn, (n, ho, ho, 5, 5, cin), (s[0], s[1], s[2], s[1], s[2], s[3]))
            col = np.empty((n, ho, ho, 5, 5, cin), np.float32)
            col2 = col.reshape(n * ho * ho, T)
            wm = w.reshape(cout, T).T.copy()
            o2 = np.empty((n * ho * ho, cout), np.float32)
            g2 = g.reshape(-1, cout).copy()
            dwm = np.empty((T, cout), np.float32)
            dcol = np.empty_like(col)
            dxn = np.zeros_like(xn)

            def col2im():
                np.dot(g2, wm.T, out=dcol.reshape(n * ho * ho, T))
                dxn[...] = 0
                for kh in range(5):
                    for kw in range(5):
                        dxn[:, kh:kh + ho, kw:kw + ho] += dcol[:, :, :, kh, kw]

            im2col = {"forward": lambda: (np.copyto(col, view), np.dot(col2, wm, out=o2)),
                      "weight grad": lambda: (np.copyto(col, view), np.dot(col2.T, g2, out=dwm)),
                      "input grad": col2im}
            passes = ("forward", "weight grad") if pad else ("forward", "weight grad", "input grad")
            for p in passes:
                rows.append((name, p, best_of(direct[p], repeats) * 1e6, best_of(im2col[p], repeats) * 1e6,
                             2 * ho * ho * cout * T * n))
    return rows


def layer_weight_grad(n=BATCH, repeats=15):
    """Microseconds of conv2's weight gradient as ``Conv2d`` computes it (im2col + BLAS an output row
    at a time, on the lanes layout: :meth:`~mlpcore.nn.kernels.NumpyKernels.conv2d_weight_grad_gemm`)."""
    fns = get_kernels("numba")
    rng = np.random.default_rng(0)
    x = rng.random((14, 14, 6, n), dtype=np.float32)
    gT = rng.standard_normal((16, 10, 10, n)).astype(np.float32)
    col, parts = np.empty((10, 5, 5, 6, 1, 10, n), np.float32), np.empty((10, 150, 16), np.float32)
    dWT = np.empty((150, 16), np.float32)
    with threadpool_limits(1):
        return best_of(lambda: fns.conv2d_weight_grad_gemm(x, gT, col, parts, dWT), repeats) * 1e6


# -- 3. the step, layer by layer -----------------------------------------------------------------
def layer_profile(repeats=20, n=BATCH):
    """``[(layer, forward us, backward us)]`` of mlpcore's LeNet-5 at batch ``n``, one thread, best of ``repeats``."""
    model = build_model("lenet5", n_features=784, n_classes=10, hidden=(), dtype=np.float32,
                        rng=np.random.default_rng(0), kernels="auto")
    rng = np.random.default_rng(1)
    X, y = rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n)
    fw = [[] for _ in model.layers]
    bw = [[] for _ in model.layers]
    with threadpool_limits(1):
        for _ in range(repeats + 1):
            out = X
            for i, layer in enumerate(model.layers):
                t = time.perf_counter()
                out = layer(out)
                fw[i].append(time.perf_counter() - t)
            model.kernels.softmax(out)
            model.kernels.softmax_grad(out, y, 1.0 / n)
            grad = out
            for i in range(len(model.layers) - 1, model._first - 1, -1):
                t = time.perf_counter()
                steps = model.layers[i].backward(grad)
                while True:
                    try:
                        next(steps)
                    except StopIteration as done:
                        grad = done.value
                        break
                bw[i].append(time.perf_counter() - t)
    return [(f"{i:2d} {type(layer).__name__}", min(fw[i][1:]) * 1e6, min(bw[i][1:]) * 1e6 if bw[i] else 0.0)
            for i, layer in enumerate(model.layers)]


# -- 4. the configurations -------------------------------------------------------------------------
def epoch_times(train_one_epoch, epochs):
    times = []
    for _ in range(epochs):
        t = time.perf_counter()
        train_one_epoch()
        times.append(time.perf_counter() - t)
    return times


def mlpcore_sequential(data, threads, epochs, blas_threads=None):
    """mlpcore's LeNet-5, sequential, with ``threads`` threads as ``mpi_train.py --threads`` gives them.

    That is: the conv kernels on ``threads`` threads and BLAS on the calling thread
    (:func:`mlpcore.strategies.ensemble.prepare_trainer`). ``blas_threads`` overrides
    BLAS's count, to show what sharing the cores with BLAS's own pool costs.
    Returns (epoch seconds, flops/sample, accuracy).
    """
    times, state = [], {}

    def on_epoch(epoch, loss):
        now = time.perf_counter()
        times.append(now - state["t"])
        state["t"] = now

    pin_blas_threads(threads)
    prepare_trainer("numpy", "auto", np.dtype(np.float32), "lenet5")
    if blas_threads is not None:
        pin_blas_threads(blas_threads)  # the kernels keep ``threads``
    state["t"] = time.perf_counter()
    model, _, _ = train_sequential(data.x_train, data.y_train, model="lenet5", hidden=(), epochs=epochs,
                                   batch_size=BATCH, seed=0, lr=LR, alpha=ALPHA, on_epoch=on_epoch)
    from mlpcore.data import to_float

    accuracy = float((model.predict(to_float(data.x_test, model.dtype)) == data.y_test).mean())
    get_kernels("auto").set_threads(1)
    pin_blas_threads(1)
    return times, model.flops_per_sample(), accuracy


def torch_lenet(data, threads, epochs):
    """PyTorch's CPU LeNet-5: same layers, Glorot-uniform (Keras fans), Adam, L2 as alpha/batch*W on the weights."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                          nn.Linear(84, 10))
    weights = []
    for module in model:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            w = module.weight
            receptive = w[0, 0].numel() if w.dim() == 4 else 1
            fan_in, fan_out = w.shape[1] * receptive, w.shape[0] * receptive
            bound = (6.0 / (fan_in + fan_out)) ** 0.5
            with torch.no_grad():
                w.uniform_(-bound, bound)
                module.bias.uniform_(-bound, bound)
            weights.append(w)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    X = torch.from_numpy(data.x_train.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0)
    Y = torch.from_numpy(data.y_train.astype(np.int64))
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)

    def one_epoch():
        order = torch.randperm(len(X), generator=generator)
        for start in range(0, len(X), BATCH):
            rows = order[start:start + BATCH]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(X[rows]), Y[rows])
            loss.backward()
            with torch.no_grad():  # mlpcore's L2: alpha / batch * W added to each weight gradient
                for w in weights:
                    w.grad.add_(w, alpha=ALPHA / len(rows))
            optimizer.step()

    times = epoch_times(one_epoch, epochs)
    with torch.no_grad():
        xt = torch.from_numpy(data.x_test.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0)
        accuracy = float((model(xt).argmax(1).numpy() == data.y_test).mean())
    return times, None, accuracy


def mlpcore_sequential_both_pools(data, threads, epochs):
    """As :func:`mlpcore_sequential` with BLAS's own pool on ``threads`` threads too (not what mlpcore does)."""
    return mlpcore_sequential(data, threads, epochs, blas_threads=threads)


#: One row each: (label, function, threads, peer). The lead adds the strategy rows here.
CONFIGS = [("mlpcore LeNet-5 sequential", mlpcore_sequential, 1, "mlpcore"),
           ("mlpcore LeNet-5 sequential", mlpcore_sequential, 2, "mlpcore"),
           ("mlpcore, BLAS pool too", mlpcore_sequential_both_pools, 2, "mlpcore"),
           ("PyTorch LeNet-5 (CPU)", torch_lenet, 1, "torch"),
           ("PyTorch LeNet-5 (CPU)", torch_lenet, 2, "torch")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per configuration (>= 2)")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="6000 images, 2 epochs")
    parser.add_argument("--skip-kernels", action="store_true", help="skip the conv-choice and per-layer tables")
    parser.add_argument("--no-strategies", action="store_true", help="skip the mpirun rows of the strategies")
    parser.add_argument("--strategy-epochs", type=int, default=10,
                        help="epochs of each strategy run (default: 10, the default experiment)")
    args = parser.parse_args(argv)
    epochs = 2 if args.quick else max(2, args.epochs)
    limit = 6000 if args.quick else args.train_limit
    data = load_mnist(train_limit=limit)
    n_train = len(data.x_train)
    kernels = get_kernels("auto")
    print(f"LeNet-5 benchmark: {n_train} training images, batch {BATCH}, {epochs} epochs a configuration, "
          f"kernels {describe(kernels)}")
    rate = sgemm_rate()
    print(f"single-thread SGEMM (1024^3, best of 7): {rate:.1f} GFLOP/s")

    if not args.skip_kernels and kernels.name == "numba":
        print("\nDirect numba convolution vs im2col + BLAS (batch 200, one thread, best of 15):")
        print(f"  {'conv':12s} {'pass':12s} {'direct us':>10s} {'im2col us':>10s} {'im2col/direct':>13s} "
              f"{'direct GF/s':>11s}")
        for name, p, direct, im2col, flops in conv_choice():
            print(f"  {name:12s} {p:12s} {direct:10.0f} {im2col:10.0f} {im2col / direct:13.2f} "
                  f"{flops / direct / 1e3:11.1f}")
        print(f"  conv2's weight gradient as Conv2d computes it (im2col + BLAS a row at a time, lanes "
              f"layout): {layer_weight_grad():.0f} us")
        print("\nmlpcore LeNet-5 step by layer (batch 200, one thread, best of 20), microseconds:")
        total = 0.0
        for name, fwd, bwd in layer_profile():
            total += fwd + bwd
            print(f"  {name:14s} forward {fwd:7.0f}  backward {bwd:7.0f}")
        print(f"  {'step (sum)':14s} {total:7.0f} us (+ softmax, loss, Adam)")

    results = {}
    for label, fn, threads, peer in CONFIGS:
        if peer == "torch":
            try:
                import torch  # noqa: F401
            except ImportError:
                if threads == CONFIGS[-1][2]:
                    print("\nPyTorch not importable: the peer rows were skipped (pip install -e .[bench])")
                continue
        print(f"  running {label} at {threads} thread(s) ...", flush=True)
        times, flops, accuracy = fn(data, threads, epochs)
        results[(label, threads)] = (times, flops, accuracy, peer)

    flops = next((r[1] for r in results.values() if r[1]), None)
    print(f"\nLeNet-5, {n_train} images an epoch, {flops} FLOPs a sample (forward + weight grads + input grads"
          f" but the first layer's; multiply-add = 2). Median epoch after the first; shared machine, noisy.")
    header = f"  {'configuration':30s} {'threads':>7s} {'s/epoch':>8s} {'GFLOP/s':>8s} {'% SGEMM':>8s} " \
             f"{'acc':>6s} {'torch/mlpcore':>13s}"
    print(header)
    medians = {key: statistics.median(r[0][1:]) for key, r in results.items()}
    for (label, threads), (times, _, accuracy, peer) in results.items():
        median = medians[(label, threads)]
        gflops = flops * n_train / median / 1e9
        theirs = medians.get(("PyTorch LeNet-5 (CPU)", threads))
        ratio = f"{theirs / median:13.2f}" if (theirs and peer == "mlpcore") else f"{'':13s}"
        print(f"  {label:30s} {threads:7d} {median:8.2f} {gflops:8.1f} {100 * gflops / rate:7.0f}% "
              f"{accuracy:6.4f} {ratio}")
    print("  (accuracy after the epochs run here, not the 10-epoch target)")

    if not args.no_strategies:
        strategy_rows(epochs if args.quick else args.strategy_epochs, limit)


#: The strategies at n=2 against their own 1-thread sequential baseline, each a real run of
#: ``mpirun -n 2 mpi_train.py --model lenet5`` (the baseline is trained in the same run).
STRATEGY_RUNS = [
    ("allreduce, overlap none", ["--strategy", "allreduce", "--overlap", "none", "--bucket-kb", "64"]),
    ("allreduce, overlap nonblocking", ["--strategy", "allreduce", "--overlap", "nonblocking", "--bucket-kb", "64"]),
    ("allreduce, overlap thread", ["--strategy", "allreduce", "--overlap", "thread", "--bucket-kb", "64"]),
    ("localsgd K=10", ["--strategy", "localsgd", "--sync-every", "10"]),
    ("ensemble (soft vote)", ["--strategy", "ensemble"]),
]


def strategy_rows(epochs, limit, ranks=2):
    """Each strategy at ``ranks`` ranks x 1 thread: time, speed-up and efficiency vs the 1-thread run, accuracy."""
    import json
    import shutil
    import subprocess
    import tempfile

    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
    if mpirun is None:
        print("\nmpirun not found: the strategy rows were skipped (pip install -e .[mpi])")
        return
    print(f"\nStrategies, mpirun -n {ranks} python mpi_train.py --model lenet5 --epochs {epochs} --threads 1 "
          f"(each run times its own 1-thread sequential baseline):")
    print(f"  {'strategy':32s} {'train s':>8s} {'seq s':>7s} {'speed-up':>8s} {'effic.':>6s} {'acc':>7s} "
          f"{'seq acc':>7s} {'overlap':>7s}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, extra) in enumerate(STRATEGY_RUNS):
            out = Path(tmp) / f"run{i}"
            cmd = [mpirun, "-n", str(ranks), sys.executable, str(REPO / "mpi_train.py"), "--model", "lenet5",
                   "--epochs", str(epochs), "--threads", "1", "--quiet", "--no-plots", "--out", str(out), *extra]
            if limit:
                cmd += ["--train-limit", str(limit)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            if proc.returncode != 0:
                print(f"  {label:32s} failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads((out / "results.json").read_text())
            t, seq = r["timings"]["parallel_train_s"], r["timings"]["baseline_train_s"]
            overlap = (r["strategy"].get("overlap") or {}).get("fraction")
            print(f"  {label:32s} {t:8.2f} {seq:7.2f} {seq / t:8.2f} {seq / t / ranks:6.2f} "
                  f"{r['metrics']['accuracy']:7.4f} {r['metrics']['baseline_accuracy']:7.4f} "
                  f"{'' if overlap is None else f'{overlap:.0%}':>7s}")


if __name__ == "__main__":
    main()
