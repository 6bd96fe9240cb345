"""nbclient executes the same notebook directly and through noyau; the outputs
must be equal once timestamps, random ids and execution metadata are
normalised away.

The second half runs each notebook of the set with `noyau run` too (the
headless route) and compares it with nbclient's run of the same notebook:
the set above, and one notebook per item of issue 20 that nbclient can run
(a kernelspec named `python`, input(), history in memory, the execution
counts of cells run on targets, the `%noyau` line magics). What nbclient
cannot run (the `%noyau` magics exist in noyau only) is compared with
nbclient's run of the notebook without them, and its own output checked in
noyau alone; each test says which.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbformat.v4 import new_code_cell, new_notebook

import noyau_testlib as lib

PNG_CODE = """\
import zlib, struct
from IPython.display import Image, SVG, display
def chunk(t, d):
    return struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d) & 0xffffffff)
raw = b''.join(b'\\x00' + bytes([x * 16, 255 - x * 16, 128]) * 16 for x in range(16))
png = (b'\\x89PNG\\r\\n\\x1a\\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 16, 16, 8, 2, 0, 0, 0))
       + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))
display(Image(data=png, format='png'))
"""

SVG_CODE = """\
svg = ('<svg xmlns="http://www.w3.org/2000/svg" width="20" height="20">'
       '<circle cx="10" cy="10" r="8" fill="teal"/></svg>')
display(SVG(data=svg))
"""

CELLS = [
    # 0 stream stdout / stderr, flushed so their order is deterministic
    "import sys\nprint('to stdout', flush=True)\nprint('to stderr', file=sys.stderr, flush=True)\n"
    "print('stdout again', flush=True)",
    # 1 many lines (stream coalescing)
    "for i in range(3000):\n    print(f'line {i}')",
    # 2 PNG, 3 SVG
    PNG_CODE,
    SVG_CODE,
    # 4 display + update in the same cell
    "h = display('first', display_id=True)\nh.update('second')",
    # 5 update of the display in cell 4 from a later cell
    "h.update('third')\nprint('updated')",
    # 6 clear_output without and with wait
    "from IPython.display import clear_output\nprint('gone', flush=True)\nclear_output()\n"
    "print('kept', flush=True)\nclear_output(wait=True)\nprint('after wait')",
    # 7 error
    "1/0",
    # 8 unicode: multi-byte and emoji, in a stream and an execute_result
    "print('héllo wörld — 日本語 ✓ 😀🎉', flush=True)\n'ünïcödé 😀 — 中文'",
    # 9 input() with stdin disabled: StdinNotImplementedError
    "input('name? ')",
    # 10 rich execute_result
    "from IPython.display import HTML\nHTML('<b>bold</b> &amp; <i>italic</i>')",
    # 11 ipywidgets: create a slider, 12 change its value
    "import ipywidgets as w\ns = w.IntSlider(value=3, min=0, max=10, description='n')\ndisplay(s)",
    "s.value = 7\ns.value",
    # 13 the kernel is still fine after all that
    "print(sum(range(10)))",
]

_cache: dict[str, Any] = {}


def execute(kernel_name: str, tmp: Path) -> Any:
    if kernel_name not in _cache:
        nb = new_notebook(cells=[new_code_cell(c) for c in CELLS])
        client = NotebookClient(nb, kernel_name=kernel_name, timeout=120, allow_errors=True,
                                resources={"metadata": {"path": str(tmp)}})
        client.execute()
        nbformat.validate(nb)
        _cache[kernel_name] = nb
    return _cache[kernel_name]


# 32 hex digits or a dashed uuid, also inside e.g. "IPY_MODEL_<hex>" (so no \b)
_UUID = re.compile(r"(?<![0-9a-f])(?:[0-9a-f]{32}|[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12})(?![0-9a-f])")


def normalise(nb: Any) -> Any:
    """A plain-JSON copy without timings, kernelspec name and random ids."""
    nb = copy.deepcopy(nbformat.from_dict(nb))
    nb.metadata.pop("kernelspec", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.pop("id", None)
        merged: list[Any] = []
        for out in cell.get("outputs", []):
            if (out.output_type == "stream" and merged and merged[-1].output_type == "stream"
                    and merged[-1].name == out.name):
                merged[-1].text += out.text
            else:
                merged.append(out)
        cell.outputs = merged
    ids: dict[str, str] = {}

    def fix(s: str) -> str:
        s = _UUID.sub(lambda m: ids.setdefault(m.group(0), f"<id{len(ids)}>"), s)
        return re.sub(r"ipykernel_\d+", "ipykernel_N", s)

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            return {fix(k): walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, str):
            return fix(x)
        return x

    return walk(nb)


def outputs(nb: Any, i: int) -> list[Any]:
    return nb["cells"][i]["outputs"]


def test_notebook_outputs(kernel_name: str, tmp_path: Path) -> None:
    """What each cell must show, for either route (guards against two equal empty runs)."""
    nb = normalise(execute(kernel_name, tmp_path))
    text = lambda i, name="stdout": "".join(o.get("text", "") for o in outputs(nb, i)  # noqa: E731
                                             if o["output_type"] == "stream" and o["name"] == name)
    assert text(0) == "to stdout\nstdout again\n" and text(0, "stderr") == "to stderr\n"
    assert text(1).splitlines() == [f"line {i}" for i in range(3000)]
    assert outputs(nb, 2)[0]["data"]["image/png"]
    assert "<circle" in outputs(nb, 3)[0]["data"]["image/svg+xml"]
    assert [o["data"]["text/plain"] for o in outputs(nb, 4)] == ["'third'"]
    assert text(5) == "updated\n"
    assert text(6) == "after wait\n"
    assert outputs(nb, 7)[0]["ename"] == "ZeroDivisionError"
    assert text(8) == "héllo wörld — 日本語 ✓ 😀🎉\n"
    assert outputs(nb, 8)[-1]["data"]["text/plain"] == "'ünïcödé 😀 — 中文'"
    assert outputs(nb, 9)[0]["ename"] == "StdinNotImplementedError"
    assert "<b>bold</b>" in outputs(nb, 10)[0]["data"]["text/html"]
    assert "application/vnd.jupyter.widget-view+json" in outputs(nb, 11)[0]["data"]
    assert outputs(nb, 12)[0]["data"]["text/plain"] == "7"
    state = nb["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    sliders = [m for m in state.values() if m["model_name"] == "IntSliderModel"]
    assert len(sliders) == 1 and sliders[0]["state"]["value"] == 7
    assert text(13) == "45\n"


def test_noyau_outputs_equal_direct(noyau_kernelspec: str, tmp_path: Path) -> None:
    direct = normalise(execute(lib.DIRECT_KERNEL_NAME, tmp_path))
    noyau = normalise(execute(noyau_kernelspec, tmp_path))
    assert noyau["metadata"] == direct["metadata"]
    for i, (d, n) in enumerate(zip(direct["cells"], noyau["cells"])):
        assert n == d, f"cell {i} differs:\n{CELLS[i]}"
    assert len(noyau["cells"]) == len(direct["cells"])


@pytest.fixture(autouse=True, scope="module")
def _clear_cache() -> Any:
    yield
    _cache.clear()


# --- `noyau run` against nbclient (issue 20) ---------------------------------

ERROR_MARKER = "papermill-error-cell-tag"
SIDE_PROFILE = '[profiles.side]\nbackend = "local"\n'


def by_nbclient(cells: list[str], tmp: Path, kernelspec: str = "python3",
                allow_errors: bool = True) -> Any:
    """nbclient's run of CELLS in a notebook naming KERNELSPEC (resolved by
    nbclient and jupyter_client, as a user's notebook is)."""
    nb = new_notebook(cells=[new_code_cell(c) for c in cells],
                      metadata={"kernelspec": {"name": kernelspec, "display_name": kernelspec,
                                               "language": "python"}})
    client = NotebookClient(nb, timeout=120, allow_errors=allow_errors,
                            resources={"metadata": {"path": str(tmp)}})
    try:
        client.execute()
    except CellExecutionError:
        assert not allow_errors
    return nb


def by_noyau_run(noyau_bin: str, cells: list[str], tmp: Path, *args: str,
                 kernelspec: str = "python3") -> tuple[subprocess.CompletedProcess[str], Any]:
    """`noyau run` of the same notebook, in TMP (its noyau.toml, if any)."""
    nb = new_notebook(cells=[new_code_cell(c) for c in cells],
                      metadata={"kernelspec": {"name": kernelspec, "display_name": kernelspec,
                                               "language": "python"}})
    nbformat.write(nb, tmp / "in.ipynb")
    r = subprocess.run([noyau_bin, "run", "--no-progress", *args, "in.ipynb", "out.ipynb"],
                       cwd=tmp, capture_output=True, text=True, timeout=300)
    return r, nbformat.read(tmp / "out.ipynb", as_version=4)


WIDGETS = "application/vnd.jupyter.widget-state+json"
_MODEL_REF = re.compile(r"IPY_MODEL_([0-9a-f]{32})")


def widget_models(nb: Any) -> list[str]:
    """The saved widget models, each as JSON with the models it refers to
    named by their model name, sorted: comparable whatever the random ids
    and the order the two writers keep (noyau's file is sorted by key)."""
    state = nb["metadata"].pop("widgets", {}).get(WIDGETS, {}).get("state", {})
    names = {k: m["model_name"] for k, m in state.items()}
    return sorted(_MODEL_REF.sub(lambda r: f"IPY_MODEL_{names.get(r.group(1), '?')}",
                                 json.dumps(m, sort_keys=True)) for m in state.values())


def comparable(nb: Any) -> Any:
    """normalise(), without what only papermill's conventions add (its
    error-marker cells, its and noyau's metadata); the widget models as
    widget_models() gives them."""
    nb = copy.deepcopy(nb)
    models = widget_models(nb)
    nb = normalise(nb)
    if models:
        nb["metadata"]["widgets"] = models
    nb["cells"] = [c for c in nb["cells"] if ERROR_MARKER not in c["metadata"].get("tags", [])]
    for c in nb["cells"]:
        for k in ("papermill", "noyau"):
            c["metadata"].pop(k, None)
        if c["metadata"].get("tags") == []:  # papermill's empty tags
            del c["metadata"]["tags"]
    for k in ("papermill", "noyau"):
        nb["metadata"].pop(k, None)
    return nb


def assert_same(run: Any, direct: Any, cells: list[str]) -> None:
    run, direct = comparable(run), comparable(direct)
    assert run["metadata"] == direct["metadata"]
    assert len(run["cells"]) == len(direct["cells"])
    for i, (n, d) in enumerate(zip(run["cells"], direct["cells"])):
        assert n == d, f"cell {i} differs:\n{cells[i]}"


def errors(nb: Any) -> list[str]:
    return [o["ename"] for c in nb["cells"] for o in c.get("outputs", []) if o["output_type"] == "error"]


def test_noyau_run_gives_nbclients_outputs(noyau_bin: str, tmp_path: Path) -> None:
    """The set above (streams, images, displays and their updates,
    clear_output, an error, unicode, input(), rich results, widgets):
    `noyau run --allow-errors` saves what nbclient (allow_errors) saves."""
    (tmp_path / "nbclient").mkdir()
    direct = by_nbclient(CELLS, tmp_path / "nbclient")
    r, run = by_noyau_run(noyau_bin, CELLS, tmp_path, "--allow-errors")
    assert r.returncode == 0, r.stderr
    assert_same(run, direct, CELLS)


def test_kernelspec_python_runs_as_under_nbclient(noyau_bin: str, tmp_path: Path) -> None:
    """A notebook whose kernelspec is named `python` runs with the native
    Python kernel under nbclient (jupyter_client's rename) and noyau run alike."""
    cells = ["import sys\nprint(sys.version_info[0], sys.executable)", "sys.version_info[0] * 2"]
    (tmp_path / "nbclient").mkdir()
    direct = by_nbclient(cells, tmp_path / "nbclient", kernelspec="python")
    r, run = by_noyau_run(noyau_bin, cells, tmp_path, kernelspec="python")
    assert r.returncode == 0, r.stderr
    assert "".join(run.cells[0].outputs[0]["text"]).startswith("3 ")
    assert_same(run, direct, cells)


def test_input_fails_its_cell_at_once_as_under_nbclient(noyau_bin: str, tmp_path: Path) -> None:
    """input() fails its cell with nbclient's error (stdin is not offered to
    a headless kernel: StdinNotImplementedError), and the run stops there."""
    cells = ["print('before')", "input('name? ')", "print('after')"]
    (tmp_path / "nbclient").mkdir()
    direct = by_nbclient(cells, tmp_path / "nbclient", allow_errors=False)
    r, run = by_noyau_run(noyau_bin, cells, tmp_path)
    assert r.returncode == 1, r.stderr
    assert errors(run) == errors(direct) == ["StdinNotImplementedError"]
    assert_same(run, direct, cells)


def test_history_in_memory_as_under_nbclient(noyau_bin: str, tmp_path: Path) -> None:
    """A headless IPython kernel keeps its history in memory, as nbclient's
    does by default (no shared history.sqlite to lock)."""
    cells = ["print(get_ipython().history_manager.hist_file)", "1 + 1"]
    (tmp_path / "nbclient").mkdir()
    direct = by_nbclient(cells, tmp_path / "nbclient")
    r, run = by_noyau_run(noyau_bin, cells, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "".join(run.cells[0].outputs[0]["text"]) == ":memory:\n"
    assert_same(run, direct, cells)


def without_magics(cells: list[str]) -> list[str]:
    """The notebook nbclient can run: `%noyau` line-magic cells removed,
    `%%noyau on` cells run in the notebook's own kernel."""
    out = []
    for c in cells:
        if c.startswith("%noyau "):
            continue
        out.append(c.split("\n", 1)[1] if c.startswith("%%noyau on ") else c)
    return out


def test_target_cells_numbered_as_nbclient_numbers_them(noyau_bin: str, tmp_path: Path) -> None:
    """Cells run on a target keep the notebook's execution count: `noyau
    run` numbers them (cells and execute_results) as nbclient numbers the
    same cells run in one kernel (nbclient cannot run `%%noyau on`, so its
    notebook runs their bodies in its kernel; the outputs are the same)."""
    (tmp_path / "noyau.toml").write_text(SIDE_PROFILE)
    (tmp_path / "nbclient").mkdir()
    plain = without_magics(lib.TARGET_CELLS)
    direct = by_nbclient(plain, tmp_path / "nbclient")
    r, run = by_noyau_run(noyau_bin, lib.TARGET_CELLS, tmp_path)
    assert r.returncode == 0, r.stderr
    assert [c.metadata["noyau"]["target"]["target"] for c in run.cells if "noyau" in c.metadata] == ["side"] * 4
    assert [c.execution_count for c in direct.cells] == [1, 2, 3, 4, 5, 6]
    for c in run.cells:
        c.source = c.source.split("\n", 1)[1] if c.source.startswith("%%noyau on ") else c.source
    assert_same(run, direct, plain)


def test_target_cells_numbered_alike_through_the_noyau_kernel(noyau_kernelspec: str, tmp_path: Path) -> None:
    """The interactive route: nbclient itself running the notebook on
    noyau's kernel numbers the target cells as it numbers the cells of one
    kernel (the proxy renumbers); the where-line each target cell shows (a
    display, noyau only) is checked here, then left out of the comparison."""
    (tmp_path / "noyau.toml").write_text(SIDE_PROFILE)
    (tmp_path / "nbclient").mkdir()
    plain = without_magics(lib.TARGET_CELLS)
    direct = by_nbclient(plain, tmp_path / "nbclient")
    nb = new_notebook(cells=[new_code_cell(c) for c in lib.TARGET_CELLS])
    NotebookClient(nb, kernel_name=noyau_kernelspec, timeout=120,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    for c in nb.cells:
        if c.source.startswith("%%noyau on "):
            where = c.outputs.pop(0)
            assert where["data"]["text/plain"].startswith("[noyau] on target side (local job"), where
            c.source = c.source.split("\n", 1)[1]
    assert [c.execution_count for c in nb.cells] == [1, 2, 3, 4, 5, 6]
    assert comparable(nb)["cells"] == comparable(direct)["cells"]


MAGIC_CELLS = [
    "%noyau targets",
    "a = 41",
    "%noyau push side a",
    "%%noyau on side\nb = a + 1\nb",
    "%noyau pull side b",
    "print(b)",
    "%noyau env show",
    "%noyau release side",
    "%noyau targets",
]


def test_line_magics_leave_the_other_cells_as_nbclient_runs_them(noyau_bin: str, tmp_path: Path) -> None:
    """The `%noyau` line magics exist in noyau only, so nbclient cannot run
    them: their own text is checked here in noyau alone, and every other
    cell must show what nbclient shows for the notebook without the magics
    (the target's cell run in the one kernel: push and pull make the values
    the same). Execution counts are left out: the magic cells take none."""
    (tmp_path / "noyau.toml").write_text(SIDE_PROFILE)
    (tmp_path / "nbclient").mkdir()
    plain = without_magics(MAGIC_CELLS)
    direct = comparable(by_nbclient(plain, tmp_path / "nbclient"))
    r, run = by_noyau_run(noyau_bin, MAGIC_CELLS, tmp_path)
    assert r.returncode == 0, r.stderr
    run = comparable(run)
    magic = [c for c in run["cells"] if c["source"].startswith("%noyau ")]
    said = ["".join(o.get("text", "")) for c in magic for o in c["outputs"]]
    starts = ["[noyau] no targets", "[noyau] pushed a to target side", "[noyau] pulled b from target side",
              "", "[noyau] releasing target side (local job", "[noyau] no targets"]
    assert len(said) == len(starts) and all(t.startswith(s) for t, s in zip(said, starts)), said
    assert "kernelspec's own environment" in said[3], said
    assert not errors(run), run
    others = [c for c in run["cells"] if not c["source"].startswith("%noyau ")]
    for c in others + direct["cells"]:
        c["source"] = c["source"].split("\n", 1)[1] if c["source"].startswith("%%noyau on ") else c["source"]
        c.pop("execution_count", None)
        for o in c["outputs"]:
            o.pop("execution_count", None)
    assert others == direct["cells"]
