"""Run under mpirun by tests/test_zero.py: trains one model with plain allreduce, ZeRO-1
(--shard-optimizer) and node-local shared memory (--node-shm), in every overlap mode they
take, and writes on rank 0 (an .npz at argv[1]) every rank's final parameters and what
each rank's optimizer held, for the tests to compare.

    mpirun -n N python zero_check.py OUT.npz MODEL N_SAMPLES EPOCHS [real-nodes]

``hier-K`` runs are --node-shm on emulated nodes of K consecutive ranks
(MLPCORE_TEST_RANKS_PER_NODE): the hierarchical path, leaders talking between "nodes".
With ``real-nodes`` (ranks really on several nodes: tests/test_multinode.py) those are
left out: the nodes are the launcher's, and COMM_TYPE_SHARED finds them.
"""

import os
import sys

import numpy as np
from mpi4py import MPI

from mlpcore.config import RunConfig
from mlpcore.data import load_mnist
from mlpcore.parallel.blas import pin_blas_threads
from mlpcore.strategies import data_parallel
from mlpcore.strategies.node_shm import RANKS_PER_NODE_ENV

out_path, model_name, n_samples, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
real_nodes = sys.argv[5:] == ["real-nodes"]
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
pin_blas_threads(1)

data = load_mnist(train_limit=n_samples, test_limit=10)
x, y = data.x_train, data.y_train
# bucket_kb=1: many small buckets (so some ranks own empty pieces of the bias buckets at 3 ranks)
base = RunConfig(strategy="allreduce", model=model_name, hidden=(32, 16), epochs=epochs, batch_size=100,
                 dtype="float32", seed=3, bucket_kb=1 if model_name == "mlp" else 16)

RUNS = [("plain", {"overlap": "none"}, None)]
RUNS += [(f"zero1-{o}", {"shard_optimizer": True, "overlap": o}, None) for o in ("none", "nonblocking", "thread")]
RUNS += [(f"shm-{o}", {"node_shm": True, "overlap": o}, None) for o in ("none", "nonblocking")]
RUNS += [(f"shmzero1-{o}", {"node_shm": True, "shard_optimizer": True, "overlap": o}, None)
         for o in ("none", "nonblocking")]
if model_name == "mlp" and not real_nodes:
    RUNS += [("plain-bucket64", {"overlap": "nonblocking", "bucket_kb": 64}, None),
             ("zero1-bucket64", {"shard_optimizer": True, "overlap": "nonblocking", "bucket_kb": 64}, None)]
    per_node = size - 1  # nodes of size-1 ranks and of 1: {0}, {1} at 2 ranks; {0, 1}, {2} at 3
    RUNS += [(f"hier{per_node}-shm-{o}", {"node_shm": True, "overlap": o}, per_node) for o in ("none", "nonblocking")]
    RUNS += [(f"hier{per_node}-shmzero1-none", {"node_shm": True, "shard_optimizer": True, "overlap": "none"},
              per_node)]

results = {}
for name, changes, per_node in RUNS:
    if per_node is None:
        os.environ.pop(RANKS_PER_NODE_ENV, None)
    else:
        os.environ[RANKS_PER_NODE_ENV] = str(per_node)
    model, losses, stats = data_parallel.train_data_parallel("allreduce", comm, x, y, base.replace(**changes))
    everyone = np.empty((size, model.params.size), dtype=model.params.dtype) if rank == 0 else None
    comm.Gather(np.ascontiguousarray(model.params), everyone, root=0)
    facts = comm.gather((stats.optimizer_bytes, stats.calls, stats.sync, losses[-1], MPI.Get_processor_name()), root=0)
    if rank == 0:
        results[name] = everyone
        results[f"{name}_optimizer_bytes"] = np.array([f[0] for f in facts])
        results[f"{name}_calls"] = np.array([f[1] for f in facts])
        results[f"{name}_sync"] = np.array(facts[0][2])
        results[f"{name}_loss"] = np.array([f[3] for f in facts])
        results[f"{name}_host"] = np.array([f[4] for f in facts])
os.environ.pop(RANKS_PER_NODE_ENV, None)
if rank == 0:
    results["n_params"] = np.array(everyone.shape[1])
    np.savez(out_path, **results)
