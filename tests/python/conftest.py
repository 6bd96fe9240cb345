"""Session set-up for the end-to-end tests.

* Every Jupyter/IPython/XDG directory points into one temporary directory made
  for this pytest session, so the user's real Jupyter set-up is never read or
  written.  This happens at import time, before jupyter_client is imported.
* The inner kernelspec `python3` (ipykernel, with this venv's absolute python)
  is installed into that directory; so is the noyau kernelspec `noyau-python3`
  (`$NOYAU_BIN install --prefix <tmp>`) when NOYAU_BIN is set.
* The `kernel_name` fixture parametrises a test over "direct" (ipykernel's
  python3) and "noyau". Without NOYAU_BIN the noyau variants are skipped; with
  NOYAU_BIN set (scripts/test always sets it) a failing install fails them.
* At the end, every process still carrying this session's marker in its
  environment is killed and reported, so no run leaks kernels.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

SESSION_ID = f"noyau-test-{uuid.uuid4().hex[:8]}"
TMP = Path(tempfile.mkdtemp(prefix=f"{SESSION_ID}-"))
PREFIX = TMP / "prefix"  # kernelspecs live in PREFIX/share/jupyter/kernels
JUPYTER_PATH = PREFIX / "share" / "jupyter"

for var, sub in {
    "JUPYTER_CONFIG_DIR": "config",
    "JUPYTER_DATA_DIR": "data",
    "JUPYTER_RUNTIME_DIR": "runtime",
    "IPYTHONDIR": "ipython",
    "XDG_CONFIG_HOME": "xdg-config",
    "XDG_DATA_HOME": "xdg-data",
    "XDG_CACHE_HOME": "xdg-cache",
    "XDG_STATE_HOME": "xdg-state",
    "XDG_RUNTIME_DIR": "xdg-runtime",
    "MPLCONFIGDIR": "mpl",
}.items():
    d = TMP / sub
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    os.environ[var] = str(d)
os.environ["JUPYTER_PATH"] = str(JUPYTER_PATH)
os.environ["JUPYTER_PLATFORM_DIRS"] = "1"
os.environ.setdefault("NOYAU_LOG", "info")
os.environ["NOYAU_TEST_SESSION"] = SESSION_ID
# the venv's bin first, so `python`, `jupyter` and ipykernel resolve to it
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

import noyau_testlib as lib  # noqa: E402  (after the environment is set)

NOYAU_BIN = lib.noyau_bin()
require_noyau = lib.require_noyau


def _install_kernelspecs() -> None:
    subprocess.run(
        [sys.executable, "-m", "ipykernel", "install", "--prefix", str(PREFIX),
         "--name", lib.DIRECT_KERNEL_NAME, "--display-name", "Python 3 (direct)"],
        check=True, capture_output=True)
    if not NOYAU_BIN:
        return
    cmd = [NOYAU_BIN, "install", "--name", lib.NOYAU_KERNEL_NAME, "--inner", "python3",
           "--backend", "local", "--prefix", str(PREFIX), "--display-name", "Python 3 (noyau)"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        lib.noyau_install_error = f"{' '.join(cmd)}: {e}"
        return
    spec = JUPYTER_PATH / "kernels" / lib.NOYAU_KERNEL_NAME / "kernel.json"
    if r.returncode != 0 or not spec.is_file():
        lib.noyau_install_error = (f"`{' '.join(cmd)}` exited {r.returncode}, kernel.json "
                                f"{'present' if spec.is_file() else 'missing'}\n"
                                f"stdout: {r.stdout}\nstderr: {r.stderr}")


def _install_slurm_kernelspec() -> None:
    """With the test cluster up: profile `test` (partition debug) in the user config
    file, and the kernelspec `noyau-slurm-python3` that runs python3 through it."""
    if not NOYAU_BIN or not lib.slurm_up():
        return
    cfg = Path(os.environ["XDG_CONFIG_HOME"]) / "noyau" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(lib.SLURM_TEST_CONFIG)
    cmd = [NOYAU_BIN, "install", "--name", lib.SLURM_KERNEL_NAME, "--inner", "python3",
           "--backend", "slurm", "--profile", "test", "--prefix", str(PREFIX),
           "--display-name", "Python 3 (noyau slurm)"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        lib.noyau_install_error = f"`{' '.join(cmd)}` exited {r.returncode}: {r.stderr}"


def _install_sge_kernelspec() -> None:
    """With the Grid Engine test cluster up: profile `sgetest` (queue all.q)
    in the user config file, and the kernelspec `noyau-sge-python3`."""
    if not NOYAU_BIN or not lib.sge_up():
        return
    cfg = Path(os.environ["XDG_CONFIG_HOME"]) / "noyau" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text((cfg.read_text() if cfg.exists() else "") + lib.sge_profile())
    cmd = [NOYAU_BIN, "install", "--name", lib.SGE_KERNEL_NAME, "--inner", "python3",
           "--backend", "sge", "--profile", "sgetest", "--prefix", str(PREFIX),
           "--display-name", "Python 3 (noyau sge)"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        lib.noyau_install_error = f"`{' '.join(cmd)}` exited {r.returncode}: {r.stderr}"


def _install_oar_kernelspec() -> None:
    """With the OAR test cluster up: the kernelspec `noyau-oar-python3`, whose
    launcher runs `noyau kernel --backend oar` as the cluster's test user."""
    if not NOYAU_BIN or not lib.oar_up():
        return
    spec = JUPYTER_PATH / "kernels" / lib.OAR_KERNEL_NAME
    spec.mkdir(parents=True, exist_ok=True)
    launcher = Path(__file__).with_name("oar_user_kernel.py")
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, str(launcher), "{connection_file}", os.environ["NOYAU_OAR_USER"]],
        "display_name": "Python 3 (noyau oar)", "language": "python",
        "interrupt_mode": "message",
        # as `noyau install` writes it: the JupyterLab extension opens its comm on it
        "metadata": {"noyau": {"inner": "python3", "backend": "oar", "profile": None}}}))


def pytest_configure(config: pytest.Config) -> None:
    _install_kernelspecs()
    _install_slurm_kernelspec()
    _install_sge_kernelspec()
    _install_oar_kernelspec()


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"noyau: NOYAU_BIN={NOYAU_BIN or '(unset: noyau variants skipped)'}",
            f"noyau: temporary Jupyter dirs under {TMP}"]


@pytest.fixture(scope="session")
def prefix() -> Path:
    return PREFIX


@pytest.fixture(scope="session")
def noyau_bin() -> str:
    require_noyau()
    assert NOYAU_BIN
    return NOYAU_BIN


@pytest.fixture(scope="session")
def noyau_kernelspec() -> str:
    require_noyau()
    return lib.NOYAU_KERNEL_NAME


@pytest.fixture(params=["direct", "noyau"])
def kernel_name(request: pytest.FixtureRequest) -> str:
    if request.param == "noyau":
        require_noyau()
        return lib.NOYAU_KERNEL_NAME
    return lib.DIRECT_KERNEL_NAME


@pytest.fixture
def tmp_log(tmp_path: Path) -> Path:
    return tmp_path / "kernel-stderr.log"


_SUITE_VARIANT = {"TestDirectKernel": ("direct", "kernel"), "TestDirectWelcome": ("direct", "welcome"),
                  "TestNoyauKernel": ("noyau", "kernel"), "TestNoyauWelcome": ("noyau", "welcome"),
                  "TestNoyauKernelWithComm": ("noyau-comm", "kernel")}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Record test_kernel_suite.py outcomes per variant (checked by its last test).
    Subtest failures arrive here as failed reports of the same node id."""
    parts = report.nodeid.split("::")
    if len(parts) < 3 or parts[-2] not in _SUITE_VARIANT:
        return
    variant, group = _SUITE_VARIANT[parts[-2]]
    table = lib.SUITE_OUTCOMES[variant]
    key = f"{group}::{parts[-1]}"
    if report.failed:
        table[key] = "failed"
    elif report.skipped:
        if table.get(key) != "failed":
            table[key] = "skipped"
    elif report.when == "call" and key not in table:
        table[key] = "passed"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = lib.tagged(lib.SESSION_VAR, SESSION_ID)
    for pid in left:
        lib.kill(pid, signal.SIGKILL)
    if left:
        names = {p: " ".join(lib.cmdline(p))[:120] for p in left}
        sys.stderr.write(f"\nnoyau tests: killed {len(left)} leftover process(es): {names}\n")
    if not os.environ.get("NOYAU_KEEP_TMP"):
        shutil.rmtree(TMP, ignore_errors=True)


@pytest.fixture
def sge():  # type: ignore[no-untyped-def]
    """The Grid Engine test cluster is up; no test may leave a noyau job behind."""
    yield from _no_job_left(lib.CLUSTERS["sge"])


@pytest.fixture
def slurm() -> None:
    """The test cluster is up; no test may leave a noyau job behind for the next one."""
    lib.require_slurm()
    yield
    left = lib.squeue_noyau()
    if left:
        subprocess.run(["scancel", *[j["id"] for j in left]], check=False)
    assert not left, f"noyau jobs left in the queue: {left}"


@pytest.fixture(params=["slurm", "oar", "sge"])
def batch(request: pytest.FixtureRequest) -> lib.Cluster:
    """Each test cluster in turn (a test that runs on every scheduler); no
    test may leave a noyau job behind for the next one."""
    yield from _no_job_left(lib.CLUSTERS[request.param])


@pytest.fixture(params=["slurm", "oar"])
def slurm_or_oar(request: pytest.FixtureRequest) -> lib.Cluster:
    """Slurm, then OAR (the issue 21 checks name these two); no noyau job
    left behind, as `batch`."""
    yield from _no_job_left(lib.CLUSTERS[request.param])


def _no_job_left(cluster: lib.Cluster):  # type: ignore[no-untyped-def]
    """The cluster, once it is up; after the test, no noyau job of it left
    (those left are cancelled, and the test fails)."""
    cluster.require()
    yield cluster
    left = cluster.jobs()
    for j in left:
        cluster.cancel(j["id"])
    assert not left, f"noyau jobs left in the {cluster.name} queue: {left}"
