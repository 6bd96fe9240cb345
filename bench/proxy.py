"""nbclient directly against ipykernel vs nbclient through noyau, side by side.

Workloads, each run --repeat times (default 3), alternating which route goes
first, reported as medians:
  (a) 200 trivial cells           target: noyau/direct ≤ 1.10
  (b) one cell printing 200,000 lines, every line checked   target ≤ 1.10
Times cover cell execution only (kernel start-up is printed separately);
one untimed warm-up run per route comes first.
Peak RSS (VmHWM) of `noyau kernel` (proxy) and `noyau agent` is read from
/proc just before each kernel is shut down; target ≤ 20 MiB each.

The floor, in the same run and interleaved with the rest: noyau-client's
`floor` example (FLOOR_BIN, built by bench/proxy), a minimal Rust client on
the same zeromq crate, over tcp as a frontend, executing the same cells one
at a time as nbclient does, straight to ipykernel ("floor") and to `noyau
kernel` ("floor+noyau": the same client through the proxy, the link and the
agent). Their ratio is what noyau's relay costs without nbclient's own time
in it; target ≤ 1.10.

Run it through bench/proxy (which builds the release binary). Jupyter dirs
are temporary, as in the tests. Exits 1 if a run lost output or failed,
0 otherwise (missed targets are printed, not fatal: this is not a test).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TMP = Path(tempfile.mkdtemp(prefix="noyau-bench-"))
for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR",
            "XDG_RUNTIME_DIR", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME"):
    d = TMP / var.lower()
    d.mkdir(mode=0o700)
    os.environ[var] = str(d)
PREFIX = TMP / "prefix"
os.environ["JUPYTER_PATH"] = str(PREFIX / "share" / "jupyter")
os.environ["NOYAU_TEST_SESSION"] = f"bench-{uuid.uuid4().hex[:8]}"
os.environ.setdefault("NOYAU_LOG", "warn")
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
sys.path.insert(0, str(ROOT / "tests" / "python"))

import noyau_testlib as lib  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402
import nbformat  # noqa: E402
from nbclient import NotebookClient  # noqa: E402
from nbformat.v4 import new_code_cell, new_notebook  # noqa: E402

N_CELLS = 200
N_LINES = 200_000
TARGET_RATIO = 1.10
TARGET_RSS_MIB = 20.0


def install(noyau_bin: str | None) -> bool:
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(PREFIX),
                    "--name", lib.DIRECT_KERNEL_NAME], check=True, capture_output=True)
    if not noyau_bin:
        return False
    r = subprocess.run([noyau_bin, "install", "--name", lib.NOYAU_KERNEL_NAME, "--inner", "python3",
                        "--backend", "local", "--prefix", str(PREFIX)], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"noyau install failed ({r.returncode}): {r.stderr.strip()}", file=sys.stderr)
        return False
    return True


def run_floor(kernel_name: str, cells: list[str]) -> dict:
    """The floor client on the kernelspec's argv; its own timings."""
    spec = json.loads((PREFIX / "share" / "jupyter" / "kernels" / kernel_name / "kernel.json").read_text())
    src = TMP / "floor.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell(c) for c in cells]), src)
    tag = f"{os.environ['NOYAU_TEST_SESSION']}-{uuid.uuid4().hex[:8]}"
    r = subprocess.run([os.environ["FLOOR_BIN"], str(src), "--transport", "tcp", "--", *spec["argv"]],
                       capture_output=True, text=True, env={**os.environ, lib.TAG_VAR: tag}, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"floor exited {r.returncode}: {r.stderr.strip()[-1000:]}")
    rep = json.loads(r.stdout)
    return {"elapsed": rep["execute_s"], "startup": rep["startup_s"], "lines": rep["stream_lines"]}


def run(kernel_name: str, cells: list[str]) -> dict:
    """Start a kernel, execute the cells with nbclient, read peak RSS, shut down."""
    tag = f"{os.environ['NOYAU_TEST_SESSION']}-{uuid.uuid4().hex[:8]}"
    km = KernelManager(kernel_name=kernel_name)
    t0 = time.perf_counter()
    km.start_kernel(env={**os.environ, lib.TAG_VAR: tag})
    nb = new_notebook(cells=[new_code_cell(c) for c in cells])
    client = NotebookClient(nb, km=km, timeout=600, record_timing=False)
    try:
        with client.setup_kernel():
            startup = time.perf_counter() - t0
            t1 = time.perf_counter()
            for i, cell in enumerate(nb.cells):
                client.execute_cell(cell, i)
            elapsed = time.perf_counter() - t1
            procs = lib.tagged(lib.TAG_VAR, tag)
            rss = {
                "proxy": max((lib.vm_hwm_kib(p) or 0 for p in procs if lib.is_proxy(p)), default=0),
                "agent": max((lib.vm_hwm_kib(p) or 0 for p in procs if lib.is_agent(p)), default=0),
                "ipykernel": max((lib.vm_hwm_kib(p) or 0 for p in procs if lib.is_inner_kernel(p)),
                                 default=0),
            }
    finally:
        km.shutdown_kernel(now=False)
    return {"nb": nb, "elapsed": elapsed, "startup": startup, "rss": rss}


def stdout_lines(nb) -> list[str]:  # type: ignore[no-untyped-def]
    return "".join(o.get("text", "") for c in nb.cells for o in c.outputs
                   if o.output_type == "stream" and o.name == "stdout").splitlines()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--direct-only", action="store_true", help="only the direct route (checks the bench)")
    args = ap.parse_args()

    have_noyau = install(None if args.direct_only else os.environ.get("NOYAU_BIN"))
    routes = {"direct": lib.DIRECT_KERNEL_NAME}
    if have_noyau:
        routes["noyau"] = lib.NOYAU_KERNEL_NAME
    elif not args.direct_only:
        print("NOYAU_BIN unset or unusable: running the direct route only", file=sys.stderr)
    if os.environ.get("FLOOR_BIN"):
        routes["floor"] = lib.DIRECT_KERNEL_NAME
        if have_noyau:
            routes["floor+noyau"] = lib.NOYAU_KERNEL_NAME
    else:
        print("FLOOR_BIN unset: the floor is not measured", file=sys.stderr)

    workloads = {
        f"(a) {N_CELLS} trivial cells": ([f"x = {i}" for i in range(N_CELLS)], None),
        f"(b) 1 cell, {N_LINES:,} lines": ([f"for i in range({N_LINES}):\n    print(i)"],
                                           [str(i) for i in range(N_LINES)]),
    }
    times: dict[tuple[str, str], list[float]] = {}
    startups: dict[str, list[float]] = {r: [] for r in routes}
    rss: dict[str, list[int]] = {"proxy": [], "agent": [], "ipykernel": []}
    failures: list[str] = []

    def once(route: str, cells: list[str]) -> dict:
        return (run_floor if route.startswith("floor") else run)(routes[route], cells)

    for route in routes:  # warm-up, untimed: first imports and page cache
        once(route, ["x = 0"] * 5)

    for rep in range(args.repeat):
        # rotate the order each repetition: drift in the load spreads evenly
        order = list(routes)[rep % len(routes):] + list(routes)[:rep % len(routes)]
        for wname, (cells, expected) in workloads.items():
            for route in order:
                try:
                    res = once(route, cells)
                except Exception as e:  # report and go on: a bench shows what it can
                    failures.append(f"{wname} via {route}, run {rep + 1}: {type(e).__name__}: {e}")
                    continue
                times.setdefault((wname, route), []).append(res["elapsed"])
                startups[route].append(res["startup"])
                if route.startswith("floor"):
                    if expected is not None and res["lines"] != len(expected):
                        failures.append(f"{wname} via {route}, run {rep + 1}: {res['lines']} lines")
                elif route == "noyau":
                    # 0: the process was not found (a binary not named
                    # `noyau`, see is_proxy): not measured, never "met"
                    rss["proxy"] += [res["rss"]["proxy"]] if res["rss"]["proxy"] else []
                    rss["agent"] += [res["rss"]["agent"]] if res["rss"]["agent"] else []
                else:
                    rss["ipykernel"].append(res["rss"]["ipykernel"])
                if expected is not None and not route.startswith("floor"):
                    got = stdout_lines(res["nb"])
                    if got != expected:
                        failures.append(f"{wname} via {route}, run {rep + 1}: {len(got)} lines, "
                                        f"{len(set(expected) - set(got))} missing")
                print(f"  run {rep + 1} {wname:<28} {route:<11} {res['elapsed']:8.3f} s", flush=True)

    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    print(f"\nnbclient direct vs through noyau, medians of {args.repeat} runs (cell execution only)\n")
    print(f"{'workload':<30} {'direct s':>9} {'noyau s':>9} {'ratio':>7} {'target':>8}")
    for wname in workloads:
        d, n = med(times.get((wname, "direct"), [])), med(times.get((wname, "noyau"), []))
        ratio = n / d if have_noyau and d == d and n == n else float("nan")
        verdict = "" if ratio != ratio else ("met" if ratio <= TARGET_RATIO else "missed")
        print(f"{wname:<30} {d:9.3f} {n:9.3f} {ratio:7.3f} {'≤ %.2f' % TARGET_RATIO:>8} {verdict}")
    print(f"{'kernel start-up (all runs)':<30} {med(startups['direct']):9.3f} "
          f"{med(startups.get('noyau', [])):9.3f}")
    if "floor" in routes:
        print(f"\nthe floor client (Rust, tcp) direct vs through noyau, medians (cell execution only)\n")
        print(f"{'workload':<30} {'floor s':>9} {'+noyau s':>9} {'ratio':>7} {'target':>8}")
        for wname in workloads:
            d, n = med(times.get((wname, "floor"), [])), med(times.get((wname, "floor+noyau"), []))
            ratio = n / d if d == d and n == n else float("nan")
            verdict = "" if ratio != ratio else ("met" if ratio <= TARGET_RATIO else "missed")
            print(f"{wname:<30} {d:9.3f} {n:9.3f} {ratio:7.3f} {'≤ %.2f' % TARGET_RATIO:>8} {verdict}")
            nb = med(times.get((wname, "noyau"), []))
            if nb == nb and d == d:
                print(f"{'  nbclient through noyau / floor':<30} {'':9} {nb:9.3f} {nb / d:7.3f}")
        print(f"{'kernel start-up (all runs)':<30} {med(startups['floor']):9.3f} "
              f"{med(startups.get('floor+noyau', [])):9.3f}")
    print(f"load average at the end: {open('/proc/loadavg').read().split()[:3]}")
    print(f"\npeak RSS (VmHWM, max over runs), target ≤ {TARGET_RSS_MIB:.0f} MiB each:")
    for who in ("proxy", "agent"):
        if rss[who]:
            mib = max(rss[who]) / 1024
            print(f"  noyau {who:<6} {mib:7.1f} MiB  {'met' if mib <= TARGET_RSS_MIB else 'missed'}")
        else:
            print(f"  noyau {who:<6}     n/a (no `noyau {'kernel' if who == 'proxy' else 'agent'}` process found:"
                  " is NOYAU_BIN named noyau?)")
    if rss["ipykernel"]:
        print(f"  (ipykernel, direct, for reference: {max(rss['ipykernel']) / 1024:.1f} MiB)")
    if failures:
        print("\nFAILED runs:\n  " + "\n  ".join(failures))
    left = lib.tagged(lib.SESSION_VAR, os.environ["NOYAU_TEST_SESSION"])
    for p in left:
        lib.kill(p)
    if left:
        print(f"\nkilled {len(left)} leftover process(es)")
    shutil.rmtree(TMP, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
