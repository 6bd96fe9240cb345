"""Kernel environments end to end (issue 5): `noyau run` with a real
ipykernel started by the agent inside the environment noyau-env made.

* a real uv environment with a pinned pure-Python package: the output
  records the spec, lock and hash; running that output again on a clean
  cache rebuilds from the recorded lock and the package list is identical;
* container isolation with real bubblewrap: reading the home directory and
  opening a network connection fail, writing to the notebook's dir works;
* `modules` from noyau.toml with Debian's environment-modules.

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
                       capture_output=True, text=True, env=env, timeout=600)
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
    noyau.toml declares an environment runs in it; `%noyau env show` tells
    what it is, `%noyau env lock` writes noyau.lock, which reproduces it."""
    from jupyter_client.manager import KernelManager

    import noyau_testlib as lib

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
        reply, out = run_cell("%noyau env show")
        assert reply["status"] == "ok" and "six==1.16.0" in out and "lock_sha256" in out, out
        reply, out = run_cell("%noyau env lock")
        assert reply["status"] == "ok", reply
        lock = (tmp_path / "noyau.lock").read_text()
        assert "six==1.16.0" in lock and "--hash=sha256:" in lock, lock
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
