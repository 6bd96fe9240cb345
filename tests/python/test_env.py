"""Kernel environments end to end (issue 5): `noyau run` with a real
ipykernel started by the agent inside the environment noyau-env made.

* a real uv environment with a pinned pure-Python package: the output
  records the spec, lock and hash; running that output again on a clean
  cache rebuilds from the recorded lock and the package list is identical;
* container isolation with real bubblewrap: reading the home directory and
  opening a network connection fail, writing to the notebook's dir works;
  a notebook's metadata cannot switch it off or open it up;
* `modules` from noyau.toml with Debian's environment-modules;
* the same `python` environment through the Slurm backend: built on this
  host before the job is submitted, into a cache shared with the job,
  recorded with the same lock as a local run;
* `prefix`: an existing venv, recorded by its package list and a hash that
  changes when the venv does.

uv comes from PATH or is installed by noyau itself from PyPI into the cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import noyau_testlib as lib
from test_run_noyau import NOYAU, notebook, python3_kernelspec  # noqa: F401  (fixture)


@pytest.fixture(autouse=True)
def _noyau_binary() -> None:
    if not Path(NOYAU).is_file():
        lib.missing(f"no noyau binary at {NOYAU}")


@pytest.fixture
def bwrap() -> None:
    if shutil.which("bwrap") is None:
        lib.missing("bwrap is missing (Debian package bubblewrap; scripts/test installs it)")


@pytest.fixture
def modules() -> None:
    if not Path("/usr/share/modules/init/bash").exists():
        lib.missing("environment-modules is missing (Debian package; scripts/test installs it)")


FREEZE = ("import importlib.metadata as m\n"
          "print(sorted(f\"{d.metadata['Name'].lower()}=={d.version}\" for d in m.distributions()))")


def run_only(tmp: Path, nb: dict, *args: str, cache: Path, name: str = "nb.ipynb",
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    src = tmp / name
    src.write_text(json.dumps(nb))
    out = tmp / (name + ".out.ipynb")
    env = dict(os.environ, NOYAU_ENV_CACHE=str(cache), **(env or {}))
    return subprocess.run([NOYAU, "run", str(src), str(out), "--no-progress", "--start-timeout", "300", *args],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp)


def run(tmp: Path, nb: dict, *args: str, cache: Path, name: str = "nb.ipynb",
        env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    p = run_only(tmp, nb, *args, cache=cache, name=name, env=env)
    out = tmp / (name + ".out.ipynb")
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


@contextlib.contextmanager
def secret_and_listener(name: str):  # type: ignore[no-untyped-def]
    """A secret file in the home and a listening port on the host, which a
    sandboxed kernel must reach neither of: (the secret's path, the port)."""
    secret = Path.home() / name
    secret.write_text("secret")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    try:
        yield secret, srv.getsockname()[1]
    finally:
        secret.unlink()
        srv.close()


def sandbox_probes(secret: Path, port: int) -> list[dict]:
    """Cells reading the secret and dialling the port, each expected to raise."""
    raises = {"tags": ["raises-exception"]}
    return [{"source": f"open({str(secret)!r}).read()", "metadata": raises},
            {"source": f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=3)",
             "metadata": raises}]


def test_container_isolation_with_a_real_kernel(bwrap, tmp_path):
    with secret_and_listener(".noyau-test-env-secret") as (secret, port):
        nb = notebook(*sandbox_probes(secret, port),
                      "open('written-by-kernel.txt', 'w').write('ok'); print('wrote')")
        p, out = run(tmp_path, nb, "--cwd", str(tmp_path), "--env", '{isolation = "container"}',
                     cache=tmp_path / "cache")
        assert p.returncode == 0, p.stderr
        c0, c1, c2 = out["cells"]
        assert any(o["output_type"] == "error" and o["ename"] == "FileNotFoundError" for o in c0["outputs"]), c0
        assert any(o["output_type"] == "error" for o in c1["outputs"]), c1
        assert "wrote" in text(c2)
        assert (tmp_path / "written-by-kernel.txt").read_text() == "ok"
        assert out["metadata"]["noyau"]["environment"]["spec"]["isolation"] == "container"


def test_a_notebook_cannot_open_its_own_sandbox(bwrap, tmp_path):
    """A notebook from someone else, run by a user whose noyau.toml asks for
    isolation, carries metadata switching it off, opening the network and
    mounting the home writable: all ignored (said on stderr), the home and
    the network stay out of its reach."""
    with secret_and_listener(".noyau-test-env-secret-meta") as (secret, port):
        (tmp_path / "noyau.toml").write_text('[environment]\nisolation = "container"\n')
        hostile = {"kind": "system", "isolation": "none", "network": True,
                   "scratch": str(Path.home()), "ro_bind": [str(secret)]}
        nb = notebook(*sandbox_probes(secret, port), metadata={"noyau": {"environment": hostile}})
        p, out = run(tmp_path, nb, "--cwd", str(tmp_path), cache=tmp_path / "cache")
        assert p.returncode == 0, p.stderr
        c0, c1 = out["cells"]
        assert any(o["output_type"] == "error" and o["ename"] == "FileNotFoundError" for o in c0["outputs"]), c0
        assert any(o["output_type"] == "error" for o in c1["outputs"]), c1
        assert "ignoring isolation, network, scratch, ro_bind" in p.stderr, p.stderr
        assert out["metadata"]["noyau"]["environment"]["spec"]["isolation"] == "container"


def test_an_isolated_kernel_is_interrupted_and_sees_no_host_process(bwrap, tmp_path):
    """An interactive kernel under bubblewrap (its own PID namespace and
    session, so SIGINT to the agent's process group no longer reaches it):
    an interrupt still ends a `time.sleep(60)` cell within 5 s, and the
    kernel goes on; its /proc shows only the sandbox."""
    lib.require_noyau()
    km = lib.kernel_in(lib.NOYAU_KERNEL_NAME, tmp_path, env={"NOYAU_ENV": '{isolation = "container"}'})
    kc = km.kc
    try:
        reply = kc.execute_interactive("import os; print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))",
                                       timeout=60, output_hook=lambda m: None)
        assert reply["content"]["status"] == "ok", reply["content"]
        out: list[str] = []
        kc.execute_interactive("import os; print(len([p for p in os.listdir('/proc') if p.isdigit()]))",
                               timeout=60, output_hook=lambda m: out.append(lib.message_text(m)))
        assert int("".join(out).split()[-1]) <= 5, out  # bwrap's init, the kernel and its threads' helpers
        msg_id = kc.execute("import time\nprint('sleeping', flush=True)\ntime.sleep(60)")
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, "the cell never started"
            m = kc.get_iopub_msg(timeout=60)
            if m["parent_header"].get("msg_id") == msg_id and "sleeping" in lib.message_text(m):
                break
        t0 = time.monotonic()
        km.interrupt_kernel()
        while True:
            left = t0 + 5 - time.monotonic()
            assert left > 0, "the interrupt did not end the cell within 5 s"
            m = kc.get_shell_msg(timeout=left)
            if m["parent_header"].get("msg_id") == msg_id:
                break
        assert m["content"]["status"] == "error" and m["content"]["ename"] == "KeyboardInterrupt", m["content"]
        reply = kc.execute_interactive("print('alive')", timeout=30, output_hook=lambda m: None)
        assert reply["content"]["status"] == "ok"
    finally:
        lib.stop_kernel(km)


def test_modules_from_noyau_toml_set_the_kernels_environment(modules, tmp_path):
    mf = tmp_path / "modulefiles" / "noyautest"
    mf.mkdir(parents=True)
    (mf / "1.0").write_text("#%Module1.0\nsetenv NOYAU_TEST_MODULE loaded-1.0\n")
    (tmp_path / "noyau.toml").write_text(
        '[environment]\nmodules = ["noyautest/1.0"]\nmodule_use = ["modulefiles"]\n')
    nb = notebook("import os; print(os.environ['NOYAU_TEST_MODULE'])")
    # (module_use runs modulefiles while the environment is prepared: only
    # from a project the user trusts)
    p, out = run(tmp_path, nb, cache=tmp_path / "cache", env=lib.trusting(tmp_path))
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


def test_uv_environment_through_slurm_is_built_before_submission_and_records_the_local_lock(slurm, tmp_path):
    """`noyau run --backend slurm --env …`: the environment is built on this
    (the submitting) host into the cache NOYAU_ENV_CACHE names (exported to
    the job, a directory both sides see), the batch job's agent uses it, and
    the output records the same lock, hash and package list as a local run
    of the same spec."""
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
    assert "noyau: environment:" in p.stderr  # the build's progress, shown by the runner
    meta = out["metadata"]["noyau"]
    assert meta["backend"] == "slurm" and meta["job_id"].isdigit(), meta
    version, job_id, prefix = text(out["cells"][0]).split()
    assert version == "1.16.0" and job_id == meta["job_id"]
    # the kernel ran in the environment built before submission, in the shared cache
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


def test_env_magic_restarts_an_interactive_kernel_in_a_new_environment(tmp_path):
    """A notebook kernel started with no environment; `%noyau env python
    six==1.16.0` (the proxy answers it, the inner kernel never sees it)
    builds the environment with uv on the proxy's host, its progress lines
    in the cell, and the agent restarts the kernel in it: a cell sent right behind the
    magic (held meanwhile) imports six from the cache. A spec uv cannot
    resolve shows uv's message and leaves that kernel running, state kept,
    and nothing half-built in the cache; a malformed spec is refused at once.
    A restart afterwards keeps the chosen environment."""
    lib.require_noyau()
    cache = tmp_path / "cache"
    km = lib.kernel_in(lib.NOYAU_KERNEL_NAME, tmp_path, env={"NOYAU_ENV_CACHE": str(cache)})
    kc = km.kc

    def collect(msg_id: str, timeout: float = 300) -> tuple[dict, str, list[dict]]:
        deadline = time.monotonic() + timeout
        reply = None
        while reply is None:
            assert time.monotonic() < deadline, f"no reply to {msg_id}"
            try:
                m = kc.get_shell_msg(timeout=1)
            except queue.Empty:
                continue
            if m["parent_header"].get("msg_id") == msg_id:
                reply = m["content"]
        msgs: list[dict] = []
        while not (msgs and lib.is_idle(msgs[-1])):
            assert time.monotonic() < deadline, f"no idle for {msg_id}: {[m['msg_type'] for m in msgs]}"
            try:
                m = kc.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            if m["parent_header"].get("msg_id") == msg_id:
                msgs.append(m)
        return reply, "".join(lib.message_text(m) for m in msgs), msgs

    def run_cell(code: str) -> tuple[dict, str]:
        reply, text, _ = collect(kc.execute(code))
        return reply, text

    try:
        reply, out = run_cell("import sys; before = 1; print(sys.prefix)")
        assert reply["status"] == "ok", reply
        assert not out.strip().startswith(str(cache)), out

        # A comm message gets no reply: it must not keep the switch waiting.
        kc.shell_channel.send(kc.session.msg("comm_open", {"comm_id": "c1", "target_name": "none", "data": {}}))
        # The magic and the next cell are sent together, as a frontend does.
        magic = kc.execute("%noyau env python six==1.16.0")
        after = kc.execute("import six, sys; print(six.__version__, sys.prefix, 'before' in globals())")
        reply, out, msgs = collect(magic)
        assert reply["status"] == "ok", (reply, out)
        assert not any(m["msg_type"] == "execute_input" for m in msgs), "the inner kernel saw the magic"
        assert "noyau: environment: resolving" in out, out  # progress lines in the cell
        assert "the kernel restarted in its new environment" in out, out
        reply, out, _ = collect(after)
        assert reply["status"] == "ok", (reply, out)
        version, prefix, kept = out.split()
        assert version == "1.16.0" and kept == "False", out  # a new kernel
        assert Path(prefix).resolve().is_relative_to(cache.resolve()), prefix

        reply, out = run_cell("%noyau env show")
        assert reply["status"] == "ok" and "six==1.16.0" in out and "lock_sha256" in out, out

        # A spec uv cannot resolve: uv's own message, and the kernel stays.
        reply, out = run_cell("state = 42")
        assert reply["status"] == "ok"
        entries = sorted(p.name for p in cache.iterdir())
        reply, out = run_cell("%noyau env noyau-no-such-package-xyz==0.0.1")
        assert reply["status"] == "error" and reply["ename"] == "NoyauEnvError", reply
        assert "noyau-no-such-package-xyz" in out and "could not resolve" in out, out
        assert "runs on in its previous environment" in out, out
        reply, out = run_cell("print(state, six.__version__)")
        assert reply["status"] == "ok" and out.strip() == "42 1.16.0", (reply, out)
        left = sorted(p.name for p in cache.iterdir())
        assert [n for n in left if n not in entries and not n.endswith(".lock")] == [], left

        # A malformed spec is refused before anything is built.
        reply, out = run_cell("%noyau env prefix")
        assert reply["status"] == "error" and "takes one prefix" in out, out
        reply, out = run_cell("print(state)")
        assert out.strip() == "42", out

        # A frontend restart keeps the chosen environment (the agent is
        # handed to the next proxy, which learns what it runs in).
        km.restart_kernel()
        kc.wait_for_ready(timeout=60)
        reply, out = run_cell("import six, sys; print(six.__version__, sys.prefix, 'state' in globals())")
        assert reply["status"] == "ok" and out.split() == ["1.16.0", prefix, "False"], (reply, out)
        reply, out = run_cell("%noyau env show")
        assert reply["status"] == "ok" and "six==1.16.0" in out, out
    finally:
        lib.stop_kernel(km)


def test_eight_runs_asking_for_the_same_new_environment_at_once_build_it_once(tmp_path):
    """8 `noyau run`s (8 agents, 8 real kernels) started together with the
    same new environment on one clean cache: every agent finds it missing
    and asks for it, exactly one builds it (uv's own "Creating virtual
    environment" line appears in one run's log; the other 7 say they used
    what another job built), and all 8 kernels run their cell in that one
    entry, recording the same build id."""
    cache = tmp_path / "cache"
    nb = notebook("import six, sys; print(six.__version__, sys.prefix)")
    env = dict(os.environ, NOYAU_ENV_CACHE=str(cache))
    runs = []
    for i in range(8):
        d = tmp_path / f"run{i}"
        d.mkdir()
        (d / "nb.ipynb").write_text(json.dumps(nb))
        log = open(d / "stderr.log", "w")
        p = subprocess.Popen([NOYAU, "run", "nb.ipynb", "out.ipynb", "--no-progress", "--start-timeout", "300",
                              "--env", SIX], cwd=d, env=env, stdout=subprocess.DEVNULL, stderr=log)
        runs.append((d, p, log))
    try:
        for d, p, log in runs:
            assert p.wait(timeout=300) == 0, (d / "stderr.log").read_text()[-3000:]
    finally:
        for _, p, log in runs:
            if p.poll() is None:
                p.kill()
            log.close()

    logs = [(d / "stderr.log").read_text() for d, _, _ in runs]
    outs = [json.loads((d / "out.ipynb").read_text()) for d, _, _ in runs]
    asked = [log for log in logs if "noyau: environment: building the Python environment py-" in log]
    built = [i for i, log in enumerate(logs) if "Creating virtual environment at:" in log]
    waited = [i for i, log in enumerate(logs)
              if any("was built by another job meanwhile" in line and " py-" in line for line in log.splitlines())]
    assert len(asked) == 8, f"only {len(asked)} of 8 runs found the environment missing (not at once)"
    assert len(built) == 1, f"the environment was built by runs {built}"
    assert sorted(built + waited) == list(range(8)), (built, waited)

    entries = [e for e in cache.iterdir() if (e / "noyau-env.json").is_file()]
    assert len(entries) == 1, entries
    record = json.loads((entries[0] / "noyau-env.json").read_text())
    for out in outs:
        version, prefix = text(out["cells"][0]).split()
        assert version == "1.16.0"
        assert Path(prefix).resolve() == (entries[0] / "venv").resolve(), prefix
        assert out["metadata"]["noyau"]["environment"]["build_id"] == record["build_id"]
    assert not [e.name for e in cache.iterdir() if e.name.startswith(".tmp-")]


def test_env_magic_in_a_headless_run_says_where_a_run_takes_its_environment(tmp_path):
    """`noyau run` cannot restart its kernel from a cell: a `%noyau env SPEC`
    cell fails with a message naming what a run reads instead."""
    p, out = run(tmp_path, notebook("%noyau env six==1.16.0", "print('not reached')"), cache=tmp_path / "cache")
    assert p.returncode != 0
    cell = next(c for c in out["cells"] if c["cell_type"] == "code")  # after papermill's error marker
    err = [o for o in cell["outputs"] if o["output_type"] == "error"]
    assert err and err[0]["ename"] == "NoyauMagicError" and "--env" in err[0]["evalue"], cell
    assert not (tmp_path / "cache").exists()  # nothing was built


def refused_untrusted(p: subprocess.CompletedProcess, key: str, project: Path, xdg: Path) -> None:
    """`p` failed saying `key` would run code outside the sandbox, and how
    to trust `project` (in the user's config file under `xdg`)."""
    err = p.stderr
    assert p.returncode != 0, err[-3000:]
    assert f"sets `{key}`" in err and "outside the sandbox" in err, err[-3000:]
    assert f'trusted_projects = ["{project.resolve()}"]' in err, err[-3000:]
    assert f"noyau trust {project.resolve()}" in err, err[-3000:]
    assert str(xdg / "noyau" / "config.toml") in err and "--env" in err, err[-3000:]


def test_a_cloned_projects_noyau_toml_cannot_run_an_interpreter_while_preparing(tmp_path):
    """A project the user cloned (its noyau.toml is theirs, so it is read)
    names an interpreter by path: `uv venv --python` would run it on this
    host, outside any sandbox, before any cell. Refused, nothing run, the
    message naming the key and how to trust the project; once the user
    trusts the directory, the interpreter is run (it writes its marker)."""
    marker = tmp_path / "ran"
    evil = tmp_path / "evil-python"
    evil.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    evil.chmod(0o755)
    (tmp_path / "noyau.toml").write_text(f'[environment]\npython = "{evil}"\n'
                                         'isolation = "container"\n')
    nb = notebook("print('not reached')")
    xdg = tmp_path / "xdg"
    p = run_only(tmp_path, nb, cache=tmp_path / "cache", env={"XDG_CONFIG_HOME": str(xdg)})
    refused_untrusted(p, "python", tmp_path, xdg)
    assert "noyau.toml" in p.stderr, p.stderr[-3000:]
    assert not marker.exists()
    # The site's trusted_projects lets the file be read, not name code:
    # only the user's own file trusts a project's code.
    site = tmp_path / "site.toml"
    site.write_text(f'trusted_projects = ["{tmp_path.parent.resolve()}/*"]\n')
    p = run_only(tmp_path, nb, cache=tmp_path / "cache",
                 env={"XDG_CONFIG_HOME": str(xdg), "NOYAU_SYSTEM_CONFIG": str(site)})
    refused_untrusted(p, "python", tmp_path, xdg)
    assert "The site's trusted_projects entry" in p.stderr, p.stderr[-3000:]
    assert not marker.exists()
    # `noyau trust DIR` (what the message suggests) trusts it.
    env = dict(os.environ, XDG_CONFIG_HOME=str(xdg))
    t = subprocess.run([NOYAU, "trust", str(tmp_path)], capture_output=True, text=True, env=env, timeout=60)
    assert t.returncode == 0 and "trusted" in t.stdout, t.stderr
    p = run_only(tmp_path, nb, cache=tmp_path / "cache", env={"XDG_CONFIG_HOME": str(xdg)})
    assert p.returncode != 0 and "sets `python`" not in p.stderr, p.stderr[-3000:]
    assert marker.exists(), p.stderr[-3000:]


def test_a_notebooks_metadata_cannot_load_modulefiles_of_its_choice(modules, tmp_path):
    """A notebook's metadata names a modulefile directory (`module_use`)
    whose modulefile runs a command: refused before the modules check runs
    it; run by the modules check once the notebook's directory is trusted."""
    marker = tmp_path / "ran"
    mf = tmp_path / "mf" / "evil"
    mf.mkdir(parents=True)
    (mf / "1.0").write_text(f'#%Module1.0\nsystem "touch {marker}"\n')
    nb = notebook("print('ran')", metadata={"noyau": {"environment": {
        "modules": ["evil/1.0"], "module_use": [str(tmp_path / "mf")]}}})
    xdg = tmp_path / "xdg"
    p = run_only(tmp_path, nb, cache=tmp_path / "cache", env={"XDG_CONFIG_HOME": str(xdg)})
    refused_untrusted(p, "module_use", tmp_path, xdg)
    assert "metadata" in p.stderr, p.stderr[-3000:]
    assert not marker.exists()
    # A module by path (`module load /x/mf`) is the same.
    nb["metadata"]["noyau"]["environment"] = {"modules": [str(mf / "1.0")]}
    p = run_only(tmp_path, nb, cache=tmp_path / "cache", env={"XDG_CONFIG_HOME": str(xdg)})
    refused_untrusted(p, "modules", tmp_path, xdg)
    assert not marker.exists()
    p, out = run(tmp_path, nb, cache=tmp_path / "cache", env=lib.trusting(tmp_path, xdg))
    assert p.returncode == 0, p.stderr[-3000:]
    assert marker.exists()


def test_a_cell_cannot_switch_off_the_isolation_of_an_interactive_kernel(bwrap, tmp_path):
    """An interactive kernel started with isolation (its NOYAU_ENV, the
    user's): a cell's `%noyau env … isolation=none` is refused with the
    reason, and the kernel stays in its sandbox (the home's secret is
    still out of reach)."""
    lib.require_noyau()
    with secret_and_listener(".noyau-test-env-secret-cell") as (secret, _):
        km = lib.kernel_in(lib.NOYAU_KERNEL_NAME, tmp_path,
                           env={"NOYAU_ENV_CACHE": str(tmp_path / "cache"),
                                "NOYAU_ENV": '{isolation = "container"}'})
        kc = km.kc

        def run_cell(code: str) -> tuple[dict, str]:
            out: list[dict] = []
            reply = kc.execute_interactive(code, timeout=120, output_hook=out.append)
            return reply["content"], "".join(lib.message_text(m) for m in out)

        try:
            probe = f"import os; print(os.path.exists({str(secret)!r}))"
            reply, out = run_cell(probe)
            assert reply["status"] == "ok" and out.strip().endswith("False"), (reply, out)
            for magic in ["%noyau env system isolation=none", "%noyau env {isolation = 'none'}",
                          "%noyau env six==1.16.0 network=true"]:
                reply, out = run_cell(magic)
                assert reply["status"] == "error", (magic, reply, out)
                assert "may not set" in out and "own sandbox" in out, (magic, out)
            reply, out = run_cell(probe)
            assert reply["status"] == "ok" and out.strip() == "False", (reply, out)
        finally:
            lib.stop_kernel(km)


def test_opening_a_cloned_projects_notebook_runs_nothing_and_says_why(tmp_path):
    """Opening a notebook in JupyterLab starts its kernel, which prepares
    ./noyau.toml's environment before any cell: a cloned project naming an
    interpreter by path gets a kernel that runs nothing, starts no job, and
    answers (its banner, each cell) with the reason and what to do, rather
    than dying without a word."""
    lib.require_noyau()
    marker = tmp_path / "ran"
    evil = tmp_path / "evil-python"
    evil.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    evil.chmod(0o755)
    (tmp_path / "noyau.toml").write_text(f'[environment]\npython = "{evil}"\n')
    xdg = tmp_path / "xdg"
    km = lib.kernel_in(lib.NOYAU_KERNEL_NAME, tmp_path,
                       env={"NOYAU_ENV_CACHE": str(tmp_path / "cache"), "XDG_CONFIG_HOME": str(xdg)})
    kc = km.kc
    try:
        info = kc.kernel_info(reply=True, timeout=30)["content"]
        assert "sets `python`" in info["banner"], info
        for _ in range(2):  # every cell, not only the first
            out: list[dict] = []
            reply = kc.execute_interactive("print('ran')", timeout=30, output_hook=out.append)["content"]
            said = "".join(lib.message_text(m) for m in out)
            assert reply["status"] == "error" and reply["ename"] == "NoyauEnvError", reply
            assert "sets `python`" in said and "outside the sandbox" in said, said
            assert f'trusted_projects = ["{tmp_path.resolve()}"]' in said, said
            assert str(xdg / "noyau" / "config.toml") in said and "ran\n" not in said, said
        assert not marker.exists()
    finally:
        lib.stop_kernel(km)


def test_a_notebook_cannot_have_noyau_read_a_file_outside_its_directory(tmp_path):
    """A cloned project's noyau.toml names as its lock_file, and a cell names
    with `%noyau env file`, a file of the user's outside the project's
    directory (here a git credential, which is neither a lock nor TOML).
    noyau would read it on this host and quote it in the refusal, which
    the kernel shows in its banner and each cell's error (and an output
    notebook keeps). Refused without reading it: the banner and the cell
    say why and what to do, and the secret appears nowhere."""
    lib.require_noyau()
    secret = "ghp_noyauTestSecret0123456789"
    creds = tmp_path / "git-credentials"
    creds.write_text(f"https://user:{secret}@git.example\n")
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "noyau.toml").write_text('[environment]\nkind = "python"\nlock_file = "../git-credentials"\n')
    env = {"NOYAU_ENV_CACHE": str(tmp_path / "cache"), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}

    def says_why(text: str) -> None:
        assert secret not in text, text
        assert "may name only files in its own directory" in text, text
        assert "Copy the file into that directory" in text and "--env FILE" in text, text

    km = lib.kernel_in(lib.NOYAU_KERNEL_NAME, proj, env=env)
    try:
        info = km.kc.kernel_info(reply=True, timeout=30)["content"]
        says_why(info["banner"])
        assert "lock_file" in info["banner"], info
        out: list[dict] = []
        reply = km.kc.execute_interactive("print('ran')", timeout=30, output_hook=out.append)["content"]
        assert reply["status"] == "error", reply
        says_why("".join(lib.message_text(m) for m in out))
    finally:
        lib.stop_kernel(km)
    (proj / "noyau.toml").unlink()
    km = lib.kernel_in(lib.NOYAU_KERNEL_NAME, proj, env=env)
    try:
        for magic in ["%noyau env file ../git-credentials", f"%noyau env file {creds}"]:
            out = []
            reply = km.kc.execute_interactive(magic, timeout=60, output_hook=out.append)["content"]
            assert reply["status"] == "error", (magic, reply)
            says_why("".join(lib.message_text(m) for m in out))
    finally:
        lib.stop_kernel(km)


def test_a_cloned_projects_profile_cannot_set_the_agents_variables(tmp_path):
    """A cloned project's noyau.toml profile sets variables for the local
    agent and its kernel (here PYTHONPATH to a sitecustomize.py of the
    project's: code run outside any sandbox). An untrusted project may
    choose resources, not this: refused before anything starts, naming the
    key, the file and how to trust it; once trusted, the variable is set
    (the code runs and writes its marker)."""
    marker = tmp_path / "ran"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (tmp_path / "noyau.toml").write_text('[profiles.side]\nbackend = "local"\ncpus_per_task = 2\n'
                                         f'env = {{ PYTHONPATH = "{evil}" }}\n')
    nb = notebook("print('reached')")
    xdg = tmp_path / "xdg"
    p = run_only(tmp_path, nb, "--profile", "side", cache=tmp_path / "cache",
                 env={"XDG_CONFIG_HOME": str(xdg)})
    err = p.stderr
    assert p.returncode != 0, err[-3000:]
    assert "[profiles.side] env (line 4, column 1)" in err and "LD_PRELOAD" in err, err[-3000:]
    assert f"noyau trust {tmp_path.resolve()}" in err, err[-3000:]
    assert str(xdg / "noyau" / "config.toml") in err, err[-3000:]
    assert not marker.exists()
    # A project may still say what it needs: the same profile without `env`.
    (tmp_path / "noyau.toml").write_text('[profiles.side]\nbackend = "local"\ncpus_per_task = 2\n')
    p, out = run(tmp_path, nb, "--profile", "side", cache=tmp_path / "cache", env={"XDG_CONFIG_HOME": str(xdg)})
    assert p.returncode == 0 and "reached" in text(out["cells"][0]), p.stderr[-3000:]
    assert not marker.exists()
    (tmp_path / "noyau.toml").write_text('[profiles.side]\nbackend = "local"\ncpus_per_task = 2\n'
                                         f'env = {{ PYTHONPATH = "{evil}" }}\n')
    env = dict(os.environ, XDG_CONFIG_HOME=str(xdg))
    t = subprocess.run([NOYAU, "trust", str(tmp_path)], capture_output=True, text=True, env=env, timeout=60)
    assert t.returncode == 0, t.stderr
    p, out = run(tmp_path, nb, "--profile", "side", cache=tmp_path / "cache", env={"XDG_CONFIG_HOME": str(xdg)})
    assert p.returncode == 0 and "reached" in text(out["cells"][0]), p.stderr[-3000:]
    assert marker.exists(), p.stderr[-3000:]


def test_a_cloned_projects_profile_with_code_is_refused_only_when_used(tmp_path, prefix):
    """A project's noyau.toml whose directory is not trusted, with a profile
    that sets `env` (code for the agent) and one that does not: a kernel
    started with the first stays up and answers kernel_info and every cell
    with the reason, and runs nothing (not a dead kernel, the reason only in
    the server's log); a kernel with the other profile, and `noyau ps`, work
    there as before (the refusal was raised for the whole file)."""
    lib.require_noyau()
    marker = tmp_path / "ran"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (tmp_path / "noyau.toml").write_text(
        'scheduler = "slurm"\n'
        f'[profiles.side]\nbackend = "local"\nenv = {{ PYTHONPATH = "{evil}" }}\n'
        '[profiles.plain]\nbackend = "local"\ncpus_per_task = 1\n')
    xdg = tmp_path / "xdg"
    env = {"NOYAU_ENV_CACHE": str(tmp_path / "cache"), "XDG_CONFIG_HOME": str(xdg)}
    for profile in ["side", "plain"]:
        subprocess.run([NOYAU, "install", "--name", f"noyau-profrefuse-{profile}", "--inner", "python3",
                        "--backend", "local", "--profile", profile, "--prefix", str(prefix)],
                       check=True, capture_output=True, timeout=60)

    def run_cell(kc, code: str) -> tuple[dict, str]:  # type: ignore[no-untyped-def]
        out: list[dict] = []
        reply = kc.execute_interactive(code, timeout=120, output_hook=out.append)["content"]
        return reply, "".join(lib.message_text(m) for m in out)

    km = lib.kernel_in("noyau-profrefuse-side", tmp_path, env=env)
    try:
        info = km.kc.kernel_info(reply=True, timeout=30)["content"]
        assert "[profiles.side] env (line 4, column 1)" in info["banner"], info
        for _ in range(2):  # every cell, not only the first
            reply, said = run_cell(km.kc, "print('ran')")
            assert reply["status"] == "error" and reply["ename"] == "NoyauEnvError", reply
            assert "[profiles.side] env" in said and f"noyau trust {tmp_path.resolve()}" in said, said
            assert "restart the kernel" in said and "ran\n" not in said, said
        assert km.is_alive()
    finally:
        lib.stop_kernel(km)
    assert not marker.exists()
    km = lib.kernel_in("noyau-profrefuse-plain", tmp_path, env=env)
    try:
        reply, said = run_cell(km.kc, "print('ran', 6 * 7)")
        assert reply["status"] == "ok" and "ran 42" in said, (reply, said)
    finally:
        lib.stop_kernel(km)
    assert not marker.exists()
    # A command that uses no profile: it asks the scheduler (the test Slurm,
    # when up), never refuses the file.
    p = subprocess.run([NOYAU, "ps"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, **env))
    assert "[profiles.side]" not in p.stderr and "noyau trust" not in p.stderr, p.stderr
    assert p.returncode == 0 or "listing your Slurm jobs" in p.stderr, p.stderr


def test_a_refused_kernel_writes_its_last_replies_before_it_exits(tmp_path, prefix):
    """A refused kernel (its profile cannot be used) ends at the frontend's
    shutdown_request. A proxy's ROUTER replies are queued and written by
    background tasks, which the process's exit would drop: the proxy waits
    for them before it exits. Here the frontend has not yet read many
    replies on shell (they fill the connection) when it asks for the
    shutdown: the shutdown_reply comes, then every shell reply, each time
    (a few rounds), and the process exits."""
    import zmq
    lib.require_noyau()
    (tmp_path / "noyau.toml").write_text(
        f'[profiles.side]\nbackend = "local"\nenv = {{ PYTHONPATH = "{tmp_path}" }}\n')
    env = {"NOYAU_ENV_CACHE": str(tmp_path / "cache"), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    subprocess.run([NOYAU, "install", "--name", "noyau-shutrefuse", "--inner", "python3",
                    "--backend", "local", "--profile", "side", "--prefix", str(prefix)],
                   check=True, capture_output=True, timeout=60)
    for attempt in range(3):
        km = lib.kernel_in("noyau-shutrefuse", tmp_path, env=env)
        shell = zmq.Context.instance().socket(zmq.DEALER)
        try:
            unread = requests_left_unread(km, shell)
            msg_id = km.kc.shutdown()
            reply = km.kc.get_control_msg(timeout=30)
            assert (reply["parent_header"]["msg_id"], reply["msg_type"]) == (msg_id, "shutdown_reply"), reply
            for want in unread:
                assert shell.poll(30_000), f"round {attempt}: shell replies lost from {want}"
                got = km.kc.session.recv(shell)[1]
                assert got["parent_header"]["msg_id"] == want, (attempt, got["parent_header"])
            assert km.provisioner.process.wait(timeout=30) == 0, attempt
        finally:
            shell.close(linger=0)
            lib.stop_kernel(km)


def requests_left_unread(km, shell, n: int = 600) -> list[str]:  # type: ignore[no-untyped-def]
    """Sends `n` requests on `shell` (a DEALER that reads as little as it
    can) whose replies, 32 kB each by their parent header, are more than the
    connection buffers; returns their ids once the kernel answered them all
    (the last one's idle came on IOPub)."""
    import zmq
    shell.setsockopt(zmq.RCVHWM, 1)
    shell.setsockopt(zmq.RCVBUF, 4096)
    c = km.get_connection_info()
    shell.connect(f"{c['transport']}://{c['ip']}:{c['shell_port']}")
    sent = []
    for _ in range(n):
        msg = km.kc.session.msg("is_complete_request", {"code": "1"})
        msg["header"]["padding"] = "x" * 32_000
        km.kc.session.send(shell, msg)
        sent.append(msg["header"]["msg_id"])
    while True:
        m = km.kc.get_iopub_msg(timeout=60)
        if m["parent_header"].get("msg_id") == sent[-1] and lib.is_idle(m):
            return sent


def evil_pythonpath(tmp: Path) -> tuple[Path, Path]:
    """A directory whose sitecustomize.py writes a marker when any Python
    started with it on PYTHONPATH runs; (the directory, the marker)."""
    marker = tmp / "ran"
    evil = tmp / "evil"
    evil.mkdir()
    (evil / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    return evil, marker


def test_a_cells_target_words_cannot_name_code(tmp_path):
    """A cell's `%%noyau on T key=value` words are the notebook's, not the
    user's `-o`: `env.PYTHONPATH=` (code run by the target's agent and
    kernel, outside any sandbox) is refused, saying the key and what to do,
    and nothing runs; `environment=` may not set the sandbox, as `--env`
    may not. Trusted, the same cell sets the variable (the marker is
    written)."""
    evil, marker = evil_pythonpath(tmp_path)
    (tmp_path / "noyau.toml").write_text('[profiles.side]\nbackend = "local"\n')
    xdg = tmp_path / "xdg"
    env = {"NOYAU_ENV_CACHE": str(tmp_path / "cache"), "XDG_CONFIG_HOME": str(xdg)}
    km = lib.kernel_in(lib.NOYAU_KERNEL_NAME, tmp_path, env=env)
    try:
        trust = f"noyau trust {tmp_path.resolve()}"
        for cell, keys in [(f"%%noyau on side env.PYTHONPATH={evil}\nprint('reached')",
                            ["a notebook cell may not set `env.PYTHONPATH`", trust, "your own config file"]),
                           ('%%noyau on side environment={"kind":"system","isolation":"none"}\nprint(1)',
                            ["may not set isolation"])]:
            out: list[dict] = []
            reply = km.kc.execute_interactive(cell, timeout=120, output_hook=out.append)["content"]
            said = "".join(lib.message_text(m) for m in out)
            assert reply["status"] == "error" and all(k in said for k in keys), (reply, said)
            assert "reached" not in said, said
        assert not marker.exists()
    finally:
        lib.stop_kernel(km)
    km = lib.kernel_in(lib.NOYAU_KERNEL_NAME, tmp_path, env={**env, **lib.trusting(tmp_path, xdg)})
    try:
        out = []
        reply = km.kc.execute_interactive(f"%%noyau on side env.PYTHONPATH={evil}\nprint('reached')",
                                          timeout=120, output_hook=out.append)["content"]
        said = "".join(lib.message_text(m) for m in out)
        assert reply["status"] == "ok" and "reached" in said, (reply, said)
        assert marker.exists()
    finally:
        lib.stop_kernel(km)


def test_a_headless_runs_target_cell_cannot_name_code(tmp_path):
    """The same in `noyau run`: a cell's `%%noyau on T env.PYTHONPATH=…`
    is refused, naming the key and both ways out, and nothing runs; the
    user's own `-o env.NAME=` is theirs (test_run_noyau)."""
    evil, marker = evil_pythonpath(tmp_path)
    (tmp_path / "noyau.toml").write_text('[profiles.side]\nbackend = "local"\n')
    xdg = tmp_path / "xdg"
    nb = notebook(f"%%noyau on side env.PYTHONPATH={evil}\nprint('reached')")
    p = run_only(tmp_path, nb, cache=tmp_path / "cache", env={"XDG_CONFIG_HOME": str(xdg)})
    said = p.stderr + (tmp_path / "nb.ipynb.out.ipynb").read_text()
    assert p.returncode != 0 and "a notebook cell may not set `env.PYTHONPATH`" in said, said[-3000:]
    assert f"noyau trust {tmp_path.resolve()}" in said and str(xdg / "noyau" / "config.toml") in said, said[-3000:]
    assert not marker.exists()


def test_a_cells_code_settings_are_judged_by_the_notebooks_directory_not_the_working_one(tmp_path):
    """`noyau run` judges what a `%%noyau on T key=value` cell may set by
    the directory its notebook was read from, not the working directory.
    The user trusts their project and, from there, runs a notebook from a
    directory they do not trust (another user's) whose cell sets the
    target's PYTHONPATH to a sitecustomize.py (code run as the user,
    outside any sandbox): refused, naming the notebook's directory, and
    nothing runs; so is a cell's `--env` naming an interpreter by path
    (run on this host while preparing). The first notebook in the trusted
    project, run from the untrusted directory, is accepted and the setting
    applies (the code writes its marker). (On the code of before, all went
    by the working directory: the first two ran their code, the last was
    refused.)"""
    evil, marker = evil_pythonpath(tmp_path)
    proj, other = tmp_path / "proj", tmp_path / "other"
    proj.mkdir()
    other.mkdir()
    xdg = tmp_path / "xdg"
    env = lib.trusting(proj, xdg)
    user_config = xdg / "noyau" / "config.toml"
    user_config.write_text(user_config.read_text() + '\n[profiles.nbside]\nbackend = "local"\n')
    nb = notebook(f"%%noyau on nbside env.PYTHONPATH={evil}\nprint('on the target')")

    def run_from(cwd: Path, nb_dir: Path, nb: dict = nb) -> tuple[subprocess.CompletedProcess, str]:
        src, out = nb_dir / "nb.ipynb", tmp_path / "out.ipynb"
        src.write_text(json.dumps(nb))
        p = subprocess.run([NOYAU, "run", str(src), str(out), "--no-progress", "--start-timeout", "300"],
                           capture_output=True, text=True, timeout=600, cwd=cwd,
                           env=dict(os.environ, NOYAU_ENV_CACHE=str(tmp_path / "cache"), **env))
        assert out.exists(), p.stderr[-3000:]
        cells = [c for c in json.loads(out.read_text())["cells"] if c["cell_type"] == "code"]
        return p, text(cells[-1])

    p, said = run_from(proj, other)
    assert p.returncode != 0, p.stderr[-3000:]
    assert "a notebook cell may not set `env.PYTHONPATH`" in said, said
    assert f"noyau trust {other.resolve()}" in said, said
    assert not marker.exists()
    # A cell's `--env` is the notebook's too: an interpreter it names by
    # path (run by uv on this host) is not run.
    py_marker, evil_py = tmp_path / "py-ran", tmp_path / "evil-python"
    evil_py.write_text(f"#!/bin/sh\ntouch {py_marker}\nexit 1\n")
    evil_py.chmod(0o755)
    p, said = run_from(proj, other, notebook(f'%%noyau on nbside --env {{python="{evil_py}"}}\nprint(1)'))
    assert p.returncode != 0 and "sets `python`" in said and "outside the sandbox" in said, said
    assert not py_marker.exists()
    p, said = run_from(other, proj)
    assert p.returncode == 0 and "on the target" in said, (said, p.stderr[-3000:])
    assert marker.exists(), p.stderr[-3000:]
