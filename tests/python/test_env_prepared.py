"""Environments and data prepared on the submitting host (issue 21), end to
end with `noyau run` and a real ipykernel:

* a data file pinned by its sha256 in `metadata.noyau.data`, served by a
  real HTTP server on 127.0.0.1 that counts its requests: fetched once for
  several runs, exposed to the kernel under `$NOYAU_DATA`, recorded with its
  hash in the output; a file whose hash differs is refused with an error
  naming the URL and both hashes, and nothing is kept;
* a `%noyau data` cell of `noyau run` pinning a local file;
* targets of one notebook kernel in their own environments (a profile's
  `environment`, `%%noyau on T --env SPEC`), the build lines in the cell;
* `%noyau env SPEC` and `%noyau data` in a notebook kernel (the proxy),
  local and through Slurm, prepared on the proxy's host while the job's
  package index refuses connections;
* `noyau env build / list / show / lock / gc --dry-run` on a real uv build;
* a batch job (Slurm, OAR) whose package index refuses connections runs a
  notebook needing six==1.16.0, built before submission; with
  `build = "node"` it fails, naming that index.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

import noyau_testlib as lib
from test_env import SIX, run, text
from test_run_noyau import NOYAU, notebook, python3_kernelspec  # noqa: F401  (fixture)

PAYLOAD = b"x,y\n1,2\n3,4\n"
# A package index that refuses connections: what a compute node without a
# route to PyPI sees. Set in the job's environment only.
REFUSED = "http://127.0.0.1:9/simple"


@pytest.fixture(autouse=True)
def _noyau_binary() -> None:
    if not Path(NOYAU).is_file():
        lib.missing(f"no noyau binary at {NOYAU}")


@pytest.fixture
def server():
    """A real HTTP server on 127.0.0.1 serving PAYLOAD at /data.csv; its
    `requests` list counts the GETs it answered."""
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802  (http.server's name)
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)

        def log_message(self, *args) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    srv.requests = requests  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def data_notebook(url: str, sha: str) -> dict:
    return notebook("import os; print(open(os.path.join(os.environ['NOYAU_DATA'], 'table.csv')).read(), end='')",
                    metadata={"noyau": {"data": [{"url": url, "sha256": sha, "name": "table.csv"}]}})


def test_data_pinned_by_hash_is_fetched_once_exposed_to_the_kernel_and_recorded(server, tmp_path):
    url = f"http://127.0.0.1:{server.server_address[1]}/data.csv"
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    cache = tmp_path / "cache"
    for i in range(3):
        d = tmp_path / f"run{i}"
        d.mkdir()
        p, out = run(d, data_notebook(url, sha), cache=cache)
        assert p.returncode == 0, p.stderr
        assert text(out["cells"][0]) == PAYLOAD.decode(), out["cells"][0]
        recorded = out["metadata"]["noyau"]["data"]
        assert [(r["name"], r["sha256"], r["url"]) for r in recorded] == [("table.csv", sha, url)], recorded
    assert server.requests == ["/data.csv"], server.requests  # one fetch for three runs


def test_data_pinned_by_hash_is_fetched_once_for_a_five_point_sweep(server, tmp_path):
    """`noyau sweep` of 5 points (all at once) over a notebook pinning a data
    file: fetched once on the submitting host before the points start (the
    server counts one request), each point's kernel reads it and each
    output records its hash."""
    url = f"http://127.0.0.1:{server.server_address[1]}/data.csv"
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    nb = data_notebook(url, sha)
    nb["cells"].insert(0, {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": "x = 0",
                           "outputs": [], "execution_count": None, "id": "params"})
    nb["cells"][1]["source"] = "print(x); " + nb["cells"][1]["source"]
    src = tmp_path / "sw.ipynb"
    src.write_text(json.dumps(nb))
    p = subprocess.run([NOYAU, "sweep", str(src), "--grid", "x=1,2,3,4,5", "--max-parallel", "5",
                        "--backend", "local", "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env=dict(os.environ, NOYAU_ENV_CACHE=str(tmp_path / "cache")))
    assert p.returncode == 0, p.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [pt["status"] for pt in summary["points"]] == ["ok"] * 5, summary
    seen = set()
    for pt in summary["points"]:
        out = json.loads(Path(pt["output"]).read_text())
        cell = next(c for c in out["cells"] if "NOYAU_DATA" in "".join(c["source"]))
        x, rest = text(cell).split("\n", 1)
        assert rest == PAYLOAD.decode(), cell
        seen.add(int(x))
        assert [r["sha256"] for r in out["metadata"]["noyau"]["data"]] == [sha], out["metadata"]["noyau"]
    assert seen == {1, 2, 3, 4, 5}
    assert server.requests == ["/data.csv"], server.requests  # one fetch for the 5 points


def test_data_whose_hash_differs_is_refused_naming_url_and_both_hashes(server, tmp_path):
    url = f"http://127.0.0.1:{server.server_address[1]}/data.csv"
    wrong = "0" * 64
    cache = tmp_path / "cache"
    src = tmp_path / "nb.ipynb"
    src.write_text(json.dumps(data_notebook(url, wrong)))
    p = subprocess.run([NOYAU, "run", str(src), str(tmp_path / "out.ipynb"), "--no-progress"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=dict(os.environ, NOYAU_ENV_CACHE=str(cache)))
    assert p.returncode != 0
    assert url in p.stderr and wrong in p.stderr and hashlib.sha256(PAYLOAD).hexdigest() in p.stderr, p.stderr
    kept = [f for f in cache.rglob("*") if f.is_file() and f.read_bytes() == PAYLOAD] if cache.exists() else []
    assert not kept, kept  # nothing of the refused file is kept


def test_noyau_env_build_list_show_lock_and_gc(tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, NOYAU_ENV_CACHE=str(cache))

    def noyau(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([NOYAU, "env", *args], capture_output=True, text=True, timeout=600,
                              cwd=tmp_path, env=env)

    nb = tmp_path / "nb.ipynb"
    nb.write_text(json.dumps(notebook("import six")))
    (tmp_path / "noyau.toml").write_text('[environment]\nrequirements = ["six==1.16.0"]\n')
    p = noyau("show", str(nb))
    assert p.returncode == 0 and "six==1.16.0" in p.stdout and "built: not yet" in p.stdout, (p.stdout, p.stderr)
    p = noyau("build", str(nb))
    assert p.returncode == 0, p.stderr
    p = noyau("show", str(nb))
    assert p.returncode == 0 and "built: not yet" not in p.stdout and "built:" in p.stdout, (p.stdout, p.stderr)
    p = noyau("list")
    assert p.returncode == 0 and "six==1.16.0" in p.stdout, (p.stdout, p.stderr)
    p = noyau("lock", str(nb))
    assert p.returncode == 0, p.stderr
    assert "six==1.16.0" in (tmp_path / "noyau.lock").read_text()
    entries = sorted(e.name for e in cache.iterdir())
    p = noyau("gc", "--older-than", "0s", "--dry-run")
    assert p.returncode == 0, p.stderr
    assert sorted(e.name for e in cache.iterdir()) == entries  # a dry run removes nothing
    p = noyau("build", SIX)  # the same spec given inline: already built
    assert p.returncode == 0, p.stderr


def test_data_pinned_by_hash_reaches_a_slurm_job_fetched_on_the_submitting_host(slurm, server, tmp_path):
    """The same through Slurm: the file is fetched here before the job is
    submitted (the server sees this host's one request) and the batch job's
    kernel reads it from the shared store."""
    url = f"http://127.0.0.1:{server.server_address[1]}/data.csv"
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    p, out = run(tmp_path, data_notebook(url, sha), "--backend", "slurm", "--profile", "test",
                 cache=tmp_path / "shared-cache")
    assert p.returncode == 0, p.stderr
    assert out["metadata"]["noyau"]["backend"] == "slurm"
    assert text(out["cells"][0]) == PAYLOAD.decode(), out["cells"][0]
    assert out["metadata"]["noyau"]["data"][0]["sha256"] == sha
    assert server.requests == ["/data.csv"], server.requests
    lib.wait_until(lambda: not lib.squeue_noyau(), 30, "the run's job to leave the queue", 0.5)


def test_a_noyau_data_cell_pins_a_local_file_that_the_run_fetches_before_the_kernel(tmp_path):
    """`%noyau data file://… --sha256 … --name …` in a cell of `noyau run`:
    read from the notebook before the kernel starts, fetched, and the cell
    says where the file is."""
    src = tmp_path / "table.csv"
    src.write_bytes(PAYLOAD)
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    nb = notebook(f"%noyau data file://{src} --sha256 {sha} --name t.csv",
                  "import os; print(open(os.path.join(os.environ['NOYAU_DATA'], 't.csv')).read(), end='')")
    p, out = run(tmp_path, nb, cache=tmp_path / "cache")
    assert p.returncode == 0, p.stderr
    assert sha in text(out["cells"][0]) and "t.csv" in text(out["cells"][0]), out["cells"][0]
    assert text(out["cells"][1]) == PAYLOAD.decode(), out["cells"][1]
    assert out["metadata"]["noyau"]["data"][0]["sha256"] == sha


def test_targets_run_cells_in_their_own_environments_built_before_their_jobs(noyau_kernelspec, tmp_path):
    """One notebook, several environments: a target whose profile declares
    `environment = {…}`, and `%%noyau on T --env SPEC`; each cell's Python
    is the one in the cache entry built for it, and the build's lines are
    stream output of the cell that started the target (the second target's
    spec is the first's: found built, nothing to say). (Local targets: this
    host is also the job's, so where the build ran is not told apart here.)"""
    cache = tmp_path / "cache"
    (tmp_path / "noyau.toml").write_text(
        '[profiles.six]\nbackend = "local"\nenvironment = { requirements = ["six==1.16.0"] }\n\n'
        '[profiles.side]\nbackend = "local"\n')
    km = lib.kernel_in(noyau_kernelspec, tmp_path, {"NOYAU_ENV_CACHE": str(cache)})

    def cell(code: str) -> tuple[dict, str]:
        out: list[dict] = []
        reply = km.kc.execute_interactive(code, timeout=300, output_hook=out.append)
        return reply["content"], "".join(lib.message_text(m) for m in out)

    probe = "import six, sys; print(six.__version__, sys.prefix)"
    try:
        for i, head in enumerate(("%%noyau on six", '%%noyau on side --env {requirements=["six==1.16.0"]}')):
            reply, out = cell(f"{head} --quiet\n{probe}")
            assert reply["status"] == "ok", (head, reply, out)
            if i == 0:
                assert "noyau: environment: building the Python environment" in out, out
                assert "noyau: environment: environment ready" in out, out
            version, prefix = out.strip().splitlines()[-1].split()
            assert version == "1.16.0", out
            assert Path(prefix).resolve().is_relative_to(cache.resolve()), prefix
    finally:
        lib.stop_kernel(km)


def test_a_dask_clusters_environment_is_prepared_in_the_dask_up_cell(noyau_kernelspec, tmp_path):
    """`%noyau dask up --target T` whose profile declares an environment: it
    is prepared on this host before any of the cluster's jobs is submitted,
    its lines in that cell; one uv cannot resolve fails the cell with uv's
    message, and no job was submitted (nothing to submit them to: the
    profile is local)."""
    (tmp_path / "noyau.toml").write_text(
        '[profiles.nope]\nbackend = "local"\n'
        'environment = { requirements = ["noyau-no-such-package-xyz==0.0.1"] }\n')
    km = lib.kernel_in(noyau_kernelspec, tmp_path, {"NOYAU_ENV_CACHE": str(tmp_path / "cache")})
    try:
        out: list[dict] = []
        reply = km.kc.execute_interactive("%noyau dask up 1 --target nope", timeout=300,
                                          output_hook=out.append)["content"]
        lines = lib.stream_text(out, "stderr")
        assert reply["status"] == "error" and "the cluster's environment" in reply["evalue"], reply
        assert "noyau-no-such-package-xyz" in reply["evalue"] and "could not resolve" in reply["evalue"], reply
        assert "noyau: environment: resolving noyau-no-such-package-xyz==0.0.1" in lines, lines
    finally:
        lib.stop_kernel(km)


def refused_index_kernel(base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernelspec like `base` whose job (only: profile keys `env.*`) has
    its package indexes at REFUSED; found first on JUPYTER_PATH."""
    jupyter = Path(os.environ["JUPYTER_PATH"].split(os.pathsep)[0])
    spec = json.loads((jupyter / "kernels" / base / "kernel.json").read_text())
    spec["argv"] += ["-o", f"env.UV_INDEX_URL={REFUSED}", "-o", f"env.PIP_INDEX_URL={REFUSED}"]
    name = f"{base}-refused-index"
    d = tmp_path / "jupyter" / "kernels" / name
    d.mkdir(parents=True)
    (d / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", f"{tmp_path / 'jupyter'}{os.pathsep}{os.environ['JUPYTER_PATH']}")
    return name


@pytest.mark.parametrize("backend", ["local", "slurm"])
def test_env_and_data_magics_of_a_kernel_are_prepared_on_the_proxys_host_not_in_the_job(
        backend, server, tmp_path, monkeypatch, request):
    """A notebook kernel (a real ipykernel behind `noyau kernel`, locally or
    in a Slurm job) whose job's package indexes refuse connections:
    `%noyau env six==1.16.0` is built by the proxy on this host, its lines
    in the cell, and the job only uses it, restarting the kernel in the same
    job; `%noyau data` is fetched by the
    proxy from a local HTTP server (one request, a second cell naming the
    same file makes none), and the kernel reads it under $NOYAU_DATA; a
    file whose hash differs fails its cell, naming the URL and both hashes,
    and the kernel runs on."""
    if backend == "slurm":
        request.getfixturevalue("slurm")
    base = lib.SLURM_KERNEL_NAME if backend == "slurm" else lib.NOYAU_KERNEL_NAME
    lib.require_noyau()
    cache = tmp_path / "shared-cache"
    km = lib.kernel_in(refused_index_kernel(base, tmp_path, monkeypatch), tmp_path,
                       {"NOYAU_ENV_CACHE": str(cache)})

    def cell(code: str) -> tuple[dict, str]:
        out: list[dict] = []
        reply = km.kc.execute_interactive(code, timeout=300, output_hook=out.append)
        return reply["content"], lib.stream_text(out, "stdout") + lib.stream_text(out, "stderr")

    url = f"http://127.0.0.1:{server.server_address[1]}/data.csv"
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    try:
        # The job's environment has the refusing index (the proxy's has not).
        reply, out = cell("import os; print(os.environ.get('UV_INDEX_URL'), os.environ.get('PIP_INDEX_URL'), "
                          "os.environ.get('SLURM_JOB_ID'))")
        assert reply["status"] == "ok" and out.split()[:2] == [REFUSED, REFUSED], (reply, out)
        job = out.split()[2]

        reply, out = cell("%noyau env six==1.16.0")
        assert reply["status"] == "ok", (reply, out)
        assert "noyau: environment: building the Python environment" in out, out  # lines in the cell
        assert f"built on {socket.gethostname()}" in out, out
        assert "using the environment" in out and "offline" in out, out  # what the job did
        reply, out = cell("import os, six, sys; print(six.__version__, sys.prefix, os.environ.get('SLURM_JOB_ID'))")
        assert reply["status"] == "ok", (reply, out)
        version, prefix, job2 = out.split()
        assert version == "1.16.0" and Path(prefix).resolve().is_relative_to(cache.resolve()), out
        assert job2 == job and (job.isdigit() or backend == "local"), (job, job2)  # the same job

        reply, out = cell(f"%noyau data {url} --sha256 {sha} --name t.csv")
        assert reply["status"] == "ok" and sha in out and "$NOYAU_DATA/t.csv" in out, (reply, out)
        reply, out = cell("import os; print(open(os.path.join(os.environ['NOYAU_DATA'], 't.csv')).read(), end='')")
        assert reply["status"] == "ok" and out == PAYLOAD.decode(), (reply, out)
        reply, out = cell(f"%noyau data {url} --sha256 {sha} --name again.csv")
        assert reply["status"] == "ok", (reply, out)
        assert server.requests == ["/data.csv"], server.requests  # fetched once, here

        bad = f"http://127.0.0.1:{server.server_address[1]}/other.csv"
        reply, out = cell(f"%noyau data {bad} --sha256 {'0' * 64} --name bad.csv")
        assert reply["status"] == "error" and reply["ename"] == "NoyauDataError", (reply, out)
        assert bad in reply["evalue"] and "0" * 64 in reply["evalue"] and sha in reply["evalue"], reply
        reply, out = cell("print(six.__version__, sorted(os.listdir(os.environ['NOYAU_DATA'])))")
        assert reply["status"] == "ok" and out.strip() == "1.16.0 ['again.csv', 't.csv']", (reply, out)
    finally:
        lib.stop_kernel(km)
    if backend == "slurm":
        lib.wait_until(lambda: not lib.squeue_noyau(), 30, "the kernel's job to leave the queue", 0.5)


# The job's own variables (profile keys `env.*`): its package indexes refuse.
REFUSED_JOB = ["-o", f"env.UV_INDEX_URL={REFUSED}", "-o", f"env.PIP_INDEX_URL={REFUSED}"]
SIX_NODE = '{requirements = ["six==1.16.0"], build = "node"}'
NEEDS_SIX = "import os, six; print(six.__version__, os.environ.get('UV_INDEX_URL'))"


def refused_run_on(scheduler: str, tmp_path: Path, env_spec: str, name: str,
                   uv: Path | None = None) -> tuple[int, str, dict | None, Path]:
    """`noyau run --backend SCHEDULER --env ENV_SPEC` of a notebook needing
    six, its job's indexes at REFUSED, with a cache of its own (and uv at
    `uv`, when given): exit code, stderr, output notebook, cache."""
    extra = [f"NOYAU_UV={uv}"] if uv else []
    if scheduler == "slurm":
        d = tmp_path / name
        d.mkdir()
        (d / "nb.ipynb").write_text(json.dumps(notebook(NEEDS_SIX)))
        p = subprocess.run([NOYAU, "run", "nb.ipynb", "out.ipynb", "--no-progress", "--start-timeout", "300",
                            "--backend", "slurm", "--profile", "test", "--env", env_spec, *REFUSED_JOB],
                           capture_output=True, text=True, timeout=600, cwd=d,
                           env=dict(os.environ, NOYAU_ENV_CACHE=str(d / "cache"), **dict(e.split("=", 1) for e in extra)))
    else:
        oar = lib.require_oar()
        d = oar.workdir(f"refused-{name}")
        oar.write(d / "nb.ipynb", json.dumps(notebook(NEEDS_SIX)))
        # The login node's CA bundle, where this host's is not the system's
        # default (a TLS-inspecting proxy): OAR's user gets a clean environment.
        ca = [f"SSL_CERT_FILE={os.environ['SSL_CERT_FILE']}"] if os.environ.get("SSL_CERT_FILE") else []
        p = oar.run(["env", f"NOYAU_ENV_CACHE={d / 'cache'}", *ca, *extra, str(oar.bin), "run", "nb.ipynb", "out.ipynb",
                     "--no-progress", "--backend", "oar", "-o", "time=5", "--env", env_spec, *REFUSED_JOB],
                    d, timeout=600)
    out = d / "out.ipynb"
    return p.returncode, p.stderr, json.loads(out.read_text()) if out.exists() else None, d / "cache"


def test_a_job_whose_index_refuses_runs_what_was_built_before_submission_and_build_node_names_that_index(
        slurm_or_oar, tmp_path):
    """The issue's check, end to end on a real scheduler: the job's package
    indexes (UV_INDEX_URL, PIP_INDEX_URL, set for the job only) refuse
    connections. The environment needing six==1.16.0 is built here before
    submission and the job runs the notebook in it; the same spec with
    `build = "node"` makes the job build (with the uv the first run
    installed, so that the job's uv, not pip installing uv, meets the
    index), which fails with an error naming the index it could not reach."""
    scheduler = slurm_or_oar.name
    code, err, out, cache = refused_run_on(scheduler, tmp_path, SIX, "prepared")
    assert code == 0 and out is not None, err
    assert "noyau: environment: building the Python environment" in err, err  # here, before submission
    assert text(out["cells"][0]).split() == ["1.16.0", REFUSED], out["cells"][0]
    assert out["metadata"]["noyau"]["backend"] == scheduler

    uv = cache / ".tools" / "uv-0.13.9" / "venv" / "bin" / "uv"  # absent when uv is on PATH
    code, err, out, _ = refused_run_on(scheduler, tmp_path, SIX_NODE, "node", uv if uv.is_file() else None)
    assert code != 0, err
    assert f"{REFUSED} (from UV_INDEX_URL)" in err and "could not resolve" in err, err
    lib.wait_until(lambda: not slurm_or_oar.jobs(), 60, "the runs' jobs to leave the queue", 0.5)
