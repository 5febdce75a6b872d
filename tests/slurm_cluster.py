"""A throw-away single-node Slurm cluster for the tests (real slurmctld + slurmd + munged).

Used by ``tests/test_slurm.py``; it is a plain module, not a pytest plugin, so it can
also be driven by hand::

    sudo .venv/bin/python -c "
    from tests.slurm_cluster import SlurmCluster
    c = SlurmCluster.create(); c.start(); print(c.conf); input('Enter stops it'); c.stop()"

What it does
------------
* :func:`install_slurm` installs ``slurmctld slurmd slurm-client munge`` with apt-get
  (root only; ``apt-get update`` first, ``DEBIAN_FRONTEND=noninteractive``).  Debian's
  package scripts start no daemons when PID 1 is not systemd; if they do on another
  box, nothing here talks to those daemons (own ports, own munge socket).
* :meth:`SlurmCluster.start` writes ``slurm.conf`` into a private temp folder (state,
  spool, logs, pid files, munge key and socket all live there), starts ``munged``,
  ``slurmctld -D`` and ``slurmd -D`` with :class:`subprocess.Popen` (so we own their
  PIDs), checks munge with ``munge -n | unmunge`` and waits, bounded, until ``sinfo``
  reports the node ``idle``.
* :meth:`SlurmCluster.stop` cancels every job, waits for the job steps to go, then
  SIGTERMs (and after a grace period SIGKILLs) every daemon it started, by PID, plus
  any ``slurmstepd`` still holding a file inside the temp folder, and removes the folder.

Every client command must see ``SLURM_CONF``; use :attr:`SlurmCluster.env` (or
:meth:`SlurmCluster.run`), which also drops ``SLURM_*``/``SBATCH_*``/``SRUN_*``/``SALLOC_*``
variables inherited from an outer job so that running the tests inside a real Slurm job
cannot leak into this cluster.

Gotchas found on Debian 12 / Slurm 22.05
----------------------------------------
* slurmctld only runs on a host named in ``SlurmctldHost`` (``localhost`` is accepted
  too), and slurmd must know its ``NodeName``. We use the short host name for both, pass
  ``slurmd -N <name>``, and pin the addresses to 127.0.0.1
  (``SlurmctldHost=name(127.0.0.1)``, ``NodeAddr=127.0.0.1``), so nothing depends on
  DNS or on ``/etc/hosts`` mapping the host name. ``SlurmctldHost=localhost`` with
  ``NodeName=localhost`` also works on this box.
* ``munged`` refuses to run as root without ``--force``; slurm finds a non-default
  munge socket through ``AuthInfo=socket=...`` (used by both auth/munge and cred/munge).
* ``CPUs=4`` on a 2-core box needs ``SlurmdParameters=config_overrides``, else slurmd
  reports the real count and the node goes ``INVAL``/``DRAIN``.
* Job ids start at ``FirstJobId`` on a fresh state dir; we randomise it so two sessions
  (or a stale ``runs/slurm-1``) never share a job id.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
# Binaries we need, and which package brings each.
BINARIES = {
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "sbatch": "slurm-client",
    "srun": "slurm-client",
    "sinfo": "slurm-client",
    "squeue": "slurm-client",
    "scancel": "slurm-client",
    "scontrol": "slurm-client",
    "munged": "munge",
    "munge": "munge",
    "unmunge": "munge",
}
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be provided here (not root, no apt-get, install failed ...)."""


class SlurmStartError(RuntimeError):
    """The packages are there but the daemons did not come up; the message has log tails."""


def which(name: str) -> str | None:
    """shutil.which that also looks in the sbin dirs (often missing from a user's PATH)."""
    path = os.environ.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(SBIN_DIRS)
    return shutil.which(name, path=path)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if which(b) is None]


def install_slurm(timeout: float = 240.0) -> None:
    """apt-get install the Slurm + munge packages; raises SlurmUnavailable on failure."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and we are not root (cannot apt-get install)")
    apt = which("apt-get")
    if apt is None:
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Wait for the dpkg lock instead of failing when another apt-get (or a parallel test
    # session installing the same packages) holds it.
    lock = ["-o", "DPkg::Lock::Timeout=120"]
    steps = (
        [apt, *lock, "update", "-qq"],
        # --no-install-recommends: the recommends pull ~20 *-dev plugin packages we don't need.
        [apt, *lock, "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    )
    for cmd in steps:
        try:
            p = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"{' '.join(cmd)} timed out after {timeout:.0f} s") from None
        if p.returncode != 0:
            tail = (p.stdout + p.stderr)[-2000:]
            raise SlurmUnavailable(f"{' '.join(cmd)} failed ({p.returncode}):\n{tail}")
    still = missing_binaries()
    if still:
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} left {still} missing")


def ensure_slurm(allow_install: bool) -> None:
    """Make sure the binaries exist (installing them if allowed) and that we can run daemons."""
    missing = missing_binaries()
    if missing:
        if not allow_install:
            raise SlurmUnavailable(
                f"Slurm/munge not installed (missing {', '.join(missing)}); run as root with CI=true "
                "or MLPCORE_SLURM_INSTALL=1 to let the tests apt-get install "
                + " ".join(PACKAGES))
        install_slurm()
    if os.geteuid() != 0:
        raise SlurmUnavailable("the test cluster runs slurmd/slurmctld as root; not root here")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(extra: dict | None = None) -> dict:
    """os.environ minus any Slurm variables of an enclosing job, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "PMI_", "PMIX_"))}
    # sbin for the daemons / scontrol, wherever PATH came from.
    env["PATH"] = env.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(SBIN_DIRS)
    if extra:
        env.update(extra)
    return env


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the daemon if the process that started it dies (even by SIGKILL),
    so a killed pytest does not leave slurmctld/slurmd/munged running (Linux only)."""
    try:
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:  # not Linux / no prctl: rely on stop()
        pass


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError as e:
        return f"<{e}>"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not "alive" for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_pids(pids, grace: float = 10.0) -> None:
    """SIGTERM every pid, wait up to `grace` s, then SIGKILL the survivors."""
    pids = [p for p in pids if p and _alive(p)]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for p in pids:
        if _alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def pids_matching(marker: str) -> list[int]:
    """PIDs (not ours) whose command line contains `marker` (read from /proc, no pgrep needed)."""
    out = []
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd and _alive(int(d)):
            out.append(int(d))
    return out


def pids_holding_files_under(root: Path) -> list[int]:
    """PIDs with an open fd or cwd inside `root` (finds this cluster's orphaned slurmstepd)."""
    root_s = str(root)
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        links = []
        try:
            links.append(os.readlink(f"/proc/{d}/cwd"))
            for fd in os.listdir(f"/proc/{d}/fd"):
                try:
                    links.append(os.readlink(f"/proc/{d}/fd/{fd}"))
                except OSError:
                    pass
        except OSError:
            continue
        if any(l == root_s or l.startswith(root_s + "/") for l in links):
            out.append(int(d))
    return out


@dataclass
class SlurmCluster:
    root: Path
    ncpus: int = 4
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    procs: dict = field(default_factory=dict)   # name -> Popen
    first_job_id: int = field(default_factory=lambda: random.randint(100_000, 9_000_000))

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, ncpus: int = 4) -> "SlurmCluster":
        # Short path under /tmp: the munge socket path must fit in sun_path (108 bytes).
        root = Path(tempfile.mkdtemp(prefix="mlpcore-slurm-", dir="/tmp"))
        return cls(root=root, ncpus=ncpus)

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket.2"

    @property
    def env(self) -> dict:
        """Environment for every client command (sbatch, srun, sinfo, squeue, scancel)."""
        return clean_env({"SLURM_CONF": str(self.conf)})

    def log(self, name: str) -> Path:
        return self.root / "log" / f"{name}.log"

    # ------------------------------------------------------------------ config
    def write_config(self) -> None:
        for d in ("etc", "state", "spool", "log", "run", "munge", "munge-lib"):
            (self.root / d).mkdir(mode=0o700, exist_ok=True)
        ctld_port, d_port = free_port(), free_port()
        while d_port == ctld_port:
            d_port = free_port()
        r = self.root
        self.conf.write_text(f"""\
# Generated by tests/slurm_cluster.py: single-node throw-away cluster.
ClusterName=mlpcoretest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={self.log('slurmctld')}
SlurmdLogFile={self.log('slurmd')}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
EnforcePartLimits=ALL
MpiDefault=none
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerType=sched/backfill
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
FirstJobId={self.first_job_id}
# scancel: SIGTERM, then SIGKILL after KillWait seconds.
KillWait=5
MinJobAge=300
InactiveLimit=0
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.ncpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    # ------------------------------------------------------------------ munge
    def _write_munge_key(self) -> Path:
        key = self.root / "munge" / "munge.key"
        mungekey = which("mungekey")
        if mungekey:
            subprocess.run([mungekey, "--create", f"--keyfile={key}", "--force"],
                           check=True, capture_output=True, timeout=30)
        else:  # munge < 0.5.14: no mungekey; 1 KiB of randomness is what create-munge-key does
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        return key

    def _start_munge(self) -> None:
        key = self._write_munge_key()
        m = self.root / "munge"
        cmd = [which("munged"), "--foreground", "--force",
               f"--socket={self.munge_socket}", f"--key-file={key}",
               f"--pid-file={m}/munged.pid", f"--seed-file={self.root}/munge-lib/munged.seed",
               f"--log-file={self.log('munged')}"]
        self._popen("munged", cmd)
        deadline = time.monotonic() + 15
        last = ""
        while time.monotonic() < deadline:
            self._check_alive("munged")
            if self.munge_socket.exists():
                enc = subprocess.run([which("munge"), "-n", "-S", str(self.munge_socket)],
                                     capture_output=True, timeout=10)
                dec = subprocess.run([which("unmunge"), "-S", str(self.munge_socket)],
                                     input=enc.stdout, capture_output=True, timeout=10)
                if enc.returncode == 0 and dec.returncode == 0:
                    return
                last = (enc.stderr + dec.stderr).decode(errors="replace")
            time.sleep(0.1)
        raise SlurmStartError(f"munge -n | unmunge never succeeded: {last}\n"
                              f"--- munged.log ---\n{_tail(self.log('munged'))}")

    # ------------------------------------------------------------------ daemons
    def _popen(self, name: str, cmd: list) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "wb")
        try:
            self.procs[name] = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.root, preexec_fn=_die_with_parent)
        finally:
            out.close()

    def _check_alive(self, name: str) -> None:
        p = self.procs[name]
        if p.poll() is not None:
            raise SlurmStartError(
                f"{name} exited with {p.returncode} during start-up\n"
                f"--- {name}.stdout ---\n{_tail(self.root / 'log' / f'{name}.stdout')}\n"
                f"--- {name}.log ---\n{_tail(self.log(name))}")

    def run(self, *cmd, timeout: float = 60, check: bool = False, **kw) -> subprocess.CompletedProcess:
        """Run a client command against this cluster (SLURM_CONF set), text output captured."""
        kw.setdefault("env", self.env)
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run([str(c) for c in cmd], timeout=timeout, check=check, **kw)

    def node_state(self) -> str:
        p = self.run("sinfo", "-h", "-N", "-n", self.node, "-o", "%T", timeout=15)
        return p.stdout.strip() if p.returncode == 0 else f"<sinfo rc={p.returncode}: {p.stderr.strip()}>"

    def start(self, timeout: float = 30.0) -> "SlurmCluster":
        try:
            self.write_config()
            self._start_munge()
            self._popen("slurmctld", [which("slurmctld"), "-D", "-c", "-f", str(self.conf)])
            self._popen("slurmd", [which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
            deadline = time.monotonic() + timeout
            state = ""
            while time.monotonic() < deadline:
                for name in ("munged", "slurmctld", "slurmd"):
                    self._check_alive(name)
                state = self.node_state()
                if state == "idle":
                    return self
                time.sleep(0.5)
            raise SlurmStartError(
                f"node {self.node} not idle after {timeout:.0f} s (sinfo says {state!r})\n"
                f"--- slurmctld.log ---\n{_tail(self.log('slurmctld'))}\n"
                f"--- slurmd.log ---\n{_tail(self.log('slurmd'))}")
        except BaseException:
            self.stop(keep_root=True)
            raise

    def stop(self, keep_root: bool = False) -> None:
        """Cancel all jobs, stop every daemon we started (by PID), remove the temp folder."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            try:
                self.run("scancel", "--partition=debug", timeout=15)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    q = self.run("squeue", "-h", "-o", "%i", timeout=15)
                    if q.returncode != 0 or not q.stdout.strip():
                        break
                    time.sleep(0.5)
            except (subprocess.SubprocessError, OSError):
                pass
        # slurmd first (it owns the steps), then the controller, then munge.
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is not None:
                kill_pids([p.pid], grace=10)
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        # slurmstepd daemonizes away from slurmd; any still holding our spool dir is ours.
        kill_pids(pids_holding_files_under(self.root), grace=5)
        self.procs.clear()
        if not keep_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"--- {n}.log ---\n{_tail(self.log(n))}"
                         for n in ("slurmctld", "slurmd", "munged"))

    # ------------------------------------------------------------------ job helpers
    def job_state(self, job_id: str) -> str:
        p = self.run("squeue", "-h", "-j", job_id, "-o", "%T", timeout=15)
        if p.returncode == 0 and p.stdout.strip():
            return p.stdout.strip()
        p = self.run("scontrol", "show", "job", job_id, "-o", timeout=15)
        for tok in p.stdout.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        return "UNKNOWN"
