"""The command line's finish: --help shows each default once, --version, --dry-run, warnings that say what
to do, colour only on a terminal (never under NO_COLOR), and a run's output ending with its folder and the
command that opens its report."""

import io
import os
import pty
import re
import subprocess

import pytest

from conftest import MPI_TRAIN, PYTHON, REPO, SMALL, cli_env, mpirun_path, run_cli, run_command

from mlpcore.cli import build_parser, parse_args, version_text
from mlpcore.report import console
from mlpcore.results import warnings as result_warnings

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def help_text():
    rc, out, err, _ = run_command([PYTHON, MPI_TRAIN, "--help"], timeout=60, env=cli_env({"COLUMNS": "100"}))
    assert rc == 0, err
    return out


def test_help_shows_each_default_once_as_typed_and_every_option_has_help():
    text = help_text()
    assert "(default: (128,))" not in text and "(default: 128)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    for block in re.split(r"\n(?=  -)", text):
        assert block.count("(default") <= 1, block
    for action in build_parser()._actions:
        if action.option_strings:
            assert action.help and action.help.strip(), f"{action.option_strings} has no help"


def test_version_prints_the_version_and_the_mpi_library():
    rc, out, err, _ = run_command([PYTHON, MPI_TRAIN, "--version"], timeout=60)
    assert rc == 0, err
    first, second = out.strip().splitlines()
    assert re.match(r"mlpcore \d+\.\d+\.\d+ \(Python [\d.]+, numpy [\d.]+\)$", first), first
    assert second.startswith("MPI: ")
    assert version_text().splitlines()[0] == first
    # --version and --dry-run are the command's options, not a run's: parse_args ignores them.
    assert parse_args(["--version"]) == parse_args([]) == parse_args(["--dry-run"])


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path):
    out_dir = tmp_path / "run"
    rc, out, err, _ = run_command([PYTHON, MPI_TRAIN, "--dry-run", "--jobs", "4", "--launcher", "joblib",
                                   "--train-limit", "6000", "--out", out_dir], timeout=120)
    assert rc == 0, err
    assert not out_dir.exists(), "a dry run must not create the run folder"
    for line in ("launcher      joblib: 4 workers on this machine", "mlp 784-128-10 (101,770 params)",
                 "409,088 FLOPs per training sample", "4 x 1500 images", "scatter 4.7 MB",
                 f"output        {out_dir}"):
        assert line in out, (line, out)
    assert "OVERSUBSCRIBED" in out and "what to do" in out  # 4 workers on 2 cores (this machine has 2)
    rc, out, err, _ = run_command([PYTHON, MPI_TRAIN, "--dry-run", "--launcher", "serial", "--jobs", "7",
                                   "--train-limit", "5"], timeout=120)
    assert rc == 2 and "cannot split 5 training samples into 7 shards" in err


@pytest.mark.skipif(mpirun_path() is None, reason="mpirun not on PATH (pip install -e .[mpi])")
def test_dry_run_under_mpirun_prints_once_with_the_data_parallel_bytes():
    rc, out, err, _ = run_command([mpirun_path(), "-n", "2", PYTHON, MPI_TRAIN, "--dry-run", "--compare",
                                   "--train-limit", "6000"], timeout=120)
    assert rc == 0, err
    assert out.count("mlpcore: the plan") == 1
    assert "mpi: 2 ranks on one node" in out and "MPI library" in out
    # allreduce: 10 epochs x 30 steps x 101,770 float32 parameters, on each of the 2 ranks
    assert f"allreduce {10 * 30 * 101_770 * 4 * 2 / 1e6:.1f} MB" in out


def test_plan_counts_flops_without_the_models_own_count():
    """Where a model has no flops_per_sample, the dry run counts 2 x the Dense MACs itself: the same number."""
    import numpy as np

    from mlpcore.cli import _flops_per_sample
    from mlpcore.nn.model import build_model

    model = build_model("mlp", n_features=784, n_classes=10, hidden=(128,), dtype=np.float32,
                        rng=np.random.default_rng(0), kernels="numpy")

    class NoCount:
        layers = model.layers

    assert _flops_per_sample(NoCount()) == 409_088
    if hasattr(model, "flops_per_sample"):
        assert _flops_per_sample(model) == 409_088


def test_the_oversubscription_warning_says_what_to_do():
    env = {"oversubscribed": True, "threads_per_worker": [1, 1, 1, 1], "world_size": 4, "cores": 2}
    (note,) = result_warnings(env)
    assert note.endswith("run at most 2 (mpirun -n 2 or --jobs 2)")
    (row,) = console.oversubscribed_rows(env, [2])
    assert "mpirun -n 1 or --jobs 1, or --threads 1" in row[1]
    assert console.oversubscribed_rows({"oversubscribed": False}, [1]) == []


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self._tty = tty

    def isatty(self):
        return self._tty


def test_colour_only_on_a_terminal_and_never_under_no_color(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert console.colour_enabled(_Stream(True)) and not console.colour_enabled(_Stream(False))
    monkeypatch.setenv("NO_COLOR", "1")
    assert not console.colour_enabled(_Stream(True))
    monkeypatch.setenv("NO_COLOR", "")  # https://no-color.org: only a non-empty value counts
    assert console.colour_enabled(_Stream(True))
    assert console.paint("x", "warn", on=False) == "x" and ANSI.search(console.paint("x", "warn"))


def _run_on_a_terminal(args, env):
    """Run mpi_train.py with stdout on a pseudo-terminal; returns (returncode, what the terminal showed)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([PYTHON, str(MPI_TRAIN), *map(str, args)], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                            stdout=follower, stderr=subprocess.STDOUT)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process has ended
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout=180), b"".join(chunks).decode(errors="replace")


def test_a_run_colours_a_terminal_not_a_pipe_and_ends_with_its_folder_and_report_command(tmp_path):
    args = ["--launcher", "serial", "--jobs", "2", *SMALL, "--out", tmp_path / "tty"]
    env = {k: v for k, v in cli_env().items() if k not in ("NO_COLOR", "DISPLAY", "WAYLAND_DISPLAY")}
    env["TERM"] = "xterm"
    rc, shown = _run_on_a_terminal(args, env)
    assert rc == 0, shown[-3000:]
    assert ANSI.search(shown), "no colour on a terminal"
    assert "mlpcore: parallel vs sequential" in ANSI.sub("", shown)
    assert not ANSI.search((tmp_path / "tty" / "report.md").read_text()), "colour leaked into report.md"

    rc, shown = _run_on_a_terminal([*args[:-1], tmp_path / "nocolor"], {**env, "NO_COLOR": "1"})
    assert rc == 0 and not ANSI.search(shown), "colour despite NO_COLOR"

    piped = run_cli(["--launcher", "serial", "--jobs", "2", *SMALL], out=tmp_path / "pipe", env=env)
    assert piped.returncode == 0, piped.stderr
    assert not ANSI.search(piped.stdout) and not ANSI.search(piped.stderr), "colour in a pipe"
    last = piped.stdout.strip().splitlines()[-2:]
    assert last == [f"run folder   {tmp_path / 'pipe'}", f"open report  less {tmp_path / 'pipe' / 'report.md'}"]
