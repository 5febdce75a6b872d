"""Run under mpirun by tests/test_strategies.py: trains with the data-parallel
strategies on a small MNIST subset and writes, on rank 0, everything the tests
compare (as an .npz at argv[1]).

Every rank's final parameters are gathered, so the test can check that the
replicas are bitwise identical; rank 0 also replays the same training in one
process (the sequential trainer, and each rank's local-SGD run on COMM_SELF)
as the reference.
"""

import sys

import numpy as np
from mpi4py import MPI

from mlpcore.config import RunConfig
from mlpcore.data import N_CLASSES, load_mnist, shard_bounds, to_float
from mlpcore.nn.model import build_model
from mlpcore.nn.train import train_sequential
from mlpcore.parallel.blas import pin_blas_threads
from mlpcore.strategies.data_parallel import train_data_parallel

out_path, n_samples, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
pin_blas_threads(1)

data = load_mnist(train_limit=n_samples, test_limit=500)
x, y = data.x_train, data.y_train
bounds = shard_bounds(len(x), size)
shard = slice(bounds[rank], bounds[rank + 1])
base = RunConfig(hidden=(32, 16), epochs=epochs, batch_size=100, lr=1e-3, alpha=1e-4,
                 dtype="float32", seed=7, bucket_kb=1)  # 1 kB: one bucket per layer


def params_of_every_rank(params):
    everyone = np.empty((size, params.size), dtype=params.dtype) if rank == 0 else None
    comm.Gather(params, everyone, root=0)
    return everyone


def initial_model(seed):
    """The model train_data_parallel builds before its broadcast: the same call, the same RNG draws."""
    return build_model("mlp", n_features=x.shape[1], n_classes=N_CLASSES, hidden=base.hidden,
                       dtype=np.dtype(base.dtype), rng=np.random.default_rng(seed), kernels=base.kernels)


results = {}
for overlap in ("none", "nonblocking", "thread"):
    config = base.replace(overlap=overlap)
    model, losses, stats = train_data_parallel("allreduce", comm, x, y, config)
    results[f"allreduce_{overlap}"] = params_of_every_rank(model.params)
    results[f"allreduce_{overlap}_calls"] = np.array(stats.calls)

for k in (1, 0):
    config = base.replace(sync_every=k)
    model, losses, stats = train_data_parallel("localsgd", comm, x[shard], y[shard], config)
    results[f"localsgd_k{k}"] = params_of_every_rank(model.params)

if rank == 0:
    # Reference 1: the sequential trainer, same seed, same global batch, same sample order.
    model, _, _ = train_sequential(x, y, hidden=base.hidden, epochs=epochs, batch_size=base.batch_size,
                                   seed=base.seed, dtype=np.float32, lr=base.lr, alpha=base.alpha)
    results["sequential"] = model.params.copy()
    # Reference 2: each rank's local-SGD run with no averaging, replayed here one by
    # one (COMM_SELF), all starting from rank 0's initial parameters: the ones the
    # strategy broadcasts, built from default_rng(seed + 0) (localsgd seeds seed + rank).
    init = initial_model(base.seed)
    independent = []
    for r in range(size):
        part = slice(bounds[r], bounds[r + 1])
        # Alone on COMM_SELF a rank's batch is the whole --batch-size: give it its share. Its
        # L2 term is scaled by that share, in the world run by the global batch: alpha / size
        # gives the same strength (this fails if local SGD's L2 were N times the sequential's).
        config = base.replace(sync_every=0, seed=base.seed + r, batch_size=base.batch_size // size,
                              alpha=base.alpha / size)
        model, _, _ = train_data_parallel("localsgd", MPI.COMM_SELF, x[part], y[part], config,
                                          initial_params=init.params)
        independent.append(model.params.copy())
    results["independent_mean"] = np.mean(independent, axis=0, dtype=np.float64)
    results["init"] = init.params.copy()
    # Test accuracy of each final model, for the comparisons that are not exact.
    probe = build_model("mlp", n_features=x.shape[1], n_classes=N_CLASSES, hidden=base.hidden,
                        dtype=np.float32, rng=np.random.default_rng(0))
    x_test = to_float(data.x_test)
    for key in ("allreduce_none", "localsgd_k1", "localsgd_k0"):
        probe.params[...] = results[key][0]
        results[f"{key}_accuracy"] = np.mean(probe.predict(x_test) == data.y_test)
    np.savez(out_path, **results)
