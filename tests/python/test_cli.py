"""`noyau install` and `noyau kernelspecs` as the CLI contract states them."""

from __future__ import annotations

import json
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
