"""`noyau run` end to end: a real binary, a real ipykernel, real papermill.

Self-contained: the binary is $NOYAU_BIN (default target/debug/noyau); the
`python3` kernelspec is the one on JUPYTER_PATH (conftest installs it), else
one is written into a temporary JUPYTER_PATH for this venv's python.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import noyau_testlib as lib

ROOT = Path(__file__).resolve().parents[2]
NOYAU = os.environ.get("NOYAU_BIN") or str(ROOT / "target" / "debug" / "noyau")


@pytest.fixture(autouse=True)
def _noyau_binary() -> None:
    if not Path(NOYAU).is_file():
        lib.missing(f"no noyau binary at {NOYAU}")


@pytest.fixture(scope="module", autouse=True)
def python3_kernelspec(tmp_path_factory):
    for d in os.environ.get("JUPYTER_PATH", "").split(os.pathsep):
        if d and (Path(d) / "kernels" / "python3" / "kernel.json").is_file():
            yield
            return
    jp = tmp_path_factory.mktemp("jp")
    spec = jp / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(jp) + (os.pathsep + old if old else "")
    yield
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


def notebook(*cells, minor=5, metadata=None):
    out = []
    for i, c in enumerate(cells):
        if isinstance(c, str):
            c = {"source": c}
        cell = {"cell_type": c.get("cell_type", "code"), "metadata": c.get("metadata", {}),
                "source": c["source"]}
        if minor >= 5:
            cell["id"] = f"cell-{i}"
        if cell["cell_type"] == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        out.append(cell)
    md = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    md.update(metadata or {})
    return {"nbformat": 4, "nbformat_minor": minor, "metadata": md, "cells": out}


def write(path: Path, nb) -> Path:
    path.write_text(json.dumps(nb, indent=1))
    return path


def run(*args, timeout=120, **kw):
    return subprocess.run([NOYAU, "run", "--no-progress", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, **kw)


def text_of(cell):
    out = []
    for o in cell.get("outputs", []):
        if o["output_type"] == "stream":
            out.append("".join(o["text"]))
    return "".join(out)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


PARAMS_NB = notebook(
    {"source": "a = 1\nb = 'x'\nc = None", "metadata": {"tags": ["parameters"]}},
    {"source": "# Title", "cell_type": "markdown"},
    "print(a, b, c)",
    "from IPython.display import display\ndisplay({'text/plain': 'shown'}, raw=True)\na * 2",
    "raise ValueError('boom ' + str(a))",
    "print('never')",
)


def comparable(nb):
    """What must be equal between papermill and noyau (timings and ids aside)."""
    cells = []
    for c in nb["cells"]:
        outs = []
        for o in c.get("outputs", []):
            if o["output_type"] == "stream":
                if outs and outs[-1][0] == "stream" and outs[-1][1] == o["name"]:
                    outs[-1] = ("stream", o["name"], outs[-1][2] + "".join(o["text"]))
                else:
                    outs.append(("stream", o["name"], "".join(o["text"])))
            elif o["output_type"] == "error":
                outs.append(("error", o["ename"], o["evalue"]))
            else:
                outs.append((o["output_type"], json.dumps(o.get("data"), sort_keys=True)))
        pm = c["metadata"].get("papermill", {})
        cells.append((c["cell_type"], "".join(c["source"]), c.get("execution_count"),
                      tuple(c["metadata"].get("tags", [])), pm.get("status"), pm.get("exception"),
                      sorted(pm), sorted(c["metadata"].get("execution", {})), tuple(outs)))
    top = nb["metadata"]["papermill"]
    return cells, sorted(top), top["parameters"], top["exception"]


def test_same_as_papermill(tmp_path):
    src = write(tmp_path / "in.ipynb", PARAMS_NB)
    before = sha(src)
    pm_out, ny_out = tmp_path / "pm.ipynb", tmp_path / "noyau.ipynb"
    pm = subprocess.run([sys.executable, "-m", "papermill", "--no-progress-bar", str(src), str(pm_out),
                         "-p", "a", "5", "-r", "b", "7", "-y", "c: yes"],
                        capture_output=True, text=True, timeout=120)
    assert pm.returncode != 0, pm.stderr
    ny = run(src, ny_out, "-p", "a", "5", "-r", "b", "7", "-y", "c: yes")
    assert ny.returncode == 1, ny.stderr
    assert "ValueError" in ny.stderr and "boom 5" in ny.stderr
    assert sha(src) == before
    a, b = json.loads(pm_out.read_text()), json.loads(ny_out.read_text())
    ca, cb = comparable(a), comparable(b)
    for x, y in zip(ca[0], cb[0]):
        assert x == y
    assert ca == cb
    assert b["cells"][0]["metadata"]["tags"] == ["papermill-error-cell-tag"]
    assert "In [5]" in "".join(b["cells"][0]["source"])
    assert b["metadata"]["noyau"]["backend"] == "local"
    assert b["metadata"]["noyau"]["job_id"].startswith("local:")
    assert b["metadata"]["language_info"]["name"] == "python"


def test_raises_exception_tag_skip_execution_and_allow_errors(tmp_path):
    nb = notebook({"source": "1/0", "metadata": {"tags": ["raises-exception"]}},
                  {"source": "print('skipped')", "metadata": {"tags": ["skip-execution"]}},
                  "print('ran')")
    src = write(tmp_path / "in.ipynb", nb)
    r = run(src, tmp_path / "out.ipynb")
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "out.ipynb").read_text())
    assert out["cells"][0]["outputs"][0]["ename"] == "ZeroDivisionError"
    assert out["cells"][1]["outputs"] == []
    assert text_of(out["cells"][2]) == "ran\n"
    src2 = write(tmp_path / "in2.ipynb", notebook("1/0", "print('on')"))
    r = run(src2, tmp_path / "out2.ipynb", "--allow-errors")
    assert r.returncode == 0, r.stderr
    assert text_of(json.loads((tmp_path / "out2.ipynb").read_text())["cells"][1]) == "on\n"


def test_input_errors_at_once(tmp_path):
    """input() fails its cell at once with the error papermill's run gives
    (stdin is not offered to a headless kernel); the cells after it do not run."""
    src = write(tmp_path / "in.ipynb", notebook("input('name? ')", "print('after')"))
    t = time.monotonic()
    r = run(src, tmp_path / "out.ipynb", timeout=60)
    assert time.monotonic() - t < 30
    assert r.returncode == 1
    out = json.loads((tmp_path / "out.ipynb").read_text())
    err = [o for c in out["cells"] for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert err and err[0]["ename"] == "StdinNotImplementedError"
    pm = subprocess.run([sys.executable, "-m", "papermill", "--no-progress-bar", str(src),
                         str(tmp_path / "pm.ipynb")], capture_output=True, text=True, timeout=120)
    assert pm.returncode != 0, pm.stderr
    assert comparable(out) == comparable(json.loads((tmp_path / "pm.ipynb").read_text()))


def test_kernel_death_mid_notebook(tmp_path):
    nb = notebook("print('before')", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "print('after')")
    src = write(tmp_path / "in.ipynb", nb)
    r = run(src, tmp_path / "out.ipynb")
    assert r.returncode == 3, r.stderr
    out = json.loads((tmp_path / "out.ipynb").read_text())
    cells = [c for c in out["cells"] if "papermill-error-cell-tag" not in c["metadata"].get("tags", [])]
    assert text_of(cells[0]) == "before\n"
    dead = cells[1]
    if cells[0]["metadata"]["papermill"]["status"] == "failed":
        # The killing cell was sent ahead, and the kernel died before the
        # first cell's reply and idle left it (seen under load): the error
        # must say it may be the next cell's doing.
        err = cells[0]["outputs"][-1]
        assert "or the next one" in err["evalue"], err
        assert dead["metadata"]["papermill"]["status"] == "pending"
    else:
        assert dead["metadata"]["papermill"]["status"] == "failed"
        err = dead["outputs"][-1]
    assert err["ename"] == "DeadKernelError" and "SIGKILL" in err["evalue"], err
    assert cells[2]["metadata"]["papermill"]["status"] == "pending"
    assert cells[2]["outputs"] == []


def test_output_sent_just_before_the_kernel_exits_is_saved_whole(tmp_path):
    """A cell writes 4 MB and ends its kernel (`exit()`: ipykernel stops
    0.1 s after the cell): what it sent before the exit, which may still be
    on its way when the agent's job is seen to end, is in the output
    notebook whole. (The next cell, sent ahead, may run before the stop
    or fail for the dead kernel: either way the run ends.)"""
    n = 4_000_000
    nb = notebook(f"import sys\nsys.stdout.write('x' * {n})\nsys.stdout.flush()\nexit()", "print('after')")
    src = write(tmp_path / "in.ipynb", nb)
    r = run(src, tmp_path / "out.ipynb")
    assert r.returncode in (0, 3), r.stderr
    out = json.loads((tmp_path / "out.ipynb").read_text())
    cells = [c for c in out["cells"] if "papermill-error-cell-tag" not in c["metadata"].get("tags", [])]
    assert text_of(cells[0]) == "x" * n, len(text_of(cells[0]))


def test_timeout(tmp_path):
    src = write(tmp_path / "in.ipynb", notebook("import time\ntime.sleep(60)", "print('no')"))
    t = time.monotonic()
    r = run(src, tmp_path / "out.ipynb", "--timeout", "1")
    assert r.returncode == 4, r.stderr
    assert time.monotonic() - t < 30
    out = json.loads((tmp_path / "out.ipynb").read_text())
    enames = [o["ename"] for c in out["cells"] for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert "CellTimeoutError" in enames


def wait_for(pred, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if pred():
                return True
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    return False


def test_sigterm_mid_cell(tmp_path):
    nb = notebook("print('first')", "import time\nprint('started', flush=True)\ntime.sleep(60)", "print('never')")
    src = write(tmp_path / "in.ipynb", nb)
    out_p = tmp_path / "out.ipynb"
    p = subprocess.Popen([NOYAU, "run", "--no-progress", str(src), str(out_p)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The running cell's partial output reaches the file within a few seconds.
    assert wait_for(lambda: "started" in text_of(json.loads(out_p.read_text())["cells"][1]), 30), \
        "partial output never saved"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 143, err
    out = json.loads(out_p.read_text())
    assert "stopped by SIGTERM" in "".join(out["cells"][0]["source"])
    body = out["cells"][1:]
    assert text_of(body[0]) == "first\n"
    assert "started" in text_of(body[1])
    assert body[1]["metadata"]["papermill"]["status"] == "failed"
    assert body[2]["metadata"]["papermill"]["status"] == "pending"


def test_sigkill_mid_run_keeps_finished_cells(tmp_path):
    cells = [f"print({i})" for i in range(5)] + ["import time\ntime.sleep(60)"]
    src = write(tmp_path / "in.ipynb", notebook(*cells))
    out_p = tmp_path / "out.ipynb"
    p = subprocess.Popen([NOYAU, "run", "--no-progress", str(src), str(out_p)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Wait until the last cell runs (its status is saved with the next save), then 1.2 s more.
    ok = wait_for(lambda: json.loads(out_p.read_text())["cells"][4]["metadata"]["papermill"]["status"] == "completed", 30)
    assert ok
    time.sleep(1.2)
    p.kill()
    p.wait(timeout=10)
    out = json.loads(out_p.read_text())
    for i in range(5):
        assert text_of(out["cells"][i]) == f"{i}\n"
        assert out["cells"][i]["metadata"]["papermill"]["status"] == "completed"


@pytest.mark.parametrize("case", ["invalid-json", "not-notebook", "nbformat5", "missing-kernel",
                                  "unwritable", "bad-yaml", "same-file", "bad-param-file", "missing-input"])
def test_bad_inputs(tmp_path, case):
    src = tmp_path / "in.ipynb"
    write(src, notebook("print(1)"))
    out = tmp_path / "out.ipynb"
    extra = []
    if case == "invalid-json":
        src.write_text('{"nbformat": 4, "cells": [')
    elif case == "not-notebook":
        src.write_text('{"hello": "world"}')
    elif case == "nbformat5":
        src.write_text(json.dumps({"nbformat": 5, "nbformat_minor": 0, "metadata": {}, "cells": []}))
    elif case == "missing-kernel":
        extra = ["--kernel", "no-such-kernel"]
    elif case == "unwritable":
        out = tmp_path / "no" / "such" / "dir" / "out.ipynb"
    elif case == "bad-yaml":
        extra = ["-y", "a: [1, 2"]
    elif case == "same-file":
        out = src
    elif case == "bad-param-file":
        extra = ["-f", str(tmp_path / "missing.yaml")]
    elif case == "missing-input":
        src = tmp_path / "absent.ipynb"
    before = sha(src) if src.exists() else None
    r = run(src, out, *extra, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "panicked" not in r.stderr and "RUST_BACKTRACE" not in r.stderr
    assert r.stderr.strip(), "no message"
    if before:
        assert sha(src) == before


def test_unknown_metadata_preserved_and_old_minor(tmp_path):
    nb = notebook({"source": "print('hi')", "metadata": {"x-cell": {"k": [1, 2]}}},
                  minor=4, metadata={"x-top": {"deep": True}})
    nb["x-root"] = 7
    nb["cells"][0]["x-cell-key"] = "kept"
    nb["cells"][0]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "old\n", "x-out": 1}]
    src = write(tmp_path / "in.ipynb", nb)
    r = run(src, tmp_path / "out.ipynb")
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "out.ipynb").read_text())
    assert out["nbformat_minor"] == 5
    assert out["x-root"] == 7
    assert out["metadata"]["x-top"] == {"deep": True}
    c = out["cells"][0]
    assert c["metadata"]["x-cell"] == {"k": [1, 2]}
    assert c["x-cell-key"] == "kept"
    assert c["id"]
    assert text_of(c) == "hi\n"
    # written like nbformat: 1-space indent, sorted keys, trailing newline
    text = (tmp_path / "out.ipynb").read_text()
    assert text.endswith("}\n") and text.startswith('{\n "cells": [')


def test_v3_notebook(tmp_path):
    v3 = {"nbformat": 3, "nbformat_minor": 0, "metadata": {"name": "old", "x-keep": 1},
          "worksheets": [{"cells": [
              {"cell_type": "heading", "level": 1, "source": "Old", "metadata": {}},
              {"cell_type": "code", "language": "python", "input": "print('v3')", "prompt_number": 1,
               "outputs": [], "metadata": {}, "collapsed": False}]}]}
    src = write(tmp_path / "in.ipynb", v3)
    r = run(src, tmp_path / "out.ipynb")
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "out.ipynb").read_text())
    assert out["nbformat"] == 4 and out["nbformat_minor"] == 5
    assert out["metadata"]["x-keep"] == 1
    assert "".join(out["cells"][0]["source"]) == "# Old"
    assert text_of(out["cells"][1]) == "v3\n"


def test_stdin_to_stdout_and_prepare_only(tmp_path):
    data = json.dumps(notebook({"source": "x = 1", "metadata": {"tags": ["parameters"]}}, "print(x)"))
    r = run("-", "-", "-p", "x", "42", input=data)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert text_of(out["cells"][2]) == "42\n"
    src = write(tmp_path / "in.ipynb", json.loads(data))
    r = run(src, tmp_path / "prep.ipynb", "--prepare-only", "-p", "x", "3")
    assert r.returncode == 0, r.stderr
    prep = json.loads((tmp_path / "prep.ipynb").read_text())
    assert "".join(prep["cells"][1]["source"]) == "# Parameters\nx = 3\n"
    assert prep["cells"][2].get("outputs") == []


def test_default_output_name_and_log_output(tmp_path):
    src = write(tmp_path / "nb.ipynb", notebook("print('logged line')"))
    r = run(src, "--log-output")
    assert r.returncode == 0, r.stderr
    assert "logged line" in r.stderr
    assert (tmp_path / "nb.out.ipynb").is_file()


def test_kernel_and_notebook_text_reach_the_terminal_without_escapes(tmp_path):
    """A cell's first line, its stream (`--log-output`) and its exception
    carry a clipboard write (OSC 52), a link (OSC 8), cursor moves and a bidi
    override: none reaches noyau's stderr or stdout, the traceback keeps its
    colours, and the notebook keeps what the kernel sent."""
    osc52 = "\x1b]52;c;Y3VybCBldmlsfHNoCg==\x07"
    link = "\x1b]8;;https://evil.example/\x1b\\link\x1b]8;;\x1b\\"
    stream = "before\x1b[1A\x1b[2Kafter\n"
    src = write(tmp_path / "nb.ipynb", notebook(
        f"# first line {link} \u202e!\nprint({stream[:-1]!r})",
        f"raise ValueError('boom' + {osc52 + chr(27) + '[1A'!r})",
    ))
    # Progress on (plain lines, stderr is a pipe), so the first lines show.
    r = subprocess.run([NOYAU, "run", str(src), "--log-output"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0, r.stderr
    shown = r.stdout + r.stderr
    for raw in ["\x1b]", "\x1b[1A", "\x1b[2K", "\x07", "\u202e", "evil.example"]:
        assert raw not in shown, (raw, shown)
    assert "# first line link" in r.stderr, r.stderr
    assert "beforeafter" in r.stderr, r.stderr
    # The clipboard's payload went with its sequence (the traceback quotes
    # the cell's source, where it is written escaped).
    assert "noyau: cell 2 (In [2]) raised ValueError: boom\n" in r.stderr, r.stderr
    # ipykernel's coloured traceback, colours kept.
    assert re.search(r"\x1b\[[0-9;]*m[^\n]*ValueError", r.stderr), r.stderr
    out = json.loads((tmp_path / "nb.out.ipynb").read_text())
    code = [c for c in out["cells"] if c["cell_type"] == "code"]
    assert "".join(code[0]["outputs"][0]["text"]) == stream
    assert code[1]["outputs"][0]["evalue"] == "boom" + osc52 + "\x1b[1A"


def test_a_data_name_from_the_notebook_never_reaches_the_terminal_raw(tmp_path):
    """`metadata.noyau.data` is read and its names printed while the
    environment is prepared, before any cell runs: a name carrying OSC 52 or
    a bidi override is refused, and the refusal shows it escaped."""
    payload = tmp_path / "table.csv"
    payload.write_bytes(b"a,b\n1,2\n")
    sha = hashlib.sha256(payload.read_bytes()).hexdigest()
    name = "t\x1b]52;c;Y3VybCBldmlsfHNoCg==\x07\u202ecsv.exe"
    src = write(tmp_path / "nb.ipynb", notebook(
        "print('ran')",
        metadata={"noyau": {"data": [{"url": f"file://{payload}", "sha256": sha, "name": name}]}}))
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    r = subprocess.run([NOYAU, "run", str(src)], capture_output=True, text=True, timeout=120, env=env)
    shown = r.stdout + r.stderr
    for raw in ["\x1b", "\x07", "\u202e"]:
        assert raw not in shown, (raw, shown)
    assert r.returncode != 0 and "cannot name a data file" in r.stderr, r.stderr


def test_a_module_name_from_the_notebook_never_reaches_the_terminal_raw(tmp_path):
    """The agent prepares the kernel's environment and sends its progress
    lines back (`loading modules: …`), which `noyau run` prints: a module
    name from the notebook carrying OSC 52 or a bidi override is shown
    without them, whatever becomes of the load."""
    name = "m\x1b]52;c;Y3VybCBldmlsfHNoCg==\x07\u202eod"
    src = write(tmp_path / "nb.ipynb", notebook(
        "print('ran')", metadata={"noyau": {"environment": {"modules": [name]}}}))
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    r = subprocess.run([NOYAU, "run", str(src)], capture_output=True, text=True, timeout=120, env=env)
    shown = r.stdout + r.stderr
    assert "loading modules: m" in r.stderr, r.stderr
    for raw in ["\x1b", "\x07", "\u202e"]:
        assert raw not in shown, (raw, [line for line in shown.splitlines() if raw in line])


def no_kernelspec_env(tmp_path, keep=()):
    """An environment where no python3 kernelspec is found (this venv off
    PATH, empty Jupyter dirs), with noyau's cache in tmp_path/cache;
    variables named in `keep` stay."""
    home = tmp_path / "home"
    home.mkdir()
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != venv_bin)
    env = {k: v for k, v in os.environ.items() if k in keep
           or not k.startswith(("JUPYTER", "VIRTUAL_ENV", "CONDA", "XDG_", "IPYTHON"))}
    env.update(HOME=str(home), PATH=path, XDG_CACHE_HOME=str(tmp_path / "cache"),
               JUPYTER_PATH=str(tmp_path / "empty"), JUPYTER_DATA_DIR=str(tmp_path / "empty"))
    listed = subprocess.run([NOYAU, "kernelspecs", "--json"], env=env, capture_output=True, text=True)
    if "python3" in listed.stdout:
        pytest.skip("a python3 kernelspec is installed system-wide here; the first-run path cannot be reached")
    return env


def test_first_run_makes_a_managed_python_kernel(tmp_path):
    """No python3 kernelspec anywhere: noyau makes a managed ipykernel
    environment in its cache (from PyPI), says so, uses it, and reuses it,
    for the notebook's kernel and for its targets' (`%%noyau on`). Under
    umask 002 (RHEL's for users of a group of their own): the kernel is
    still made writable by its owner alone, which its reuse checks (it
    refused, on the second run, one made with the umask's modes)."""
    env = no_kernelspec_env(tmp_path)
    src = write(tmp_path / "in.ipynb", notebook("import sys; print(sys.prefix)"))
    r = subprocess.run([NOYAU, "run", "--no-progress", str(src), str(tmp_path / "out.ipynb")],
                       env=env, capture_output=True, text=True, timeout=600,
                       preexec_fn=lambda: os.umask(0o002))
    assert r.returncode == 0, r.stderr
    assert "making a managed Python kernel" in r.stderr, r.stderr
    out = json.loads((tmp_path / "out.ipynb").read_text())
    prefix = text_of(out["cells"][0]).strip()
    assert prefix.startswith(str(tmp_path / "cache" / "noyau" / "kernels")), prefix
    (tmp_path / "noyau.toml").write_text('[profiles.side]\nbackend = "local"\n')
    src = write(tmp_path / "again-in.ipynb", notebook(
        "import sys; print(sys.prefix)", "%%noyau on side\nimport sys; print(sys.prefix)"))
    r = subprocess.run([NOYAU, "run", "--no-progress", str(src), str(tmp_path / "again.ipynb")],
                       env=env, capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
                       preexec_fn=lambda: os.umask(0o002))
    assert r.returncode == 0, r.stderr
    assert "making a managed" not in r.stderr, "the managed kernel was made twice"
    cells = json.loads((tmp_path / "again.ipynb").read_text())["cells"]
    assert text_of(cells[1]) == text_of(cells[0]) == f"{prefix}\n", "the target must run the managed kernel too"


def test_a_cache_home_in_tmp_planted_by_another_user_runs_nothing_of_theirs(tmp_path):
    """No HOME nor XDG_CACHE_HOME and no python3 kernelspec: the managed
    kernel's cache is /tmp/noyau-cache-EUID ($TMPDIR here). Another user
    (nobody) made it first, and the shared /tmp/noyau-cache older noyaus
    used, each with a finished managed kernel whose kernelspec runs their
    script: the run is refused with an error naming the directory, and
    their script never runs."""
    if os.geteuid() != 0:
        lib.missing("planting a directory of another user (chown to nobody) needs root")
    env = no_kernelspec_env(tmp_path)
    for name in ("HOME", "XDG_CACHE_HOME"):
        env.pop(name)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env["TMPDIR"] = str(tmp)
    ran = tmp_path / "their-script-ran"
    script = tmp_path / "theirs.sh"
    script.write_text(f"#!/bin/sh\ntouch {ran}\n")
    script.chmod(0o755)
    ours = tmp / f"noyau-cache-{os.geteuid()}"
    for home in (ours, tmp / "noyau-cache"):
        kernel = home / "noyau" / "kernels" / "python3-ipykernel-7.4.0"
        spec = kernel / "share" / "jupyter" / "kernels" / "python3"
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps(
            {"argv": [str(script), "{connection_file}"], "display_name": "theirs", "language": "python"}))
        (kernel / ".complete").write_text("")
        subprocess.run(["chown", "-R", "nobody", str(home)], check=True)
    src = write(tmp_path / "in.ipynb", notebook("print(1)"))
    r = subprocess.run([NOYAU, "run", "--no-progress", str(src), str(tmp_path / "out.ipynb")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert not ran.exists(), f"the other user's kernelspec was run:\n{r.stderr}"
    assert r.returncode != 0, r.stderr
    assert f"{ours} belongs to uid 65534" in r.stderr, r.stderr


def test_delegated_cells_run_on_their_targets_headless(tmp_path):
    """The same `%%noyau on` cells an interactive notebook delegates are
    delegated by `noyau run` too: state per target, outputs in their cells."""
    (tmp_path / "noyau.toml").write_text('[profiles.side]\nbackend = "local"\n')
    nb = notebook(
        "import os\nmain_pid = os.getpid()\nx = 'main'",
        "%%noyau on side\nimport os\nx = 'side'\nprint('side pid differs:', os.getpid())",
        "print(x)",
        "%%noyau on side\nprint(x)",
        "%%noyau on side --tasks 2\nimport os\nprint('task', os.environ['NOYAU_TASK_ID'])",
    )
    src = write(tmp_path / "in.ipynb", nb)
    r = run(src, tmp_path / "out.ipynb", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    cells = json.loads((tmp_path / "out.ipynb").read_text())["cells"]
    assert text_of(cells[1]).startswith("side pid differs:")
    assert text_of(cells[2]) == "main\n", "the notebook's kernel must keep its own state"
    assert text_of(cells[3]) == "side\n", "the target must keep its state between cells"
    assert text_of(cells[4]) == "--- task 0 ---\ntask 0\n--- task 1 ---\ntask 1\n"
    assert cells[1]["metadata"]["noyau"]["target"]["target"] == "side"
    assert cells[1]["metadata"]["noyau"]["target"]["job_id"].startswith("local:")


def test_target_cells_keep_the_notebooks_execution_count(tmp_path):
    """A cell run on a target is saved with the notebook's own execution
    count (its cell and its execute_result), not its target kernel's: three
    target cells in a row are In [2], [3], [4], and the notebook kernel's
    next cell [5], numbered as nbclient numbers the same cells run in one
    kernel (test_nbclient.py compares the two)."""
    (tmp_path / "noyau.toml").write_text('[profiles.side]\nbackend = "local"\n')
    src = write(tmp_path / "in.ipynb", notebook(*lib.TARGET_CELLS))
    r = run(src, tmp_path / "out.ipynb", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    cells = json.loads((tmp_path / "out.ipynb").read_text())["cells"]
    assert [c["execution_count"] for c in cells] == [1, 2, 3, 4, 5, 6]
    results = {i: o for i, c in enumerate(cells) for o in c["outputs"]
               if o["output_type"] == "execute_result"}
    assert {i: (o["execution_count"], "".join(o["data"]["text/plain"])) for i, o in results.items()} == {
        2: (3, "3"), 4: (5, "2"), 5: (6, "20")}
    assert text_of(cells[3]) == "2\n"


def test_kernel_named_python_runs_the_native_python3(tmp_path):
    """`python` in the notebook (older notebooks, some tools) or on the
    command line is `python3`, as jupyter_client's KernelManager renames it."""
    nb = notebook("import sys; print(sys.version_info[0])")
    nb["metadata"]["kernelspec"] = {"name": "python", "display_name": "Python", "language": "python"}
    src = write(tmp_path / "in.ipynb", nb)
    r = run(src, tmp_path / "out.ipynb")
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "out.ipynb").read_text())
    assert text_of(out["cells"][0]) == "3\n"
    assert out["metadata"]["noyau"]["kernel"] == "python3"
    r = run(write(tmp_path / "in3.ipynb", notebook("print(1)")), tmp_path / "out3.ipynb",
            "--kernel", "python")
    assert r.returncode == 0, r.stderr


def test_no_reconnection_warning_at_kernel_start_or_end(tmp_path):
    """The zeromq crate's warning of a failed redial of the kernel's IOPub
    socket (each time a kernel exits) is not shown, even at NOYAU_LOG=info
    (only when NOYAU_LOG names zeromq)."""
    src = write(tmp_path / "in.ipynb", notebook("print(1)"))
    r = run(src, tmp_path / "out.ipynb", env={**os.environ, "NOYAU_LOG": "info"})
    assert r.returncode == 0, r.stderr
    # (other warnings may come under load: a kernel slow to exit is killed, and says so)
    assert "Reconnection attempt" not in r.stderr and "zeromq" not in r.stderr, r.stderr


HIST = "print(get_ipython().history_manager.hist_file)"


def test_headless_ipython_history_in_memory_unless_told(tmp_path):
    """Like nbclient, a headless IPython kernel keeps its history in memory
    (no shared history.sqlite to lock); NOYAU_IPYTHON_HIST_FILE names a file
    instead, and an empty value leaves IPython's own default."""
    src = write(tmp_path / "in.ipynb", notebook(HIST, "1 + 1"))
    ipython = tmp_path / "ipython"
    env = {**os.environ, "IPYTHONDIR": str(ipython)}
    env.pop("NOYAU_IPYTHON_HIST_FILE", None)
    r = run(src, tmp_path / "mem.ipynb", env=env)
    assert r.returncode == 0, r.stderr
    assert text_of(json.loads((tmp_path / "mem.ipynb").read_text())["cells"][0]) == ":memory:\n"
    assert not list(ipython.rglob("history.sqlite")), "the history went to a file"
    hist = tmp_path / "hist.sqlite"
    r = run(src, tmp_path / "file.ipynb", env={**env, "NOYAU_IPYTHON_HIST_FILE": str(hist)})
    assert r.returncode == 0, r.stderr
    assert text_of(json.loads((tmp_path / "file.ipynb").read_text())["cells"][0]) == f"{hist}\n"
    assert hist.is_file()
    r = run(src, tmp_path / "default.ipynb", env={**env, "NOYAU_IPYTHON_HIST_FILE": ""})
    assert r.returncode == 0, r.stderr
    default = ipython / "profile_default" / "history.sqlite"
    assert text_of(json.loads((tmp_path / "default.ipynb").read_text())["cells"][0]) == f"{default}\n"


def test_slurm_run_without_kernelspec_makes_the_managed_kernel(slurm, tmp_path):
    """--backend slurm with no python3 kernelspec: the managed kernel is made
    here, in the cache on the shared filesystem, and the job runs it."""
    env = no_kernelspec_env(tmp_path, keep=("XDG_CONFIG_HOME",))
    src = write(tmp_path / "in.ipynb", notebook("import os, sys; print(sys.prefix, os.environ['SLURM_JOB_ID'])"))
    r = subprocess.run([NOYAU, "run", "--no-progress", "--backend", "slurm", "--profile", "test",
                        "-o", "mem=400M", str(src), str(tmp_path / "out.ipynb")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "making a managed Python kernel" in r.stderr, r.stderr
    prefix, job = text_of(json.loads((tmp_path / "out.ipynb").read_text())["cells"][0]).split()
    assert prefix.startswith(str(tmp_path / "cache" / "noyau" / "kernels")), prefix
    assert job.isdigit()
    lib.wait_until(lambda: not lib.squeue_noyau(), 30, "the run's job to leave the queue", 0.5)


def oar_kernelspec(oar, data: Path, name: str, mark: str) -> None:
    """A kernelspec NAME under DATA/kernels running the test user's ipykernel,
    whose kernel sees MARK in $NOYAU_TEST_MARK."""
    spec = data / "kernels" / name
    oar.run(["mkdir", "-p", str(spec)], oar.home, check=True)
    oar.write(spec / "kernel.json", json.dumps({
        "argv": [f"{oar.venv}/bin/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": name, "language": "python", "env": {"NOYAU_TEST_MARK": mark}}))


def test_oar_job_finds_the_kernels_the_submitting_shell_finds(tmp_path):
    """OAR does not export the submitter's environment: the job still gets
    its JUPYTER_PATH and the other dirs noyau searched (an active venv's)."""
    oar = lib.require_oar()
    d = oar.workdir("jupyter-path")
    oar_kernelspec(oar, d / "jp", "from-jupyter-path", "jp")
    oar_kernelspec(oar, d / "venv" / "share" / "jupyter", "from-venv", "venv")
    show = "import os; print(os.environ['NOYAU_TEST_MARK'], os.environ['OAR_JOB_ID'])"
    for kernel, shell, mark in [("from-jupyter-path", f"JUPYTER_PATH={d / 'jp'}", "jp"),
                                ("from-venv", f"VIRTUAL_ENV={d / 'venv'}", "venv")]:
        nb = notebook(show)
        nb["metadata"]["kernelspec"]["name"] = kernel
        oar.write(d / f"{kernel}.ipynb", json.dumps(nb))
        r = oar.run([shell, str(oar.bin), "run", "--no-progress", "--backend", "oar", "-o", "time=5",
                     f"{kernel}.ipynb", "out.ipynb"], d)
        assert r.returncode == 0, r.stderr
        got, job = text_of(json.loads((d / "out.ipynb").read_text())["cells"][0]).split()
        assert (got, job.isdigit()) == (mark, True)


def test_oar_run_without_kernelspec_makes_the_managed_kernel():
    """--backend oar with no python3 kernelspec found by the submitting
    shell: the managed kernel is made before the job, in the user's cache,
    and the job runs it (not the user's own python3 of ~/.local)."""
    oar = lib.require_oar()
    d = oar.workdir("managed")
    oar.run(["mkdir", "empty"], d, check=True)
    oar.write(d / "in.ipynb", json.dumps(notebook("import sys; print(sys.prefix)")))
    cache = d / "cache"
    r = oar.run(["PATH=/usr/local/bin:/usr/bin:/bin", f"JUPYTER_DATA_DIR={d / 'empty'}",
                 f"XDG_CACHE_HOME={cache}", str(oar.bin), "run", "--no-progress", "--backend", "oar",
                 "-o", "time=10", "in.ipynb", "out.ipynb"], d, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "making a managed Python kernel" in r.stderr, r.stderr
    prefix = text_of(json.loads((d / "out.ipynb").read_text())["cells"][0]).strip()
    assert prefix.startswith(str(cache / "noyau" / "kernels")), prefix


def test_every_line_magic_works_headless(tmp_path):
    """`%noyau targets|push|pull|env show|env lock|release` work in `noyau
    run` as in an interactive kernel, their text in their cells; the
    magics only an interactive kernel can do fail their cell clearly."""
    (tmp_path / "noyau.toml").write_text('[profiles.side]\nbackend = "local"\n')
    nb = notebook(
        "%noyau targets",
        "a = 41",
        "%noyau push side a",
        "%%noyau on side\nb = a + 1",
        "%noyau pull side b",
        "print(b)",
        "%noyau targets",
        "%noyau env show",
        "%noyau release side",
        "%noyau targets",
        "%noyau dask status",
    )
    src = write(tmp_path / "in.ipynb", nb)
    r = run(src, tmp_path / "out.ipynb", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    cells = json.loads((tmp_path / "out.ipynb").read_text())["cells"]
    assert text_of(cells[0]).startswith("[noyau] no targets"), cells[0]
    assert text_of(cells[2]).startswith("[noyau] pushed a to target side"), cells[2]
    assert text_of(cells[4]).startswith("[noyau] pulled b from target side"), cells[4]
    assert text_of(cells[5]) == "42\n", "the pulled value must be the target's"
    rows = text_of(cells[6]).splitlines()
    assert rows[0].split()[:3] == ["TARGET", "STATE", "BACKEND"] and rows[1].split()[:3] == ["side", "idle", "local"], rows
    assert "kernelspec's own environment" in text_of(cells[7]), cells[7]
    assert text_of(cells[8]).startswith("[noyau] releasing target side (local job local:"), cells[8]
    assert text_of(cells[9]).startswith("[noyau] no targets"), "a released target must be gone"
    assert text_of(cells[10]).startswith("[noyau] no Dask cluster"), cells[10]
    assert all(not [o for o in c["outputs"] if o["output_type"] == "error"] for c in cells)


@pytest.mark.parametrize("magic,ename,says", [
    ("%noyau env six==1.16.0", "NoyauMagicError", "--env"),
    ("%noyau pull nowhere x", "NoyauTransferError", 'no target named "nowhere"'),
    ("%noyau release nowhere", "NoyauTargetError", 'no target named "nowhere"'),
    ("%noyau env lock", "NoyauEnvError", "has no lock"),
    ("%noyau sideways", "UsageError", "usage: %noyau"),
])
def test_a_magic_that_cannot_work_fails_its_cell_clearly(tmp_path, magic, ename, says):
    src = write(tmp_path / "in.ipynb", notebook("x = 1", magic, "print('never')"))
    r = run(src, tmp_path / "out.ipynb", cwd=str(tmp_path))
    assert r.returncode == 1, r.stderr
    # by id: papermill's error marker comes first
    cells = {c.get("id"): c for c in json.loads((tmp_path / "out.ipynb").read_text())["cells"]}
    errors = [o for o in cells["cell-1"]["outputs"] if o["output_type"] == "error"]
    assert errors and errors[0]["ename"] == ename and says in errors[0]["evalue"], cells["cell-1"]
    assert cells["cell-1"]["metadata"]["papermill"]["exception"] is True
    assert text_of(cells["cell-2"]) == "", "the run must stop at the failed magic"
