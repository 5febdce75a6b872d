"""Train MLP classifiers on MNIST in parallel and compare them with a sequential baseline.

Launch it one of these ways (from the repository root):

    mpirun -n 4 python mpi_train.py                  # MPI ensemble: 4 shards, 4 models, one vote
    python mpi_train.py --jobs 4                     # the same experiment with joblib, no MPI needed
    mpirun -n 2 python mpi_train.py --strategy allreduce   # one model, gradients averaged every step
    mpirun -n 2 python mpi_train.py --strategy localsgd --sync-every 10
    mpirun -n 2 python mpi_train.py --compare        # every strategy, one table
    sbatch scripts/slurm_train.sbatch                # the same job on a Slurm cluster
    python mpi_train.py --help                       # every option, with defaults

Exit status: 0 on success, 2 for bad input (options, data, output folder),
1 for any other failure, 130 when interrupted, 143 when terminated (SIGTERM:
scancel, mpirun tearing the job down). Under MPI a failure on any
rank ends every rank.
"""

import sys

from mlpcore.cli import main

if __name__ == "__main__":
    sys.exit(main())
