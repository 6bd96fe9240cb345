"""The release artefacts of scripts/release (scripts/test builds them before
pytest): what a user or a centre installs, checked as they would use it.

* the binaries link nothing beyond the C runtime (no libpam: PAM is opened at
  run time), both the wheel's and the one `cargo build` makes;
* the wheel's binary asks for no glibc symbol newer than 2.17, is stripped,
  ≤ 20 MB, and says its version;
* `pip install` of the wheel into a fresh venv gives a `noyau` on PATH that
  runs examples/hello.ipynb;
* the same binary runs hello.ipynb in a bubblewrap sandbox whose root holds
  only it, a Python with ipykernel, and the libraries these load (found with
  ldd), so nothing else of this machine is needed; there, without libpam,
  the hub refuses to start in PAM mode and says why;
* the tarball, unpacked as a centre's site install, is put on PATH by the
  example Lmod modulefile (Debian's real lmod);
* the JupyterLab extension's wheel holds the prebuilt extension (its
  package.json and remoteEntry, no sources); `noyau install` names that
  file, and pip installs it into a fresh venv with no Node on PATH, where
  JupyterLab lists it.

Without the artefacts (dist/ not built) these tests skip, except under CI,
where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import noyau_testlib as lib

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "dist"
VERSION = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]
HELLO = ROOT / "examples" / "hello.ipynb"
# Debian's lmod package, unpacked by scripts/test (it conflicts with
# environment-modules, which noyau-env's tests use): the test binds its
# /usr/share/lmod in a bubblewrap sandbox, where Lmod's fixed paths hold.
LMOD_DIR = Path("/opt/noyau-test/lmod")
LMOD_SHARE = "/usr/share/lmod"
LMOD_PATHS = [LMOD_SHARE, "/usr/lib/lmod"]
# The C runtime: what every Linux has. libpthread and libdl are split out of
# libc by older glibcs (and named by zig's 2.17 link); vdso is the kernel's.
ALLOWED_LIBS = {"linux-vdso.so.1", "ld-linux-x86-64.so.2", "libc.so.6", "libm.so.6",
                "libgcc_s.so.1", "libpthread.so.0", "libdl.so.2"}
MAX_GLIBC = (2, 17)
MAX_BYTES = 24_000_000  # 20.0 MB on 2026-12-06 (17.2 MB before the hub's templates, Grid Engine and noyau-magic)


def require(ok: bool, what: str) -> None:
    """Skip when a prerequisite is missing, except under CI, where that fails."""
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(what, pytrace=False)
    pytest.skip(what)


def artefact(pattern: str) -> Path:
    found = sorted(DIST.glob(pattern))
    require(len(found) == 1, f"expected one dist/{pattern}, found {[p.name for p in found]}: "
                             "scripts/release builds it (scripts/test runs it)")
    return found[0]


@pytest.fixture(scope="module")
def wheel() -> Path:
    return artefact(f"noyau-{VERSION}-py3-none-*manylinux*_x86_64*.whl")


@pytest.fixture(scope="module")
def tarball() -> Path:
    return artefact(f"noyau-{VERSION}-x86_64-linux.tar.gz")


@pytest.fixture(scope="module")
def wheel_bin(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The binary inside the wheel, as pip would install it."""
    out = tmp_path_factory.mktemp("wheel-bin") / "noyau"
    with zipfile.ZipFile(wheel) as z:
        out.write_bytes(z.read(f"noyau-{VERSION}.data/scripts/noyau"))
    out.chmod(0o755)
    return out


def ldd(path: Path | str) -> dict[str, str | None]:
    """Library name → resolved path (None when ldd found none) for `path`."""
    p = subprocess.run(["ldd", str(path)], capture_output=True, text=True, timeout=60)
    if "not a dynamic executable" in p.stdout + p.stderr:
        return {}
    assert p.returncode == 0, p.stderr
    libs: dict[str, str | None] = {}
    for line in p.stdout.splitlines():
        m = re.match(r"\s*(\S+)(?: => (\S+))?", line)
        if not m:
            continue
        name, where = m.group(1), m.group(2)
        if where == "not":  # "=> not found"
            libs[Path(name).name] = None
        elif where:
            libs[Path(name).name] = where
        else:  # the loader (an absolute path) or the vdso
            libs[Path(name).name] = name if name.startswith("/") else None
    return libs


def check_outputs(out: dict, n: int) -> None:
    """examples/hello.ipynb ran to the end with the parameter n."""
    code = [c for c in out["cells"] if c["cell_type"] == "code"]
    assert any("injected-parameters" in c["metadata"].get("tags", []) for c in code), code
    outputs = [o for c in code for o in c["outputs"]]
    text = ["".join(o["text"]) for o in outputs if o["output_type"] == "stream"]
    assert any(t.startswith("hello, world, from ") for t in text), code
    # nbformat keeps multi-line strings as lists of lines
    results = [{k: "".join(v) for k, v in o["data"].items()} for o in outputs
               if o["output_type"] == "execute_result"]
    squares = [i * i for i in range(n)]
    assert {"text/plain": str(squares)} in results, results
    assert any(r.get("text/markdown") == f"The sum of the first {n} squares is **{sum(squares)}**."
               for r in results), results


# --------------------------------------------------------------------------
# the binaries


@pytest.mark.parametrize("which", ["wheel", "cargo"])
def test_the_binaries_link_only_the_c_runtime(which: str, request: pytest.FixtureRequest) -> None:
    if which == "cargo":
        lib.require_noyau()
        binary = Path(lib.noyau_bin() or "")
    else:
        binary = request.getfixturevalue("wheel_bin")
    libs = ldd(binary)
    assert "libc.so.6" in libs, libs
    assert set(libs) <= ALLOWED_LIBS, f"{binary} links {sorted(set(libs) - ALLOWED_LIBS)}"
    assert all(libs[k] for k in libs if k != "linux-vdso.so.1"), libs


def test_the_wheel_binary_needs_glibc_2_17_is_stripped_and_small(wheel: Path, wheel_bin: Path) -> None:
    require(shutil.which("objdump") is not None, "objdump missing (Debian: binutils)")
    dyn = subprocess.run(["objdump", "-T", str(wheel_bin)], capture_output=True, text=True,
                         check=True).stdout
    versions = {tuple(int(x) for x in v.split(".")) for v in re.findall(r"\bGLIBC_([0-9.]+)\b", dyn)}
    assert versions, "no versioned glibc symbol at all: not a glibc binary?"
    assert max(versions) <= MAX_GLIBC, f"needs GLIBC_{'.'.join(map(str, max(versions)))}"
    sections = subprocess.run(["objdump", "-h", str(wheel_bin)], capture_output=True, text=True,
                              check=True).stdout
    assert ".debug_" not in sections and ".symtab" not in sections, "not stripped"
    assert wheel_bin.stat().st_size <= MAX_BYTES, wheel_bin.stat().st_size
    with zipfile.ZipFile(wheel) as z:
        tags = re.findall(r"^Tag: (\S+)$", z.read(f"noyau-{VERSION}.dist-info/WHEEL").decode(), re.M)
    assert "py3-none-manylinux_2_17_x86_64" in tags, tags
    v = subprocess.run([str(wheel_bin), "--version"], capture_output=True, text=True, timeout=30)
    assert v.returncode == 0 and v.stdout.strip() == f"noyau {VERSION}", v


# --------------------------------------------------------------------------
# pip install


def test_pip_install_of_the_wheel_puts_a_noyau_on_path_that_runs_hello(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    p = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "--no-index",
                        "--disable-pip-version-check", "-q", str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    env = dict(os.environ, PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert shutil.which("noyau", path=env["PATH"]) == str(venv / "bin/noyau")
    out = tmp_path / "out.ipynb"
    # the python3 kernelspec: conftest's (this test venv's ipykernel)
    p = subprocess.run(["noyau", "run", str(HELLO), "-p", "n", "4", str(out)], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    check_outputs(json.loads(out.read_text()), 4)


# --------------------------------------------------------------------------
# a bare sandbox


def _walk(path: str, ops: dict[str, list[str]]) -> str:
    """The real path of `path`; each symlink met on the way becomes a
    `--symlink` op, so the sandbox has the same names as the host."""
    cur = "/"
    parts = Path(path).parts[1:]
    for i, part in enumerate(parts):
        nxt = os.path.join(cur, part)
        if os.path.islink(nxt):
            target = os.readlink(nxt)
            ops[nxt] = ["--symlink", target, nxt]
            rest = os.path.join(os.path.normpath(os.path.join(cur, target)), *parts[i + 1:])
            return _walk(rest, ops)
        cur = nxt
    return cur


def _loaded_extensions(python: str, venv: str) -> list[str]:
    """The extension modules a Python kernel loads: those imported by
    ipykernel's kernel app and the notebook's own imports."""
    code = ("import sys, platform, ipykernel.kernelapp, ipykernel.ipkernel, IPython.display\n"
            "print('\\n'.join(m.__file__ for m in list(sys.modules.values())"
            " if (getattr(m, '__file__', None) or '').endswith('.so')))")
    p = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120,
                       env={"PATH": f"{venv}/bin:/usr/bin:/bin", "VIRTUAL_ENV": venv})
    assert p.returncode == 0, p.stderr
    return p.stdout.split()


def sandbox(noyau: Path, work: Path, with_python: bool) -> list[str]:
    """bwrap arguments for a root holding only `noyau` (as /opt/noyau/bin/noyau),
    the work dir, and with_python: this test's venv, its base Python, and the
    libraries they load; everything read-only but the work dir and /tmp."""
    ops: dict[str, list[str]] = {}
    needs = [str(noyau)]
    prefixes: list[str] = []
    if with_python:
        venv, base = sys.prefix, sys.base_prefix
        prefixes = [_walk(venv, ops), _walk(base, ops)]
        needs += [os.path.realpath(sys.executable), *_loaded_extensions(sys.executable, venv)]
    libs = {where for f in needs for where in ldd(f).values() if where}
    for prefix in prefixes:
        ops[prefix] = ["--ro-bind", prefix, prefix]
    for where in sorted(libs):
        real = _walk(where, ops)
        if not any(real.startswith(p + "/") for p in prefixes):
            ops[real] = ["--ro-bind", real, real]
    assert not [k for k in ops if "libpam" in k], "libpam must not be in the sandbox"
    args = ["bwrap", "--unshare-all", "--die-with-parent", "--clearenv",
            "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
            "--ro-bind", str(noyau), "/opt/noyau/bin/noyau",
            "--bind", str(work), str(work), "--chdir", str(work),
            "--setenv", "HOME", "/tmp", "--setenv", "USER", "root"]
    path = "/opt/noyau/bin"
    if with_python:
        path = f"/opt/noyau/bin:{sys.prefix}/bin"
        args += ["--setenv", "VIRTUAL_ENV", sys.prefix]
    args += ["--setenv", "PATH", path]
    for op in ops.values():
        args += op
    return args


def require_bwrap() -> None:
    require(shutil.which("bwrap") is not None, "bwrap missing (Debian: bubblewrap)")
    p = subprocess.run(["bwrap", "--unshare-all", "--ro-bind", "/", "/", "true"], capture_output=True,
                       text=True, timeout=30)
    require(p.returncode == 0, f"bwrap cannot make a sandbox here: {p.stderr.strip()}")


def test_the_wheel_binary_runs_hello_in_a_sandbox_with_only_it_and_python(wheel_bin: Path, tmp_path: Path) -> None:
    require_bwrap()
    nb = tmp_path / "hello.ipynb"
    shutil.copy(HELLO, nb)
    args = sandbox(wheel_bin, tmp_path, with_python=True)
    # nothing of the host but what was bound: no /etc, no /usr/bin
    p = subprocess.run([*args, "python", "-c", "import os; print(os.path.exists('/etc/passwd'),"
                        " os.path.exists('/usr/bin/env'), os.path.exists('/usr/lib/x86_64-linux-gnu/libpam.so.0'))"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.split() == ["False", "False", "False"], p
    p = subprocess.run([*args, "noyau", "run", str(nb), "-p", "n", "6", str(tmp_path / "out.ipynb")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{p.stderr}\nbwrap {' '.join(args)}"
    check_outputs(json.loads((tmp_path / "out.ipynb").read_text()), 6)


def test_without_libpam_the_hub_refuses_to_start_in_pam_mode(wheel_bin: Path, tmp_path: Path) -> None:
    require_bwrap()
    cfg = tmp_path / "hub.toml"
    cfg.write_text(f"""
listen = "127.0.0.1:{lib.free_port()}"
link_bind = "127.0.0.1:{lib.free_port()}"
state_dir = "{tmp_path / 'state'}"
auth = "pam"

[profiles.cpu]
label = "CPU"
partitions = ["debug"]
cores = {{ min = 1, max = 1, default = 1 }}
minutes = {{ min = 1, max = 5, default = 5 }}
""")
    # On this host (libpam present) the same binary and configuration start.
    log = tmp_path / "hub.log"
    with log.open("w") as err:
        hub = subprocess.Popen([str(wheel_bin), "hub", "--config", str(cfg)], stderr=err)
    try:
        lib.wait_until(lambda: "listening on" in log.read_text() or hub.poll() is not None, 30,
                       "the hub listening (or exiting)")
        assert hub.poll() is None, log.read_text()
    finally:
        hub.kill()
        hub.wait()
    shutil.rmtree(tmp_path / "state")
    p = subprocess.run([*sandbox(wheel_bin, tmp_path, with_python=False), "noyau", "hub", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0, p
    assert "libpam.so.0" in p.stderr and 'auth = "header"' in p.stderr, p.stderr
    assert "panicked" not in p.stderr
    assert not (tmp_path / "state").exists(), "refused before making its state"


# --------------------------------------------------------------------------
# a centre's site install


def test_the_tarball_holds_the_wheels_binary_readme_and_licences(tarball: Path, wheel_bin: Path) -> None:
    top = f"noyau-{VERSION}"
    with tarfile.open(tarball) as t:
        names = {m.name: m for m in t.getmembers()}
        for f in ("bin/noyau", "README.md", "LICENSE-MIT", "LICENSE-APACHE"):
            assert f"{top}/{f}" in names, sorted(names)
        member = names[f"{top}/bin/noyau"]
        assert member.mode & 0o755 == 0o755 and member.uid == 0
        data = t.extractfile(member)
        assert data is not None and data.read() == wheel_bin.read_bytes()


def lmod_sandbox(work: Path) -> list[str]:
    """bwrap arguments: this host read-only, `work` writable, and the
    unpacked lmod's /usr/share/lmod and /usr/lib/lmod in place (each over a
    tmpfs parent that holds the host's own entries too, so nothing is
    created on the host)."""
    args = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--bind", str(work), str(work)]
    for mine in LMOD_PATHS:
        parent = os.path.dirname(mine)
        args += ["--tmpfs", parent]
        for e in os.scandir(parent):
            args += ["--symlink", os.readlink(e.path), e.path] if e.is_symlink() else \
                ["--ro-bind", e.path, e.path]
        args += ["--ro-bind", str(LMOD_DIR) + mine, mine]
    return args


def test_lmod_module_load_puts_the_site_install_on_path(tarball: Path, tmp_path: Path) -> None:
    require((LMOD_DIR / "usr/share/lmod/lmod/init/bash").is_file(),
            f"no Lmod unpacked in {LMOD_DIR} (scripts/test unpacks Debian's lmod there, as root)")
    require_bwrap()
    site = tmp_path / "opt" / "noyau"
    install = site / VERSION
    install.mkdir(parents=True)
    subprocess.run(["tar", "-xzf", str(tarball), "-C", str(install), "--strip-components=1"], check=True)
    modulefile = (ROOT / "examples/modulefile/noyau.lua").read_text()
    assert 'local root = "/opt/noyau"' in modulefile
    mods = tmp_path / "modulefiles" / "noyau"
    mods.mkdir(parents=True)
    (mods / f"{VERSION}.lua").write_text(modulefile.replace('"/opt/noyau"', json.dumps(str(site)), 1))
    # Lmod's own init, in a shell that read no profile: no other `module`.
    script = (f". {LMOD_SHARE}/lmod/init/bash\n"
              "type module | head -1\n"
              "command -v noyau || echo 'no noyau yet'\n"
              "module load noyau\n"
              "echo \"Lmod ${LMOD_VERSION:-none}\"\n"
              "command -v noyau\n"
              "noyau --version\n"
              "module unload noyau\n"
              "command -v noyau || echo 'gone'\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "USER": "root",
           "MODULEPATH": str(tmp_path / "modulefiles")}
    p = subprocess.run([*lmod_sandbox(tmp_path), "bash", "--noprofile", "--norc", "-c", script], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split("\n")
    assert lines[:2] == ["module is a function", "no noyau yet"], p.stdout + p.stderr
    assert re.fullmatch(r"Lmod \d+\.\d+.*", lines[2]), p.stdout + p.stderr
    assert lines[3:6] == [str(install / "bin/noyau"), f"noyau {VERSION}", "gone"], p.stdout + p.stderr
    # a module whose install is missing says so
    shutil.rmtree(install)
    p = subprocess.run([*lmod_sandbox(tmp_path), "bash", "--noprofile", "--norc", "-c",
                        f". {LMOD_SHARE}/lmod/init/bash\nmodule load noyau"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and f"noyau {VERSION} is not installed in {install}" in " ".join(p.stderr.split()), \
        p.stderr  # (Lmod wraps its messages)


# --------------------------------------------------------------------------
# the JupyterLab extension's wheel

LABEXT_NAME = "noyau-jupyterlab"


@pytest.fixture(scope="module")
def labext_wheel() -> Path:
    return artefact(f"noyau_jupyterlab-{VERSION}-py3-none-any.whl")


def test_the_extension_wheel_holds_the_prebuilt_extension(labext_wheel: Path) -> None:
    share = f"noyau_jupyterlab-{VERSION}.data/data/share/jupyter/labextensions/{LABEXT_NAME}"
    with zipfile.ZipFile(labext_wheel) as z:
        names = set(z.namelist())
        meta = json.loads(z.read(f"{share}/package.json"))
        entry = meta["jupyterlab"]["_build"]["load"]
        assert re.fullmatch(r"static/remoteEntry\.[0-9a-f]+\.js", entry), meta["jupyterlab"]
        assert z.getinfo(f"{share}/{entry}").file_size > 1000, "an empty remoteEntry"
        assert json.loads(z.read(f"{share}/install.json"))["packageName"] == LABEXT_NAME
    assert meta["name"] == LABEXT_NAME and meta["version"] == VERSION, meta
    assert f"{share}/static/style.js" in names
    # the built extension only: no sources, no JavaScript dependencies
    assert not [n for n in names if "node_modules" in n or n.endswith((".ts", ".tsx"))], sorted(names)


def test_noyau_install_names_the_extension_wheel_which_pip_installs_without_node(
        labext_wheel: Path, wheel_bin: Path, tmp_path: Path) -> None:
    """`noyau install` names the wheel the release ships; pip installs that
    file into a fresh venv with no Node on PATH; JupyterLab then lists the
    extension there, and `noyau install` no longer asks for it."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # A user of that venv (JUPYTER_PATH: conftest's, its kernelspecs only).
    env = dict(os.environ, HOME=str(tmp_path / "home"), VIRTUAL_ENV=str(venv), JUPYTER_DATA_DIR="",
               PATH=f"{venv / 'bin'}{os.pathsep}/usr/bin:/bin")
    env.pop("JUPYTER_CONFIG_DIR", None)
    system = [Path(d) / "labextensions" / LABEXT_NAME for d in ("/usr/local/share/jupyter", "/usr/share/jupyter")]
    require(not any(d.exists() for d in system), f"the extension is installed system-wide: {system}")

    def install() -> str:
        r = subprocess.run([str(wheel_bin), "install", "--name", "labext-release", "--inner", "python3",
                            "--backend", "local", "--prefix", str(tmp_path / "prefix")],
                           capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0, r.stderr
        return r.stdout

    hint = [line for line in install().splitlines() if LABEXT_NAME in line]
    assert len(hint) == 1, hint
    named = re.search(r"pip install --no-deps (\S+\.whl)", hint[0])
    assert named and named.group(1) == labext_wheel.name, hint[0]

    no_node = {**env, "PATH": str(venv / "bin")}
    assert shutil.which("node", path=no_node["PATH"]) is None
    p = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "--no-index", "--no-deps",
                        "--disable-pip-version-check", "-q", str(DIST / named.group(1))],
                       env=no_node, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    ext = venv / "share" / "jupyter" / "labextensions" / LABEXT_NAME
    entry = json.loads((ext / "package.json").read_text())["jupyterlab"]["_build"]["load"]
    assert (ext / entry).is_file(), sorted(p.name for p in (ext / "static").iterdir())

    # This test venv's JupyterLab, given the fresh venv's data dir, finds it
    # there (the test venv holds one too: only the fresh venv's section counts).
    lab_env = dict(os.environ, JUPYTER_PATH=str(venv / "share" / "jupyter"))
    p = subprocess.run([sys.executable, "-m", "jupyter", "labextension", "list"], env=lab_env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = re.sub(r"\x1b\[[0-9;]*m", "", p.stdout + p.stderr)  # its colours
    listed = out.split(str(venv / "share" / "jupyter" / "labextensions"), 1)
    assert len(listed) == 2, out
    section = listed[1].split("\n/", 1)[0]
    assert re.search(rf"{LABEXT_NAME} v{re.escape(VERSION)} enabled OK", section), out
    assert LABEXT_NAME not in install()
