"""`noyau run` and `noyau sweep` with the Slurm backend, on the real test cluster
of scripts/slurm-up (profile `test` in the session's user config, partition
`debug`; conftest writes it).

The runner stays on this host and drives a kernel in a batch job; walltime
runs and sweeps (one job array) are checked against squeue and the output
notebooks.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import noyau_testlib as lib




def notebook(path: Path, *sources: str, params: str | None = None) -> Path:
    cells = []
    if params is not None:
        cells.append({"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": params,
                      "outputs": [], "execution_count": None, "id": "params"})
    for i, s in enumerate(sources):
        cells.append({"cell_type": "code", "metadata": {}, "source": s, "outputs": [],
                      "execution_count": None, "id": f"c{i}"})
    path.write_text(json.dumps({
        "cells": cells, "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                    "language": "python"}}}))
    return path


def stdout_of(cell: dict) -> str:
    return "".join("".join(o.get("text", "")) for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")


class Proc:
    """A noyau command whose stderr is collected line by line as it comes."""

    def __init__(self, argv: list[str], cwd: Path, env: dict | None = None) -> None:
        self.lines: list[str] = []
        self.p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env)
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self) -> None:
        assert self.p.stderr
        for line in self.p.stderr:
            self.lines.append(line)

    def wait(self, timeout: float) -> int:
        rc = self.p.wait(timeout=timeout)
        self.t.join(5)
        return rc

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


def test_run_drives_a_kernel_in_a_job(slurm: None, noyau_bin: str, tmp_path: Path) -> None:
    nb = notebook(tmp_path / "in.ipynb",
                  "import os, socket\nprint(x * 2, os.environ.get('SLURM_JOB_ID'), socket.gethostname())",
                  params="x = 1")
    out = tmp_path / "out.ipynb"
    r = subprocess.run([noyau_bin, "run", str(nb), str(out), "--backend", "slurm", "--profile", "test",
                        "-o", "mem=400M", "-p", "x", "21"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    meta = res["metadata"]["noyau"]
    assert meta["backend"] == "slurm"
    assert meta["job_id"].isdigit(), meta
    assert meta["node"], meta
    value, job_id, host = stdout_of(res["cells"][-1]).split()
    assert value == "42" and job_id == meta["job_id"] and host == meta["node"]
    # the runner stayed here: the job ran only the agent and is gone
    lib.wait_until(lambda: not lib.squeue_noyau(), 30, "the run's job to leave the queue", 0.5)


def test_run_queued_shows_reason_and_start_then_runs(slurm: None, noyau_bin: str,
                                                     tmp_path: Path) -> None:
    blocker = lib.fill_the_node()
    proc = None
    try:
        nb = notebook(tmp_path / "q.ipynb", "print('ran after the queue')")
        out = tmp_path / "q.out.ipynb"
        proc = Proc([noyau_bin, "run", str(nb), str(out), "--profile", "test"], cwd=tmp_path)
        lib.wait_until(lambda: any("queued: Resources" in l or "queued: Priority" in l
                                   for l in proc.lines), 60, "a queued line with Slurm's reason")
        line = next(l for l in proc.lines if "queued: R" in l or "queued: P" in l)
        assert "partition debug" in line and "est. start" in line, line
        runs = [j for j in lib.squeue_noyau() if j["name"] == "noyau-run-q"]
        assert len(runs) == 1 and runs[0]["state"] == "PENDING", runs
        subprocess.run(["scancel", blocker], check=True)
        rc = proc.wait(120)
        assert rc == 0, proc.stderr
        assert "ran after the queue" in stdout_of(json.loads(out.read_text())["cells"][0])
    finally:
        subprocess.run(["scancel", blocker], check=False)
        if proc and proc.p.poll() is None:
            proc.p.kill()


def walltime_notebook(path: Path) -> Path:
    """Two quick cells, a 10-minute one, one that never runs."""
    return notebook(path, "print('a')", "print('b')",
                    "import time\nfor _ in range(600):\n    time.sleep(1)", "print('never')")


def check_walltime_save(out: Path) -> dict:
    """The output of a run of walltime_notebook stopped by the walltime
    signal: the error marker first, the two first cells completed, the
    third failed with a WalltimeError, the last pending and empty."""
    res = json.loads(out.read_text())
    cells = [c for c in res["cells"] if "papermill-error-cell-tag" not in c["metadata"].get("tags", [])]
    marker = res["cells"][0]
    assert "papermill-error-cell-tag" in marker["metadata"]["tags"]
    assert "walltime" in "".join(marker["source"]), marker
    assert stdout_of(cells[0]) == "a\n" and stdout_of(cells[1]) == "b\n"
    assert [c["metadata"]["papermill"]["status"] for c in cells] == \
        ["completed", "completed", "failed", "pending"]
    err = cells[2]["outputs"][-1]
    assert err["output_type"] == "error" and err["ename"] == "WalltimeError", err
    assert "walltime reached" in err["evalue"]
    assert cells[3]["outputs"] == []
    return res


def test_walltime_saves_finished_cells_and_exits_6(slurm: None, noyau_bin: str,
                                                   tmp_path: Path) -> None:
    """A 1-minute job with a long cell: Slurm's early SIGUSR1 (walltime_signal=20;
    Slurm may send it up to a minute early) reaches the agent, which tells the
    runner; the runner saves, marks the cell and exits 6."""
    nb = walltime_notebook(tmp_path / "long.ipynb")
    out = tmp_path / "long.out.ipynb"
    t0 = time.monotonic()
    r = subprocess.run([noyau_bin, "run", str(nb), str(out), "--profile", "test",
                        "-o", "time=00:01:00", "-o", "walltime_signal=20",
                        "-o", "env.NOYAU_WALLTIME_WARN=50"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert r.returncode == 6, r.stderr
    assert time.monotonic() - t0 < 120
    assert "walltime reached" in r.stderr, r.stderr
    check_walltime_save(out)
    lib.wait_until(lambda: not lib.squeue_noyau(), 30, "the run's job to leave the queue", 0.5)


def test_exit_codes_documented(noyau_bin: str) -> None:
    r = subprocess.run([noyau_bin, "run", "--help"], capture_output=True, text=True, check=True)
    assert "6    walltime reached" in r.stdout
    doc = (Path(__file__).resolve().parents[2] / "docs" / "run.md").read_text()
    assert "| 6 | walltime reached" in doc


SWEEP_NB = ("import os\n"
            "if os.path.exists(FLAG) and x == 2:\n"
            "    raise ValueError('point x=2 fails while the flag exists')\n"
            "print(x, y, os.environ.get('SLURM_ARRAY_JOB_ID'), os.environ.get('SLURM_ARRAY_TASK_ID'))")


def sweep_notebook(tmp_path: Path) -> tuple[Path, Path]:
    flag = tmp_path / "flag"
    nb = notebook(tmp_path / "sw.ipynb", SWEEP_NB, params=f"x = 0\ny = 'a'\nFLAG = {str(flag)!r}")
    return nb, flag


def check_summary(outdir: Path, n: int) -> dict:
    summary = json.loads((outdir / "summary.json").read_text())
    assert len(summary["points"]) == n
    csv_lines = (outdir / "summary.csv").read_text().splitlines()
    assert csv_lines[0].split(",")[:3] == ["index", "x", "y"], csv_lines[0]
    assert csv_lines[0].endswith("status,exit_code,duration_s,output")
    assert len(csv_lines) == n + 1
    for p in summary["points"]:
        assert Path(p["output"]).is_file(), p
        assert isinstance(p["duration_s"], float), p
    return summary


def test_sweep_is_one_job_array_and_retry_reruns_only_failed(slurm: None, noyau_bin: str,
                                                             tmp_path: Path) -> None:
    nb, flag = sweep_notebook(tmp_path)
    flag.write_text("fail x=2")
    outdir = tmp_path / "out"
    seen: set[str] = set()
    proc = Proc([noyau_bin, "sweep", str(nb), "--grid", "x=1,2,3", "--grid", "y=a,b",
                 "--max-parallel", "2", "--profile", "test", "-o", str(outdir)], cwd=tmp_path)
    while proc.p.poll() is None:
        for j in lib.squeue_noyau():
            seen.add(j["id"].split("_")[0])
            assert j["name"] == "noyau-sweep-sw", j
        time.sleep(0.3)
    rc = proc.wait(10)
    assert rc == 1, proc.stderr  # the two x=2 points failed
    summary = check_summary(outdir, 6)
    job = summary["job_id"]
    assert seen <= {job}, (seen, job)  # one job array, nothing else
    assert "--array=0-5%2" in proc.stderr
    statuses = [(p["parameters"]["x"], p["parameters"]["y"], p["status"]) for p in summary["points"]]
    assert statuses == [(1, "a", "ok"), (1, "b", "ok"), (2, "a", "failed"), (2, "b", "failed"),
                        (3, "a", "ok"), (3, "b", "ok")], statuses
    for i, p in enumerate(summary["points"]):
        assert p["job"] == f"{job}_{i}", p
        out = json.loads(Path(p["output"]).read_text())
        assert out["metadata"]["noyau"]["allocation"] == f"{job}_{i}"
        assert out["metadata"]["papermill"]["parameters"]["x"] == p["parameters"]["x"]
        if p["status"] == "ok":
            assert stdout_of(out["cells"][-1]).split() == [str(p["parameters"]["x"]), p["parameters"]["y"],
                                                         job, str(i)]
    mtimes = {p["output"]: Path(p["output"]).stat().st_mtime_ns for p in summary["points"]}

    flag.unlink()
    r = subprocess.run([noyau_bin, "sweep", str(nb), "--retry-failed", "--profile", "test",
                        "-o", str(outdir)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "--array=2-3%4" in r.stderr, r.stderr
    summary2 = check_summary(outdir, 6)
    assert [p["status"] for p in summary2["points"]] == ["ok"] * 6
    retry_job = summary2["job_id"]
    assert retry_job != job
    for i, p in enumerate(summary2["points"]):
        rerun = i in (2, 3)
        assert p["job"] == (f"{retry_job}_{i}" if rerun else f"{job}_{i}"), p
        assert (Path(p["output"]).stat().st_mtime_ns != mtimes[p["output"]]) == rerun
    lib.wait_until(lambda: not lib.squeue_noyau(), 30, "the sweep's jobs to leave the queue", 0.5)


def test_sweep_ctrl_c_while_sbatch_runs_leaves_no_job(slurm: None, noyau_bin: str, tmp_path: Path) -> None:
    """A Ctrl-C while the sweep's sbatch runs (in its own process group,
    out of the Ctrl-C's reach, it still submits): the sweep waits for the
    array's id, cancels it, says so and exits 130; no job is left. sbatch is
    held by a wrapper on PATH until the test, having seen the sweep take the
    signal, opens a FIFO. (Before, the Ctrl-C ended noyau at once and the
    array stayed queued, followed by no one.)"""
    import os
    import re
    import signal

    bindir, gate, began = lib.held_sbatch(tmp_path)
    nb, _ = sweep_notebook(tmp_path)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    proc = Proc([noyau_bin, "sweep", str(nb), "--grid", "x=1,2", "--profile", "test",
                 "-o", str(tmp_path / "out")], cwd=tmp_path, env=env)
    try:
        lib.wait_until(began.exists, 60, "the sweep's sbatch to start")
        proc.p.send_signal(signal.SIGINT)
        lib.wait_until(lambda: "interrupted while submitting" in proc.stderr or proc.p.poll() is not None,
                       30, "the sweep to take the Ctrl-C")
        with gate.open("w"):
            pass  # sbatch goes on, and submits
        rc = proc.wait(60)
        said = re.search(r"Slurm job (\S+) was submitted after its caller gave up", proc.stderr)
        assert said, (rc, proc.stderr)
        assert rc == 130, (rc, proc.stderr)
        lib.wait_until(lambda: not lib.squeue_noyau(), 30,
                       f"job array {said.group(1)}, given after the Ctrl-C, to be cancelled", 0.5)
    finally:
        _let_go(gate, proc)


def _let_go(gate: Path, proc: Proc) -> None:
    """The end of a test that held sbatch on the FIFO `gate`: a held sbatch
    is let go (it reads the FIFO), else nothing; the command is killed if
    it still runs."""
    import os

    try:
        os.close(os.open(gate, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass
    if proc.p.poll() is None:
        proc.p.kill()


@contextlib.contextmanager
def _run_told_ctrl_c_while_sbatch_runs(noyau_bin: str, tmp_path: Path) -> Iterator[tuple[Proc, Path]]:
    """A `noyau run` on Slurm whose sbatch a wrapper holds (until the test
    opens the FIFO `gate`), sent one Ctrl-C once sbatch has begun, and
    still alive once it has said that it waits for the scheduler's answer.
    Yields the run and `gate`; a held sbatch is let go and the run killed
    at the end, whatever the test did."""
    import os
    import signal

    bindir, gate, began = lib.held_sbatch(tmp_path)
    nb = notebook(tmp_path / "in.ipynb", "print(1)")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    proc = Proc([noyau_bin, "run", str(nb), str(tmp_path / "out.ipynb"), "--backend", "slurm",
                 "--profile", "test", "--no-progress"], cwd=tmp_path, env=env)
    try:
        lib.wait_until(began.exists, 60, "the run's sbatch to start")
        proc.p.send_signal(signal.SIGINT)
        lib.wait_until(lambda: "waiting for the scheduler to answer a submission" in proc.stderr
                       or proc.p.poll() is not None, 30, f"the run to say what it waits for: {proc.stderr}")
        assert proc.p.poll() is None, proc.stderr
        yield proc, gate
    finally:
        _let_go(gate, proc)


def test_run_ctrl_c_while_sbatch_runs_leaves_no_job(slurm: None, noyau_bin: str, tmp_path: Path) -> None:
    """A Ctrl-C while the kernel's sbatch runs gives the start up at once
    (not once sbatch has answered); the job sbatch still gives is cancelled
    before the run exits 130. sbatch is held until the run has said it waits."""
    import re

    with _run_told_ctrl_c_while_sbatch_runs(noyau_bin, tmp_path) as (proc, gate):
        with gate.open("w"):
            pass  # sbatch goes on, and submits
        rc = proc.wait(60)
        said = re.search(r"Slurm job (\S+) was submitted after its caller gave up", proc.stderr)
        assert said, (rc, proc.stderr)
        assert rc == 130, (rc, proc.stderr)
        lib.wait_until(lambda: not any(j["id"] == said.group(1) for j in lib.squeue_noyau()), 30,
                       f"job {said.group(1)}, given after the Ctrl-C, to be cancelled", 0.5)


def test_run_says_it_waits_for_a_submission_and_a_second_ctrl_c_leaves(slurm: None, noyau_bin: str,
                                                                         tmp_path: Path) -> None:
    """A Ctrl-C while the kernel's sbatch runs ends the run, which then
    waits for the scheduler's answer (to cancel the job it gives) and says
    so; a second Ctrl-C leaves at once, warning that a job may be left and
    how to find it. sbatch is held by a wrapper until the end. (Before, the
    wait was silent and the second Ctrl-C ignored.)"""
    import signal

    with _run_told_ctrl_c_while_sbatch_runs(noyau_bin, tmp_path) as (proc, _gate):
        assert "Ctrl-C again to leave now" in proc.stderr, proc.stderr
        proc.p.send_signal(signal.SIGINT)
        rc = proc.wait(30)
        assert rc == 130, (rc, proc.stderr)
        assert "a job it gives is not cancelled" in proc.stderr and "noyau ps" in proc.stderr, proc.stderr


def test_local_sweep_runs_k_at_a_time(noyau_bin: str, tmp_path: Path) -> None:
    nb, _ = sweep_notebook(tmp_path)
    r = subprocess.run([noyau_bin, "sweep", str(nb), "--grid", "x=1,2", "--grid", "y=a,b",
                        "--max-parallel", "2", "--backend", "local"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    outdir = tmp_path / "sw.sweep"
    summary = check_summary(outdir, 4)
    assert summary["backend"] == "local" and summary["job_id"] is None
    assert [p["status"] for p in summary["points"]] == ["ok"] * 4
    assert sorted(p.name for p in outdir.glob("sw-*.ipynb")) == [f"sw-{i}.ipynb" for i in range(4)]
    assert "2 running" in r.stderr and "3 running" not in r.stderr, r.stderr


def test_sweep_bad_input(noyau_bin: str, tmp_path: Path) -> None:
    nb, _ = sweep_notebook(tmp_path)
    for args, want in [(["--grid", "x"], "NAME=V1,V2"), ([], "no points"),
                       (["--retry-failed"], "no summary")]:
        r = subprocess.run([noyau_bin, "sweep", str(nb), "--backend", "local", *args],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and want in r.stderr, (args, r.stderr)
    bad = tmp_path / "bad.ipynb"
    bad.write_text("{nope")
    r = subprocess.run([noyau_bin, "sweep", str(bad), "--grid", "x=1"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "invalid JSON" in r.stderr, r.stderr


def test_twelve_submissions_at_once_run_at_most_two_sbatch_at_a_time(
        slurm: None, noyau_bin: str, tmp_path: Path) -> None:
    """`concurrent_submissions = 2` in the user's config: 12 `noyau run
    --detach` processes started at once run sbatch at most 2 at a time
    (timed through a wrapper on PATH, 0.3 s slower than sbatch so that
    overlaps would show), and all 12 are submitted. The project's
    `./noyau.toml` saying 1 is ignored, with a warning (its directory may
    be another user's)."""
    import os
    import shutil
    (tmp_path / "bin").mkdir()
    log = tmp_path / "sbatch.log"
    log.touch()
    real = shutil.which("sbatch")
    assert real, "sbatch is not on PATH"
    lib.timing_wrapper(tmp_path / "bin", "sbatch", log, real, slow=0.3)
    user = Path(os.environ["XDG_CONFIG_HOME"]) / "noyau" / "config.toml"
    mine = tmp_path / "xdg" / "noyau" / "config.toml"
    mine.parent.mkdir(parents=True)
    mine.write_text("concurrent_submissions = 2\n" + user.read_text())
    (tmp_path / "noyau.toml").write_text("concurrent_submissions = 1\n")
    nb = notebook(tmp_path / "t.ipynb", "import time\ntime.sleep(300)")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
           "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    procs = [subprocess.Popen([noyau_bin, "run", str(nb), str(tmp_path / f"t{i}.out.ipynb"),
                               "--detach", "--profile", "test"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(12)]
    jobs = []
    try:
        errs = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            jobs += out.split()
            errs.append((p.returncode, err))
        for code, err in errs:
            assert code == 0, err
            assert "concurrent_submissions = 1 is ignored in a project's file" in err, err
        calls, most, span = lib.timed_calls(log)
        assert calls == 12, log.read_text()
        assert most == 2, f"{most} sbatch at once (the bound is 2): {log.read_text()}"
        assert span >= 6 * 0.3, f"12 submissions 2 at a time took only {span:.2f} s"
    finally:
        for p in procs:
            p.kill()
        for j in jobs:
            subprocess.run(["scancel", j], check=False)
        lib.wait_until(lambda: not {j["id"] for j in lib.squeue_noyau()} & set(jobs), 60,
                       "the cancelled jobs to leave the queue", 0.3)


def test_ten_queued_runs_with_a_slow_squeue_make_one_squeue_at_a_time(
        slurm: None, noyau_bin: str, tmp_path: Path) -> None:
    """Ten `noyau run` drivers whose jobs wait behind a blocker share one
    listing even when squeue is slower than their 2 s interval (a wrapper on
    PATH sleeps 5 s first, as a loaded slurmctld or oarstat would): a driver
    waits while another asks, instead of giving up after one interval and
    asking too (a herd that made the scheduler slower still). Over a 30 s
    window: about one call per call duration, never more than two at once;
    with every driver asking for itself it was one per driver per ~9 s."""
    import os
    import shutil
    slow, window = 5.0, 30.0
    (tmp_path / "bin").mkdir()
    log = tmp_path / "squeue.log"
    log.touch()
    real = shutil.which("squeue")
    assert real, "squeue is not on PATH"
    lib.timing_wrapper(tmp_path / "bin", "squeue", log, real, slow=slow)
    nb = notebook(tmp_path / "q.ipynb", "print('ran')")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "NOYAU_SLURM_POLL": "2"}
    blocker = lib.fill_the_node()
    procs: list[subprocess.Popen[str]] = []
    try:
        procs = [subprocess.Popen([noyau_bin, "run", str(nb), str(tmp_path / f"q{i}.out.ipynb"),
                                   "--profile", "test"], cwd=tmp_path, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
                 for i in range(10)]
        lib.wait_until(lambda: len([j for j in lib.squeue_noyau() if j["id"] != blocker]) >= 10, 120,
                       "the ten runs' jobs to queue", 0.5)
        t0 = time.time()
        time.sleep(window)  # the measuring window, not a synchronisation
        t1 = time.time()
        assert all(p.poll() is None for p in procs), "a driver ended while its job was queued"
        starts = [float(l.split()[2]) for l in log.read_text().splitlines() if l.startswith("start ")]
        calls = sum(1 for t in starts if t0 <= t <= t1)
        _, most, _ = lib.timed_calls(log)
        bound = int(window / slow) + 3
        print(f"{calls} squeue calls in {window:.0f} s for 10 drivers, at most {most} at once")
        assert calls <= bound, f"{calls} squeue calls in {window:.0f} s for 10 drivers (bound {bound})"
        assert calls >= 2, f"only {calls} squeue calls in {window:.0f} s: are the drivers watching?"
        assert most <= 2, f"{most} squeue calls at once: {log.read_text()}"
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)
        ids = [j["id"] for j in lib.squeue_noyau()]
        if ids:
            subprocess.run(["scancel", *ids], check=False)
        lib.wait_until(lambda: not lib.squeue_noyau(), 60, "the runs' jobs and the blocker to leave the queue", 0.5)


def test_detached_run_is_the_job_and_ps_shows_its_cells(slurm: None, noyau_bin: str,
                                                        tmp_path: Path) -> None:
    nb = notebook(tmp_path / "det.ipynb", "import time", *["time.sleep(1)"] * 6,
                  "import os\nprint(x, tok, where, os.environ.get('SLURM_JOB_ID'))",
                  params="x = 0\ntok = ''\nwhere = ''")
    out = tmp_path / "det.out.ipynb"
    # Parameter values (a token, a path) must not sit on the runner's argv,
    # which `ps` shows every user of the compute node for the whole run.
    tok, where = f"tok-{uuid.uuid4().hex}", f"/where-{uuid.uuid4().hex}"
    t0 = time.monotonic()
    r = subprocess.run([noyau_bin, "run", str(nb), str(out), "--detach", "--profile", "test",
                        "-p", "x", "7", "-r", "tok", tok, "-y", f"where: {where}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 15, "--detach waited for the run"
    job = r.stdout.strip()
    assert job.isdigit(), r.stdout
    seen = set()
    runners = set()

    def cells() -> str | None:
        for pid in lib.pids():
            argv = lib.cmdline(pid)
            if str(nb) in argv and "--backend" in argv:
                runners.add(pid)
            assert not any(tok in a or where in a for a in argv), argv
        ps = subprocess.run([noyau_bin, "ps"], capture_output=True, text=True, check=True).stdout
        line = next((l for l in ps.splitlines() if l.split()[:1] == [job]), None)
        if line is None:
            return None
        assert " run " in line and "noyau-run-det" in line, line
        f = line.split()
        if f[-1].count("/") == 1:
            seen.add(f[-1])
        return line

    lib.wait_until(lambda: cells() is None and out.exists(), 120, "the detached run to end", 0.3)
    done = {int(s.split("/")[0]) for s in seen}
    assert seen and all(s.endswith("/10") for s in seen), seen
    assert len(done) >= 2, f"progress never moved: {seen}"
    res = json.loads(out.read_text())
    assert [c["metadata"]["papermill"]["status"] for c in res["cells"]] == ["completed"] * 10
    assert runners, "the detached runner was never seen running"
    assert stdout_of(res["cells"][-1]).split() == ["7", tok, where, job]
    assert res["metadata"]["noyau"]["allocation"] == job


def test_queued_sweep_and_detached_run_run_the_notebook_as_submitted(slurm: None, noyau_bin: str,
                                                                     tmp_path: Path) -> None:
    """The notebook replaced by a rename while the jobs wait in the queue
    (anyone who can write a shared project's directory can, the file's own
    mode notwithstanding) is not what runs: a sweep's tasks and a detached
    run execute the copy kept, private, when they were submitted."""
    blocker = lib.fill_the_node()
    sweep = None
    try:
        nb = notebook(tmp_path / "sub.ipynb", "print('submitted', x)", params="x = 0")
        replaced = notebook(tmp_path / ".sub.ipynb", "print('replaced', x)", params="x = 0")
        outdir = tmp_path / "out"
        sweep = Proc([noyau_bin, "sweep", str(nb), "--grid", "x=1,2", "--profile", "test",
                      "-o", str(outdir)], cwd=tmp_path)
        det_out = tmp_path / "det.out.ipynb"
        r = subprocess.run([noyau_bin, "run", str(nb), str(det_out), "--detach", "--profile", "test",
                            "-p", "x", "3"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        det = r.stdout.strip()
        lib.wait_until(lambda: {j["name"] for j in lib.squeue_noyau() if j["state"] == "PENDING"}
                       >= {"noyau-sweep-sub", "noyau-run-sub"}, 60, "the sweep and the run to queue")
        replaced.rename(nb)
        subprocess.run(["scancel", blocker], check=True)
        assert sweep.wait(300) == 0, sweep.stderr
        lib.wait_until(lambda: not any(j["id"] == det for j in lib.squeue_noyau()), 120,
                       "the detached run to end", 0.5)
        summary = json.loads((outdir / "summary.json").read_text())
        assert [p["status"] for p in summary["points"]] == ["ok", "ok"], summary
        ran = [stdout_of(json.loads(Path(p["output"]).read_text())["cells"][-1]) for p in summary["points"]]
        ran.append(stdout_of(json.loads(det_out.read_text())["cells"][-1]))
        assert ran == ["submitted 1\n", "submitted 2\n", "submitted 3\n"], ran
        assert "print('replaced', x)" in nb.read_text()  # the file was replaced, and left alone
        state = Path(os.environ["XDG_STATE_HOME"]) / "noyau"
        assert not list((state / "sweeps").glob("sub-*")), "the sweep's plan or copy outlived it"
        # (a detached job cancelled before it starts leaves its copy: only this one's is looked for)
        assert not [f for f in (state / "runs").glob("input-*") if "submitted" in f.read_text()], \
            "the detached run's copy outlived it"
    finally:
        subprocess.run(["scancel", blocker], check=False)
        if sweep and sweep.p.poll() is None:
            sweep.p.kill()
