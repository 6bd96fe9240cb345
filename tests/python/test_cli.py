"""`noyau install` and `noyau kernelspecs` as the CLI contract states them."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import noyau_testlib as lib


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60)


def test_install_writes_kernelspec(noyau_bin: str, tmp_path: Path) -> None:
    r = run(noyau_bin, "install", "--name", "cli-check", "--inner", "python3", "--backend", "local",
            "--prefix", str(tmp_path), "--display-name", "CLI check")
    assert r.returncode == 0, r.stderr
    spec = lib.read_kernelspec(tmp_path, "cli-check")
    argv = spec["argv"]
    assert Path(argv[0]).name.startswith("noyau"), argv
    assert argv[1:4] == ["kernel", "-f", "{connection_file}"], argv
    flags = dict(zip(argv[4::2], argv[5::2]))
    assert flags.get("--inner") == "python3" and flags.get("--backend") == "local", argv
    assert spec["display_name"] == "CLI check"
    assert spec["language"] == "python", "the language comes from the inner kernelspec"


def test_kernelspecs_lists_installed(noyau_bin: str, noyau_kernelspec: str) -> None:
    r = run(noyau_bin, "kernelspecs")
    assert r.returncode == 0, r.stderr
    assert noyau_kernelspec in r.stdout
    r = run(noyau_bin, "kernelspecs", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert noyau_kernelspec in json.dumps(data)
    assert lib.DIRECT_KERNEL_NAME in json.dumps(data)


def test_install_without_inner_spec_fails_clearly(noyau_bin: str, tmp_path: Path) -> None:
    r = run(noyau_bin, "install", "--name", "bad", "--inner", "no-such-kernel-xyz",
            "--backend", "local", "--prefix", str(tmp_path))
    assert r.returncode != 0
    assert "no-such-kernel-xyz" in r.stderr, "the error should name the missing inner kernelspec"
    assert "panicked" not in r.stderr


def test_install_names_the_jupyterlab_extension_when_missing(noyau_bin: str, tmp_path: Path) -> None:
    """After writing the kernelspec, one line names noyau-jupyterlab and the pip
    command for the wheel the release ships (test_release.py checks that file
    name against dist/) when the Jupyter environment lacks it, and nothing
    when it has it."""
    system = [Path(d) / "labextensions" / "noyau-jupyterlab" for d in ("/usr/local/share/jupyter", "/usr/share/jupyter")]
    assert not any(d.exists() for d in system), f"the extension is installed system-wide: {system}"
    env = dict(os.environ, HOME=str(tmp_path / "home"), VIRTUAL_ENV=str(tmp_path / "env"), JUPYTER_DATA_DIR="")
    env.pop("JUPYTER_CONFIG_DIR", None)
    prefix = tmp_path / "prefix"

    def install() -> str:
        r = subprocess.run([noyau_bin, "install", "--name", "labext-hint", "--inner", "python3", "--backend", "local",
                            "--prefix", str(prefix)], capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0, r.stderr
        return r.stdout

    out = install()
    hint = [line for line in out.splitlines() if "noyau-jupyterlab" in line]
    assert len(hint) == 1 and re.search(r"pip install --no-deps noyau_jupyterlab-[0-9.]+-py3-none-any\.whl", hint[0]), out
    ext = prefix / "share" / "jupyter" / "labextensions" / "noyau-jupyterlab"
    ext.mkdir(parents=True)
    (ext / "package.json").write_text('{"name": "noyau-jupyterlab"}')
    assert "noyau-jupyterlab" not in install()
