"""The scaling study (mlpcore/study/, scripts/scaling.py) and the run trace (mlpcore/report/trace.py).

The maths is checked on numbers with known answers; the trace, ``--from`` and a
tiny sweep are checked on real files, the MPI ones under a real ``mpirun``
(each command with a timeout, see conftest.run_command).
"""

import csv
import json
import math
import os
import stat

import numpy as np
import pytest

from conftest import MPI_TRAIN, PYTHON, REPO, cli_env, mpirun_path, run_command
from mlpcore.errors import UsageError
from mlpcore.report import trace
from mlpcore.study import figures, laws, sweep, table

SCRIPT = REPO / "scripts" / "scaling.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--train-limit", "2000", "--test-limit", "500", "--epochs", "1"]

needs_mpi = pytest.mark.skipif(mpirun_path() is None, reason="mpirun not on PATH (pip install -e .[mpi])")


def assert_png(path):
    assert path.is_file(), f"{path.name} missing"
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path.name} is not a PNG"


# -- the maths -----------------------------------------------------------------
@pytest.mark.parametrize("f", [0.0, 0.03, 0.1, 0.5])
def test_amdahl_fit_recovers_the_serial_fraction(f):
    ranks = [1, 2, 4, 8, 16]
    assert laws.fit_amdahl(ranks, laws.amdahl_speedup(ranks, f)) == pytest.approx(f, abs=1e-6)


def test_amdahl_fit_uses_repeats_and_stays_in_bounds():
    ranks = [1, 1, 2, 2, 4, 4]
    noisy = laws.amdahl_speedup(ranks, 0.2) * np.array([1.02, 0.98, 1.03, 0.97, 1.01, 0.99])
    assert laws.fit_amdahl(ranks, noisy) == pytest.approx(0.2, abs=0.02)
    assert laws.fit_amdahl([2, 4], [2.5, 5.0]) == pytest.approx(0.0, abs=1e-9)  # superlinear
    assert laws.fit_amdahl([2, 4], [0.5, 0.4]) == pytest.approx(1.0, abs=1e-9)  # slower than serial
    assert math.isnan(laws.fit_amdahl([1, 1], [1.0, 1.0]))                     # nothing to fit


def test_gustafson_fit_recovers_the_serial_fraction():
    ranks = [1, 2, 4, 8]
    assert laws.fit_gustafson(ranks, laws.gustafson_speedup(ranks, 0.15)) == pytest.approx(0.15, abs=1e-12)


def test_karp_flatt_on_known_numbers():
    assert laws.karp_flatt(1.6, 2) == 0.25
    assert laws.karp_flatt(4.0, 4) == 0.0          # ideal speed-up: no serial part
    assert math.isnan(laws.karp_flatt(1.0, 1))     # undefined at one rank
    # On speed-ups that follow Amdahl's law exactly, e is the law's f at every N.
    ranks = np.array([2, 4, 8, 16])
    assert laws.karp_flatt(laws.amdahl_speedup(ranks, 0.1), ranks) == pytest.approx([0.1] * 4, abs=1e-12)


def _results(spans, per_rank, **timings):
    return {"spans": spans, "config": {"strategy": "allreduce"}, "environment": {"world_size": len(spans)},
            "timings": {"per_rank": per_rank, "load_s": 1.0, "vote_s": 0.1, "parallel_total_s": 5.0, **timings}}


def test_phase_breakdown_splits_the_parallel_time():
    # Rank 0 loads 1 s; rank 1 waits for it, trains 1 s less, then waits 0.6 s before the
    # gather and 0.4 s inside it (0.1 s of gather is the transfer itself).
    per_rank = [{"rank": 0, "wait_s": 0.0, "train_s": 3.0, "predict_s": 0.2, "scatter_s": 0.5,
                 "gather_s": 0.1, "comm_exposed_s": 0.5},
                {"rank": 1, "wait_s": 1.6, "train_s": 2.0, "predict_s": 0.2, "scatter_s": 0.5,
                 "gather_s": 0.5, "comm_exposed_s": 0.5}]
    parts = table.phase_breakdown(_results([[], []], per_rank))
    assert parts == pytest.approx({"load_scatter_s": 1.5, "compute_s": 2.2, "comm_exposed_s": 0.5,
                                   "imbalance_s": 0.5, "gather_vote_s": 0.2})
    # Each rank's phases add up to the same wall time, so the average does too.
    assert sum(parts.values()) == pytest.approx(1.0 + 0.5 + 3.0 + 0.2 + 0.1 + 0.1)


# -- the trace -------------------------------------------------------------------
def assert_valid_trace(doc, n_ranks):
    """One named track per rank, every event on a named track, no overlap within a track."""
    events = doc["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    for rank in range(n_ranks):
        assert names.get(rank) == f"rank {rank}"
    complete = [e for e in events if e["ph"] == "X"]
    assert complete and {e["pid"] for e in complete} == {0}
    by_track = {}
    for e in complete:
        assert e["tid"] in names, e
        assert isinstance(e["ts"], int) and isinstance(e["dur"], int) and e["dur"] >= 0
        by_track.setdefault(e["tid"], []).append(e)
    for tid, track in by_track.items():
        track.sort(key=lambda e: e["ts"])
        for a, b in zip(track, track[1:]):
            assert a["ts"] + a["dur"] <= b["ts"], f"{names[tid]}: {a['name']} overlaps {b['name']}"
    return names, by_track


def test_nested_and_overlapping_spans_go_to_their_own_tracks():
    spans = [[["load", 0.0, 1.0], ["train", 1.0, 4.0], ["compute", 1.0, 2.0], ["comm", 1.5, 2.5],
              ["compute", 2.0, 3.0], ["my_phase", 4.0, 4.5]],
             [["wait", 0.0, 1.0], ["train", 1.0, 4.2]]]
    results = _results(spans, [])
    events = trace.timeline_events(results)
    levels = {(e.rank, e.name, e.start): e.level for e in events}
    assert levels[(0, "train", 1.0)] == 0 and levels[(0, "my_phase", 4.0)] == 0
    assert levels[(0, "compute", 1.0)] == 1 and levels[(0, "compute", 2.0)] == 1
    assert levels[(0, "comm", 1.5)] == 2  # overlaps the compute span it hides behind
    names, by_track = assert_valid_trace(trace.chrome_trace(results), 2)
    assert names[1000] == "rank 0 inner" and names[2000] == "rank 0 inner 2"
    assert [e["name"] for e in by_track[0]] == ["load", "train", "my_phase"]
    assert trace.phase_color("my_phase") == trace.NEUTRAL


@pytest.mark.timeout(300)
@needs_mpi
def test_trace_of_a_real_run(tmp_path):
    n, out = 2, tmp_path / "run"
    cmd = [mpirun_path(), "-n", str(n), PYTHON, MPI_TRAIN, *TINY, "--quiet", "--out", out]
    rc, stdout, stderr, _ = run_command(cmd, timeout=120)
    assert rc == 0, stderr[-3000:]
    doc = json.loads((out / "trace.json").read_text())
    names, by_track = assert_valid_trace(doc, n)
    for rank in range(n):
        assert "train" in [e["name"] for e in by_track[rank]], f"rank {rank} has no train span"
    results = json.loads((out / "results.json").read_text())
    assert {"trace.json", "timeline.png"} <= set(results["files"])
    # The trace holds exactly the run's spans, in microseconds.
    assert sum(len(s) for s in results["spans"]) == sum(len(t) for t in by_track.values())
    assert_png(out / "timeline.png")


# -- the table and --from ----------------------------------------------------------
def synthetic_rows():
    """Two strategies at N = 1, 2, 4 (4 oversubscribed on 2 cores), two repeats, Amdahl-like times."""
    rows = []
    for strategy, f in (("ensemble", 0.1), ("allreduce", 0.3)):
        for repeat, noise in enumerate((0.97, 1.03)):
            for n in (1, 2, 4):
                speedup = float(laws.amdahl_speedup(n, f)) * noise
                par = 10.0 / speedup
                rows.append({"strategy": strategy, "ranks": n, "repeat": repeat, "weak": False,
                             "n_train": 60000, "n_test": 10000, "epochs": 3, "hidden": "128", "threads": 1,
                             "cores": 2, "oversubscribed": n > 2, "parallel_train_s": par,
                             "parallel_total_s": par + 1.0, "baseline_train_s": 10.0, "baseline_total_s": 11.0,
                             "speedup": speedup, "efficiency": speedup / n,
                             "speedup_end_to_end": 11.0 / (par + 1.0),
                             "karp_flatt": laws.karp_flatt(speedup, n) if n > 1 else float("nan"),
                             "accuracy": 0.97 - 0.01 * n, "baseline_accuracy": 0.97,
                             "load_scatter_s": 0.6, "compute_s": par * 0.9, "comm_exposed_s": par * 0.05,
                             "imbalance_s": par * 0.05, "gather_vote_s": 0.1,
                             "run_dir": f"runs/{strategy}-n{n}-r{repeat}"})
    return rows


def test_table_round_trip(tmp_path):
    rows = synthetic_rows()
    path = table.write_table(rows, tmp_path, meta={"command": "test"})
    back = table.read_table(path)
    assert len(back) == len(rows)
    for a, b in zip(rows, back):
        for key, value in a.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(b[key]), key
            else:
                assert b[key] == value, key
    assert json.loads((tmp_path / "scaling.json").read_text())["runs"][0]["strategy"] == "ensemble"


def test_from_replots_without_running_anything(tmp_path):
    table_dir = tmp_path / "sweep"
    table_dir.mkdir()
    csv_path = table.write_table(synthetic_rows(), table_dir)
    # The timeline's run (largest N of the first strategy, first repeat), with a phase no one knows.
    run = table_dir / "runs" / "ensemble-n4-r0"
    run.mkdir(parents=True)
    spans = [[["load", 0, 1], ["train", 1, 3], ["compute", 1, 2], ["comm", 2, 3], ["checkpoint", 3, 3.2]]] * 4
    (run / "results.json").write_text(json.dumps(_results(spans, [])))
    # A fake mpirun that leaves a mark if anything calls it; no other mpirun on PATH.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    marker = tmp_path / "mpirun-was-called"
    fake = fake_bin / "mpirun"
    fake.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = cli_env({"PATH": f"{fake_bin}{os.pathsep}/usr/bin{os.pathsep}/bin"})
    out = tmp_path / "plots"

    rc, stdout, stderr, _ = run_command([PYTHON, SCRIPT, "--from", csv_path, "--out", out, "--mpirun", fake],
                                        timeout=120, env=env)
    assert rc == 0, stderr[-3000:]
    assert not marker.exists(), "--from started mpirun"
    for name in figures.FIGURES:
        assert_png(out / name)
    report = (out / "report.md").read_text()
    assert "| ensemble | 4 (over) | 2 |" in report and "Amdahl serial fraction" in report
    assert "allreduce: fitted Amdahl f = " in stdout
    fitted = table.fits(table.read_table(csv_path))
    assert fitted == pytest.approx({"ensemble": 0.1, "allreduce": 0.3}, abs=0.03)


def test_sweep_commands_and_checks():
    weak_sweep = sweep.Sweep(ranks=(1, 4), weak=True, train_limit=1000, epochs=2, extra=("--batch-size", "100"))
    cmd = weak_sweep.command("mpirun", 4, "ensemble", "/tmp/x")
    assert cmd[:3] == ["mpirun", "-n", "4"]
    assert cmd[cmd.index("--train-limit") + 1] == "4000"  # weak: per rank x ranks
    assert cmd[cmd.index("--threads") + 1] == "1" and cmd[-2:] == ["--batch-size", "100"]
    assert weak_sweep.environment()["OPENBLAS_NUM_THREADS"] == "1"
    assert [(r, n) for r, _, n in weak_sweep.plan()] == [(0, 1), (0, 4), (1, 1), (1, 4), (2, 1), (2, 4)]
    with pytest.raises(UsageError, match="per rank"):
        sweep.Sweep(weak=True)
    with pytest.raises(UsageError, match="--out"):
        sweep.Sweep(extra=("--out", "x"))


def test_a_run_past_its_timeout_is_stopped(tmp_path):
    log = tmp_path / "run" / "mpirun.log"
    with pytest.raises(table.SweepError, match="timed out"):
        sweep.run_one([PYTHON, "-c", "import time; print('started', flush=True); time.sleep(60)"], 1.0,
                      log_path=log)
    assert "started" in log.read_text()


# -- a real sweep ------------------------------------------------------------------
@pytest.mark.timeout(300)
@needs_mpi
def test_tiny_sweep_end_to_end(tmp_path):
    out = tmp_path / "sweep"
    cmd = [PYTHON, SCRIPT, "--ranks", "1,2", "--repeats", "1", *TINY, "--out", out, "--quiet",
           "--timeout", "120"]
    rc, stdout, stderr, _ = run_command(cmd, timeout=240)
    assert rc == 0, f"{stderr[-3000:]}\n{stdout[-2000:]}"
    with open(out / "scaling.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["strategy"], int(r["ranks"])) for r in rows] == [("ensemble", 1), ("ensemble", 2)]
    assert set(table.COLUMNS) <= set(rows[0])
    for row in rows:
        assert float(row["speedup"]) > 0 and float(row["baseline_train_s"]) > 0
        assert float(row["speedup"]) == pytest.approx(float(row["baseline_train_s"]) / float(row["parallel_train_s"]))
        assert row["threads"] == "1" and int(row["n_train"]) == 2000
        assert (out / row["run_dir"] / "trace.json").is_file()
    assert rows[0]["karp_flatt"] == "" and float(rows[1]["karp_flatt"]) == pytest.approx(
        laws.karp_flatt(float(rows[1]["speedup"]), 2))
    for name in figures.FIGURES:
        assert_png(out / name)
    report = (out / "report.md").read_text()
    assert "| ensemble | 2" in report and "![scaling_speedup.png](scaling_speedup.png)" in report


@pytest.mark.timeout(300)
@needs_mpi
def test_a_failed_run_stops_the_sweep_loudly(tmp_path):
    cmd = [PYTHON, SCRIPT, "--ranks", "1", "--repeats", "1", *TINY, "--out", tmp_path / "sweep", "--quiet",
           "--", "--lr", "99"]
    rc, stdout, stderr, _ = run_command(cmd, timeout=120)
    assert rc == 1
    assert "run failed: exit status 2" in stderr and "--lr must be in" in stderr  # the run's own message
    assert "mpirun" in stderr and not (tmp_path / "sweep" / "report.md").exists()
