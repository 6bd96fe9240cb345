"""`noyau run` against what happens to files while it runs: the disk filling
up under the output, the input notebook edited on disk, a second run writing
the same output. Nothing the user wrote or ran is lost in any of them.

The disk-full tests mount a 1 MiB tmpfs (root only, as scripts/test runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

import noyau_testlib as lib
from test_run_noyau import NOYAU, notebook, text_of, write


class Run:
    """`noyau run` in the background, its stderr collected as it comes."""

    def __init__(self, *args: object) -> None:
        self.lines: list[str] = []
        self.p = subprocess.Popen([NOYAU, "run", "--no-progress", *map(str, args)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self) -> None:
        assert self.p.stderr
        for line in self.p.stderr:
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float, what: str) -> None:
        """Until `text` is in stderr; a failure shows the run's stderr so far."""
        try:
            lib.wait_until(lambda: text in self.stderr, timeout, what)
        except AssertionError as e:
            raise AssertionError(f"{e}; exit status {self.p.poll()}, stderr so far:\n{self.stderr}") from None

    def wait(self, timeout: float = 120) -> int:
        rc = self.p.wait(timeout=timeout)
        self.t.join(5)
        return rc


def wait_for_file(flag: Path) -> str:
    """A cell that waits (with a deadline) until the test creates `flag`."""
    return (f"import os, time\nt = time.monotonic()\n"
            f"while not os.path.exists({str(flag)!r}):\n"
            f"    assert time.monotonic() - t < 60, 'the test never said go'\n"
            f"    time.sleep(0.02)\n")


# Closed at the end, so that removing it frees the space.
FILL = ("try:\n"
        "    with open({path!r}, 'wb') as f:\n"
        "        while True:\n"
        "            f.write(b'x' * 65536); f.flush()\n"
        "except OSError as e:\n"
        "    print('disk full:', e.strerror)\n")


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    if os.getuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the disk-full tests mount a tmpfs and need root", pytrace=False)
        pytest.skip("mounting a tmpfs needs root")
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_disk_full_mid_run_keeps_the_last_save_and_recovers(tmp_path: Path, small_disk: Path) -> None:
    go = tmp_path / "go"
    src = write(tmp_path / "in.ipynb", notebook(
        "print('before')", FILL.format(path=str(small_disk / "filler")), wait_for_file(go) + "print('after')"))
    out = small_disk / "out.ipynb"
    r = Run(src, out)
    # A save while the disk is full fails, says so, and leaves the last one.
    r.wait_for("No space left", 60, "a failed save reported")
    assert "keeps the last complete save" in r.stderr, r.stderr
    json.loads(out.read_text())  # still a complete notebook
    (small_disk / "filler").unlink()
    go.touch()
    assert r.wait() == 0, r.stderr
    cells = json.loads(out.read_text())["cells"]
    assert [text_of(c) for c in cells] == ["before\n", "disk full: No space left on device\n", "after\n"]
    assert sorted(p.name for p in small_disk.iterdir()) == ["out.ipynb"], "temporary files left behind"


def test_disk_full_to_the_end_rescues_the_notebook(tmp_path: Path, small_disk: Path) -> None:
    src = write(tmp_path / "in.ipynb", notebook(
        "print('before')", FILL.format(path=str(small_disk / "filler")), "print('after')"))
    out = small_disk / "out.ipynb"
    r = Run(src, out)
    assert r.wait() == 2
    assert "No space left" in r.stderr and "rescued" in r.stderr, r.stderr
    json.loads(out.read_text())  # the last complete save, never a torn file
    rescued = Path(r.stderr.split("rescued to ", 1)[1].split()[0].rstrip(";,."))
    cells = json.loads(rescued.read_text())["cells"]
    assert [text_of(c) for c in cells] == ["before\n", "disk full: No space left on device\n", "after\n"]
    assert "panicked" not in r.stderr


def test_input_edited_during_the_run_is_left_alone(tmp_path: Path) -> None:
    src = tmp_path / "in.ipynb"
    edited = json.dumps(notebook("print('the user saved this meanwhile')"), indent=1)
    write(src, notebook(f"open({str(src)!r}, 'w').write({edited!r})\nprint('first')", "print('second')"))
    out = tmp_path / "out.ipynb"
    r = Run(src, out)
    assert r.wait() == 0, r.stderr
    assert src.read_text() == edited, "the user's edit of the input was overwritten"
    assert "changed on disk during the run" in r.stderr, r.stderr
    cells = json.loads(out.read_text())["cells"]
    assert [text_of(c) for c in cells] == ["first\n", "second\n"]


def test_two_runs_writing_the_same_output(tmp_path: Path) -> None:
    go = tmp_path / "go"
    first = write(tmp_path / "first.ipynb", notebook(wait_for_file(go) + "print('first run')"))
    second = write(tmp_path / "second.ipynb", notebook("print('second run')"))
    out = tmp_path / "out.ipynb"
    a = Run(first, out)
    lib.wait_until(lambda: (tmp_path / ".out.ipynb.noyau-lock").exists(), 60, "the first run's lock")
    b = Run(second, out)
    assert b.wait() == 2
    assert "being written by another noyau run" in b.stderr and f"pid {a.p.pid}" in b.stderr, b.stderr
    go.touch()
    assert a.wait() == 0, a.stderr
    assert text_of(json.loads(out.read_text())["cells"][0]) == "first run\n"
    assert not (tmp_path / ".out.ipynb.noyau-lock").exists()
    # Once the first run has ended, the output is free again.
    c = Run(second, out)
    assert c.wait() == 0, c.stderr
    assert text_of(json.loads(out.read_text())["cells"][0]) == "second run\n"
