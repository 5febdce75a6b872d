"""Checkpoints (``--checkpoint-every E``) and resuming a killed run (``--resume RUN_DIR``).

Every ``E`` epochs each worker writes ``RUN_DIR/checkpoints/rank{r}.npz``
holding everything that determines the rest of its training: the model's
spec and parameter layout (:meth:`Sequential.spec`) and parameters, Adam's state (``t``, ``M``, ``V``), the training RNG's state (the
shuffles still to come), the number of epochs done, the losses so far, and
the options and world size of the run. A resumed run therefore ends with the
*same* parameters and predictions, bit for bit, as one that was never
interrupted (``tests/test_reliability.py`` checks it).

Writing is atomic: the new checkpoint goes to a temporary file, is fsynced,
the current ``rank{r}.npz`` becomes ``rank{r}.prev.npz`` and the temporary
file becomes ``rank{r}.npz``. A kill at any moment leaves at least one
complete checkpoint of each rank (after the first has been written).

With a sharded optimizer (``--shard-optimizer``, ``--node-shm``) each rank
holds Adam's moments for its own pieces of the parameters only, and saves
those: ``adam_M`` and ``adam_V`` then hold the pieces one after the other and
``adam_shard`` their ``[start, stop)`` ranges in the flat buffer. A resumed
rank must step the same pieces (the world size, options and model are in the
fingerprint and spec already; the ranges are checked too, as they also depend
on how the ranks are spread over the nodes), else the resume is refused.

``--resume RUN_DIR`` reads every rank's checkpoints on the root (the run
folder is shared by the ranks: they write their checkpoints into it) and
picks each rank's starting epoch (:func:`choose_start`): the ensemble's
members are independent, so each resumes from its own latest complete
checkpoint; ranks that train one shared model must resume from an epoch that
is complete on all of them. A checkpoint written with other options or
another number of workers is refused with a :class:`UsageError`, and so is
one whose model differs from the one being trained, layer by layer and slot
by slot, by name.

To use it from a training loop (see :func:`mlpcore.nn.train.train_sequential`)::

    ckpt = plan.for_rank(rank)                       # a RankCheckpoint, or None
    start, losses = ckpt.restore(model, optimizer, rng)
    on_epoch = ckpt.saver(model, optimizer, rng, losses, then=on_epoch)
    fit(model, optimizer, x, y, epochs=epochs, sync=sync, on_epoch=on_epoch,
        start_epoch=start, losses=losses)
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..fsio import atomic_write

FOLDER = "checkpoints"
FORMAT = 3  # 2: the model's spec and parameter layout; 3: the training data's checksum
# Options that may change between a run and its resumption: where and how
# output is written, checkpointing itself, the watchdog, what the root does
# after training (the vote shown, the baselines). Every other option decides
# what is trained and must be the same. Where the data comes from may change
# too: the checkpoint holds the training arrays' checksum, which must match.
MAY_DIFFER = ("out", "overwrite", "no_plots", "show", "quiet", "resume", "checkpoint_every", "stall_timeout",
              "kernels",  # numba and numpy kernels train the same model, bit for bit
              "vote", "no_baseline", "baseline_threads", "data", "source", "download", "mirror")


def fingerprint(config, world_size):
    """The options and world size a checkpoint must match to be resumed (JSON text)."""
    options = {k: v for k, v in config.as_dict().items() if k not in MAY_DIFFER}
    return json.dumps({"options": options, "world_size": int(world_size)}, sort_keys=True)


def folder(run_dir):
    return Path(run_dir) / FOLDER


def paths(run_dir, rank):
    """``(latest, previous)`` checkpoint files of ``rank``."""
    d = folder(run_dir)
    return d / f"rank{rank}.npz", d / f"rank{rank}.prev.npz"


def clear(run_dir):
    """Remove the checkpoints of an earlier run in this folder (a fresh run with --overwrite)."""
    d = folder(run_dir)
    if d.is_dir():
        for f in d.iterdir():
            if f.name.startswith(("rank", ".rank")):
                f.unlink()


# -- writing ----------------------------------------------------------------------
def write(run_dir, rank, *, epoch, losses, model, optimizer, rng, fingerprint, data_sha256=""):
    """Write rank ``rank``'s checkpoint after ``epoch`` epochs, atomically, keeping the previous one."""
    latest, previous = paths(run_dir, rank)
    latest.parent.mkdir(parents=True, exist_ok=True)
    state = optimizer.state()
    # A sharded optimizer: this rank's pieces of the moments, and where they lie.
    sharded = {} if state.get("shard") is None else {"adam_shard": np.asarray(state["shard"], dtype=np.int64)}
    buf = io.BytesIO()
    np.savez(buf, format=np.int64(FORMAT), rank=np.int64(rank), epoch=np.int64(epoch),
             losses=np.asarray(losses, dtype=np.float64), params=model.params, data_sha256=np.str_(data_sha256),
             model_spec=np.str_(json.dumps(model.spec(), sort_keys=True)),
             adam_t=np.int64(state["t"]), adam_M=state["M"], adam_V=state["V"],
             rng_state=np.str_(json.dumps(rng.bit_generator.state)), fingerprint=np.str_(fingerprint), **sharded)
    # The previous complete checkpoint stays (as .prev) until the new one is in place.
    atomic_write(latest, buf.getvalue(), keep_previous=previous)


# -- reading ----------------------------------------------------------------------
def read(path):
    """The arrays of a complete checkpoint file, or None if it is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            ckpt = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError):
        return None
    needed = ("format", "rank", "epoch", "losses", "params", "model_spec", "data_sha256", "adam_t", "adam_M", "adam_V",
              "rng_state", "fingerprint")
    if any(k not in ckpt for k in needed) or int(ckpt["format"]) != FORMAT:
        return None
    return ckpt


def available(run_dir, rank, expected):
    """Epochs of ``rank``'s complete checkpoints in ``run_dir``: ``{epoch: path}``.

    Raises :class:`UsageError` if a checkpoint was written with other options
    or another number of workers than ``expected`` (a :func:`fingerprint`).
    """
    found = {}
    for path in paths(run_dir, rank):
        ckpt = read(path)
        if ckpt is None:
            continue
        _check_fingerprint(path, str(ckpt["fingerprint"]), expected)
        found[int(ckpt["epoch"])] = str(path)
    return found


def _check_fingerprint(path, got, expected):
    if got == expected:
        return
    got, expected = json.loads(got), json.loads(expected)
    if got["world_size"] != expected["world_size"]:
        raise UsageError(f"--resume: {path} was written by a run with {got['world_size']} workers, "
                         f"this run has {expected['world_size']}; resume with the same number of "
                         "ranks (or --jobs)")
    keys = sorted(set(got["options"]) | set(expected["options"]))
    diffs = [f"--{k.replace('_', '-')} {_show(got['options'].get(k))} (checkpoint) vs "
             f"{_show(expected['options'].get(k))} (now)"
             for k in keys if got["options"].get(k) != expected["options"].get(k)]
    raise UsageError(f"--resume: {path} was written with other options: {'; '.join(diffs)}; resume with "
                     f"the same options (only {', '.join('--' + k.replace('_', '-') for k in MAY_DIFFER)} "
                     "may change)")


def _show(value):
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def choose_start(found, world_size, shared_model):
    """Each rank's starting epoch, from ``found[rank] = {epoch: path}`` (see :func:`available`).

    ``shared_model``: the ranks train one model, so they all start from the
    latest epoch complete on every rank. Otherwise (the ensemble) each rank
    starts from its own latest complete checkpoint. 0 means "from scratch".
    """
    if shared_model:
        common = set.intersection(*(set(found.get(r, {})) for r in range(world_size)))
        return (max(common, default=0),) * world_size
    return tuple(max(found.get(r, {}), default=0) for r in range(world_size))


# -- the plan every worker gets -----------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CheckpointPlan:
    """What each worker needs to write and restore checkpoints (small and picklable, for joblib).

    Attributes
    ----------
    directory : str
        The run folder.
    every : int
        Write every ``every`` epochs (0: never).
    start_epochs : tuple of int
        Per rank: the checkpointed epoch to resume from (0: from scratch).
    fingerprint : str
        See :func:`fingerprint`.
    data_sha256 : str
        The training arrays' checksum (:func:`data_checksum`), set once the data is loaded.
    """

    directory: str
    every: int
    start_epochs: tuple
    fingerprint: str
    data_sha256: str = ""

    def for_rank(self, rank):
        return RankCheckpoint(self, rank)


def plan(run_dir, config, world_size, *, shared_model=False):
    """Check ``--resume``'s checkpoints (or clear stale ones) and return the :class:`CheckpointPlan`.

    Runs on the root; raises :class:`UsageError` for a folder without
    checkpoints or with checkpoints of another configuration.
    """
    expected = fingerprint(config, world_size)
    starts = (0,) * world_size
    if config.resume:
        found = {r: available(run_dir, r, expected) for r in range(world_size)}
        if not any(found.values()):
            raise UsageError(f"--resume {config.resume}: no complete checkpoint in {folder(run_dir)} "
                             "(was the run started with --checkpoint-every E, and did it finish an E-th epoch?)")
        starts = choose_start(found, world_size, shared_model)
    else:
        clear(run_dir)
    return CheckpointPlan(str(run_dir), int(config.checkpoint_every), tuple(int(e) for e in starts), expected)


def check_model(path, saved, current):
    """Raise :class:`UsageError` naming the first layer or slot where two model specs differ."""
    if saved == current:
        return
    if saved["name"] != current["name"] or saved["dtype"] != current["dtype"]:
        raise UsageError(f"--resume: {path} holds a {saved['dtype']} {saved['name']!r} model, this run trains "
                         f"a {current['dtype']} {current['name']!r}")
    for i, (a, b) in enumerate(zip(saved["layers"], current["layers"])):
        if a != b:
            raise UsageError(f"--resume: {path}: layer {i} is {_layer(a)} in the checkpoint, {_layer(b)} now")
    if len(saved["layers"]) != len(current["layers"]):
        raise UsageError(f"--resume: {path} holds {len(saved['layers'])} layers, the model has "
                         f"{len(current['layers'])}")
    for a, b in zip(saved["layout"], current["layout"]):
        if a != b:
            raise UsageError(f"--resume: {path}: slot {a['slot']!r} of layer {a['layer']} lies at "
                             f"{a['start']}:{a['stop']} with shape {tuple(a['shape'])} in the checkpoint; the "
                             f"model has slot {b['slot']!r} of layer {b['layer']} there, shape {tuple(b['shape'])}")
    raise UsageError(f"--resume: {path} holds another parameter layout than the model's")


def check_shard(path, saved, current):
    """Raise :class:`UsageError` unless a checkpoint's optimizer holds the pieces this rank now steps."""
    if saved is None and current is None:
        return
    if saved is None or current is None:
        held = "every parameter's" if saved is None else "a shard of the"
        now = "a shard of them" if saved is None else "every parameter"
        raise UsageError(f"--resume: {path} holds {held} optimizer state, this run steps {now}")
    saved, current = np.asarray(saved).reshape(-1, 2), np.asarray(current).reshape(-1, 2)
    if not np.array_equal(saved, current):
        count = lambda r: int((r[:, 1] - r[:, 0]).sum())  # noqa: E731
        raise UsageError(f"--resume: {path} holds the optimizer state of {len(saved)} pieces ({count(saved)} values) "
                         f"of the parameters; this rank now steps {len(current)} pieces ({count(current)} values): "
                         "resume with the same number of ranks, spread over the nodes as before")


def _layer(spec):
    return spec["type"] + "".join(f" {k}={v}" for k, v in spec.items() if k != "type")


def data_checksum(x, y):
    """sha256 of the training arrays' bytes: what a resumed run must train on (the path may change)."""
    digest = hashlib.sha256()
    for array in (x, y):
        digest.update(str((array.dtype.str, array.shape)).encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def bind_data(launcher, chosen, data):
    """Collective, after the load: the plan with the training data's checksum, checked against ``--resume``'s.

    Raises :class:`UsageError` on every rank when a checkpoint to resume from
    was written while training on other data.
    """
    if chosen is None:
        return None

    def check():
        digest = data_checksum(data.x_train, data.y_train)
        for rank, epoch in enumerate(chosen.start_epochs):
            if epoch:
                path = available(chosen.directory, rank, chosen.fingerprint)[epoch]
                saved = str(read(path)["data_sha256"])
                if saved != digest:
                    raise UsageError(f"--resume: {path} was trained on other data (training arrays' sha256 "
                                     f"{saved[:12]}..., now {digest[:12]}...); resume with the same data")
        return dataclasses.replace(chosen, data_sha256=digest)

    bound = launcher.on_root(check, "resume")
    return launcher.comm.bcast(bound, root=0) if launcher.comm is not None else bound


def plan_for_run(launcher, config, run_dir, *, shared_model):
    """Collective: what every worker does about checkpoints, a :class:`CheckpointPlan`, or None.

    On the root: check ``--resume``'s checkpoints against these options and
    choose each rank's starting epoch, or clear an earlier run's checkpoints
    from a reused (``--overwrite``) folder; then every rank gets the plan.
    ``shared_model``: the ranks train one model, which resumes from the latest
    epoch every rank saved.
    """
    if not (config.checkpoint_every or config.resume):
        if launcher.is_root:
            clear(run_dir)  # an earlier run's, from a folder reused with --overwrite
        return None
    chosen = launcher.on_root(lambda: plan(run_dir, config, launcher.size, shared_model=shared_model), "resume")
    if launcher.comm is not None:
        chosen = launcher.comm.bcast(chosen, root=0)  # small and pickled
    if config.resume and launcher.is_root:
        print(f"resuming {run_dir}: " + ", ".join(f"rank {r} from epoch {e}" for r, e in
                                                    enumerate(chosen.start_epochs)), file=sys.stderr, flush=True)
    return chosen


class RankCheckpoint:
    """One worker's checkpoints: restore at the start, save every ``plan.every`` epochs."""

    def __init__(self, plan, rank):
        self.plan, self.rank = plan, rank

    def restore(self, model, optimizer, rng, write_params=None):
        """Load this rank's chosen checkpoint into the objects; returns ``(start_epoch, losses)``.

        Call it after the model is built (its initialisation draws from
        ``rng``; the restored state replaces all of that). ``write_params``:
        called with the saved parameters instead of copying them into
        ``model.params`` (``--node-shm``: one rank per node writes the node's
        shared copy, then the node's ranks synchronise: the ranks of one model
        all resume from the same epoch, so every one of them calls it, or none).
        """
        epoch, losses, params = self._restore(model, optimizer, rng)
        if write_params is not None:
            if params is not None:
                write_params(params)
        elif params is not None:
            model.params[...] = params
        return epoch, losses

    def _restore(self, model, optimizer, rng):
        epoch = self.plan.start_epochs[self.rank]
        if epoch == 0:
            return 0, [], None
        found = available(self.plan.directory, self.rank, self.plan.fingerprint)
        if epoch not in found:
            raise UsageError(f"--resume: the checkpoint of rank {self.rank} at epoch {epoch} disappeared "
                             f"from {folder(self.plan.directory)} while resuming")
        ckpt = read(found[epoch])
        check_model(found[epoch], json.loads(str(ckpt["model_spec"])), model.spec())
        if ckpt["params"].shape != model.params.shape or ckpt["params"].dtype != model.params.dtype:
            raise UsageError(f"--resume: {found[epoch]} holds {ckpt['params'].shape} {ckpt['params'].dtype} "
                             f"parameters, the model has {model.params.shape} {model.params.dtype}")
        check_shard(found[epoch], ckpt.get("adam_shard"), optimizer.state().get("shard"))
        optimizer.load_state({"t": int(ckpt["adam_t"]), "M": ckpt["adam_M"], "V": ckpt["adam_V"],
                              "shard": ckpt.get("adam_shard")})
        rng.bit_generator.state = json.loads(str(ckpt["rng_state"]))
        return epoch, [float(v) for v in ckpt["losses"]], ckpt["params"]

    def saver(self, model, optimizer, rng, losses, then=None):
        """An ``on_epoch(epoch, loss)`` callback for :func:`mlpcore.nn.train.fit` that writes checkpoints.

        ``losses``: those restored; ``then``: another callback to call after it.
        """
        history = list(losses)

        def on_epoch(epoch, loss):
            history.append(float(loss))
            done = epoch + 1
            if self.plan.every and done % self.plan.every == 0:
                write(self.plan.directory, self.rank, epoch=done, losses=history, model=model,
                      optimizer=optimizer, rng=rng, fingerprint=self.plan.fingerprint,
                      data_sha256=self.plan.data_sha256)
            if then is not None:
                then(epoch, loss)

        return on_epoch
