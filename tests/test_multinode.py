"""Across nodes: MPI and Slurm on emulated nodes (network namespaces on one bridge).

scripts/netns_cluster.py makes two "nodes" (namespaces mlpcore-node0/1, 198.18.0.11/12 on
bridge mlpbr0, no route beyond it). MPI crosses them with MPICH's Hydra through
scripts/hydra_netns_launcher (``-launcher ssh -launcher-exec``), Slurm with one slurmd per
namespace (tests/netns_slurm.py). Every job has a timeout; the module fixture tears the
nodes down (and checks that nothing is left) whatever happens.

When they run:
* ``CI=true``: always; anything that prevents the nodes (or Slurm) from working FAILS.
* elsewhere: skipped with the reason when not root or the kernel has no namespaces
  (Slurm: see tests/test_slurm.py; ``MLPCORE_SLURM_INSTALL=1`` lets it apt-get install).

A rank killed while it writes a checkpoint would leave ``checkpoints/.rankN.XXXX.npz.tmp``
(mlpcore/fsio.py's temporary file): the CLI raises SIGTERM as an exception so that clean-up
runs, and the root's handling of a failed run removes what a SIGKILLed rank left
(:func:`mlpcore.fsio.remove_stale_temp_files`); the fault tests assert none is left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import netns_cluster as nc  # noqa: E402
from conftest import BIN_DIR, MPI_TRAIN, PYTHON, cli_env  # noqa: E402

SMALL = ["--train-limit", "2000", "--test-limit", "500", "--epochs", "1", "--no-plots", "--quiet"]
# Long enough that node1's ranks are still training when the fault hits (checkpoints say they are).
LONG = ["--train-limit", "2000", "--test-limit", "500", "--epochs", "400", "--checkpoint-every", "20",
        "--no-plots", "--quiet", "--no-baseline", "--threads", "1"]
FAULT_DEADLINE_S = 30


def in_ci():
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_or_fail(reason):
    if in_ci():
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def nodes():
    """Two emulated nodes for the whole module; torn down (and checked clean) at the end."""
    try:
        nc.check_supported()
    except nc.NetnsUnavailable as exc:
        skip_or_fail(f"no emulated nodes: {exc}")
    if nc.leftovers() and not nc.read_state():
        nc.teardown()  # a crashed earlier run's remains (no owner): ours to remove
    cluster = nc.EmulatedCluster(nodes=2)
    try:
        cluster.up()
    except (nc.NetnsUnavailable, nc.ClusterBusy) as exc:
        skip_or_fail(f"no emulated nodes: {exc}")
    try:
        yield cluster
    finally:
        cluster.down()
        left = nc.leftovers()
        assert not left, f"the emulated nodes left {left}"


def mpi_env(extra=None):
    return cli_env(extra)


def node_pids(cluster, marker=None):
    return {h: [p for p in cluster.pids_on(h) if marker is None or marker in nc._cmdline(p)] for h in cluster.hosts}


def assert_nodes_empty(cluster, within=10.0, daemons=()):
    """No process on any node within ``within`` s, except the ``daemons`` (the slurmds)."""
    def left_now():
        return {h: [p for p in pids if p not in daemons] for h, pids in node_pids(cluster).items()}

    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(left_now().values()):
        time.sleep(0.1)
    left = {h: [(p, nc._cmdline(p)[:100]) for p in pids] for h, pids in left_now().items() if pids}
    assert not left, f"processes survived on the nodes: {left}"


# ------------------------------------------------------------------------------- the harness
# (first: these start their own cluster through the CLI, before the module's one exists)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_run_tears_down_on_a_signal(sig):
    try:
        nc.check_supported()
    except nc.NetnsUnavailable as exc:
        skip_or_fail(f"no emulated nodes: {exc}")
    if nc.read_state():
        skip_or_fail(f"another emulated cluster is up: {nc.read_state()}")
    hosts_before = Path("/etc/hosts").read_text()
    command = ["sleep", f"{300 + os.getpid() % 997 / 1000:.3f}"]  # a command line no other process has
    proc = __import__("subprocess").Popen(
        [sys.executable, REPO / "scripts" / "netns_cluster.py", "run", "--nodes", "2", "--", *command])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(nc.our_netns_names()) < 2:
            assert proc.poll() is None, "netns_cluster.py run ended by itself"
            time.sleep(0.05)
        time.sleep(0.3)                                    # the command is running
        assert nc.read_state()["owner_pid"] == proc.pid
        proc.send_signal(sig)
        assert proc.wait(timeout=20) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            nc.teardown()
    assert nc.leftovers() == [], nc.leftovers()
    assert Path("/etc/hosts").read_text() == hosts_before
    assert not [d for d in os.listdir("/proc") if d.isdigit() and nc._alive(int(d))
                and nc._cmdline(int(d)) == " ".join(command)], "the command outlived the cluster"


# ------------------------------------------------------------------------------- the nodes
@pytest.mark.timeout(60)
def test_nodes_are_isolated_namespaces(nodes):
    for i, host in enumerate(nodes.hosts):
        name = nodes.run(host, ["hostname"]).stdout.strip()
        addrs = nodes.run(host, ["ip", "-4", "-o", "addr", "show"]).stdout
        routes = [r.strip() for r in nodes.run(host, ["ip", "-4", "route"]).stdout.splitlines() if r.strip()]
        sysnet = sorted(nodes.run(host, ["ls", "/sys/class/net"]).stdout.split())
        assert name == host
        assert f"{nc.node_ip(i)}/24" in addrs and "eth0" not in addrs, addrs
        assert routes == [f"198.18.0.0/24 dev nic0 proto kernel scope link src {nc.node_ip(i)}"], routes
        assert sysnet == ["lo", "nic0"], sysnet               # the node's own /sys/class/net
        # no route beyond the bridge: the kernel refuses before sending anything
        q = nodes.run(host, ["ip", "route", "get", "192.0.2.1"])
        assert q.returncode != 0 and "unreachable" in q.stderr.lower(), q.stdout + q.stderr
    hosts = Path("/etc/hosts").read_text()
    assert f"{nc.node_ip(1)} node1  {nc.HOSTS_MARK}" in hosts


@pytest.mark.timeout(60)
def test_cli_refuses_a_second_cluster(nodes):
    p = nc._run(sys.executable, REPO / "scripts" / "netns_cluster.py", "up", "--nodes", "2", check=False)
    assert p.returncode == 2 and "already up" in p.stderr, p.stdout + p.stderr


# ------------------------------------------------------------------------------- MPI across nodes
ALLREDUCE_4MB = (
    "import numpy as np, socket; from mpi4py import MPI; c = MPI.COMM_WORLD; "
    "a = np.full(1 << 20, c.rank + 1, np.float32); b = np.empty_like(a); c.Allreduce(a, b); "
    "import os; os.write(1, f'{c.rank} {MPI.Get_processor_name()} {float(b[0])}\\n'.encode())")


@pytest.mark.timeout(120)
def test_allreduce_goes_over_tcp_through_the_veths(nodes):
    """4 MB allreduce, 1 rank per node: >= 4 MB leave node1 on its veth with UCX_TLS=tcp,self;
    without it UCX finds the other "node" on the same machine and uses shared memory."""
    before = nodes.counters("node1")
    run = nodes.mpirun([PYTHON, "-c", ALLREDUCE_4MB], ppn=1, timeout=60, env=mpi_env())
    after = nodes.counters("node1")
    assert run.returncode == 0, run.output
    assert sorted(run.stdout.split("\n")[:2]) == ["0 node0 3.0", "1 node1 3.0"], run.output
    sent = after["tx_bytes"] - before["tx_bytes"]
    got = after["rx_bytes"] - before["rx_bytes"]
    print(f"node1 veth: sent {sent} B, received {got} B for a 4 MiB allreduce over TCP")
    assert sent >= 4 * 2**20 and got >= 4 * 2**20, (sent, got)

    # Control: the same job with UCX left to choose moves the 4 MB through shared memory.
    before = nodes.counters("node1")
    run = nodes.mpirun([PYTHON, "-c", ALLREDUCE_4MB], ppn=1, timeout=60, env=mpi_env(), force_tcp=False)
    shm_sent = nodes.counters("node1")["tx_bytes"] - before["tx_bytes"]
    print(f"node1 veth without UCX_TLS: sent {shm_sent} B")
    if run.returncode == 0:
        assert shm_sent < 2**20, f"without UCX_TLS=tcp,self {shm_sent} B crossed; expected shared memory"
    assert_nodes_empty(nodes)


@pytest.mark.timeout(180)
def test_mpi_train_across_two_nodes(nodes, tmp_path):
    out = tmp_path / "run"
    before = nodes.counters("node1")
    run = nodes.mpirun([PYTHON, MPI_TRAIN, *SMALL, "--out", out], ppn=2, timeout=150, env=mpi_env(), cwd=REPO)
    after = nodes.counters("node1")
    assert run.returncode == 0, run.output
    res = json.loads((out / "results.json").read_text())
    env = res["environment"]
    assert env["world_size"] == 4 and env["launcher"] == "mpi", env
    assert env["hostname"] == "node0"                        # rank 0 ran on node0
    assert run.placement() == {"node0": [0, 1], "node1": [2, 3]}, run.events
    # node1's shards (2 x 500 x 784 B of pixels) and the test set (500 x 784 B) crossed its link
    assert after["rx_bytes"] - before["rx_bytes"] > 2 * 500 * 784 + 500 * 784, (before, after)
    assert_nodes_empty(nodes)


@pytest.mark.timeout(300)
def test_sharded_optimizer_and_node_shm_across_two_nodes(nodes, tmp_path):
    """ZeRO-1 and --node-shm on 2 nodes x 2 ranks: shared windows per node, the leaders over TCP.

    tests/mpi_scripts/zero_check.py trains plain allreduce and every variant on the real
    nodes. Replicas bitwise identical on all four ranks; every variant within the tolerance
    of tests/test_strategies.py of plain allreduce (4 ranks: the summation orders differ);
    --node-shm bitwise equal across its overlap modes (its order, ``(g0 + g1) + (g2 + g3)``,
    is fixed by construction); each node's shared memory holds one copy, and the pieces of
    Adam's state partition the parameters.
    """
    from test_strategies import ATOL, RTOL

    out = tmp_path / "zero.npz"
    before = nodes.counters("node1")
    run = nodes.mpirun([PYTHON, REPO / "tests" / "mpi_scripts" / "zero_check.py", out, "mlp", 800, 1, "real-nodes"],
                       ppn=2, timeout=270, env=mpi_env(), cwd=REPO)
    sent = nodes.counters("node1")["tx_bytes"] - before["tx_bytes"]
    assert run.returncode == 0, run.output
    d = np.load(out)
    full = 2 * int(d["n_params"]) * 4  # Adam's M and V, float32
    names = [k[:-len("_host")] for k in d.files if k.endswith("_host")]
    assert len(names) == 8, names
    for name in names:
        assert list(d[f"{name}_host"]) == ["node0", "node0", "node1", "node1"], (name, d[f"{name}_host"])
        for rank in range(1, 4):
            assert np.array_equal(d[name][rank], d[name][0]), f"{name}: rank {rank} differs from rank 0"
        np.testing.assert_allclose(d[name][0], d["plain"][0], rtol=RTOL, atol=ATOL, err_msg=name)
    for name in ("shm-nonblocking", "shmzero1-none", "shmzero1-nonblocking"):
        assert np.array_equal(d[name][0], d["shm-none"][0]), name
    shm = d["shm-none_optimizer_bytes"]
    assert shm[0] + shm[1] == full == shm[2] + shm[3], shm  # one copy of the optimizer per node
    for name in ("zero1-none", "shmzero1-none"):
        assert d[f"{name}_optimizer_bytes"].sum() == full and d[f"{name}_optimizer_bytes"].max() <= 0.3 * full
    # 8 runs x 8 steps, each moving at least the gradients once across the link
    assert sent > 8 * int(d["n_params"]) * 4, sent
    assert_nodes_empty(nodes)


# ------------------------------------------------------------------------------- faults across nodes
def _wait_training(nodes, out, proc, rank=2, timeout=90):
    """Until node1's rank has written a checkpoint: it is training."""
    ck = out / "checkpoints" / f"rank{rank}.npz"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not ck.exists():
        assert proc.poll() is None, "the job ended before its ranks trained"
        time.sleep(0.1)
    assert ck.exists(), f"{ck} never appeared"


def assert_run_folder_clean(out):
    """Nothing torn: every file under its final name is complete (checkpoints load), no results.json
    of a failed run; and no temporary file left (see the xfail below)."""
    if not out.exists():
        return
    for ck in out.rglob("*.npz"):
        with np.load(ck) as z:
            for key in z.keys():
                z[key]
    assert not (out / "results.json").exists(), "a failed run wrote results.json"
    # A rank SIGKILLed while writing a checkpoint leaves fsio.atomic_path's temporary file;
    # the root's clean-up of the failed run (and SIGTERM, raised as an exception) removes it.
    tmp = [str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not tmp, f"temporary files left in the run folder: {tmp}"


FAULTS = ["kill", "sigstop", "link-down"]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("fault", FAULTS)
def test_fault_on_one_node_ends_the_job(nodes, tmp_path, fault):
    out = tmp_path / "run"
    args = [*LONG, "--out", out]
    if fault != "kill":
        args += ["--stall-timeout", "10"]
    t = {}

    def inject(proc):
        _wait_training(nodes, out, proc)
        ranks = [p for p in node_pids(nodes, str(MPI_TRAIN))["node1"]]
        assert len(ranks) == 2, ranks
        t["pids"] = ranks
        t["at"] = time.monotonic()
        if fault == "kill":
            os.kill(ranks[0], signal.SIGKILL)
        elif fault == "sigstop":
            for pid in ranks:
                os.kill(pid, signal.SIGSTOP)
        else:
            nodes.link_down("node1")

    try:
        run = nodes.mpirun([PYTHON, MPI_TRAIN, *args], ppn=2, timeout=120, env=mpi_env(),
                           cwd=REPO, on_start=inject)
    finally:
        nodes.link_up("node1")
    took = run.ended_at - t["at"] if t else None
    output = run.output
    print(f"{fault}: status {run.returncode}, job ended {took:.1f} s after the fault\n{output[-2500:]}")
    assert not run.timed_out, output
    assert run.returncode != 0, output
    assert took is not None and took < FAULT_DEADLINE_S, f"ended {took:.1f} s after the fault"
    if fault == "kill":
        pid = t["pids"][0]
        m = re.search(rf"node1: rank (\d) \(pid {pid}\) was killed by signal 9 \(SIGKILL\)", output)
        assert m and m.group(1) in "23", output
        assert f"PID {pid} RUNNING AT node1" in output          # Hydra's own report
    else:
        m = re.search(r"^stall: ranks \[([\d, ]+)\]( on ([\w, ]+))? have not reached", output, re.M)
        assert m, output
        stalled = [int(r) for r in m.group(1).split(",")]
        assert run.placement().get("node1") == [2, 3], run.events
        assert set(stalled) <= {2, 3}, output                  # node1's ranks
        if m.group(3):                                         # the watchdog names the node itself
            assert m.group(3) == "node1", output
        else:  # an older watchdog: the launchers' notes name the node of those ranks
            assert re.search(r"netns_cluster: node1: ranks \[[23, ]+\] \(pids .*\) were still running when the node "
                             r"was torn down", output) or \
                re.search(r"netns_cluster: node1: rank [23] \(pid \d+\) was killed", output), output
    assert_nodes_empty(nodes, within=5)
    assert_run_folder_clean(out)


# ------------------------------------------------------------------------------- netbench
@pytest.mark.timeout(120)
def test_netbench_fits_the_tcp_link(nodes, tmp_path):
    """scripts/netbench.py under MPI on 2 nodes x 1 rank (a few sizes): a fit with residuals.

    With ``--busy-us`` (compute before every message, as training has), and the flag recorded.
    """
    out = tmp_path / "nb.json"
    run = nodes.mpirun([PYTHON, REPO / "scripts" / "netbench.py", "--sizes", "8,4096,262144,4194304",
                        "--trials", "1", "--busy-us", "100", "--link", "tcp", "--out", out], ppn=1, timeout=90,
                       env=mpi_env())
    assert run.returncode == 0, run.output
    link = json.loads(out.read_text())["links"]["tcp"]
    assert link["busy_us"] == 100 and link["blas_threads"] == 1, link
    assert link["hosts"] == ["node0", "node1"] and link["env"]["UCX_TLS"] == "tcp,self", link
    f = link["fit"]
    assert f["alpha_s"] > 0 and f["beta_s_per_byte"] > 0, f
    assert len(link["measurements"]) == 8
    assert all("relative_residual" in m for m in link["measurements"])
    assert_nodes_empty(nodes)


# ------------------------------------------------------------------------------- Slurm across nodes
@pytest.fixture(scope="module")
def slurm(nodes):
    from slurm_cluster import SlurmStartError, SlurmUnavailable, ensure_slurm
    from netns_slurm import NetnsSlurmCluster

    try:
        ensure_slurm(allow_install=in_ci() or os.environ.get("MLPCORE_SLURM_INSTALL") == "1")
    except SlurmUnavailable as exc:
        skip_or_fail(f"no Slurm: {exc}")
    cluster = NetnsSlurmCluster.create_on(nodes, ncpus=2)
    try:
        cluster.start(timeout=45)
    except SlurmStartError as exc:
        pytest.fail(f"Slurm across the emulated nodes did not start:\n{exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


def srun_ended_tasks(text, node):
    """The ranks srun reports as ended on ``node``: "tasks 2-3: ..." or a line a task, as it happens."""
    ended = set()
    for tasks in re.findall(rf"^srun: error: {node}: tasks? ([\d,-]+): (?:Terminated|Killed|Exited with exit code 143)",
                            text, re.M):
        for part in tasks.split(","):
            lo, _, hi = part.partition("-")
            ended.update(range(int(lo), int(hi or lo) + 1))
    return ended


def job_env(nodes, extra=None):
    env = {"PYTHON": PYTHON, "ENV_KIND": "none", "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}",
           "UCX_TLS": "tcp,self", "UCX_NET_DEVICES": nc.NODE_IFACE, "PYTHONUNBUFFERED": "1"}
    env.update(extra or {})
    return env


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_sbatch_across_two_nodes(nodes, slurm, tmp_path):
    out = tmp_path / "run"
    before = nodes.counters("node1")
    p = slurm.run("sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=2",
                  f"--output={tmp_path}/mlpcore-%j.out", REPO / "scripts" / "slurm_train.sbatch",
                  *SMALL, "--out", out, cwd=REPO, env={**slurm.env, **job_env(nodes)}, timeout=30)
    job = p.stdout.strip().split(";")[0]
    assert p.returncode == 0 and job.isdigit(), p.stdout + p.stderr
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and slurm.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING",
                                                                    "COMPLETING"):
        time.sleep(0.5)
    state = slurm.job_state(job)
    if state != "COMPLETED":
        info = slurm.run("scontrol", "show", "job", job, timeout=15).stdout
        out_text = (tmp_path / f"mlpcore-{job}.out").read_text(errors="replace") \
            if (tmp_path / f"mlpcore-{job}.out").exists() else "<no job output>"
        slurm.run("scancel", job, timeout=30)
        pytest.fail(f"job {job} {state}\n{info}\n{out_text[-3000:]}\n{slurm.logs()[-4000:]}", pytrace=False)
    text = (tmp_path / f"mlpcore-{job}.out").read_text(errors="replace") if job.isdigit() else ""
    assert p.returncode == 0, f"{p.stdout}\n{p.stderr}\n{text}\n{slurm.logs()}"
    assert re.search(r"^nodes\s*:\s*2 \(node\[0-1\]\)$", text, re.M), text
    assert re.search(r"^launcher\s*:\s*srun --mpi=pmi2$", text, re.M), text
    res = json.loads((out / "results.json").read_text())
    env = res["environment"]
    assert env["world_size"] == 4 and env["hostname"] == "node0", env
    moved = nodes.counters("node1")["rx_bytes"] - before["rx_bytes"]
    assert moved > 3 * 500 * 784, moved                       # node1's shards came over the bridge


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_scancel_across_two_nodes(nodes, slurm, tmp_path):
    out = tmp_path / "run"
    p = slurm.run("sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=2", f"--output={tmp_path}/job-%j.out",
                  REPO / "scripts" / "slurm_train.sbatch", *LONG, "--out", out,
                  cwd=REPO, env={**slurm.env, **job_env(nodes)}, timeout=30)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 90
        ck = out / "checkpoints" / "rank2.npz"
        while time.monotonic() < deadline and not ck.exists():
            assert slurm.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), \
                (tmp_path / f"job-{job}.out").read_text(errors="replace")
            time.sleep(0.2)
        ranks = {h: [p for p in pids if Path(nc._cmdline(p).split()[0]).name.startswith("python")]
                 for h, pids in node_pids(nodes, str(out)).items()}   # the run folder is in every rank's argv
        assert len(ranks["node0"]) == 2 and len(ranks["node1"]) == 2, ranks
        start = time.monotonic()
        c = slurm.run("scancel", job, timeout=30)
        assert c.returncode == 0, c.stderr
        while time.monotonic() - start < FAULT_DEADLINE_S and slurm.job_state(job) not in (
                "CANCELLED", "FAILED", "COMPLETED"):
            time.sleep(0.2)
        state = slurm.job_state(job)
        took = time.monotonic() - start
        assert state == "CANCELLED", state
        assert_nodes_empty(nodes, within=max(1.0, FAULT_DEADLINE_S - took),
                           daemons={p.pid for p in slurm.procs.values()})
        text = (tmp_path / f"job-{job}.out").read_text(errors="replace")
        print(f"scancel: {state} after {took:.1f} s\n{text[-2000:]}")
        assert re.search(r"\*\*\* JOB \d+ ON node0 CANCELLED AT", text), text
        # srun names the node and its ranks; 143: SIGTERM -> MPI_Abort
        assert srun_ended_tasks(text, "node1") == {2, 3}, text
        assert_run_folder_clean(out)
    finally:
        slurm.run("scancel", job, timeout=30)
