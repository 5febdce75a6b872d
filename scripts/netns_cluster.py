#!/usr/bin/env python3
"""Emulated cluster nodes on one Linux machine: one network namespace per "node".

Each node is a network namespace with one veth into a shared bridge, an address in the
RFC 2544 benchmarking range 198.18.0.0/24 and NO route beyond the bridge (no default
route, no forwarding set up), plus its own host name (a UTS namespace, entered per
command).  Everything else (files, PIDs, users) is the machine's: a process on "node1"
is an ordinary process whose network is node1's.

Layout (K nodes, K <= 200)::

    root namespace:  bridge mlpbr0  198.18.0.1/24       (the "head node": mpirun, slurmctld)
    node i:          netns mlpcore-node<i>, interface nic0 198.18.0.<11+i>/24, lo
                     root end of its veth: mlpv<i> (in the bridge)
    /etc/hosts:      "198.18.0.<11+i> node<i>  # mlpcore-netns" lines, removed on teardown

Python (the tests use this)::

    from netns_cluster import EmulatedCluster
    with EmulatedCluster(nodes=2) as cluster:          # refuses with NetnsUnavailable
        subprocess.run(cluster.mpirun_cmd(["python", "mpi_train.py"], ppn=2),
                       env=cluster.mpi_env())
        cluster.link_down("node1")                      # a "pulled cable"
        cluster.pids_on("node1")                        # processes in node1's namespace
        cluster.counters("node1")                       # rx/tx bytes of node1's veth

Command line (root)::

    python scripts/netns_cluster.py up --nodes 2        # stays up; prints the mpirun line
    python scripts/netns_cluster.py exec node1 -- ip addr
    python scripts/netns_cluster.py status
    python scripts/netns_cluster.py down                # also cleans up after a crash
    python scripts/netns_cluster.py run --nodes 2 -- CMD ...        # up, CMD, down
    python scripts/netns_cluster.py mpirun --nodes 2 --ppn 2 -- python mpi_train.py --quiet

``run`` and ``mpirun`` tear everything down when the command ends, on an exception and
on SIGTERM/SIGINT/SIGHUP.  A process that was SIGKILLed cannot clean up: the next
``up`` (or ``down``) finds its leftovers by the state file and the fixed names, and
removes them.

MPI across the nodes: ``mpirun`` runs in the root namespace and starts one Hydra proxy
per node through ``scripts/hydra_netns_launcher`` (Hydra's ssh launcher with
``-launcher-exec``), which enters the node's namespaces instead of ssh-ing.
``-iface mlpbr0`` makes the proxies call back to the bridge address.  ``UCX_TLS=tcp,self``
(+ ``UCX_NET_DEVICES=nic0``) keeps UCX from using shared memory between "nodes" (they
are one machine, and UCX would see that); MPICH's own shared memory still serves the
ranks of one node.  See :meth:`EmulatedCluster.mpi_env`.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAUNCHER = HERE / "hydra_netns_launcher"

SUBNET_PREFIX = "198.18.0."       # RFC 2544: benchmarking only, never routed
BRIDGE = "mlpbr0"
BRIDGE_IP = SUBNET_PREFIX + "1"
FIRST_NODE_OCTET = 11
MAX_NODES = 200
NODE_IFACE = "nic0"               # the node's end of its veth (inside the namespace)
VETH_PREFIX = "mlpv"              # the root end: mlpv0, mlpv1, ...
NETNS_PREFIX = "mlpcore-"         # namespace of host H: mlpcore-H
HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARK = "# mlpcore-netns"
STATE_DIR = Path("/run/mlpcore-netns")
STATE_FILE = STATE_DIR / "state.json"
LOCK_FILE = STATE_DIR / "lock"
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


class NetnsUnavailable(RuntimeError):
    """Emulated nodes cannot be made here (not root, no namespaces, no veth/bridge ...)."""


class ClusterBusy(RuntimeError):
    """Another emulated cluster (a live process, or one left `up`) owns the names and addresses."""


# --------------------------------------------------------------------------- small tools
def _which(name):
    return shutil.which(name, path=os.environ.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(SBIN))


def _run(*cmd, check=True, timeout=30, **kw):
    """Run a command (text output captured); raise RuntimeError with its stderr when ``check``."""
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"`{' '.join(map(str, cmd))}` failed ({p.returncode}): {p.stderr.strip()}")
    return p


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def node_ip(index):
    return f"{SUBNET_PREFIX}{FIRST_NODE_OCTET + index}"


def check_supported():
    """Raise :class:`NetnsUnavailable` (with the reason) unless emulated nodes can be made here."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("emulated nodes need root (network namespaces, veths, a bridge); not root here")
    if not Path("/proc/self/ns/net").exists() or not Path("/proc/self/ns/uts").exists():
        raise NetnsUnavailable("this kernel has no network/UTS namespaces (/proc/self/ns/net, uts missing)")
    missing = [t for t in ("ip", "nsenter", "unshare") if _which(t) is None]
    if missing:
        raise NetnsUnavailable(f"missing tools: {', '.join(missing)} (Debian: apt-get install iproute2 util-linux)")


# --------------------------------------------------------------------------- the cluster
class EmulatedCluster:
    """K emulated nodes (network namespaces on one bridge); a context manager that tears down.

    Parameters
    ----------
    nodes : int
        How many nodes (1..200).
    prefix : str
        Host names are ``f"{prefix}{i}"`` (``node0``, ``node1``, ...).
    persistent : bool
        For ``netns_cluster.py up``: no owner process; ``down`` removes it.
    """

    def __init__(self, nodes=2, prefix="node", persistent=False):
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"nodes must be 1..{MAX_NODES}, got {nodes}")
        self.hosts = [f"{prefix}{i}" for i in range(nodes)]
        self.persistent = persistent
        self._up = False
        self._old_handlers = {}

    # -- names -------------------------------------------------------------------------
    def index(self, host):
        try:
            return self.hosts.index(host)
        except ValueError:
            raise KeyError(f"{host!r} is not a node of this cluster ({', '.join(self.hosts)})") from None

    def netns(self, host):
        return NETNS_PREFIX + host

    def netns_path(self, host):
        return Path("/run/netns") / self.netns(host)

    def veth(self, host):
        return f"{VETH_PREFIX}{self.index(host)}"

    def ip(self, host):
        return node_ip(self.index(host))

    # -- up / down ---------------------------------------------------------------------
    def __enter__(self):
        self.up()
        return self

    def __exit__(self, *exc):
        self.down()
        return False

    def up(self):
        """Create the bridge, the namespaces, the veths and the /etc/hosts lines (all or nothing)."""
        check_supported()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        with _locked():
            state = read_state()
            if state is not None:
                owner = state.get("owner_pid")
                if state.get("persistent") or (owner and _alive(owner) and owner != os.getpid()):
                    who = "left up by `netns_cluster.py up`" if state.get("persistent") else f"owned by pid {owner}"
                    raise ClusterBusy(f"an emulated cluster is already up ({', '.join(state.get('hosts', []))}; "
                                      f"{who}); run `python scripts/netns_cluster.py down` first")
            cleanup_leftovers(state)  # a crashed owner's bridge/namespaces/hosts lines
            if not self.persistent:
                self._install_handlers()
                atexit.register(self.down)
            self._up = True
            write_state({"owner_pid": None if self.persistent else os.getpid(), "persistent": self.persistent,
                         "hosts": self.hosts, "created": time.time()})
            try:
                self._create()
            except BaseException as exc:
                self._down_locked()
                if isinstance(exc, RuntimeError) and "Operation not supported" in str(exc):
                    raise NetnsUnavailable(f"the kernel refused a namespace/veth/bridge: {exc}") from None
                raise
        return self

    def _create(self):
        ip = _which("ip")
        # No STP: a port that comes back up (link_up) forwards at once, with no 15 s listening delay.
        _run(ip, "link", "add", BRIDGE, "type", "bridge", "stp_state", "0", "forward_delay", "0")
        _run(ip, "addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE)
        _disable_ipv6(BRIDGE)
        _run(ip, "link", "set", BRIDGE, "up")
        for i, host in enumerate(self.hosts):
            ns, veth = self.netns(host), self.veth(host)
            _run(ip, "netns", "add", ns)
            _run(ip, "link", "add", veth, "type", "veth", "peer", "name", NODE_IFACE, "netns", ns)
            _run(ip, "link", "set", veth, "master", BRIDGE)
            _run(ip, "link", "set", veth, "up")
            _run(ip, "-n", ns, "link", "set", "lo", "up")
            _run(ip, "-n", ns, "addr", "add", f"{node_ip(i)}/24", "dev", NODE_IFACE)
            _run(ip, "-n", ns, "link", "set", NODE_IFACE, "up")
            _disable_ipv6(veth)
            _disable_ipv6(NODE_IFACE, ns)
            # Only the connected 198.18.0.0/24 route exists: nothing leaves the bridge.
            routes = _run(ip, "-n", ns, "route", "show").stdout
            assert "default" not in routes, routes
        add_hosts_lines([(node_ip(i), h) for i, h in enumerate(self.hosts)])
        # wait until the bridge forwards (the veths leave their brief "listening" state at once
        # when STP is off, which is the default); a ping would need a binary: check carriers.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            states = [_run(ip, "-n", self.netns(h), "-br", "link", "show", NODE_IFACE).stdout for h in self.hosts]
            if all("UP" in s.split()[1] for s in states if s.split()):
                break
            time.sleep(0.05)

    def down(self):
        """Remove everything this cluster made; kill what still runs in its namespaces. Idempotent."""
        if not self._up:
            return
        with _locked():
            self._down_locked()

    def _down_locked(self):
        problems = teardown(self.hosts)
        clear_state()
        self._up = False
        self._restore_handlers()
        with contextlib.suppress(Exception):
            atexit.unregister(self.down)
        if problems:
            print("netns_cluster: teardown problems: " + "; ".join(problems), file=sys.stderr, flush=True)

    # -- signals: SIGTERM/SIGINT/SIGHUP end the owner through its finally/__exit__ ---------
    def _install_handlers(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            self.down()
            old = self._old_handlers.get(signum)
            if callable(old):
                old(signum, frame)
            raise SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            old = signal.getsignal(sig)
            # pytest's SIGINT handler (KeyboardInterrupt) does the right thing through __exit__
            if sig == signal.SIGINT and old is signal.default_int_handler:
                continue
            self._old_handlers[sig] = old
            signal.signal(sig, handler)

    def _restore_handlers(self):
        for sig, old in self._old_handlers.items():
            with contextlib.suppress(Exception):
                signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old_handlers = {}

    # -- running things on a node ---------------------------------------------------------
    def enter(self, host, cmd):
        """argv that runs ``cmd`` on ``host``: its network namespace, a UTS namespace named after it.

        ``nsenter --net`` (not ``ip netns exec``, which remounts /sys and hides /sys/fs/cgroup).
        """
        self.index(host)
        return enter_argv(self.netns_path(host), host, cmd)

    def popen(self, host, cmd, **kw):
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.enter(host, [str(c) for c in cmd]), **kw)

    def run(self, host, cmd, timeout=60, **kw):
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.enter(host, [str(c) for c in cmd]), timeout=timeout, **kw)

    def pids_on(self, host):
        """PIDs of the live processes whose network namespace is ``host``'s."""
        return pids_in_netns(self.netns_path(host))

    # -- links --------------------------------------------------------------------------
    def link_down(self, host):
        """Pull the node's cable: the bridge end of its veth goes down (the node's nic0 loses carrier)."""
        _run(_which("ip"), "link", "set", self.veth(host), "down")

    def link_up(self, host, wait_s=10.0):
        """Plug the cable back in, and wait until the node reaches the bridge's address again."""
        _run(_which("ip"), "link", "set", self.veth(host), "up")
        # Reachable = a TCP connect to the bridge is refused (nothing listens on port 9), not
        # "no route to host", which the node reports while its neighbour entry is stale.
        probe = ("import socket, sys\ns = socket.socket(); s.settimeout(1)\n"
                 f"try:\n    s.connect(({BRIDGE_IP!r}, 9))\nexcept ConnectionRefusedError:\n    sys.exit(0)\n"
                 "except OSError:\n    sys.exit(1)\n")
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            self.run(host, [_which("ip"), "neigh", "flush", "dev", NODE_IFACE])  # forget the failed lookups
            if self.run(host, [sys.executable, "-c", probe]).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"{host}: its link did not come back within {wait_s:g} s")

    def counters(self, host):
        """``{"rx_bytes", "tx_bytes", "rx_packets", "tx_packets"}`` of the node's nic0 (the node's view)."""
        stats = Path("/sys/class/net") / self.veth(host) / "statistics"
        # The root end's counters, mirrored: what the root end sent, the node received.
        read = lambda name: int((stats / name).read_text())  # noqa: E731
        return {"rx_bytes": read("tx_bytes"), "tx_bytes": read("rx_bytes"),
                "rx_packets": read("tx_packets"), "tx_packets": read("rx_packets")}

    def shape(self, host, rate="1gbit", delay=None, burst="32kb"):
        """Try to shape the node's link (tbf for rate, netem for delay). Returns None or the kernel's refusal.

        The root end of the node's veth is shaped: what the bridge sends *to* the node, so
        shaping every node shapes both directions. ``burst`` stays well below a gradient
        bucket: with a larger one, a training step's exchange after an idle gap would pass
        at the veth's own speed (32 KB: the 1 Gbit/s rate held from 128 KB to 2 MB, with or
        without compute between the allreduces).
        """
        tc = _which("tc")
        if tc is None:
            return "no tc binary"
        if delay:
            p = _run(tc, "qdisc", "replace", "dev", self.veth(host), "root", "netem", "delay", delay,
                     "rate", rate, check=False)
        else:
            p = _run(tc, "qdisc", "replace", "dev", self.veth(host), "root", "tbf", "rate", rate,
                     "burst", burst, "latency", "50ms", check=False)
        return None if p.returncode == 0 else p.stderr.strip()

    def shape_all(self, rate):
        """Shape every node's link to ``rate`` (both directions); raises ``RuntimeError`` with tc's refusal."""
        for host in self.hosts:
            refused = self.shape(host, rate)
            if refused:
                raise RuntimeError(f"tc refused to shape {host}'s link to {rate}: {refused}")

    # -- MPI --------------------------------------------------------------------------------
    def mpi_env(self, base=None, force_tcp=True):
        """Environment for mpirun (and so every rank): inter-node traffic over TCP on nic0.

        ``force_tcp=False`` leaves UCX free to choose (it then uses shared memory between the
        emulated nodes, which are one machine: only for showing that difference).
        """
        env = dict(os.environ if base is None else base)
        if not force_tcp:
            env["MLPCORE_NETNS_STATE"] = str(STATE_FILE)
            return env
        env.update({
            # UCX (MPICH's default ch4 netmod in the PyPI wheel) would find the other "node" on
            # the same machine and use shared memory / CMA: allow only TCP (and self).
            "UCX_TLS": "tcp,self",
            "UCX_NET_DEVICES": NODE_IFACE,
            # and should MPICH pick its OFI netmod instead, make that TCP as well
            "FI_PROVIDER": "tcp",
            "FI_TCP_IFACE": NODE_IFACE,
            "MLPCORE_NETNS_STATE": str(STATE_FILE),
        })
        return env

    def mpirun_args(self, ppn=1, hosts=None):
        """Hydra options that place ``ppn`` ranks on each node through the namespace launcher."""
        hosts = hosts or self.hosts
        return ["-launcher", "ssh", "-launcher-exec", str(LAUNCHER), "-iface", BRIDGE,
                "-hosts", ",".join(f"{h}:{ppn}" for h in hosts), "-ppn", str(ppn)]

    def mpirun_cmd(self, prog, ppn=1, np=None, hosts=None, mpirun="mpirun", extra=()):
        hosts = hosts or self.hosts
        np = np or ppn * len(hosts)
        return [mpirun, *self.mpirun_args(ppn, hosts), *extra, "-n", str(np), *map(str, prog)]

    def mpirun(self, prog, ppn=1, *, timeout=120, env=None, cwd=None, hosts=None, extra=(), on_start=None,
               settle=10.0, force_tcp=True):
        """Run ``mpirun`` across the nodes; returns an :class:`MpiRun` (never hangs past ``timeout``).

        After mpirun ends it waits (up to ``settle`` s) for the nodes to empty, then appends the
        launchers' notes to stderr: which rank on which node ended abnormally first, and which
        ranks were still running when their node was torn down. ``on_start(popen)`` is called
        once mpirun has started (the fault tests inject their fault there).
        """
        import tempfile

        fd, events_path = tempfile.mkstemp(prefix="mlpcore-netns-events-", suffix=".jsonl")
        os.close(fd)
        run_env = self.mpi_env(env, force_tcp=force_tcp)
        run_env["MLPCORE_NETNS_EVENTS"] = events_path
        cmd = self.mpirun_cmd(prog, ppn=ppn, hosts=hosts, extra=extra,
                              mpirun=_which_in(run_env, "mpirun") or "mpirun")
        start = time.monotonic()
        proc = subprocess.Popen(cmd, env=run_env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        timed_out = False
        try:
            if on_start is not None:
                on_start(proc)
            out, err = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except BaseException as exc:
            timed_out = isinstance(exc, subprocess.TimeoutExpired)
            kill_tree(proc.pid)
            out, err = proc.communicate()
            if not timed_out:
                raise
        finally:
            ended_at = time.monotonic()
            wall = ended_at - start
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline and any(self.pids_on(h) for h in hosts or self.hosts):
            time.sleep(0.1)
        settled = time.monotonic() - start - wall
        events = []
        try:
            for line in Path(events_path).read_text().splitlines():
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                os.unlink(events_path)
        notes = summarise_events(events)
        if notes:
            err += "".join(f"netns_cluster: {n}\n" for n in notes)
        run = MpiRun(cmd, proc.returncode, out, err, events, wall, settled, timed_out)
        run.ended_at = ended_at   # time.monotonic() when mpirun had ended
        return run


class MpiRun:
    """What one :meth:`EmulatedCluster.mpirun` did: command, status, output, launcher events, times."""

    def __init__(self, cmd, returncode, stdout, stderr, events, wall_s, settle_s, timed_out):
        self.cmd, self.returncode, self.stdout, self.stderr = cmd, returncode, stdout, stderr
        self.events, self.wall_s, self.settle_s, self.timed_out = events, wall_s, settle_s, timed_out

    @property
    def output(self):
        return self.stdout + self.stderr

    def placement(self):
        """{host: [ranks]} as the launchers saw them (a rank's child process inherits PMI_RANK: counted once)."""
        out = {}
        for e in self.events:
            if e.get("event") == "rank":
                out.setdefault(e["host"], set()).add(e["rank"])
        return {h: sorted(r) for h, r in out.items()}


def summarise_events(events):
    notes = []
    for e in events:
        if e.get("event") == "rank-ended":
            notes.append(f"{e['host']}: {e['message']}")
    for e in events:
        if e.get("event") == "torn-down":
            notes.append(f"{e['host']}: ranks {e['ranks']} (pids {e['pids']}) were still running when the node "
                         f"was torn down ({e['why']}); the launcher ended them")
    return notes


def _which_in(env, name):
    return shutil.which(name, path=env.get("PATH", os.defpath))


def descendants(pid):
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    kids.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
            except (OSError, IndexError):
                pass
    found, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def kill_tree(pid):
    """End ``pid`` and everything below it (by PID): TERM+CONT, a short grace, KILL."""
    kill_all([pid, *descendants(pid)], grace=2.0)


def _disable_ipv6(dev, netns=None):
    """No IPv6 (link-local chatter) on our links: the counters then count MPI and Slurm only."""
    cmd = ["sysctl", "-q", "-w", f"net.ipv6.conf.{dev}.disable_ipv6=1"]
    if netns:
        cmd = [_which("nsenter") or "nsenter", f"--net=/run/netns/{netns}", *cmd]
    if Path("/proc/sys/net/ipv6").exists():
        _run(*cmd, check=False)


# Run inside the node's namespaces before its command: the host name, and a /sys/class/net that
# shows the node's own interfaces. (A sysfs shows the network namespace of whoever mounted it;
# /sys is the root namespace's, so UCX would find no nic0 there: "network device 'nic0' is not
# available, please use one or more of: 'lo'(tcp)". Remounting all of /sys, as `ip netns exec`
# does, would hide /sys/fs/cgroup, which slurmd needs; so only the two net directories are
# replaced, from a sysfs mounted inside the node, in a private mount namespace.)
_NODE_SETUP = r"""
h=$0
printf %s "$h" > /proc/sys/kernel/hostname || exit 111
m=SYSFS_MNT
mount -t sysfs sysfs "$m" && mount --bind "$m/class/net" /sys/class/net \
  && mount --bind "$m/devices/virtual/net" /sys/devices/virtual/net && umount "$m" \
  || { echo "netns_cluster: $h: cannot mount the node's /sys/class/net" >&2; exit 111; }
exec "$@"
"""
SYSFS_MNT = STATE_DIR / "sysfs"


def enter_argv(netns_path, host, cmd):
    """argv: enter ``netns_path`` (nsenter --net), new UTS + mount namespaces for ``host``, exec ``cmd``.

    The command sees host name ``host`` and the node's own interfaces in /sys/class/net; files,
    PIDs and /sys/fs/cgroup stay the machine's.
    """
    SYSFS_MNT.mkdir(parents=True, exist_ok=True)
    return [_which("nsenter") or "nsenter", f"--net={netns_path}",
            _which("unshare") or "unshare", "--uts", "--mount", "--propagation", "private",
            "/bin/sh", "-c", _NODE_SETUP.replace("SYSFS_MNT", str(SYSFS_MNT)), host, *cmd]


# --------------------------------------------------------------------------- state, hosts, teardown
_LOCK_DEPTH = [0]  # re-entrant: a signal handler's down() may run while up() holds the lock


@contextlib.contextmanager
def _locked():
    """The machine-wide lock on the state file (flock; released if the holder dies)."""
    if _LOCK_DEPTH[0]:
        _LOCK_DEPTH[0] += 1
        try:
            yield
        finally:
            _LOCK_DEPTH[0] -= 1
        return
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        _LOCK_DEPTH[0] = 1
        try:
            yield
        finally:
            _LOCK_DEPTH[0] = 0
            fcntl.flock(f, fcntl.LOCK_UN)


def read_state():
    try:
        return json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return None


def write_state(state):
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, STATE_FILE)


def clear_state():
    with contextlib.suppress(OSError):
        STATE_FILE.unlink()


def add_hosts_lines(pairs):
    """Append ``ip name  # mlpcore-netns`` lines to /etc/hosts (in place: it may be a bind mount)."""
    text = HOSTS_FILE.read_text()
    names = {tok for line in text.splitlines() if not line.lstrip().startswith("#")
             for tok in line.split("#")[0].split()[1:]}
    clash = [name for _, name in pairs if name in names]
    if clash:
        raise ClusterBusy(f"{', '.join(clash)} already in {HOSTS_FILE}; choose another prefix")
    add = "".join(f"{ip} {name}  {HOSTS_MARK}\n" for ip, name in pairs)
    with open(HOSTS_FILE, "a") as f:
        if text and not text.endswith("\n"):
            f.write("\n")
        f.write(add)


def remove_hosts_lines():
    try:
        text = HOSTS_FILE.read_text()
    except OSError:
        return
    keep = [line for line in text.splitlines(keepends=True) if HOSTS_MARK not in line]
    if len(keep) != len(text.splitlines(keepends=True)):
        with open(HOSTS_FILE, "r+") as f:
            f.write("".join(keep))
            f.truncate()


def pids_in_netns(netns_path):
    try:
        target = os.stat(netns_path)
    except OSError:
        return []
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            st = os.stat(f"/proc/{d}/ns/net")
        except OSError:
            continue
        if (st.st_ino, st.st_dev) == (target.st_ino, target.st_dev) and _alive(int(d)):
            out.append(int(d))
    return out


def kill_all(pids, grace=3.0):
    pids = [p for p in pids if _alive(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
                if sig == signal.SIGTERM:
                    os.kill(p, signal.SIGCONT)  # a SIGSTOPped process acts on SIGTERM only once continued
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)
        pids = [p for p in pids if _alive(p)]
        if not pids:
            return


def our_netns_names():
    try:
        return [n for n in os.listdir("/run/netns") if n.startswith(NETNS_PREFIX)]
    except OSError:
        return []


def our_links():
    p = _run(_which("ip") or "ip", "-o", "link", "show", check=False)
    names = [line.split(":")[1].strip().split("@")[0] for line in p.stdout.splitlines() if ":" in line]
    return [n for n in names if n == BRIDGE or (n.startswith(VETH_PREFIX) and n[len(VETH_PREFIX):].isdigit())]


def teardown(hosts=None):
    """Kill what runs on the nodes, delete veths, bridge, namespaces and hosts lines. Returns problems."""
    problems = []
    ip = _which("ip") or "ip"
    names = set(our_netns_names()) | {NETNS_PREFIX + h for h in (hosts or [])}
    for ns in sorted(names):
        path = Path("/run/netns") / ns
        left = pids_in_netns(path)
        if left:
            kill_all(left)
            still = [p for p in left if _alive(p)]
            if still:
                problems.append(f"{ns}: processes {still} survived SIGKILL")
    for link in our_links():
        p = _run(ip, "link", "del", link, check=False)
        if p.returncode != 0 and "Cannot find" not in p.stderr:
            problems.append(f"ip link del {link}: {p.stderr.strip()}")
    for ns in sorted(names):
        if (Path("/run/netns") / ns).exists():
            p = _run(ip, "netns", "del", ns, check=False)
            if p.returncode != 0:
                problems.append(f"ip netns del {ns}: {p.stderr.strip()}")
    try:
        remove_hosts_lines()
    except OSError as exc:
        problems.append(f"{HOSTS_FILE}: {exc}")
    with contextlib.suppress(OSError):
        SYSFS_MNT.rmdir()          # only a mount point inside the nodes' private mount namespaces
    return problems


def cleanup_leftovers(state=None):
    """Remove a previous (dead or persistent) cluster's resources, found by state file and names."""
    teardown((state or {}).get("hosts"))


def leftovers():
    """What of ours is still on the machine (for tests): namespaces, links, hosts lines, state."""
    found = [f"netns {n}" for n in our_netns_names()] + [f"link {n}" for n in our_links()]
    with contextlib.suppress(OSError):
        found += [f"/etc/hosts: {line}" for line in HOSTS_FILE.read_text().splitlines() if HOSTS_MARK in line]
    if STATE_FILE.exists():
        found.append(f"state file {STATE_FILE}")
    return found


# --------------------------------------------------------------------------- command line
def _attach():
    """The cluster described by the state file (for exec/status after `up`)."""
    state = read_state()
    if state is None:
        raise SystemExit("netns_cluster: no emulated cluster is up (run `netns_cluster.py up`)")
    c = EmulatedCluster(nodes=len(state["hosts"]))
    c.hosts = state["hosts"]
    return c, state


def _describe(cluster, ppn=1):
    lines = [f"bridge {BRIDGE} {BRIDGE_IP}/24 (root namespace)"]
    lines += [f"{h:8s} {cluster.ip(h):14s} netns {cluster.netns(h)}, veth {cluster.veth(h)} <-> {NODE_IFACE}"
              for h in cluster.hosts]
    env = cluster.mpi_env({})
    env.pop("MLPCORE_NETNS_STATE")
    lines.append("mpirun line:")
    lines.append("  " + " ".join(f"{k}={v}" for k, v in env.items()) + " "
                 + " ".join(cluster.mpirun_cmd(["python", "mpi_train.py"], ppn=ppn)))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="see the module docstring: python -c 'help(\"scripts/netns_cluster.py\")'")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("up", "run", "mpirun"):
        p = sub.add_parser(name)
        p.add_argument("--nodes", "-k", type=int, default=2)
        p.add_argument("--prefix", default="node")
        if name == "mpirun":
            p.add_argument("--ppn", type=int, default=1, help="ranks per node")
            p.add_argument("--timeout", type=float, default=3600, help="end the job after this many seconds")
        if name != "up":
            p.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("down")
    sub.add_parser("status")
    p = sub.add_parser("exec")
    p.add_argument("host")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    command = [c for c in getattr(args, "command", [])]
    if command[:1] == ["--"]:
        command = command[1:]

    try:
        if args.cmd == "down":
            with _locked():
                problems = teardown((read_state() or {}).get("hosts"))
                clear_state()
            left = leftovers()
            if not left and not problems:
                with contextlib.suppress(OSError):
                    LOCK_FILE.unlink()
                    STATE_DIR.rmdir()
            print("down" + (": " + "; ".join(problems + left) if problems or left else ": nothing left"))
            return 1 if problems or left else 0
        if args.cmd == "status":
            state = read_state()
            print(json.dumps(state, indent=1) if state else "no cluster up")
            left = leftovers()
            print("resources: " + (", ".join(left) if left else "none"))
            return 0
        if args.cmd == "exec":
            cluster, _ = _attach()
            if not command:
                command = [os.environ.get("SHELL", "/bin/sh")]
            return subprocess.call(cluster.enter(args.host, command))
        if args.cmd == "up":
            cluster = EmulatedCluster(args.nodes, args.prefix, persistent=True).up()
            print(_describe(cluster))
            return 0
        if not command:
            ap.error(f"{args.cmd}: give the command after --")
        with EmulatedCluster(args.nodes, args.prefix) as cluster:
            env = cluster.mpi_env()
            env["NETNS_HOSTS"] = ",".join(cluster.hosts)
            env["NETNS_MPIRUN_ARGS"] = " ".join(cluster.mpirun_args())
            if args.cmd == "mpirun":
                print("+ " + " ".join(cluster.mpirun_cmd(command, ppn=args.ppn)), file=sys.stderr, flush=True)
                res = cluster.mpirun(command, ppn=args.ppn, timeout=args.timeout)
                sys.stdout.write(res.stdout)
                sys.stderr.write(res.stderr)
                return 124 if res.timed_out else res.returncode
            proc = subprocess.Popen(command, env=env)
            try:
                return proc.wait()
            finally:
                if proc.poll() is None:      # SIGTERM/SIGINT: the command goes with the nodes
                    kill_tree(proc.pid)
    except (NetnsUnavailable, ClusterBusy) as exc:
        print(f"netns_cluster: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
