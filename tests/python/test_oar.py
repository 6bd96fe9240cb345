"""noyau on a real OAR 2.5 (scripts/oar-up): runs, kernels driven by nbclient,
cells delegated to a target, ps/cancel/extend (and how they find their
scheduler), sweeps as OAR arrays, walltime warning and checkpoint signal, and
profile keys checked against the scheduler.

OAR runs no job of root's, so every noyau command here runs as the test user
of scripts/oar-up ($NOYAU_OAR_USER), prepared by noyau_testlib.require_oar.
Without a cluster the tests skip, except under CI (or with NOYAU_TEST_OAR=1),
where that fails. The kernel tests of test_slurm_kernel.py and the protocol
suite of test_slurm_suite.py run on OAR too.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

import noyau_testlib as lib

OarUser = lib.OarUser


@pytest.fixture(scope="module")
def oar() -> OarUser:
    return lib.require_oar()


def notebook(*sources: str, kernel: str = "python3") -> str:
    cells = [{"cell_type": "code", "metadata": {}, "source": s, "outputs": [],
              "execution_count": None, "id": f"c{i}"} for i, s in enumerate(sources)]
    return json.dumps({"cells": cells, "nbformat": 4, "nbformat_minor": 5,
                       "metadata": {"kernelspec": {"name": kernel, "display_name": kernel,
                                                   "language": "python"}}})


def outputs(path: Path) -> list[str]:
    nb = json.loads(path.read_text())
    return ["".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                    for o in c["outputs"]) for c in nb["cells"] if c["cell_type"] == "code"]


def printed(path: Path) -> list[str]:
    """What each code cell printed (its streams only): a Dask cell may also
    carry noyau's note that the cluster's jobs waited in the queue."""
    nb = json.loads(path.read_text())
    return ["".join("".join(o["text"]) for o in c["outputs"] if o["output_type"] == "stream")
            for c in nb["cells"] if c["cell_type"] == "code"]


def oar_state(job: str) -> str:
    r = subprocess.run(["oarstat", "-s", "-j", job], capture_output=True, text=True)
    return r.stdout.strip().rpartition(": ")[2]


def wait_state(job: str, want: set[str], secs: float = 90) -> str:
    deadline = time.monotonic() + secs
    while (s := oar_state(job)) not in want:
        assert time.monotonic() < deadline, f"job {job} still {s!r}, wanted {want}"
        time.sleep(0.3)
    return s


SHOW_JOB = ("import os\n"
            "print(os.environ.get('OAR_JOB_ID'), 'NOYAU_LINK_TOKEN' in os.environ, "
            "len(os.sched_getaffinity(0)) >= 1)")


def test_run_on_oar(oar: OarUser) -> None:
    d = oar.workdir("run")
    oar.write(d / "nb.ipynb", notebook(SHOW_JOB, "6 * 7"))
    # other runs may have left theirs (a proxy killed while its job was queued)
    env_files = oar.home / ".local/state/noyau/oar"
    before = set(env_files.glob("*.env"))
    r = oar.run([str(oar.bin), "run", "--backend", "oar", "-o", "cpus_per_task=2",
                 "-o", "time=5", "nb.ipynb", "out.ipynb"], d, check=True)
    first, second = outputs(d / "out.ipynb")
    job, token_seen, _ = first.split()
    assert job.isdigit() and token_seen == "False", first
    assert second == "42"
    assert wait_state(job, {"Terminated", "Error"}) == "Terminated", r.stderr
    # what every user sees in oarstat holds no secret, and the 0600 files are gone
    full = subprocess.run(["oarstat", "-f", "-j", job], capture_output=True, text=True).stdout
    assert "core=2" in full and "walltime=0:5:0" in full, full
    assert "NOYAU_LINK" not in full
    assert set(env_files.glob("*.env")) - before == set()


def test_kernel_driven_by_nbclient_on_oar(oar: OarUser) -> None:
    d = oar.workdir("kernel")
    oar.write(d / "nb.ipynb", notebook(SHOW_JOB, "x = 5", "x * 2", kernel="noyau-oar"))
    oar.write(d / "drive.py", textwrap.dedent("""\
        import nbformat, nbclient
        nb = nbformat.read("nb.ipynb", as_version=4)
        nbclient.NotebookClient(nb, timeout=120, startup_timeout=120, kernel_name="noyau-oar").execute()
        nbformat.write(nb, "out.ipynb")
    """))
    oar.run([f"{oar.venv}/bin/python", "drive.py"], d, check=True)
    first, _, third = outputs(d / "out.ipynb")
    job, token_seen, _ = first.split()
    assert job.isdigit() and token_seen == "False", first
    assert third == "10"
    # the kernel's shutdown ends the job
    wait_state(job, {"Terminated", "Error"})


def test_target_cell_runs_in_its_own_oar_job(oar: OarUser) -> None:
    d = oar.workdir("target")
    oar.write(d / "noyau.toml", '[profiles.big]\nbackend = "oar"\ncpus_per_task = 2\ntime = "5"\n')
    oar.write(d / "nb.ipynb", notebook(
        "import os\nprint(os.environ.get('OAR_JOB_ID'))",
        "%%noyau on big\nimport os\nprint(os.environ.get('OAR_JOB_ID'))"))
    oar.run([str(oar.bin), "run", "--backend", "oar", "-o", "time=5", "nb.ipynb", "out.ipynb"],
            d, check=True)
    here, there = outputs(d / "out.ipynb")
    there = there.split()[-1] if there.split() else there
    assert here.strip().isdigit() and there.strip().isdigit(), (here, there)
    assert here.strip() != there.strip()
    meta = json.loads((d / "out.ipynb").read_text())["cells"][1]["metadata"]["noyau"]["target"]
    assert meta["backend"] == "oar" and str(meta["job_id"]) == there.strip(), meta


def test_tasks_run_through_oarsh_on_the_jobs_cores(oar: OarUser) -> None:
    d = oar.workdir("tasks")
    oar.write(d / "noyau.toml", '[profiles.big]\nbackend = "oar"\ntime = "5"\n')
    body, hidden = lib.tasks_hide_their_body()
    oar.write(d / "nb.ipynb", notebook(
        "%%noyau on big --quiet --tasks 2\n"
        "import os\n"
        "cpuset = [l.strip().split(':')[2] for l in open('/proc/self/cgroup') if ':cpuset:' in l]\n"
        "parent = open(f'/proc/{os.getppid()}/comm').read().strip()\n"
        "print(os.environ['NOYAU_TASK_ID'], os.environ['NOYAU_NTASKS'], os.environ['OAR_JOB_ID'], "
        f"cpuset, parent, os.getcwd() == {str(d)!r})",
        f"%%noyau on big --quiet --tasks 2\n{body}",
        "%%noyau on big --quiet --tasks 2\nimport os, sys\nsys.exit(3 * int(os.environ['NOYAU_TASK_ID']))"))
    r = oar.run([str(oar.bin), "run", "--backend", "oar", "-o", "time=5", "nb.ipynb", "out.ipynb"], d)
    assert r.returncode != 0, "the failing task must fail the run"
    first, second, _ = outputs(d / "out.ipynb")
    # the body reached both tasks through the launcher's stdin, on no command line
    assert second == f"--- task 0 ---\n{hidden}\n--- task 1 ---\n{hidden}\n", second
    lines = first.splitlines()
    assert lines[0] == "--- task 0 ---" and lines[2] == "--- task 1 ---", first
    t0, t1 = lines[1].split(" ", 3), lines[3].split(" ", 3)
    assert t0[:2] == ["0", "2"] and t1[:2] == ["1", "2"], first
    job = t0[2]
    # one job of 2 cores (ntasks=2), both tasks in its cpuset, each started by
    # oarsh's sshd (not by the kernel), in the notebook's directory
    assert job.isdigit() and t1[2] == job, first
    assert t0[3] == t1[3] == f"['/oar/{oar.name}_{job}'] sshd True", first
    full = subprocess.run(["oarstat", "-f", "-j", job], capture_output=True, text=True).stdout
    assert "core=2" in full, full
    error = json.loads((d / "out.ipynb").read_text())["cells"][-1]["outputs"][-1]
    assert error.get("evalue") == "task 1 on localhost exited 3", error


def test_dask_cluster_on_oar_computes_and_ends_with_its_owner(oar: OarUser) -> None:
    d = oar.workdir("dask")
    oar.write(d / "noyau.toml", '[profiles.hpc]\nbackend = "oar"\ntime = "10"\n')
    # driven as the test user (OAR runs no root job); it kills its own
    # kernel's proxy with SIGKILL at the end and prints what it saw
    oar.write(d / "drive.py", textwrap.dedent("""\
        import json, os, signal, time
        from jupyter_client.manager import KernelManager
        km = KernelManager(kernel_name="noyau-oar")
        km.start_kernel(env={**os.environ, "NOYAU_LINK_GIVE_UP": "10", "NOYAU_REATTACH_GRACE": "10"})
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=120)
        def run(code):
            out = []
            reply = kc.execute_interactive(code, timeout=240, output_hook=out.append)
            text = "".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")
            assert reply["content"]["status"] == "ok", (code, text, reply["content"])
            return text
        seen = {"up": run("%noyau dask up 2 --target hpc")}
        seen["compute"] = run(
            "import os\\n"
            "from dask.distributed import Client\\n"
            "client = Client()\\n"
            "client.wait_for_workers(2, timeout=120)\\n"
            "print(sum(client.gather(client.map(lambda x: x * x, range(100)))))\\n"
            "print(len(client.scheduler_info()['workers']))\\n"
            "print(' '.join(sorted(client.run(lambda: os.environ.get('OAR_JOB_ID')).values())))\\n")
        # the scheduler lists its workers once a second
        deadline = time.monotonic() + 20
        while "workers: 2" not in (status := run("%noyau dask status")) and time.monotonic() < deadline:
            time.sleep(0.5)
        seen["status"] = status
        print(json.dumps(seen), flush=True)
        os.kill(km.provisioner.process.pid, signal.SIGKILL)
    """))
    r = oar.run([f"{oar.venv}/bin/python", "drive.py"], d, timeout=400)
    killed = time.monotonic()
    assert r.returncode == 0, (r.stdout, r.stderr)
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert re.search(r'Client\("tls://', seen["up"]) and "(oar)" in seen["up"], seen["up"]
    total, workers, jobs = seen["compute"].splitlines()
    assert total == str(sum(x * x for x in range(100))) and workers == "2", seen["compute"]
    # each worker in an OAR job of its own
    worker_jobs = jobs.split()
    assert len(set(worker_jobs)) == 2 and all(j.isdigit() for j in worker_jobs), jobs
    assert "workers: 2" in seen["status"] and seen["status"].count("running on") == 3, seen["status"]

    def cluster_jobs() -> list[dict[str, str]]:
        return [j for j in lib.oarstat_noyau(oar.name) if j["name"].startswith("noyau-dask-")]

    assert {j["id"] for j in cluster_jobs()} >= set(worker_jobs)
    # the proxy was killed: after the grace period (10 s) the scheduler job
    # oardels every job of the cluster
    lib.wait_until(lambda: not cluster_jobs(), 90, "the cluster's OAR jobs to end after the owner died", 0.5)
    assert time.monotonic() - killed >= 5, "the cluster ended before the grace period"
    lib.wait_until(lambda: not lib.oarstat_noyau(oar.name), 90, "the kernel's own job to end", 0.5)


def test_a_run_and_a_sweep_with_a_dask_cluster_on_oar(oar: OarUser) -> None:
    """issue 20: the batch notebook that starts a Dask cluster and computes
    on it, run with `noyau run --backend oar` and as a 3-point sweep (one
    OAR array): the right result in every output, and no job left."""
    d = oar.workdir("dask-run")
    oar.write(d / "noyau.toml", '[profiles.hpc]\nbackend = "oar"\ntime = "10"\n')
    cells = [{"cell_type": "code", "metadata": {"tags": tags}, "source": s, "outputs": [],
              "execution_count": None, "id": f"c{i}"} for i, (s, tags) in enumerate([
                  ("n = 1000", ["parameters"]),
                  ("%noyau dask up 2 --target hpc", []),
                  # (the test user's environment has no numpy: futures, not dask.array)
                  ("from dask.distributed import Client\nclient = Client()\n"
                   "print(sum(client.gather(client.map(lambda x: x * x, range(n)))))", [])])]
    oar.write(d / "batch.ipynb", json.dumps({
        "cells": cells, "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}}))

    def cluster_jobs() -> list[dict[str, str]]:
        return [j for j in lib.oarstat_noyau(oar.name) if j["name"].startswith("noyau-dask-")]

    oar.run([str(oar.bin), "run", "--no-progress", "--backend", "oar", "-o", "time=10", "-p", "n", "100",
             "batch.ipynb", "out.ipynb"], d, timeout=400, check=True)
    assert printed(d / "out.ipynb")[-1] == "328350\n"
    lib.wait_until(lambda: not cluster_jobs(), 60, "the run's cluster to leave OAR's queue", 0.5)
    oar.run([str(oar.bin), "sweep", "batch.ipynb", "--grid", "n=10,100,1000", "--max-parallel", "1",
             "--backend", "oar", "-o", str(d / "sweep")], d, timeout=900, check=True)
    summary = json.loads((d / "sweep" / "summary.json").read_text())
    got = {p["parameters"]["n"]: printed(Path(p["output"]))[-1] for p in summary["points"]}
    assert got == {10: "285\n", 100: "328350\n", 1000: "332833500\n"}, got
    lib.wait_until(lambda: not lib.oarstat_noyau(oar.name), 90, "every job of the runs to end", 0.5)


def test_detached_run_ps_extend_cancel(oar: OarUser) -> None:
    d = oar.workdir("detach")
    # the site's scheduler, for ps/extend/cancel without --backend (this
    # machine has both squeue and oarstat)
    oar.write(d / "noyau.toml", 'scheduler = "oar"\n')
    oar.write(d / "nb.ipynb", notebook("import time\ntime.sleep(600)"))
    r = oar.run([str(oar.bin), "run", "--detach", "--backend", "oar", "-o", "time=10",
                 "nb.ipynb", "out.ipynb"], d, check=True)
    job = r.stdout.strip()
    assert job.isdigit(), r.stdout + r.stderr
    wait_state(job, {"Running"})
    ps = oar.run([str(oar.bin), "ps"], d, check=True).stdout
    assert any(l.split()[0] == job and "noyau-run-nb" in l for l in ps.splitlines()[1:]), ps
    ext = oar.run([str(oar.bin), "extend", job, "5"], d)
    assert ext.returncode == 0, ext.stdout + ext.stderr
    deadline = time.monotonic() + 60
    while "walltime = 0:15:0" not in subprocess.run(
            ["oarstat", "-f", "-j", job], capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline, "oarwalltime's extension never applied"
        time.sleep(0.5)
    bad = oar.run([str(oar.bin), "extend", "999999", "5"], d)
    assert bad.returncode != 0 and "not one of your noyau jobs" in bad.stderr
    oar.run([str(oar.bin), "cancel", job], d, check=True)
    assert wait_state(job, {"Terminated", "Error"}) == "Error"


def test_job_commands_find_their_scheduler(oar: OarUser) -> None:
    """ps/cancel/extend without --backend: the config's `scheduler`, else the
    scheduler whose commands are on PATH; a clear error when that is not one."""
    d = oar.workdir("which")
    ps = [str(oar.bin), "ps"]
    both = oar.run(ps, d)  # squeue and oarstat are both installed here
    assert both.returncode != 0 and "slurm and oar" in both.stderr \
        and "--backend slurm|oar" in both.stderr, both.stderr
    only_oar = d / "bin"
    only_oar.mkdir()
    (only_oar / "oarstat").symlink_to(shutil.which("oarstat"))
    r = oar.run(["env", f"PATH={only_oar}", *ps], d)
    assert r.returncode == 0 and r.stdout.startswith("JOBID"), r.stdout + r.stderr
    r = oar.run(["env", f"PATH={d}", *ps], d)
    assert r.returncode != 0 and "neither squeue (Slurm) nor oarstat (OAR)" in r.stderr, r.stderr
    oar.write(d / "noyau.toml", 'scheduler = "oarr"\n')
    r = oar.run(ps, d)
    assert r.returncode != 0 and "did you mean `oar`" in r.stderr, r.stderr


def test_profile_keys_checked_for_oar(oar: OarUser) -> None:
    d = oar.workdir("keys")
    r = oar.run([str(oar.bin), "kernel", "--dry-run", "--backend", "oar", "-o", "mem=4G"], d)
    assert r.returncode != 0 and "mem has no meaning on OAR" in r.stderr, r.stderr
    r = oar.run([str(oar.bin), "kernel", "--dry-run", "--backend", "oar", "-o", "partition=batch",
                 "-o", "account=proj", "-o", "cpus_per_task=3", "-o", "time=1:00:00",
                 "-o", "properties=host='localhost'"], d, check=True)
    assert "-q batch" in r.stdout and "--project proj" in r.stdout, r.stdout
    assert "nodes=1/core=3,walltime=1:00:00" in r.stdout, r.stdout
    r = oar.run([str(oar.bin), "kernel", "--dry-run", "--backend", "slurm", "-o", "properties=x"], d)
    assert r.returncode != 0 and "properties has no meaning on Slurm" in r.stderr, r.stderr


SWEEP_NB = ("import os\n"
            "if os.path.exists(FLAG) and x == 2:\n"
            "    raise ValueError('point x=2 fails while the flag exists')\n"
            "print(x, y, os.environ.get('OAR_ARRAY_ID'), os.environ.get('OAR_JOB_ID'))")


def test_sweep_is_one_oar_array_k_at_a_time_and_retry_reruns_only_failed(oar: OarUser) -> None:
    """As test_slurm_run's sweep test: OAR has no %K, so the tasks beyond K
    wait held and the sweep resumes them; never more than K queued or running."""
    from test_slurm_run import check_summary, notebook as param_notebook, stdout_of
    d = oar.workdir("sweep")
    flag = oar.write(d / "flag", "fail x=2")
    nb = param_notebook(d / "sw.ipynb", SWEEP_NB, params=f"x = 0\ny = 'a'\nFLAG = {str(flag)!r}")
    shutil.chown(nb, oar.name, oar.name)
    outdir = d / "out"
    proc = oar.popen([str(oar.bin), "sweep", "sw.ipynb", "--grid", "x=1,2,3",
                      "--grid", "y=a,b", "--max-parallel", "2", "--backend", "oar",
                      "-o", str(outdir)], d)
    arrays: set[int] = set()
    held_seen = most_active = 0
    while proc.poll() is None:
        out = subprocess.run(["oarstat", "-J", "-f", "-u", oar.name], capture_output=True,
                             text=True).stdout
        jobs = [j for j in (json.loads(out) if out.strip() else {}).values()
                if j["state"] not in ("Terminated", "Error")]
        for j in jobs:
            assert j["name"] == "noyau-sweep-sw", j
            arrays.add(j["array_id"])
        held_seen += sum(j["state"] == "Hold" for j in jobs)
        most_active = max(most_active, sum(j["state"] != "Hold" for j in jobs))
        assert most_active <= 2, jobs
        time.sleep(0.3)
    stderr = proc.stderr.read()
    assert proc.wait() == 1, stderr  # the two x=2 points failed
    summary = check_summary(outdir, 6)
    array = summary["job_id"]
    assert summary["backend"] == "oar" and arrays <= {int(array)}, (arrays, array)
    assert held_seen and most_active == 2, (held_seen, most_active)
    assert "6 tasks, 2 at a time" in stderr, stderr
    statuses = [(p["parameters"]["x"], p["parameters"]["y"], p["status"]) for p in summary["points"]]
    assert statuses == [(1, "a", "ok"), (1, "b", "ok"), (2, "a", "failed"), (2, "b", "failed"),
                        (3, "a", "ok"), (3, "b", "ok")], statuses
    for p in summary["points"]:
        out = json.loads(Path(p["output"]).read_text())
        assert out["metadata"]["noyau"]["allocation"] == p["job"], p
        if p["status"] == "ok":
            assert stdout_of(out["cells"][-1]).split() == [
                str(p["parameters"]["x"]), p["parameters"]["y"], array, p["job"]]
    mtimes = {p["output"]: Path(p["output"]).stat().st_mtime_ns for p in summary["points"]}
    # the array's files (environment, script, tasks) are gone with it
    assert list((oar.home / ".local/state/noyau/oar").glob("noyau-sweep-*")) == []

    flag.unlink()
    r = oar.run([str(oar.bin), "sweep", "sw.ipynb", "--retry-failed", "--backend", "oar",
                 "-o", str(outdir)], d, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "2 tasks, 4 at a time" in r.stderr, r.stderr
    summary2 = check_summary(outdir, 6)
    assert [p["status"] for p in summary2["points"]] == ["ok"] * 6
    assert summary2["job_id"] != array
    for i, (old, new) in enumerate(zip(summary["points"], summary2["points"])):
        rerun = i in (2, 3)
        assert (new["job"] != old["job"]) == rerun, (old, new)
        assert (Path(new["output"]).stat().st_mtime_ns != mtimes[new["output"]]) == rerun


def test_walltime_warns_saves_finished_cells_and_exits_6_on_oar(oar: OarUser) -> None:
    """As test_slurm_run's walltime test: a 1-minute OAR job with a long cell.
    The agent asks oarstat for its time left and warns 40 s before the end;
    OAR's checkpoint signal (--checkpoint 25 --signal 10: SIGUSR1, sent at
    OAR's next check, then again at each until the end) reaches the agent,
    the runner saves, marks the cell and exits 6."""
    from test_slurm_run import notebook as param_notebook, stdout_of
    d = oar.workdir("walltime")
    nb = param_notebook(d / "long.ipynb", "print('a')", "print('b')",
                        "import time\nfor _ in range(600):\n    time.sleep(1)", "print('never')")
    shutil.chown(nb, oar.name, oar.name)
    t0 = time.monotonic()
    r = oar.run([str(oar.bin), "run", "long.ipynb", "out.ipynb", "--backend", "oar",
                 "-o", "time=00:01:00", "-o", "walltime_signal=25",
                 "-o", "env.NOYAU_WALLTIME_WARN=40"], d, timeout=240)
    assert r.returncode == 6, r.stderr
    assert time.monotonic() - t0 < 120
    assert "walltime: batch job" in r.stderr and "ends in" in r.stderr, r.stderr
    # stopped by the early signal, before the end (a kill at the end says "in about 0 s")
    ahead = re.search(r"walltime reached: the batch job \d+ ends at its time limit \(in about (\d+) s\)",
                      r.stderr)
    assert ahead and int(ahead[1]) > 0, r.stderr
    res = json.loads((d / "out.ipynb").read_text())
    marker = res["cells"][0]
    assert "papermill-error-cell-tag" in marker["metadata"]["tags"]
    assert "walltime" in "".join(marker["source"]), marker
    cells = res["cells"][1:]
    assert stdout_of(cells[0]) == "a\n" and stdout_of(cells[1]) == "b\n"
    assert [c["metadata"]["papermill"]["status"] for c in cells] == \
        ["completed", "completed", "failed", "pending"]
    err = cells[2]["outputs"][-1]
    assert err["output_type"] == "error" and err["ename"] == "WalltimeError", err
    assert cells[3]["outputs"] == []
    wait_state(res["metadata"]["noyau"]["job_id"], {"Terminated", "Error"})
