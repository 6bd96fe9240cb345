"""Kernel environments end to end (issue 5): `noyau run` with a real
ipykernel started by the agent inside the environment noyau-env made.

* a real uv environment with a pinned pure-Python package: the output
  records the spec, lock and hash; running that output again on a clean
  cache rebuilds from the recorded lock and the package list is identical;
* container isolation with real bubblewrap: reading the home directory and
  opening a network connection fail, writing to the notebook's dir works;
* `modules` from noyau.toml with Debian's environment-modules;
* the same `python` environment through the Slurm backend: built inside the
  job into a cache shared with this host, recorded with the same lock as a
  local run;
* `prefix`: an existing venv, recorded by its package list and a hash that
  changes when the venv does.

uv comes from PATH or is installed by noyau itself from PyPI into the cache.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import noyau_testlib as lib
from test_run_noyau import NOYAU, notebook, python3_kernelspec  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(not Path(NOYAU).is_file(), reason=f"no noyau binary at {NOYAU}")

FREEZE = ("import importlib.metadata as m\n"
          "print(sorted(f\"{d.metadata['Name'].lower()}=={d.version}\" for d in m.distributions()))")


def run(tmp: Path, nb: dict, *args: str, cache: Path, name: str = "nb.ipynb") -> tuple[subprocess.CompletedProcess, dict]:
    src = tmp / name
    src.write_text(json.dumps(nb))
    out = tmp / (name + ".out.ipynb")
    env = dict(os.environ, NOYAU_ENV_CACHE=str(cache))
    p = subprocess.run([NOYAU, "run", str(src), str(out), "--no-progress", "--start-timeout", "300", *args],
                       capture_output=True, text=True, env=env, timeout=600, cwd=tmp)
    assert out.exists(), p.stderr
    return p, json.loads(out.read_text())


def text(cell: dict) -> str:
    return "".join("".join(o.get("text", "")) + o.get("evalue", "") for o in cell["outputs"])


def test_uv_environment_recorded_and_rebuilt_from_its_lock_on_a_clean_cache(tmp_path):
    nb = notebook("import six; print(six.__version__)", FREEZE)
    p, out = run(tmp_path, nb, "--env", '{requirements = ["six==1.16.0"]}', cache=tmp_path / "cache1")
    assert p.returncode == 0, p.stderr
    assert "noyau: environment:" in p.stderr  # build progress in the log
    assert text(out["cells"][0]).strip() == "1.16.0"
    env = out["metadata"]["noyau"]["environment"]
    assert env["spec"] == {"kind": "python", "requirements": ["six==1.16.0"]}
    assert "six==1.16.0" in env["lock"] and "--hash=sha256:" in env["lock"]
    import hashlib
    assert env["lock_sha256"] == hashlib.sha256(env["lock"].encode()).hexdigest()

    # Run the output again, on a clean cache: the recorded lock is used.
    p2, out2 = run(tmp_path, out, cache=tmp_path / "cache2", name="again.ipynb")
    assert p2.returncode == 0, p2.stderr
    env2 = out2["metadata"]["noyau"]["environment"]
    assert env2["lock"] == env["lock"] and env2["lock_sha256"] == env["lock_sha256"]
    assert env2["spec"]["lock"] == env["lock"]
    assert text(out2["cells"][1]) == text(out["cells"][1])  # identical package list
    assert env2["freeze"] == env["freeze"]


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap missing (Debian package bubblewrap)")
def test_container_isolation_with_a_real_kernel(tmp_path):
    secret = Path.home() / ".noyau-test-env-secret"
    secret.write_text("secret")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    try:
        raises = {"tags": ["raises-exception"]}
        nb = notebook(
            {"source": f"open({str(secret)!r}).read()", "metadata": raises},
            {"source": f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=3)",
             "metadata": raises},
            "open('written-by-kernel.txt', 'w').write('ok'); print('wrote')",
        )
        p, out = run(tmp_path, nb, "--cwd", str(tmp_path), "--env", '{isolation = "container"}',
                     cache=tmp_path / "cache")
        assert p.returncode == 0, p.stderr
        c0, c1, c2 = out["cells"]
        assert any(o["output_type"] == "error" and o["ename"] == "FileNotFoundError" for o in c0["outputs"]), c0
        assert any(o["output_type"] == "error" for o in c1["outputs"]), c1
        assert "wrote" in text(c2)
        assert (tmp_path / "written-by-kernel.txt").read_text() == "ok"
        assert out["metadata"]["noyau"]["environment"]["spec"]["isolation"] == "container"
    finally:
        secret.unlink()
        srv.close()


@pytest.mark.skipif(not Path("/usr/share/modules/init/bash").exists(),
                    reason="environment-modules missing")
def test_modules_from_noyau_toml_set_the_kernels_environment(tmp_path):
    mf = tmp_path / "modulefiles" / "noyautest"
    mf.mkdir(parents=True)
    (mf / "1.0").write_text("#%Module1.0\nsetenv NOYAU_TEST_MODULE loaded-1.0\n")
    (tmp_path / "noyau.toml").write_text(
        '[environment]\nmodules = ["noyautest/1.0"]\nmodule_use = ["modulefiles"]\n')
    nb = notebook("import os; print(os.environ['NOYAU_TEST_MODULE'])")
    p, out = run(tmp_path, nb, cache=tmp_path / "cache")
    assert p.returncode == 0, p.stderr
    assert text(out["cells"][0]).strip() == "loaded-1.0"
    assert "noyautest/1.0" in out["metadata"]["noyau"]["environment"]["module_list"]


def test_interactive_kernel_in_a_declared_environment_and_env_magics(tmp_path):
    """A notebook kernel (noyau kernelspec) started in a directory whose
    noyau.toml declares an environment runs in it; the first cell shows the
    build's progress lines; `%noyau env show` tells what it is,
    `%noyau env lock` writes noyau.lock, which reproduces it."""
    from jupyter_client.manager import KernelManager

    lib.require_noyau()
    (tmp_path / "noyau.toml").write_text('[environment]\nrequirements = ["six==1.16.0"]\n')
    km = KernelManager(kernel_name=lib.NOYAU_KERNEL_NAME)
    km.start_kernel(cwd=str(tmp_path), env=dict(os.environ, NOYAU_ENV_CACHE=str(tmp_path / "cache")))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=300)

        def run_cell(code: str) -> tuple[dict, str]:
            out: list[dict] = []
            reply = kc.execute_interactive(code, timeout=300, output_hook=out.append)
            return reply["content"], "".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")

        reply, out = run_cell("import six; print(six.__version__)")
        assert reply["status"] == "ok" and out.endswith("1.16.0\n"), (reply, out)
        # The build ran at kernel start, before any cell: its lines were held
        # and shown in this first cell, from the first to the last.
        assert "noyau: environment: building the Python environment" in out, out
        assert "noyau: environment: environment ready" in out, out
        reply, out = run_cell("%noyau env show")
        assert reply["status"] == "ok" and "six==1.16.0" in out and "lock_sha256" in out, out
        reply, out = run_cell("%noyau env lock")
        assert reply["status"] == "ok", reply
        lock = (tmp_path / "noyau.lock").read_text()
        assert "six==1.16.0" in lock and "--hash=sha256:" in lock, lock
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


SIX = '{requirements = ["six==1.16.0"]}'


def test_uv_environment_through_slurm_is_built_in_the_job_and_records_the_local_lock(slurm, tmp_path):
    """`noyau run --backend slurm --env …`: the agent in the batch job builds
    the environment into the cache NOYAU_ENV_CACHE names (exported to the
    job, a directory both sides see), and the output records the same lock,
    hash and package list as a local run of the same spec."""
    nb = notebook("import os, sys, six\nprint(six.__version__, os.environ.get('SLURM_JOB_ID'), sys.prefix)",
                  FREEZE)
    local_dir, slurm_dir = tmp_path / "local", tmp_path / "slurm"
    local_dir.mkdir()
    slurm_dir.mkdir()
    p, local = run(local_dir, nb, "--env", SIX, cache=local_dir / "cache")
    assert p.returncode == 0, p.stderr

    shared = slurm_dir / "shared-cache"
    p, out = run(slurm_dir, nb, "--backend", "slurm", "--profile", "test", "--env", SIX, cache=shared)
    assert p.returncode == 0, p.stderr
    assert "noyau: environment:" in p.stderr  # the job's build progress reached the runner
    meta = out["metadata"]["noyau"]
    assert meta["backend"] == "slurm" and meta["job_id"].isdigit(), meta
    version, job_id, prefix = text(out["cells"][0]).split()
    assert version == "1.16.0" and job_id == meta["job_id"]
    # the kernel ran in the environment built in the job, in the shared cache
    assert Path(prefix).resolve().is_relative_to(shared.resolve()), prefix
    built = [d for d in shared.iterdir() if (d / "noyau-env.json").is_file()]
    assert len(built) == 1 and Path(prefix).resolve() == (built[0] / "venv").resolve(), (built, prefix)

    env, lenv = meta["environment"], local["metadata"]["noyau"]["environment"]
    assert env["spec"] == lenv["spec"] == {"kind": "python", "requirements": ["six==1.16.0"]}
    assert env["lock"] == lenv["lock"] and env["lock_sha256"] == lenv["lock_sha256"]
    assert env["freeze"] == lenv["freeze"]
    assert text(out["cells"][1]) == text(local["cells"][1])  # identical package list in both kernels
    lib.wait_until(lambda: not lib.squeue_noyau(), 30, "the run's job to leave the queue", 0.5)


def test_prefix_environment_records_its_packages_and_hash_which_follow_the_prefix(tmp_path):
    """`prefix`: an existing venv (made here, with ipykernel and six) is the
    kernel's environment; the record lists its packages and their hash;
    installing another six into it changes both."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "ipykernel", "six==1.16.0"], check=True, capture_output=True, timeout=600)
    spec = json.dumps({"prefix": str(venv)})
    nb = notebook("import sys, six; print(sys.prefix, six.__version__)")

    p, out = run(tmp_path, nb, "--env", spec, cache=tmp_path / "cache")
    assert p.returncode == 0, p.stderr
    assert text(out["cells"][0]).split() == [str(venv), "1.16.0"]
    rec = out["metadata"]["noyau"]["environment"]
    assert rec["kind"] == "prefix" and rec["prefix"] == str(venv)
    assert rec["spec"] == {"kind": "prefix", "prefix": str(venv)}
    assert "six==1.16.0" in rec["packages"]
    assert any(x.startswith("ipykernel==") for x in rec["packages"]), rec["packages"]
    import hashlib
    assert rec["packages_sha256"] == hashlib.sha256("\n".join(rec["packages"]).encode()).hexdigest()

    subprocess.run([*pip, "six==1.17.0"], check=True, capture_output=True, timeout=600)
    p2, out2 = run(tmp_path, nb, "--env", spec, cache=tmp_path / "cache", name="again.ipynb")
    assert p2.returncode == 0, p2.stderr
    assert text(out2["cells"][0]).split() == [str(venv), "1.17.0"]
    rec2 = out2["metadata"]["noyau"]["environment"]
    assert "six==1.17.0" in rec2["packages"] and "six==1.16.0" not in rec2["packages"]
    assert rec2["packages_sha256"] != rec["packages_sha256"]
