"""ZeRO-1 (--shard-optimizer) and node-local shared memory (--node-shm), with real mpirun ranks.

What must hold, and why (mlpcore/strategies/zero.py, node_shm.py; docs/zero.md):

* every rank ends with bitwise-identical parameters: each element of the sum and
  of the Adam step is computed once, by its owner, and the others get copies (or,
  with --node-shm, read the one shared copy);
* Adam's arithmetic is elementwise (mlpcore/nn/optim.py), so a variant's parameters
  differ from plain allreduce's only if its gradient sums do. A float sum of two
  values is commutative: with 2 ranks every variant is bitwise equal to plain
  allreduce. With 3, plain allreduce and ZeRO's reduce-scatter add the ranks'
  values in whatever order MPICH's algorithms choose: equal within the tolerance
  of tests/test_strategies.py. --node-shm adds them in local-rank order
  ``((g0 + g1) + g2)`` whatever the overlap mode, bucket plan, or (emulated) node
  layout with 2+1 ranks (the leaders' sum of two node sums is commutative again):
  those are bitwise equal to each other by construction;
* each rank's optimizer holds its pieces only: the pieces of all ranks partition
  the parameters, so at N ranks each holds about 1/N of plain allreduce's moments.

The runs happen in tests/mpi_scripts/zero_check.py (a few hundred to a few
thousand MNIST images, one or two epochs: seconds each).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import PYTHON, REPO, mpirun_path, run_command
from mlpcore.config import RunConfig
from mlpcore.errors import UsageError
from test_strategies import ATOL, RTOL

pytestmark = pytest.mark.timeout(240)

CHECKS = {"mlp-2ranks": (2, "mlp", 2000, 2), "mlp-3ranks": (3, "mlp", 900, 1), "lenet5-2ranks": (2, "lenet5", 400, 1)}


@pytest.fixture(scope="module", params=list(CHECKS), ids=list(CHECKS))
def check(request, tmp_path_factory):
    ranks, model, n, epochs = CHECKS[request.param]
    out = tmp_path_factory.mktemp("zero") / f"{request.param}.npz"
    rc, _, stderr, _ = run_command([mpirun_path(), "-n", ranks, PYTHON, REPO / "tests" / "mpi_scripts" /
                                    "zero_check.py", out, model, n, epochs], timeout=200)
    assert rc == 0, stderr
    d = np.load(out)
    return ranks, model, {k: d[k] for k in d.files}


def runs(d):
    return [k for k in d if not k.endswith(("_optimizer_bytes", "_calls", "_sync", "_loss", "_host")) and k != "n_params"]


def reference(d, name):
    """The plain-allreduce run with the same bucket size (the buckets decide backprop's BLAS calls)."""
    return d["plain-bucket64"] if name.endswith("bucket64") else d["plain"]


def test_replicas_are_bitwise_identical_on_every_rank(check):
    _, _, d = check
    for name in runs(d):
        params = d[name]
        for rank in range(1, len(params)):
            assert np.array_equal(params[rank], params[0]), f"{name}: rank {rank} differs from rank 0"


def test_every_variant_equals_plain_allreduce(check):
    """2 ranks: bitwise (a sum of two floats is commutative). 3 ranks: within the stated tolerance."""
    ranks, _, d = check
    for name in runs(d):
        if ranks == 2:
            assert np.array_equal(d[name][0], reference(d, name)[0]), name
        else:
            np.testing.assert_allclose(d[name][0], reference(d, name)[0], rtol=RTOL, atol=ATOL, err_msg=name)
        assert np.array_equal(d[f"{name}_loss"], np.full(ranks, d[f"{name}_loss"][0]))  # the same loss everywhere


def test_node_shm_sums_in_one_order_whatever_the_overlap_and_the_nodes(check):
    """--node-shm adds the ranks' gradients in local-rank order in every mode: bitwise equal to each other."""
    ranks, _, d = check
    shm = [name for name in runs(d) if "shm" in name and (ranks == 3 or "hier" not in name)]
    for name in shm:
        assert np.array_equal(d[name][0], d["shm-none"][0]), name


def test_zero1_overlap_modes_agree(check):
    """The same reduce-scatters and allgathers in every mode: within tolerance (bitwise with MPICH)."""
    _, _, d = check
    for mode in ("nonblocking", "thread"):
        np.testing.assert_allclose(d[f"zero1-{mode}"][0], d["zero1-none"][0], rtol=RTOL, atol=ATOL)
        assert np.array_equal(d[f"zero1-{mode}_calls"], d["zero1-none_calls"])


def test_each_rank_holds_its_slice_of_the_optimizer(check):
    ranks, _, d = check
    full = 2 * int(d["n_params"]) * 4  # M and V, float32
    assert list(d["plain_optimizer_bytes"]) == [full] * ranks
    for name in ("zero1-none", "shm-none", "shmzero1-none"):
        per_rank = d[f"{name}_optimizer_bytes"]
        assert per_rank.sum() == full, name  # the ranks' pieces partition the parameters
        assert per_rank.max() <= 1.2 * full / ranks, (name, per_rank)  # small buckets round to 64 bytes
    if ranks == 3:  # "nodes" {0, 1} and {2}: without --shard-optimizer each node holds one whole copy
        assert d["hier2-shm-none_optimizer_bytes"][:2].sum() == full == d["hier2-shm-none_optimizer_bytes"][2]
        assert d["hier2-shmzero1-none_optimizer_bytes"].sum() == full
    # ZeRO-1: a reduce-scatter and an allgather per bucket of plain allreduce
    assert np.array_equal(d["zero1-none_calls"], 2 * d["plain_calls"])


def test_sharded_adam_steps_the_same_values_as_adam():
    """Adam over pieces: the same arithmetic per value, bit for bit; pieces partition the buffer."""
    from mlpcore.nn.model import build_model
    from mlpcore.nn.optim import Adam
    from mlpcore.strategies.zero import split_buckets

    def model():
        return build_model("mlp", n_features=20, n_classes=3, hidden=(7,), dtype=np.float32,
                           rng=np.random.default_rng(1))

    full, parts = model(), [model(), model()]
    n = full.n_params
    cuts = split_buckets([(0, 40), (40, n)], 2, 16)
    opts = [Adam(full)] + [Adam(parts[r], shard=[(c[r], c[r + 1]) for c in cuts]) for r in range(2)]
    assert opts[1].nbytes + opts[2].nbytes == opts[0].nbytes
    rng = np.random.default_rng(2)
    for _ in range(5):
        g = rng.standard_normal(n).astype(np.float32)
        full.grads[...] = g
        opts[0].step(50)
        for r in range(2):
            for lo, hi in opts[r + 1].shard:
                opts[r + 1].grad_slice(lo, hi)[...] = g[lo:hi]
            opts[r + 1].step(50)
    for r in range(2):
        for lo, hi in opts[r + 1].shard:
            assert np.array_equal(parts[r].params[lo:hi], full.params[lo:hi])
    with pytest.raises(ValueError):  # another shard's state
        opts[1].load_state(opts[2].state())


SMALL = ["--train-limit", "3000", "--test-limit", "500", "--epochs", "2", "--quiet", "--no-plots", "--threads", "1"]


def test_compare_shows_each_option_as_a_row(cli):
    """--compare --shard-optimizer --node-shm: plain allreduce and three rows of its own, the same model."""
    rc, out, err, results = cli([*SMALL, "--compare", "--shard-optimizer", "--node-shm"], np=2)
    assert rc == 0, err
    rows = results["compare"]
    assert list(rows) == ["ensemble", "allreduce", "zero1", "node-shm", "shm+zero1", "localsgd"]
    plain = rows["allreduce"]
    assert plain["overlap"]["sync"] == "allreduce"
    full = plain["overlap"]["optimizer_bytes_per_rank"]
    assert full == [2 * 101_770 * 4] * 2
    for name, sync in (("zero1", "zero1"), ("node-shm", "node-shm"), ("shm+zero1", "node-shm+zero1")):
        row = rows[name]
        assert row["overlap"]["sync"] == sync
        assert row["accuracy"] == plain["accuracy"] and row["final_train_loss"] == plain["final_train_loss"], name
        halves = row["overlap"]["optimizer_bytes_per_rank"]
        assert sum(halves) == full[0] and max(halves) <= 0.51 * full[0], (name, halves)  # 1/N at N = 2
        assert row["overlap"]["bytes"] == plain["overlap"]["bytes"]  # the same gradient bytes combined
    assert rows["zero1"]["overlap"]["wire_bytes_per_rank"] == plain["overlap"]["wire_bytes_per_rank"]
    assert rows["node-shm"]["overlap"]["wire_bytes_per_rank"] == [0, 0]  # one node: nothing on the network
    assert rows["node-shm"]["overlap"]["shm_bytes_per_rank"][0] > 0
    for name in ("zero1", "node-shm", "shm+zero1"):
        assert name in out


@pytest.mark.parametrize("kwargs,message", [
    ({"shard_optimizer": True}, r"--shard-optimizer change how --strategy allreduce"),
    ({"strategy": "localsgd", "node_shm": True}, r"--node-shm change how --strategy allreduce"),
    ({"strategy": "allreduce", "node_shm": True, "overlap": "thread"}, r"--node-shm with --overlap thread"),
    ({"compare": True, "node_shm": True, "overlap": "thread"}, r"--node-shm with --overlap thread"),
], ids=["zero-with-ensemble", "shm-with-localsgd", "shm-with-thread", "compare-shm-with-thread"])
def test_refused_combinations(kwargs, message):
    with pytest.raises(UsageError, match=message):
        RunConfig(**kwargs)


def test_accepted_combinations():
    for kwargs in ({"shard_optimizer": True, "overlap": "thread"}, {"node_shm": True, "overlap": "none"},
                   {"node_shm": True, "shard_optimizer": True}):
        assert RunConfig(strategy="allreduce", **kwargs).strategies == ("allreduce",)
    assert RunConfig(compare=True, node_shm=True).strategies == ("ensemble", "allreduce", "node-shm", "localsgd")


def test_a_refused_combination_is_one_message_under_mpirun(cli):
    rc, out, err, results = cli([*SMALL, "--strategy", "allreduce", "--node-shm", "--overlap", "thread"], np=2)
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "--node-shm with --overlap thread" in lines[0], err
    assert "Traceback" not in err and results is None
