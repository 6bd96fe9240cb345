"""The proxy issue's checks through a Slurm-backed kernelspec: the
jupyter_kernel_test suite and the nbclient output comparison, with the kernel
in a batch job on the test cluster.

One documented difference: while a job is queued the proxy answers
kernel_info from the inner kernelspec (language name, mimetype, extension),
so the notebook's `language_info` may lack the version fields a direct run
has. It is compared by name only; every cell's outputs must be equal.
"""

from __future__ import annotations

from pathlib import Path

import noyau_testlib as lib
from noyau_testlib import require_slurm
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


TestSlurmKernel.__test__ = True  # type: ignore[attr-defined]
TestSlurmWelcome.__test__ = True  # type: ignore[attr-defined]


def test_slurm_outputs_equal_direct(tmp_path: Path) -> None:
    require_slurm()
    direct = normalise(execute(lib.DIRECT_KERNEL_NAME, tmp_path))
    slurm = normalise(execute(lib.SLURM_KERNEL_NAME, tmp_path))
    d_li = direct["metadata"].pop("language_info")
    s_li = slurm["metadata"].pop("language_info")
    assert s_li["name"] == d_li["name"]
    assert slurm["metadata"] == direct["metadata"]
    assert len(slurm["cells"]) == len(direct["cells"])
    for i, (d, s) in enumerate(zip(direct["cells"], slurm["cells"])):
        assert s == d, f"cell {i} differs:\n{CELLS[i]}"
    assert not lib.squeue_noyau() or lib.wait_until(lambda: not lib.squeue_noyau(), 20,
                                                    "the notebook's job to end", interval=0.5)
