#!/usr/bin/env python3
"""scripts/test's closing lines: the skipped tests with their reasons, then
`summary: P passed, F failed, S skipped`.

Usage: test-summary.py ROOT RUST_LOG PYTEST_XML ALLOWED ci|local [NODE_TAP_LOG]

Rust counts come from nextest's Summary line (or cargo test's result
lines), its skipped tests from the SKIP lines (`--status-level skip`) and
their reasons from the test's `#[ignore = "…"]` in the source. pytest's
come from its junit xml. In `ci` mode every skip must match an entry of
ALLOWED (scripts/test-skips.allowed); the exit status is 1 otherwise.
NODE_TAP_LOG, when given, is the output of node's test runner (the
JupyterLab extension's unit tests): its `# pass N` / `# fail N` lines count.
"""

from __future__ import annotations

import fnmatch
import os
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def ignore_reason(root: Path, binary_id: str, test: str) -> str:
    """The `#[ignore = "…"]` reason of `test` (nextest's binary id
    `crate::binary`, or `crate` for unit tests)."""
    crate, _, binary = binary_id.partition("::")
    files = ([root / "crates" / crate / "tests" / f"{binary}.rs"] if binary
             else sorted((root / "crates" / crate / "src").rglob("*.rs")))
    name = test.rsplit("::", 1)[-1]
    for f in files:
        text = f.read_text(errors="replace") if f.exists() else ""
        m = re.search(r'#\[ignore\s*=\s*"((?:[^"\\]|\\.)*)"\]\s*(?:#\[[^\]]*\]\s*)*(?:async\s+)?fn\s+'
                      + re.escape(name) + r"\b", text)
        if m:
            return m.group(1)
    return "skipped by scripts/test (no #[ignore] reason found)"


def rust(root: Path, log_path: str) -> tuple[int, int, int, list[tuple[str, str]]]:
    log = Path(log_path).read_text(errors="replace") if os.path.exists(log_path) else ""
    log = re.sub(r"\x1b\[[0-9;]*m", "", log)
    passed = failed = skipped = 0
    m = re.findall(r"(\d+) tests? run: (\d+) passed(?:.*?(\d+) failed)?(?:.*?(\d+) skipped)?", log)
    if m:  # nextest: "Summary [..] N tests run: P passed, F failed, S skipped"
        _, p, f, s = m[-1]
        passed, failed, skipped = int(p), int(f or 0), int(s or 0)
    else:  # cargo test: one "test result:" line per test binary
        for p, f, ig in re.findall(r"test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored", log):
            passed += int(p)
            failed += int(f)
            skipped += int(ig)
    skips = {}
    for binary_id, test in re.findall(r"^\s*SKIP \[[^\]]*\] \([^)]*\) (\S+) (\S+)\s*$", log, re.M):
        skips[f"rust: {binary_id}::{test}"] = ignore_reason(root, binary_id, test)
    return passed, failed, skipped, sorted(skips.items())


def python(xml_path: str) -> tuple[int, int, int, list[tuple[str, str]]]:
    passed = failed = skipped = 0
    skips = []
    if not os.path.exists(xml_path):
        return 0, 0, 0, []
    root = ET.parse(xml_path).getroot()
    for s in root.iter("testsuite"):
        t, f, e, sk = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        passed += t - f - e - sk
        failed += f + e
        skipped += sk
    for tc in root.iter("testcase"):
        sk = tc.find("skipped")
        if sk is not None:
            name = f"py: {tc.get('classname', '').replace('.', '::')}::{tc.get('name')}"
            reason = sk.get("message") or (sk.text or "").strip() or "no reason given"
            skips.append((name, reason.removeprefix("Skipped: ")))
    return passed, failed, skipped, skips


def node(tap_path: str | None) -> tuple[int, int, int]:
    if not tap_path or not os.path.exists(tap_path):
        return 0, 0, 0
    counts = {"pass": 0, "fail": 0, "skipped": 0}
    for key, n in re.findall(r"^# (pass|fail|skipped) (\d+)$", Path(tap_path).read_text(errors="replace"), re.M):
        counts[key] += int(n)
    return counts["pass"], counts["fail"], counts["skipped"]


def allowed(path: str) -> list[tuple[str, str, str]]:
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            test, reason, why = (x.strip() for x in line.split(" | ", 2))
            out.append((test, reason, why))
    return out


def main() -> int:
    root, rust_log, pytest_xml, allow_file, mode = sys.argv[1:6]
    rp, rf, rs, rskips = rust(Path(root), rust_log)
    pp, pf, ps, pskips = python(pytest_xml)
    np_, nf, ns = node(sys.argv[6] if len(sys.argv) > 6 else None)
    rules = allowed(allow_file)
    refused = 0
    skips = rskips + pskips
    if skips:
        print(f"  skipped tests ({len(skips)}):")
    for test, reason in skips:
        ok = any(fnmatch.fnmatchcase(test, t) and fnmatch.fnmatchcase(reason, r) for t, r, _ in rules)
        mark = ""
        if mode == "ci" and not ok:
            refused += 1
            mark = "  <- NOT ALLOWED under CI (scripts/test-skips.allowed)"
        print(f"    {test}: {reason}{mark}")
    if refused:
        print(f"  {refused} skip(s) not allowed under CI: a missing prerequisite must fail, not skip")
    print(f"summary: {rp + pp + np_} passed, {rf + pf + nf} failed, {rs + ps + ns} skipped")
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
