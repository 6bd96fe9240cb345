"""noyau on a real Son of Grid Engine 8.1.9 (scripts/sge-up): `noyau run`
with the kernel in a job, a sweep as one array job K tasks at a time, the
walltime warning and save signal (SIGUSR2 at h_rt: exit 6), `--detach` with
`ps`/`cancel`/`extend`, a `%%noyau on` cell and `--tasks` in a Grid Engine
job, a Dask cluster of Grid Engine jobs, and profile keys checked for Grid
Engine. The kernel tests of
test_slurm_kernel.py (queue reason, shutdown while queued, proxy SIGKILL,
restart, the qmaster down for 30 s) and the protocol suite of
test_slurm_suite.py run on Grid Engine too, through the `batch` fixture.

Jobs run as root (scripts/sge-up allows it), with the profile `sgetest`
(queue all.q; conftest writes it with this session's directories in its
`env`, as Grid Engine passes no environment to a job). Without a cluster the
tests skip, except under CI (or with NOYAU_TEST_SGE=1), where that fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import noyau_testlib as lib
from test_slurm_run import (Proc, check_summary, check_walltime_save, notebook, stdout_of,
                            walltime_notebook)

PROFILE = ["--backend", "sge", "--profile", "sgetest"]


def run(noyau_bin: str, args: list[str], cwd: Path, timeout: float = 180,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([noyau_bin, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def no_process_of(job: str) -> None:
    """Nothing of the job runs any more: no process with its JOB_ID (Grid
    Engine kills the job's process group; noyau's agent and kernel each run
    in a group of their own, which it does not reach)."""
    lib.wait_until(lambda: not lib.tagged("JOB_ID", job), 20, f"every process of job {job} to end", 0.3)


def test_run_in_a_job_with_its_slots_and_no_secret_in_sight(sge: lib.Cluster, noyau_bin: str,
                                                           tmp_path: Path) -> None:
    nb = notebook(tmp_path / "in.ipynb",
                  "import os, socket\n"
                  "print(x * 2, os.environ.get('JOB_ID'), os.environ.get('NSLOTS'), socket.gethostname(),\n"
                  "      sorted(k for k in os.environ if k.startswith('NOYAU_LINK')))",
                  params="x = 1")
    out = tmp_path / "out.ipynb"
    r = run(noyau_bin, ["run", str(nb), str(out), *PROFILE, "-o", "cpus_per_task=2", "-p", "x", "21"],
            tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    meta = res["metadata"]["noyau"]
    assert meta["backend"] == "sge" and meta["job_id"].isdigit(), meta
    value, job, slots, host, secrets = stdout_of(res["cells"][-1]).strip().split(maxsplit=4)
    assert (value, job, slots, host, secrets) == ("42", meta["job_id"], "2", meta["node"], "[]")
    lib.wait_until(lambda: not lib.qstat_noyau(), 30, "the run's job to leave Grid Engine", 0.5)
    no_process_of(job)
    # it ended as the agent ended: exit 0, in all.q, with 2 slots of the PE
    acct = lib.qacct(job)[0]
    assert acct["exit_status"].split()[0] == "0" and acct["qname"] == "all.q", acct
    assert acct["granted_pe"] == "smp" and acct["slots"] == "2", acct
    # the 0600 environment file was written there, and is gone with the job that read it
    files = Path(os.environ["XDG_STATE_HOME"]) / "noyau" / "sge"
    assert files.is_dir() and list(files.glob("noyau-run-in-*")) == [], list(files.iterdir())


def test_walltime_warns_saves_finished_cells_and_exits_6(sge: lib.Cluster, noyau_bin: str,
                                                         tmp_path: Path) -> None:
    """A 45-second job (h_rt) with a long cell: the agent warns 30 s before
    the end (its watcher: start + h_rt); Grid Engine's SIGUSR2 at h_rt
    (-notify) reaches the agent, which tells the runner; it saves, marks the
    cell and exits 6 within the queue's notify delay (10 s here)."""
    nb = walltime_notebook(tmp_path / "long.ipynb")
    out = tmp_path / "long.out.ipynb"
    t0 = time.monotonic()
    r = run(noyau_bin, ["run", str(nb), str(out), *PROFILE, "-o", "time=0:45",
                        "-o", "env.NOYAU_WALLTIME_WARN=30"], tmp_path, timeout=240)
    assert r.returncode == 6, r.stderr
    assert time.monotonic() - t0 < 120
    warning = re.search(r"walltime: batch job (\d+) ends in ([^;]+)", r.stderr)
    assert warning, r.stderr
    assert "walltime reached" in r.stderr, r.stderr
    res = check_walltime_save(out)
    job = res["metadata"]["noyau"]["job_id"]
    assert warning[1] == job
    lib.wait_until(lambda: not lib.qstat_noyau(), 30, "the run's job to leave Grid Engine", 0.5)
    no_process_of(job)
    acct = lib.qacct(job)[0]
    assert "h_rt=45" in acct["category"], acct


SWEEP_NB = ("import os\n"
            "if x == 2:\n"
            "    raise ValueError('point x=2 fails')\n"
            "print(x, y, os.environ.get('JOB_ID'), os.environ.get('SGE_TASK_ID'))")


def test_sweep_is_one_array_job_k_at_a_time(sge: lib.Cluster, noyau_bin: str, tmp_path: Path) -> None:
    """Six points, two at a time: one `qsub -t 1-6 -tc 2`, never more than 2
    tasks running (qstat), six task records in qacct."""
    nb = notebook(tmp_path / "sw.ipynb", SWEEP_NB, params="x = 0\ny = 'a'")
    outdir = tmp_path / "out"
    proc = Proc([noyau_bin, "sweep", str(nb), "--grid", "x=1,2,3", "--grid", "y=a,b",
                 "--max-parallel", "2", *PROFILE, "-o", str(outdir)], cwd=tmp_path)
    jobs: set[str] = set()
    most = 0
    while proc.p.poll() is None:
        lines = lib.qstat_noyau()
        for j in lines:
            assert j["name"] == "noyau-sweep-sw", j
            jobs.add(j["job"])
        most = max(most, sum(j["state"] in ("r", "t") for j in lines))
        assert most <= 2, lines
        time.sleep(0.3)
    rc = proc.wait(10)
    assert rc == 1, proc.stderr  # the two x=2 points failed
    assert "-t 1-6 -tc 2" in proc.stderr, proc.stderr
    summary = check_summary(outdir, 6)
    job = summary["job_id"]
    assert summary["backend"] == "sge" and jobs == {job}, (jobs, job)
    assert most == 2, "never 2 tasks at once"
    statuses = [(p["parameters"]["x"], p["parameters"]["y"], p["status"]) for p in summary["points"]]
    assert statuses == [(1, "a", "ok"), (1, "b", "ok"), (2, "a", "failed"), (2, "b", "failed"),
                        (3, "a", "ok"), (3, "b", "ok")], statuses
    for i, p in enumerate(summary["points"]):
        assert p["job"] == f"{job}.{i + 1}", p
        out = json.loads(Path(p["output"]).read_text())
        assert out["metadata"]["noyau"]["allocation"] == p["job"]
        if p["status"] == "ok":
            assert stdout_of(out["cells"][-1]).split() == [
                str(p["parameters"]["x"]), p["parameters"]["y"], job, str(i + 1)]
    records = lib.qacct(job, 6)
    assert sorted(int(r["taskid"]) for r in records) == [1, 2, 3, 4, 5, 6], records
    no_process_of(job)
    assert all(r["jobname"] == "noyau-sweep-sw" for r in records)


def test_detached_run_ps_extend_and_cancel(sge: lib.Cluster, noyau_bin: str, tmp_path: Path) -> None:
    """`--detach`: the runner is the job. `ps` shows its cells; `extend` says
    Grid Engine cannot; `cancel` (qdel: SIGUSR2 well before h_rt, then
    SIGKILL) makes the runner save and stop as on SIGTERM."""
    nb = notebook(tmp_path / "det.ipynb", "print('first')", "import time\ntime.sleep(600)")
    out = tmp_path / "det.out.ipynb"
    r = run(noyau_bin, ["run", str(nb), str(out), "--detach", *PROFILE], tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    assert job.isdigit(), r.stdout

    def line() -> str | None:
        # Grid Engine shows the job as `t` (transferring) until the execd's
        # report reaches the qmaster, which can come after the first cell ran.
        ps = run(noyau_bin, ["ps", "--backend", "sge"], tmp_path).stdout
        return next((l for l in ps.splitlines()[1:]
                     if l.split()[0] == job and l.endswith("1/2") and " r " in l), None)

    row = lib.wait_until(line, 60, "ps to show the run's first cell done, the job in state r", 0.3)
    assert " run " in row and "noyau-run-det" in row, row
    ext = run(noyau_bin, ["extend", "--backend", "sge", job, "10"], tmp_path)
    assert ext.returncode != 0 and "cannot extend" in ext.stderr, ext.stderr
    c = run(noyau_bin, ["cancel", "--backend", "sge", job], tmp_path)
    assert c.returncode == 0 and f"cancelled {job}" in c.stdout, c.stdout + c.stderr
    lib.wait_until(lambda: not lib.qstat_noyau(), 30, "the cancelled job to leave Grid Engine", 0.3)
    no_process_of(job)
    res = json.loads(out.read_text())
    assert [c["metadata"]["papermill"]["status"] for c in res["cells"][1:]] == ["completed", "failed"]
    assert stdout_of(res["cells"][1]) == "first\n"
    assert "cancel of the batch job" in "".join(res["cells"][0]["source"]), res["cells"][0]
    # the runner saved and stopped (143, as on SIGTERM) before the kill
    assert lib.qacct(job)[0]["exit_status"].split()[0] == "143"


def test_target_cell_and_tasks_in_a_grid_engine_job(sge: lib.Cluster, noyau_bin: str,
                                                   tmp_path: Path) -> None:
    """`%%noyau on` with a Grid Engine profile: its own job; `--tasks 2`
    sizes it (2 slots of the PE on one host) and runs 2 local processes of
    that job, which see its id and its slots."""
    (tmp_path / "noyau.toml").write_text(lib.sge_profile("big", time="5"))
    show = ("import os\nprint(os.environ['NOYAU_TASK_ID'], os.environ['NOYAU_NTASKS'], "
            "os.environ.get('JOB_ID'), os.environ.get('NSLOTS'), os.getcwd() == {!r})".format(str(tmp_path)))
    nb = notebook(tmp_path / "t.ipynb",
                  "import os\nprint(os.environ.get('JOB_ID'))",
                  f"%%noyau on big --quiet --tasks 2\n{show}",
                  "%%noyau on big --quiet\nimport os\nprint(os.environ.get('JOB_ID'))")
    out = tmp_path / "t.out.ipynb"
    r = run(noyau_bin, ["run", str(nb), str(out)], tmp_path, timeout=240,
            env=dict(os.environ, **lib.trusting(tmp_path)))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    here, tasks, there = (stdout_of(c) for c in res["cells"])
    assert here.strip() == "None", here  # the notebook's own kernel: local
    lines = tasks.splitlines()
    assert lines[0] == "--- task 0 ---" and lines[2] == "--- task 1 ---", tasks
    t0, t1 = lines[1].split(), lines[3].split()
    job = there.strip()
    assert job.isdigit() and t0 == ["0", "2", job, "2", "True"] and t1 == ["1", "2", job, "2", "True"], tasks
    meta = res["cells"][2]["metadata"]["noyau"]["target"]
    assert meta["backend"] == "sge" and str(meta["job_id"]) == job, meta
    lib.wait_until(lambda: not lib.qstat_noyau(), 30, "the target's job to end with the run", 0.5)
    no_process_of(job)
    acct = lib.qacct(job)[0]
    assert acct["granted_pe"] == "smp" and acct["slots"] == "2", acct


def test_profile_keys_checked_for_grid_engine(sge: lib.Cluster, noyau_bin: str, tmp_path: Path) -> None:
    dry = ["kernel", "--dry-run", "--backend", "sge"]
    r = run(noyau_bin, [*dry, "-o", "gpus=1"], tmp_path)
    assert r.returncode != 0 and "gpus has no meaning on Grid Engine" in r.stderr, r.stderr
    assert "qsub" in r.stderr and "pe" in r.stderr, r.stderr
    r = run(noyau_bin, [*dry, "-o", "queue=batch", "-o", "project=proj", "-o", "cpus_per_task=3",
                        "-o", "time=1:00:00", "-o", "mem=3G", "-o", "pe=threads",
                        "-o", "mem_resource=m_mem_free", "-o", "qsub=-l", "-o", "qsub=gpu=1"], tmp_path)
    assert r.returncode == 0, r.stderr
    for want in ["-q batch", "-P proj", "-pe threads 3", "-l h_rt=3600,m_mem_free=1024M -l gpu=1",
                 "-notify", "-r n"]:
        assert want in r.stdout, (want, r.stdout)
    r = run(noyau_bin, [*dry, "-o", "nodes=2"], tmp_path)
    assert r.returncode != 0 and "one host" in r.stderr, r.stderr
    r = run(noyau_bin, ["kernel", "--dry-run", "--backend", "slurm", "-o", "pe=smp"], tmp_path)
    assert r.returncode != 0 and "pe has no meaning on Slurm" in r.stderr, r.stderr


def test_a_run_with_a_dask_cluster_on_grid_engine(sge: lib.Cluster, noyau_bin: str,
                                                  tmp_path: Path) -> None:
    """The batch notebook that starts a Dask cluster on Grid Engine: its
    scheduler and each worker a job of their own (qsub), the computation's
    result in the output, and every job gone when the run ends."""
    (tmp_path / "noyau.toml").write_text(lib.sge_profile("big", time="10"))
    nb = notebook(tmp_path / "d.ipynb",
                  "%noyau dask up 2 --target big",
                  "import os\nfrom dask.distributed import Client\nclient = Client()\n"
                  "client.wait_for_workers(2, timeout=120)\n"
                  "print(sum(client.gather(client.map(lambda x: x * x, range(100)))))\n"
                  "print(' '.join(sorted(client.run(lambda: os.environ.get('JOB_ID', '-')).values())))")
    out = tmp_path / "d.out.ipynb"
    r = run(noyau_bin, ["run", "--no-progress", str(nb), str(out)], tmp_path, timeout=300,
            env=dict(os.environ, **lib.trusting(tmp_path)))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    up, computed = stdout_of(res["cells"][0]), stdout_of(res["cells"][1])
    assert re.search(r'Client\("tls://', up) and "(sge)" in up, up
    total, jobs = computed.splitlines()
    assert total == str(sum(x * x for x in range(100))), computed
    worker_jobs = jobs.split()
    assert len(set(worker_jobs)) == 2 and all(j.isdigit() for j in worker_jobs), jobs
    lib.wait_until(lambda: not lib.qstat_noyau(), 60, "the cluster's jobs to leave Grid Engine", 0.5)
    for j in worker_jobs:
        no_process_of(j)
