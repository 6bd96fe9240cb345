"""What the browser tests share: Debian's headless Chromium driven by
playwright-core from tests/browser (scripts/test installs both), and the
noyau JupyterLab extension's presence in a Python environment."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BROWSER = ROOT / "tests" / "browser"
LABEXT_NAME = "noyau-jupyterlab"


def _missing(what: str) -> None:
    """Fails under CI (or with a test cluster up), skips otherwise."""
    msg = f"missing for the browser test: {what} (scripts/test installs it)"
    if os.environ.get("CI") or os.environ.get("NOYAU_TEST_SLURM"):
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def require_browser() -> None:
    missing = [what for what, ok in (("/usr/bin/chromium", Path("/usr/bin/chromium").exists()),
                                     ("node", shutil.which("node") is not None),
                                     ("tests/browser/node_modules/playwright-core",
                                      (BROWSER / "node_modules" / "playwright-core").exists())) if not ok]
    if missing:
        _missing(", ".join(missing))


def require_labextension(prefix: Path) -> None:
    """The extension's wheel installed in the environment at `prefix`."""
    if not (prefix / "share" / "jupyter" / "labextensions" / LABEXT_NAME / "package.json").is_file():
        _missing(f"the {LABEXT_NAME} extension in {prefix} (its wheel, built from labextension/)")
