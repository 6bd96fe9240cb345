"""The JupyterLab extension (labextension/) in a real browser: Debian's
headless Chromium driven by playwright-core (tests/browser/labext.mjs),
against a real JupyterLab 4 with the extension's wheel installed (scripts/test
builds it and installs it in the test venv).

Two kernels run the scenario:
- a REAL noyau kernel (the proxy and a real ipykernel) on the test Slurm
  (`RealSlurmKernel`): the status bar reads `Queued (Resources)` while a
  blocking job (lib.fill_the_node()) holds the CPUs, then `Running on
  <node>` and the time left once the blocker is cancelled; the panel's
  memory rises after a 200 MB cell; a target started by a `%%noyau on` cell
  is released from the panel and leaves `squeue`; the scheduler job of a Dask
  cluster started by `%noyau dask up` shows its log from its row, a worker
  job is cancelled from the panel and leaves `squeue` (the cluster submits
  its replacement); the status bar turns amber, then red, as the job runs
  down to the test's warning thresholds;
  Slurm offers the extend button to root, one of its operators (the
  extension itself: test_comm.py); the comm is reopened after a restart (the
  proxy's log says so);
- a STAND-IN kernel (`StandInCommKernel`: an ipykernel that loads
  tests/python/noyau_comm_standin.py, answering the comm from scenes this
  test writes; its memory and CPU use are its process's real ones) for
  what the real one cannot give here: a GPU (no GPU on this machine), the
  scheduler's estimated start (the test Slurm gives none) and an idle
  release with a date (the real kernel's section shows its default limit
  here; its release itself: test_idle_release.py), then the kernel released
  for idleness: the status bar reads "Released after 1:00:00 idle at …",
  not in the error colour, and the panel offers no extend.
A real noyau kernel on the test OAR (`OarKernel`) shows that the extend
button adds walltime through oarwalltime: the time left grows by what was
asked.
Screenshots of every step are kept in target/test-logs/labext-browser/
(stand-in), target/test-logs/labext-browser-real/ and …-oar/.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

import browser_testlib as bt
import noyau_testlib as lib

SHOTS = bt.ROOT / "target" / "test-logs" / "labext-browser"
SHOTS_REAL = bt.ROOT / "target" / "test-logs" / "labext-browser-real"
SHOTS_OAR = bt.ROOT / "target" / "test-logs" / "labext-browser-oar"
VENV = Path(sys.prefix)


class RealSlurmKernel:
    """A real noyau kernel on the test Slurm (the session's kernelspec
    `noyau-slurm-python3`), its node held by a blocker until the scenario
    needs the job to run; `%%noyau on side` starts a target (profile `side`
    in the notebook directory's noyau.toml)."""

    kernel_name = lib.SLURM_KERNEL_NAME
    display_name = "Python 3 (noyau slurm)"
    mode = "real"
    # The walltime thresholds (NOYAU_WALLTIME_WARN) the proxies get: amber
    # at once in a 10-minute job, red 2 minutes after it starts.
    WARNINGS = "600,480"
    shots = SHOTS_REAL

    def __init__(self, root: Path, work: Path) -> None:
        self.cluster = lib.CLUSTERS["slurm"]
        self.jupyter_path = root / "no-extra-kernels"
        self.lab_log: Path | None = None
        self.released: list[str] = []
        self.cancelled: list[str] = []
        (work / "noyau.toml").write_text('[profiles.side]\nbackend = "slurm"\npartition = "debug"\n'
                                         'time = "10"\nmem = "300M"\n\n'
                                         '[profiles.hpc]\nbackend = "slurm"\npartition = "debug"\n'
                                         'time = "10"\nmem = "500M"\n')
        self.blocker: str | None = self.cluster.fill_the_node()

    def free(self) -> None:
        if self.blocker:
            self.cluster.cancel(self.blocker)
            self.blocker = None

    def need(self, what: str) -> None:
        if what == "running":
            jobs = [j for j in self.cluster.jobs() if j["name"] == "noyau-kernel-python3"]
            assert [j["state"] for j in jobs] == [self.cluster.pending], f"queued until now: {jobs}"
            self.free()
        elif what in ("warn", "critical"):
            pass  # the job runs down to WARNINGS by itself
        elif what.startswith("cancelled "):
            job = what.removeprefix("cancelled ")
            lib.wait_until(lambda: job not in {j["id"] for j in self.cluster.jobs()}, 60,
                           f"the cancelled worker job {job} to leave squeue", interval=0.5)
            self.cancelled.append(job)
        elif what.startswith("released "):
            self.check_released(what.removeprefix("released "))
            self.released.append(what.removeprefix("released "))
        elif what == "check-reopened":
            assert self.lab_log is not None
            opened = set(re.findall(r"noyau comm opened comm=(\w+)", self.lab_log.read_text()))
            assert len(opened) >= 2, f"the comm was not reopened after the restart: {opened}"
        else:
            raise AssertionError(f"the scenario asked for {what!r}, which the real kernel does not provide")

    def check_released(self, target: str) -> None:
        """The target's job leaves the queue."""
        lib.wait_until(lambda: not [j for j in self.cluster.jobs() if j["name"] == f"noyau-target-{target}"],
                       60, f"target {target}'s job to leave squeue", interval=0.5)


class OarKernel:
    """A real noyau kernel on the test OAR (the session's kernelspec
    `noyau-oar-python3`, run as OAR's test user): the scenario only extends
    its walltime, which OAR lets users do."""

    kernel_name = lib.OAR_KERNEL_NAME
    display_name = "Python 3 (noyau oar)"
    mode = "oar"
    shots = SHOTS_OAR

    def need(self, what: str) -> None:
        raise AssertionError(f"the OAR scenario asked for {what!r}")


class StandInCommKernel:
    """A STAND-IN for a noyau kernel speaking the `noyau` comm (see the module
    docstring): a kernelspec marked as noyau's (metadata `noyau`, as `noyau
    install` writes) whose ipykernel runs noyau_comm_standin at start."""

    kernel_name = "noyau-standin"
    display_name = "Python 3 (noyau comm STAND-IN)"
    mode = "standin"
    shots = SHOTS

    def __init__(self, root: Path) -> None:
        self.root = root
        self.scene_file = root / "scene.json"
        self.opened = root / "opened"
        self.opened.mkdir(parents=True)
        self.jupyter_path = root / "share" / "jupyter"
        spec_dir = self.jupyter_path / "kernels" / self.kernel_name
        spec_dir.mkdir(parents=True)
        spec = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                     "--IPKernelApp.exec_lines=__import__('noyau_comm_standin')"],
            "display_name": self.display_name,
            "language": "python",
            "metadata": {"noyau": {"inner": "python3", "backend": "slurm", "stand_in": True}},
            "env": {"PYTHONPATH": str(Path(__file__).parent), "NOYAU_STANDIN_SCENE": str(self.scene_file),
                    "NOYAU_STANDIN_OPENED": str(self.opened)},
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec))
        self._write(self._queued())

    # -- scenes (the world a real test cluster would provide) ------------------

    def _write(self, scene: dict) -> None:
        tmp = self.scene_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(scene))
        os.replace(tmp, self.scene_file)

    @staticmethod
    def _base() -> dict:
        return {
            "backend": "slurm",
            "resources": {"cpus": 4, "mem_bytes": 8 * 1024**3, "gpus": None},
            "can": {"extend": True, "release_target": True, "cancel_worker": True, "log": True},
            "targets": [],
            "dask": None,
            "interval": 30,
        }

    def _queued(self) -> dict:
        return {**self._base(), "job": {"id": "4242", "state": "pending", "reason": "Resources",
                                        "partition": "batch", "estimated_start_in_s": 250, "warnings_s": [600, 60]}}

    def _running(self, left_s: int) -> dict:
        log = "".join(f"[{i:03d}] noyau agent: kernel output line {i} of job {{job}}\n" for i in range(80))
        return {
            **self._base(),
            "job": {"id": "4242", "state": "running", "partition": "batch", "node": "node12",
                    "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 300)),
                    "ends_in_s": left_s, "warnings_s": [600, 60]},
            "targets": [{"name": "gpu", "backend": "slurm", "job": "4243", "state": "running", "node": "gpu3",
                         "reason": None},
                        {"name": "big", "backend": "slurm", "job": "4244", "state": "pending", "node": None,
                         "reason": "Priority"}],
            "dask": {"workers": 2, "dashboard": "http://127.0.0.1:8787/status",
                     "jobs": [{"id": "4250", "role": "scheduler", "state": "running"},
                              {"id": "4251", "role": "worker", "state": "running"},
                              {"id": "4252", "role": "worker", "state": "running"}]},
            "idle": {"release_after_s": 3600, "idle_since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            "log": log,
            "resources": {"cpus": 4, "mem_bytes": 8 * 1024**3, "gpus": 1},
            "usage_gpus": [{"index": 0, "name": "STAND-IN GPU", "util_percent": 30,
                            "mem_used_bytes": 2 * 1024**3, "mem_total_bytes": 16 * 1024**3}],
        }

    def need(self, what: str) -> None:
        """Brings the world to `what`, as the browser scenario asks."""
        if what == "running":
            self._write(self._running(left_s=2 * 3600))
        elif what == "warn":
            self._write(self._running(left_s=500))
        elif what == "critical":
            self._write(self._running(left_s=45))
        elif what == "refuse-extend":
            self._write({**self._running(left_s=2 * 3600),
                         "extend_refusal": "Slurm refused to raise the time limit of job 4242 (scontrol update "
                                           "JobId=4242 TimeLimit=180: Access/permission denied for job 4242): "
                                           "only its operators may"})
        elif what == "released-idle":
            # as the proxy says it (docs/comm.md): the old job ended, cancelled by the release
            at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 120))
            self._write({**self._running(left_s=2 * 3600),
                         "job": {"id": "4242", "state": "ended", "ended": "CANCELLED", "partition": "batch"},
                         "targets": [], "dask": None,
                         "idle": {"release_after_s": 3600, "idle_since": None, "released_at": at,
                                  "released_job": "4242"}})
        elif what == "check-reopened":
            pids = {p.name.split("-")[0] for p in self.opened.iterdir()}
            assert len(pids) >= 2, f"the comm was not reopened by the restarted kernel: opened by {pids}"
        else:
            raise AssertionError(f"the scenario asked for {what!r}, which this kernel cannot provide")

    def check_released(self, target: str) -> None:
        """The real kernel's test checks `squeue` here; the stand-in's jobs are not real."""


def write_notebook(path: Path, kernel_name: str, display_name: str) -> None:
    nb = {
        "cells": [{"cell_type": "code", "execution_count": None, "id": "c1", "metadata": {}, "outputs": [],
                   "source": ""}],
        "metadata": {"kernelspec": {"name": kernel_name, "display_name": display_name, "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(nb))


class Lab:
    """A real JupyterLab from this venv, on 127.0.0.1, without token."""

    def __init__(self, root: Path, jupyter_path: Path) -> None:
        self.root = root
        self.port = lib.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "lab.log"
        config = root / "config"
        (config / "labconfig").mkdir(parents=True)
        # No "would you like news?" toast over the screenshots.
        (config / "labconfig" / "page_config.json").write_text(
            json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
        env = dict(os.environ, JUPYTER_CONFIG_DIR=str(config),
                   JUPYTER_PATH=f"{jupyter_path}{os.pathsep}{os.environ.get('JUPYTER_PATH', '')}")
        argv = [str(VENV / "bin" / "jupyter-lab"), "--no-browser", "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0", "--IdentityProvider.token=",
                "--ServerApp.password=", f"--ServerApp.root_dir={root / 'work'}",
                f"--LabApp.user_settings_dir={root / 'settings'}", f"--LabApp.workspaces_dir={root / 'workspaces'}"]
        if os.geteuid() == 0:
            argv.append("--allow-root")
        self.proc = subprocess.Popen(argv, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        lib.wait_until(self._up, 120, f"JupyterLab on {self.url} (log {self.log})", interval=0.3)

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"JupyterLab exited ({self.proc.returncode}): {self.log.read_text()[-3000:]}")
        try:
            return requests.get(f"{self.url}/api/status", timeout=2).ok
        except requests.RequestException:
            return False

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def seconds(clock: str) -> int:
    """`1:02:03` (in a longer text) in seconds."""
    m = re.search(r"(\d+):(\d\d):(\d\d)", clock)
    assert m, clock
    return int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])


def size(text: str) -> float:
    """The first size (`210 MiB`) in a meter's text, in bytes."""
    m = re.search(r"([\d.]+) (B|KiB|MiB|GiB|TiB)\b", text)
    assert m, text
    return float(m[1]) * 1024 ** ["B", "KiB", "MiB", "GiB", "TiB"].index(m[2])


def run_scenario(lab: Lab, kernel: StandInCommKernel | RealSlurmKernel | OarKernel, tmp_path: Path) -> dict[str, dict]:
    env = dict(os.environ, LAB_URL=f"{lab.url}/lab", NOTEBOOK="alloc.ipynb", PLAIN_NOTEBOOK="plain.ipynb",
               KERNEL_DISPLAY_NAME=kernel.display_name, KERNEL=kernel.mode,
               SHOTS_DIR=str(kernel.shots), PROFILE_DIR=str(tmp_path / "chromium-profile"))
    proc = subprocess.Popen(["node", str(bt.BROWSER / "labext.mjs")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env, cwd=bt.BROWSER)
    steps: dict[str, dict] = {}
    errors: list[str] = []
    try:
        assert proc.stdout is not None and proc.stdin is not None
        for line in proc.stdout:
            s = json.loads(line)
            if "error" in s:
                errors.append(f"{s['error']}\nbrowser console: {s.get('console')}")
                break
            if s["step"] == "need":
                kernel.need(s["what"])
                proc.stdin.write("go\n")
                proc.stdin.flush()
            steps[s["step"]] = s
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    (kernel.shots / "steps.json").write_text(json.dumps(steps, indent=1))
    assert rc == 0 and not errors, \
        f"browser scenario failed: {errors} (screenshots in {kernel.shots}; Lab log {lab.log})"
    return steps


def lab_dirs(tmp_path: Path, kernel_name: str, display_name: str, shots: Path) -> Path:
    """The Lab's work directory with the two notebooks; old screenshots gone."""
    work = tmp_path / "lab" / "work"
    work.mkdir(parents=True)
    write_notebook(work / "alloc.ipynb", kernel_name, display_name)
    write_notebook(work / "plain.ipynb", lib.DIRECT_KERNEL_NAME, "Python 3 (ipykernel)")
    for old in shots.glob("*.png"):
        old.unlink()
    shots.mkdir(parents=True, exist_ok=True)
    return work


def test_status_bar_and_panel_follow_a_real_kernels_slurm_job(slurm: None, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    bt.require_browser()
    monkeypatch.setenv("NOYAU_WALLTIME_WARN", RealSlurmKernel.WARNINGS)
    bt.require_labextension(VENV)
    work = lab_dirs(tmp_path, RealSlurmKernel.kernel_name, RealSlurmKernel.display_name, SHOTS_REAL)
    kernel = RealSlurmKernel(tmp_path, work)
    lab = None
    try:
        lab = Lab(tmp_path / "lab", kernel.jupyter_path)
        kernel.lab_log = lab.log
        s = run_scenario(lab, kernel, tmp_path)
    finally:
        kernel.free()
        if lab:
            lab.close()
    lib.wait_until(lambda: not kernel.cluster.jobs(), 60, "the kernels' jobs to end with JupyterLab", interval=0.5)

    queued = s["queued"]["text"]
    assert re.fullmatch(r"Slurm \d+ · Queued \((Resources|Priority)\) · "
                        r"(in about .*|start time not known yet)", queued), s["queued"]
    assert re.fullmatch(r"Slurm \d+ · Running on \S+ · \d:\d\d:\d\d left", s["running"]["text"]), s["running"]
    assert 9 * 60 <= seconds(s["running"]["text"]) <= 10 * 60, s["running"]  # profile `test`: time = 10
    panel = s["panel"]["text"]
    for want in ("Running on", "(debug)", "side", "Slurm"):
        assert want in panel, (want, panel)
    assert "of 500 MiB" in panel, panel  # profile `test`: mem = 500M
    # the kernel's own idle clock ([idle] kernel's default: 1 h)
    assert "idle" in s["panel"]["sections"], s["panel"]
    assert "Given back after 1:00:00 without activity" in panel, panel
    mem = s["memory"]
    assert size(mem["after"]) - size(mem["before"]) >= 190 * 2**20, mem
    assert s["release"]["target"] == "side" and s["release"]["reply"]["ok"], s["release"]
    assert kernel.released == ["side"], "the released target's job was not seen leaving squeue"
    assert "extend" not in s, "a stand-in step ran on the real kernel"
    assert s["cancel"]["reply"]["ok"] and kernel.cancelled == [s["cancel"]["job"]], s["cancel"]
    assert s["cancel"]["job"] not in s["cancel"]["dask"], s["cancel"]
    # the Dask scheduler's job log, from its row (Dask logs to stderr, into the job's log)
    assert "distributed.scheduler" in s["dask-log"]["text"], s["dask-log"]["text"][-300:]
    # amber at 600 s left (at once), red at 480 s: the real job's own walltime
    assert s["warn"]["text"].startswith("Slurm") and 480 < seconds(s["warn"]["text"]) <= 600, s["warn"]
    assert seconds(s["critical"]["text"]) <= 480, s["critical"]
    assert s["warn"]["background"] != s["critical"]["background"], (s["warn"], s["critical"])
    assert "kernel started" in s["log"]["text"], s["log"]["text"][-300:]
    # root is one of Slurm's operators: the button is there (what it does,
    # and an ordinary user's refusal: test_comm.py)
    assert s["refused"]["extendButtons"] == 1, s["refused"]
    assert "Running on" in s["restarted"]["text"]
    assert not s["plain"]["statusVisible"], s["plain"]
    assert "plain.ipynb" in s["changed"]["panel"] and "Running on" in s["changed"]["text"], s["changed"]
    assert "alloc.ipynb" in s["back"]["panel"] and "Running on" in s["back"]["text"]
    assert not [c for c in s["end"]["console"] if "noyau" in c.lower()], s["end"]["console"]
    assert "No such comm target" not in lab.log.read_text()


@pytest.mark.parametrize("batch", ["oar"], indirect=True)
def test_extend_from_the_panel_adds_oar_walltime(batch: lib.Cluster, tmp_path: Path) -> None:
    bt.require_browser()
    bt.require_labextension(VENV)
    lab_dirs(tmp_path, OarKernel.kernel_name, OarKernel.display_name, SHOTS_OAR)
    lab = Lab(tmp_path / "lab", tmp_path / "no-extra-kernels")
    try:
        s = run_scenario(lab, OarKernel(), tmp_path)
    finally:
        lab.close()
    lib.wait_until(lambda: not batch.jobs(), 60, "the kernel's job to end with JupyterLab", interval=0.5)
    ext = s["extend"]
    assert ext["reply"]["ok"], ext
    # 30 minutes more, less the seconds OAR took to apply it (up to 2 min)
    assert 28 * 60 <= seconds(ext["after"]) - seconds(ext["before"]) <= 30 * 60, ext
    assert seconds(ext["status"]) >= seconds(ext["after"]) - 5, ext


def test_status_bar_and_panel_on_the_standin_kernel(tmp_path: Path) -> None:
    """The STAND-IN kernel's scenes: what the real kernel cannot show here
    (a GPU) or is not yet driven to (see the module's docstring)."""
    bt.require_browser()
    bt.require_labextension(VENV)
    comm_kernel = StandInCommKernel(tmp_path / "kernel")
    lab_dirs(tmp_path, comm_kernel.kernel_name, comm_kernel.display_name, SHOTS)
    lab = Lab(tmp_path / "lab", comm_kernel.jupyter_path)
    try:
        s = run_scenario(lab, comm_kernel, tmp_path)
    finally:
        lab.close()

    # The status bar: queued with the reason and the estimate, then running.
    assert re.fullmatch(r"Slurm 4242 · Queued \(Resources\) · in about [45] min, \d\d:\d\d", s["queued"]["text"]), s
    assert s["queued"]["level"] == "queued"
    assert "Starts" in s["queued-panel"]["text"] and "in about" in s["queued-panel"]["text"]
    assert "Waiting for the first sample" in s["queued-panel"]["text"], s["queued-panel"]
    assert re.fullmatch(r"Slurm 4242 · Running on node12 · \d:\d\d:\d\d left", s["running"]["text"]), s["running"]
    assert 7200 - 60 <= seconds(s["running"]["text"]) <= 7200, s["running"]
    assert s["running"]["level"] == "ok"
    # It counts down between the kernel's updates (this scene sends one every 30 s).
    assert 0 < seconds(s["running"]["text"]) - seconds(s["running"]["later"]) <= 3, s["running"]

    # The panel: the job, the allocation's resources and use, targets, Dask.
    panel = s["panel"]["text"]
    assert s["panel"]["sections"] == ["job", "resources", "targets", "dask", "idle"], s["panel"]
    assert s["refused"]["toast"], "a refusal is also a notification"
    for want in ("Running on node12", "4242 (batch)", "of 4 cores", "of 8 GiB", "GPU 0", "STAND-IN GPU · 30%",
                 "2 GiB of 16 GiB", "gpu", "Slurm 4243", "big",
                 "queued (Priority)", "2 workers", "4251", "Given back after 1:00:00 without activity"):
        assert want in panel, (want, panel)
    mem = s["memory"]
    assert size(mem["after"]) - size(mem["before"]) >= 190 * 2**20, mem

    # Extend: asked for 30 minutes, the time left grew by that.
    ext = s["extend"]
    assert ext["reply"]["ok"] and "extended by 0:30:00" in ext["reply"]["text"], ext
    assert 29 * 60 <= seconds(ext["after"]) - seconds(ext["before"]) <= 30 * 60, ext

    # Release a target, cancel a worker: confirmed, answered, gone from the panel.
    assert s["release"]["target"] == "gpu" and s["release"]["reply"]["ok"], s["release"]
    assert "released target gpu" in s["release"]["reply"]["text"]
    comm_kernel.check_released("gpu")
    assert s["cancel"]["job"] == "4251" and s["cancel"]["reply"]["ok"], s["cancel"]
    assert "1 worker" in s["cancel"]["dask"], s["cancel"]

    # The log tail, in a pre that scrolls.
    assert "[079]" in s["log"]["text"] and "job 4242" in s["log"]["text"], s["log"]["text"][-300:]
    assert s["log"]["overflowY"] == "auto" and s["log"]["scrollable"] and s["log"]["atEnd"], s["log"]

    # Amber at the first warning (600 s), red at the last (60 s): different colours.
    assert re.search(r"· 0:0[78]:\d\d left$", s["warn"]["text"]), s["warn"]
    assert re.search(r"· 0:00:[34]\d left$", s["critical"]["text"]), s["critical"]
    assert s["warn"]["background"] != s["critical"]["background"], (s["warn"], s["critical"])

    # Released for idleness: said as such, with when, in no error colour.
    rel = s["released-idle"]
    assert re.fullmatch(r"Slurm 4242 · Released after 1:00:00 idle at \d\d:\d\d · the next cell starts a new job",
                        rel["text"]), rel
    assert rel["state"].startswith("Released after 1:00:00 idle at"), rel
    assert "job 4242 was given back at" in rel["idle"], rel
    assert rel["background"] != s["critical"]["background"], (rel, s["critical"])
    assert rel["extendButtons"] == 0, rel

    # A refusal (ok: false) is shown with the kernel's message.
    assert not s["refused"]["reply"]["ok"] and "only its operators" in s["refused"]["reply"]["text"]

    # After a restart the comm was reopened (need("check-reopened") checked it).
    assert "Running on node12" in s["restarted"]["text"]

    # A plain kernel: no status item, the panel says why; changed to a noyau
    # kernel, the comm opens on it; back on the first notebook, the panel follows.
    assert not s["plain"]["statusVisible"], s["plain"]
    assert "does not report a batch allocation" in s["plain"]["panel"], s["plain"]
    assert "plain.ipynb" in s["changed"]["panel"] and "Running on node12" in s["changed"]["text"], s["changed"]
    assert "alloc.ipynb" in s["back"]["panel"] and "Running on node12" in s["back"]["text"]

    # No "Hub" menu outside the hub; nothing alarming from the extension anywhere.
    assert "Hub" not in s["end"]["menus"], s["end"]["menus"]
    assert not [c for c in s["end"]["console"] if "noyau" in c.lower()], s["end"]["console"]
    log = lab.log.read_text()
    assert "No such comm target" not in log, "the extension opened its comm on a kernel that is not noyau's"
    for name in ("01-queued", "03-running", "04-panel", "05-memory", "06-extend-dialog", "08-release-confirm",
                 "11-log", "12-amber", "13-red", "14-refused", "15-plain-notebook", "15b-kernel-changed", "16-back"):
        assert (SHOTS / f"{name}.png").stat().st_size > 1000, name
