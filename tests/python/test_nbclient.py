"""nbclient executes the same notebook directly and through noyau; the outputs
must be equal once timestamps, random ids and execution metadata are
normalised away.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient
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
