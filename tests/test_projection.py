"""The projection (mlpcore/study/projection.py): the collective formulas, the overlap model, real runs.

Formulas are checked against their closed forms on one link (Thakur, Rabenseifner
and Gropp 2005), placement against a hand sum of the steps, the profile of real
``mpirun`` runs against what those runs counted (bytes and calls per step are
deterministic, so they must match exactly), and a small version of the validation
(scripts/validate_projection.py, real ranks on 2 emulated nodes) runs end to end.
Times are never asserted: the errors of the small validation are printed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mlpcore.errors import UsageError
from mlpcore.study import projection as pj

from conftest import PYTHON, REPO, run_command

A, B, G = 3e-6, 2e-9, 5e-10            # one link's alpha, beta, gamma
LINK = pj.Link("x", A, B, G)
FLAT = pj.Cluster("flat", LINK, LINK, ranks_per_node=1)


@pytest.mark.parametrize("p", [2, 4, 8, 64])
def test_one_link_formulas_are_the_closed_forms(p):
    n, lg = 1e6, math.log2(p)
    assert pj.rabenseifner(n, p, FLAT) == pytest.approx(2 * lg * A + 2 * (p - 1) / p * n * B + (p - 1) / p * n * G)
    assert pj.recursive_doubling(n, p, FLAT) == pytest.approx(lg * (A + n * B + n * G))
    assert pj.ring(n, p, FLAT) == pytest.approx(2 * (p - 1) * (A + n / p * B) + (p - 1) / p * n * G)
    assert pj.reduce_scatter_time(n, p, FLAT) == pytest.approx(lg * A + (p - 1) / p * n * (B + G))
    assert pj.allgather_time(1000, p, FLAT) == pytest.approx(lg * A + (p - 1) / p * 1000 * B)   # short: doubling
    assert pj.allgather_time(n, p, FLAT) == pytest.approx((p - 1) * (A + n / p * B))           # long: ring


def test_a_rank_count_that_is_not_a_power_of_two_pays_mpichs_fold():
    n = 1e6
    fold = 2 * (A + n * B) + n * G
    assert pj.rabenseifner(n, 6, FLAT) == pytest.approx(pj.rabenseifner(n, 4, FLAT) + fold)
    assert pj.recursive_doubling(n, 3, FLAT) == pytest.approx(pj.recursive_doubling(n, 2, FLAT) + fold)


def test_mpichs_choice_switches_at_2048_bytes():
    assert pj.allreduce_time(2048, 8, FLAT) == pytest.approx(pj.recursive_doubling(2048, 8, FLAT))
    assert pj.allreduce_time(4096, 8, FLAT) == pytest.approx(pj.rabenseifner(4096, 8, FLAT))
    assert pj.allreduce_time(1e6, 1, FLAT) == 0.0


def test_steps_within_a_node_use_the_intra_node_link():
    fast, slow = pj.Link("shm", 1e-6, 1e-10, G), pj.Link("net", 50e-6, 1e-8, G)
    two_by_two = pj.Cluster("c", fast, slow, ranks_per_node=2)
    n = 1e6
    # recursive halving: partner 1 away (same node) with n/2, then 2 away (the other node) with n/4
    by_hand = (2 * (fast.alpha_s + n / 2 * fast.beta_s_per_byte) + n / 2 * G
               + 2 * (slow.alpha_s + n / 4 * slow.beta_s_per_byte) + n / 4 * G)
    assert pj.rabenseifner(n, 4, two_by_two) == pytest.approx(by_hand)
    assert pj.ring(n, 4, two_by_two) == pytest.approx(pj.ring(n, 4, pj.Cluster("s", slow, slow)))
    # one rank per node: hierarchical is the leaders' allreduce and nothing else
    one_per_node = replace(two_by_two, ranks_per_node=1)
    assert pj.hierarchical(n, 8, one_per_node) == pytest.approx(pj.allreduce_time(n, 8, one_per_node))
    # one node: no inter-node step at all
    one_node = replace(two_by_two, ranks_per_node=4)
    assert pj.hierarchical(n, 4, one_node) == pytest.approx(
        2 * (fast.alpha_s + n * fast.beta_s_per_byte + n * G) + 2 * (fast.alpha_s + n * fast.beta_s_per_byte))


def _profile(mode, buckets, ready, **kw):
    fields = dict(run_dir="-", strategy="allreduce", mode=mode, shard_optimizer=False, node_shm=False, sync_every=0,
                  world_size=2, ranks_per_node=2, batch_size=200, epochs=1, n_train=2000, n_test=100, n_features=784,
                  n_classes=10, value_bytes=4, n_params=buckets[-1][1], buckets=tuple(buckets),
                  bucket_ready=tuple(ready), handover_ready=tuple(ready), backward_share=0.5, compute_c0_s=1e-3, compute_c1_s=1e-5,
                  adam_s=1e-4, seq_train_s=1.0, measured_train_s=1.0, local_batch=100)
    fields.update(kw)
    return pj.RunProfile(**fields)


def test_wait_free_backprop_hides_what_the_backward_pass_covers():
    # two buckets of 250,000 values (1 MB), ready at 40% and 100% of a 10 ms backward pass
    buckets, ready = [(0, 250_000), (250_000, 500_000)], [0.4, 1.0]
    each = pj.allreduce_time(1e6, 2, FLAT)
    none = pj.exposed_comm(_profile("none", buckets, ready), 2, FLAT, 10e-3)
    wait_free = pj.exposed_comm(_profile("thread", buckets, ready), 2, FLAT, 10e-3)
    assert none[0] == pytest.approx(2 * each) and none[2:] == (2_000_000, 2)
    # the first bucket runs from 4 ms for `each` (< 6 ms): only the last one is exposed
    assert each < 6e-3 and wait_free[0] == pytest.approx(each)
    # `nonblocking` calls into MPI only at the hand-overs (4 and 10 ms here): the first bucket's
    # second round (Rabenseifner at 2 ranks: reduce-scatter, then allgather) waits for 10 ms
    progress_bound = pj.exposed_comm(_profile("nonblocking", buckets, ready), 2, FLAT, 10e-3)
    assert progress_bound[0] == pytest.approx(each / 2 + each)
    # hand-overs often enough, and it is the comm thread's overlap again
    often = _profile("nonblocking", buckets, ready, handover_ready=tuple(np.linspace(0, 1, 10001)))
    assert pj.exposed_comm(often, 2, FLAT, 10e-3)[0] == pytest.approx(each, rel=1e-3)
    # a link whose transfers are the cores' own copies hides nothing
    copies = pj.Cluster("copies", LINK, replace(LINK, host_cpu=True), ranks_per_node=1)
    assert pj.exposed_comm(_profile("thread", buckets, ready), 2, copies, 10e-3)[0] == pytest.approx(2 * each)
    # a slow link: the first bucket still runs when the second is ready; the channel serialises them
    slow = pj.Cluster("slow", LINK, pj.Link("s", A, 1e-8, G), ranks_per_node=1)
    t = pj.allreduce_time(1e6, 2, slow)
    assert pj.exposed_comm(_profile("thread", buckets, ready), 2, slow, 10e-3)[0] == pytest.approx(4e-3 + 2 * t - 10e-3)
    assert pj.exposed_comm(_profile("nonblocking", buckets, ready), 1, slow, 10e-3) == (0.0, 0.0, 0, 0)



def test_ranks_that_share_cores_take_turns_at_the_copies_too():
    # 4 ranks on a node of 2 cores: compute, Adam and (on a link the cores copy) communication
    # all take twice as long; on a wire that is not the cores' work, only compute and Adam do
    buckets, ready = [(0, 250_000), (250_000, 500_000)], [0.4, 1.0]
    profile = _profile("none", buckets, ready)
    copies = replace(LINK, host_cpu=True)
    for link, comm_stretch in ((copies, 2.0), (LINK, 1.0)):
        own_cores = pj.project(profile, 4, pj.Cluster("c", link, link, ranks_per_node=4, cores_per_node=4))
        shared = pj.project(profile, 4, pj.Cluster("c", link, link, ranks_per_node=4, cores_per_node=2))
        assert shared["compute_step_s"] == pytest.approx(2 * own_cores["compute_step_s"])
        assert shared["adam_step_s"] == pytest.approx(2 * own_cores["adam_step_s"])
        assert shared["exposed_step_s"] == pytest.approx(comm_stretch * own_cores["exposed_step_s"])
        assert own_cores["exposed_step_s"] == pytest.approx(2 * pj.allreduce_time(1e6, 4, pj.Cluster("c", link, link, 4)))
    local = pj.project(replace(profile, strategy="localsgd", sync_every=1), 4,
                       pj.Cluster("c", copies, copies, ranks_per_node=4, cores_per_node=2))
    assert local["sync_s"] == pytest.approx(2 * pj.allreduce_time(2e6, 4, pj.Cluster("c", copies, copies, 4)))

def test_bucket_ready_fractions_follow_backprop_from_the_last_layer():
    from mlpcore.nn.model import build_model
    from mlpcore.strategies.zero import bucket_bounds

    model = build_model("mlp", n_features=784, n_classes=10, hidden=(128,), dtype=np.float32,
                        rng=np.random.default_rng(0), kernels="numpy")
    buckets = bucket_bounds(model, 256 * 1024 // 4, 784)
    ready, share = pj.bucket_ready_fractions(model, buckets)
    # backward FLOPs per sample: dense 2 weight grad 2*128*10 and its input grad 2*128*10;
    # dense 1 weight grad 2*784*128 and no input grad (the first layer's is never needed)
    w2, x2, w1 = 2 * 128 * 10, 2 * 128 * 10, 2 * 784 * 128
    total = w2 + x2 + w1
    assert share == pytest.approx(total / (total + w1 + w2))
    assert buckets[0][1] > 1290 and ready[-1] == pytest.approx(1.0)
    first = (w2 + x2 + w1 * (buckets[0][1] - 1290) / (784 * 128 + 128)) / total
    assert ready[0] == pytest.approx(first, rel=1e-6)
    assert list(ready) == sorted(ready)


def test_what_the_run_waited_beyond_its_modelled_communication_is_kept():
    buckets, ready = [(0, 250_000), (250_000, 500_000)], [0.4, 1.0]
    own = pj.allreduce_time(1e6, 2, FLAT)    # per bucket, on the run's own placement: 2 ranks of one node
    waited = _profile("none", buckets, ready, measured_wait_s=2 * own + 3e-4)
    plain = replace(waited, measured_wait_s=None)
    # the run's link must be a measured one: an assumed link can't tell transfers from lags
    assert pj.unexplained_wait(waited, FLAT) == 0.0
    measured = replace(LINK, measured=True)
    flat_measured = pj.Cluster("flat", measured, measured, ranks_per_node=1)
    assert pj.unexplained_wait(waited, flat_measured) == pytest.approx(3e-4)
    slow = pj.Cluster("slow", measured, pj.Link("s", A, 1e-8, G), ranks_per_node=1)
    for ranks in (2, 8):        # a lag, not a transfer: the same on any link and at any rank count
        gap = pj.project(waited, ranks, slow)["train_s"] - pj.project(plain, ranks, slow)["train_s"]
        assert gap == pytest.approx(waited.steps * 3e-4)
    assert pj.project(waited, 1, slow)["train_s"] == pj.project(plain, 1, slow)["train_s"]
    # a model that costs the run's communication above what it waited adds nothing
    assert pj.unexplained_wait(replace(waited, measured_wait_s=own), flat_measured) == 0.0
    # local SGD: per sync
    local = replace(waited, strategy="localsgd", sync_every=5, measured_wait_s=pj.allreduce_time(2e6, 2, FLAT) + 1e-3)
    row = pj.project(local, 4, flat_measured)
    assert row["sync_s"] == pytest.approx(pj.allreduce_time(2e6, 4, FLAT) + 1e-3)


# --------------------------------------------------------------------------- real runs
SMALL = ["--train-limit", "4000", "--test-limit", "500", "--epochs", "2", "--quiet", "--no-plots", "--threads", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Real 2-rank runs: allreduce none and nonblocking, ZeRO-1, local SGD K=5, the ensemble; one --no-baseline."""
    from conftest import run_cli

    base = tmp_path_factory.mktemp("proj")
    specs = {"none": ["--strategy", "allreduce", "--overlap", "none", "--bucket-kb", "64"],
             "nonblocking": ["--strategy", "allreduce", "--overlap", "nonblocking"],
             "zero1": ["--strategy", "allreduce", "--overlap", "nonblocking", "--shard-optimizer"],
             "localsgd": ["--strategy", "localsgd", "--sync-every", "5"],
             "ensemble": ["--strategy", "ensemble"],
             "nobaseline": ["--strategy", "allreduce", "--no-baseline"]}
    out = {}
    for name, args in specs.items():
        r = run_cli([*SMALL, *args], np=2, out=base / name, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        out[name] = base / name
    return out


@pytest.mark.parametrize("name", ["none", "nonblocking", "zero1"])
def test_the_bucket_plan_moves_what_the_run_moved(runs, name):
    prof = pj.load_profile(runs[name])
    doc = json.loads((runs[name] / "results.json").read_text())
    overlap = doc["strategy"]["overlap"]
    row = pj.project(prof, 2, pj.Cluster("c", LINK, LINK, ranks_per_node=2))
    assert row["bytes_step"] * overlap["steps"] == overlap["bytes"]
    assert row["calls_step"] * overlap["steps"] == overlap["calls"]
    assert prof.steps == overlap["steps"] and prof.n_params == doc["model"]["n_params"]
    # Adam over every parameter: the sharded run stepped half, and the profile says so
    assert prof.adam_s > 0 and math.isfinite(prof.compute_c0_s + prof.compute_c1_s)
    assert prof.compute(200) + prof.adam_s == pytest.approx(prof.seq_train_s / prof.steps, rel=1e-9) \
        or prof.notes
    # what the ranks waited in communication, per step; the sharded optimizer counts its waits otherwise
    waits = [r["reduce_s"] / overlap["steps"] for r in overlap["breakdown_per_rank"]]
    assert prof.measured_wait_s == (None if name == "zero1" else pytest.approx(np.mean(waits)))


def test_local_sgd_syncs_as_often_as_the_run(runs):
    prof = pj.load_profile(runs["localsgd"])
    doc = json.loads((runs["localsgd"] / "results.json").read_text())
    row = pj.project(prof, 2, FLAT)
    assert row["syncs"] == doc["strategy"]["comm"]["train_calls"] == prof.steps // 5
    exposed = [r["comm_exposed_s"] for r in doc["timings"]["per_rank"]]
    assert prof.measured_wait_s == pytest.approx(np.mean(exposed) / row["syncs"])


def test_the_ensemble_trains_a_shard_per_rank(runs):
    prof = pj.load_profile(runs["ensemble"])
    one, eight = pj.project(prof, 1, FLAT), pj.project(prof, 8, FLAT)
    assert one["steps"] == 2 * math.ceil(4000 / 200) and eight["steps"] == 2 * math.ceil(500 / 200)
    assert eight["once_s"] > 0 == one["once_s"]


def test_a_run_without_baseline_is_refused_by_name(runs):
    with pytest.raises(UsageError, match="no sequential baseline"):
        pj.load_profile(runs["nobaseline"])


def test_project_py_prints_the_table_and_writes_json(runs, tmp_path):
    out = tmp_path / "p.json"
    rc, stdout, stderr, _ = run_command([PYTHON, REPO / "scripts" / "project.py", runs["nonblocking"],
                                         runs["localsgd"], runs["ensemble"], "--cluster", "10gbe",
                                         "--json", out, "--figure", tmp_path / "p.png", "--scaling", "both"],
                                        timeout=120)
    assert rc == 0, stdout + stderr
    doc = json.loads(out.read_text())
    ranks = [r["ranks"] for r in doc["rows"] if r["strategy"] == "allreduce nonblocking" and r["scaling"] == "strong"]
    assert ranks == [2 ** k for k in range(11)]
    for r in doc["rows"]:
        assert {"ranks", "nodes", "train_s", "speedup", "efficiency"} <= set(r)
    big = [r for r in doc["rows"] if r["ranks"] == 1024 and r["scaling"] == "strong"
           and r["strategy"].startswith("allreduce")]
    assert big[0]["train_s"] is None and "cannot be split" in big[0]["note"]
    assert "on 10gbe: 1 rank(s) per node, strong scaling" in stdout and (tmp_path / "p.png").stat().st_size > 0
    rc, stdout, stderr, _ = run_command([PYTHON, REPO / "scripts" / "project.py", runs["none"], "--cluster", "5gbe"],
                                        timeout=60)
    assert rc != 0 and "neither a preset (1gbe, 10gbe, ib100) nor a file" in stderr
    rc, stdout, stderr, _ = run_command([PYTHON, REPO / "scripts" / "project.py", tmp_path], timeout=60)
    assert rc != 0 and "no readable results.json" in stderr


@pytest.mark.parametrize("flag, message", [(["--busy-us", "-1"], "--busy-us must be >= 0"),
                                           (["--trials", "0"], "--trials must be >= 1")])
def test_netbench_refuses_bad_input_before_any_mpi(flag, message):
    rc, stdout, stderr, _ = run_command([PYTHON, REPO / "scripts" / "netbench.py", *flag], timeout=60)
    assert rc == 2 and message in stderr, stdout + stderr


@pytest.mark.timeout(600)
def test_a_small_validation_on_two_emulated_nodes(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import netns_cluster as nc
    from test_multinode import skip_or_fail

    try:
        nc.check_supported()
    except nc.NetnsUnavailable as exc:
        skip_or_fail(f"emulated nodes unavailable: {exc}")
    out = tmp_path / "val"
    rc, stdout, stderr, _ = run_command(
        [PYTHON, REPO / "scripts" / "validate_projection.py", "--out", out, "--train-limit", "4000", "--epochs", "1",
         "--configs", "allreduce nonblocking,localsgd K=10"], timeout=540)
    assert rc == 0, stdout + stderr
    doc = json.loads((out / "validation.json").read_text())
    rows = {(r["config"], r["target"]): r for r in doc["rows"]}
    assert set(doc["links"]) >= {"shm", "tcp"} and len(rows) == 5
    two = rows[("allreduce nonblocking", "2 nodes x 1 rank, tcp")]
    assert two["projected_bytes_step"] == two["measured_bytes_step"] == 4 * 101_770
    for r in doc["rows"]:
        assert r["projected_train_s"] > 0 and r["measured_train_s"] > 0 and math.isfinite(r["error"])
    placement = json.loads(Path(two["target_dir"], "results.json").read_text())["environment"]["placement"]
    assert placement["nodes"] == 2 and placement["collectives_cross_nodes"] is True
    print("\n" + (out / "validation.md").read_text())       # the errors, for the log; not asserted
