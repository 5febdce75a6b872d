"""The strategies, behind one registry: ``name -> run(config, launcher, data, timer, plan) -> Outcome``.

- :mod:`~mlpcore.strategies.ensemble` - one model per shard, then a vote (the core).
- :mod:`~mlpcore.strategies.data_parallel` - one model trained by every rank: allreduce, local SGD.
- :mod:`~mlpcore.strategies.allreduce`, :mod:`~mlpcore.strategies.zero`, :mod:`~mlpcore.strategies.node_shm` -
  allreduce's gradient sum: plain, ZeRO-1 (``--shard-optimizer``), node-local shared memory (``--node-shm``).
- :mod:`~mlpcore.strategies.checkpoint` - checkpoints per rank and resuming.
- :mod:`~mlpcore.strategies.outcome` - what a strategy hands back (:class:`Outcome`).

Every ``run`` is called on every rank, in the same order; it returns the
:class:`Outcome` on the root and None elsewhere.
"""

from __future__ import annotations

from . import data_parallel, ensemble
from .outcome import Outcome

REGISTRY = {
    "ensemble": ensemble.run,
    "allreduce": data_parallel.run_allreduce,
    "localsgd": data_parallel.run_localsgd,
    # --compare's rows for allreduce's --shard-optimizer and --node-shm (zero1, node-shm, shm+zero1)
    **{name: data_parallel.run_variant(name) for name in data_parallel.VARIANTS},
}

#: Strategies that train one model with every rank (they resume from an epoch every rank saved).
SHARED_MODEL = ("allreduce", "localsgd")


def run(name, config, launcher, data, timer, plan=None):
    """Train with strategy ``name``; the root gets its :class:`Outcome`."""
    return REGISTRY[name](config, launcher, data, timer, plan)


__all__ = ["REGISTRY", "SHARED_MODEL", "Outcome", "run"]
