"""The proxy issue's checks through Slurm-, OAR- and Grid Engine-backed
kernelspecs: the jupyter_kernel_test suite and the nbclient output
comparison, with the kernel in a batch job on each test cluster.

One documented difference: while a job is queued the proxy answers
kernel_info from the inner kernelspec (language name, mimetype, extension),
so the notebook's `language_info` may lack the version fields a direct run
has. It is compared by name only; every cell's outputs must be equal.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import noyau_testlib as lib
from noyau_testlib import require_oar, require_sge, require_slurm
from test_kernel_suite import _PythonKernelTests, _WelcomeTests
from test_nbclient import CELLS, execute, normalise


def _wait_until_running(kc) -> None:  # type: ignore[no-untyped-def]
    """Runs one cell to the end: once it has, the job runs and the agent is
    attached. The suite checks a running kernel's protocol; while the job is
    queued the proxy puts a queue note before a cell's own messages, which
    test_slurm_kernel.py checks."""
    reply = kc.execute_interactive("1", timeout=300, output_hook=lambda m: None)
    assert reply["content"]["status"] == "ok", reply["content"]


class TestSlurmKernel(_PythonKernelTests):
    kernel_name = lib.SLURM_KERNEL_NAME

    @classmethod
    def setUpClass(cls) -> None:
        require_slurm()
        super().setUpClass()
        _wait_until_running(cls.kc)


class TestSlurmWelcome(_WelcomeTests):
    kernel_name = lib.SLURM_KERNEL_NAME

    @classmethod
    def setUpClass(cls) -> None:
        require_slurm()
        super().setUpClass()


class TestOarKernel(_PythonKernelTests):
    kernel_name = lib.OAR_KERNEL_NAME

    @classmethod
    def setUpClass(cls) -> None:
        require_oar()
        super().setUpClass()
        _wait_until_running(cls.kc)


class TestOarWelcome(_WelcomeTests):
    kernel_name = lib.OAR_KERNEL_NAME

    @classmethod
    def setUpClass(cls) -> None:
        require_oar()
        super().setUpClass()


class TestSgeKernel(_PythonKernelTests):
    kernel_name = lib.SGE_KERNEL_NAME

    @classmethod
    def setUpClass(cls) -> None:
        require_sge()
        super().setUpClass()
        _wait_until_running(cls.kc)


class TestSgeWelcome(_WelcomeTests):
    kernel_name = lib.SGE_KERNEL_NAME

    @classmethod
    def setUpClass(cls) -> None:
        require_sge()
        super().setUpClass()


for _cls in (TestSlurmKernel, TestSlurmWelcome, TestOarKernel, TestOarWelcome, TestSgeKernel,
             TestSgeWelcome):
    _cls.__test__ = True  # type: ignore[attr-defined]


def _site_packages(nb: Any) -> Any:
    """Tracebacks name ipykernel's files: the OAR kernel runs as its test
    user, with a venv of its own at the same pins."""
    text = re.sub(r"[~/][^\"\s\\]*/lib/python3\.\d+/site-packages/", "<site-packages>/",
                  json.dumps(nb))
    return json.loads(text)


def test_outputs_equal_direct(batch: lib.Cluster, tmp_path: Path) -> None:
    direct = _site_packages(normalise(execute(lib.DIRECT_KERNEL_NAME, tmp_path)))
    other = _site_packages(normalise(execute(batch.kernel_name, tmp_path)))
    d_li = direct["metadata"].pop("language_info")
    o_li = other["metadata"].pop("language_info")
    assert o_li["name"] == d_li["name"]
    assert other["metadata"] == direct["metadata"]
    assert len(other["cells"]) == len(direct["cells"])
    for i, (d, o) in enumerate(zip(direct["cells"], other["cells"])):
        assert o == d, f"cell {i} differs:\n{CELLS[i]}"
    lib.wait_until(lambda: not batch.jobs(), 30, "the notebook's job to end", interval=0.5)
