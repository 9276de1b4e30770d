"""Checks that the committed generated code is exactly what protos/ generate."""

from __future__ import annotations

import difflib
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GENERATOR = REPO / "tools" / "gen_protos.py"
COMMITTED_ROOT = REPO / "stubs"


def _files(directory: Path) -> dict[str, bytes]:
    if not directory.is_dir():
        return {}
    return {path.name: path.read_bytes() for path in directory.iterdir() if path.is_file()}


def _diff(name: str, committed: bytes, fresh: bytes) -> str:
    lines = difflib.unified_diff(
        committed.decode(errors="replace").splitlines(keepends=True),
        fresh.decode(errors="replace").splitlines(keepends=True),
        fromfile=f"committed/{name}",
        tofile=f"generated/{name}",
    )
    return "".join(list(lines)[:40])


def test_committed_stubs_match_protos(tmp_path: Path) -> None:
    # Generate outside the tree: the test must not repair what it checks.
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, f"gen_protos failed:\n{result.stdout}{result.stderr}"

    package_dirs = sorted({path.parent for path in tmp_path.rglob("*") if path.is_file()})
    assert package_dirs, "gen_protos wrote nothing"
    problems: list[str] = []
    for fresh_dir in package_dirs:
        package = fresh_dir.relative_to(tmp_path)
        fresh = _files(fresh_dir)
        committed = _files(COMMITTED_ROOT / package)
        for name in sorted(fresh.keys() - committed.keys()):
            problems.append(f"missing from stubs/{package}: {name}")
        for name in sorted(committed.keys() - fresh.keys()):
            problems.append(f"extra in stubs/{package} (not generated): {name}")
        for name in sorted(fresh.keys() & committed.keys()):
            if fresh[name] != committed[name]:
                diff = _diff(f"{package}/{name}", committed[name], fresh[name])
                problems.append(f"differs: stubs/{package}/{name}\n{diff}")

    assert not problems, (
        "The committed generated code is not what protos/ generate; run `make proto` "
        "and commit the result.\n" + "\n".join(problems)
    )
