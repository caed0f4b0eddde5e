"""The layout's rules (README, "Where things live"), checked on the source: data flows one way, measuring and
the laws never import each other, only the Lightning adapters import Lightning, only the command line parses
arguments, and ``snrmon fit`` starts without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Per subpackage of snrmon/: the top-level modules it must never import (directly or lazily, in a function).
FORBIDDEN = {
    "measure": {"snrmon.laws", "snrmon.forecast", "snrmon.logs", "snrmon.cli", "lightning", "argparse"},
    "laws": {"snrmon.measure", "snrmon.forecast", "snrmon.cli", "torch", "lightning", "argparse"},
    "forecast": {"snrmon.measure", "snrmon.cli", "torch", "lightning", "argparse"},
    "logs": {"snrmon.measure", "snrmon.laws", "snrmon.forecast", "snrmon.cli", "lightning", "argparse"},
    "cli": {"snrmon.measure", "lightning"},
}


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _violations(paths, forbidden: set[str]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in paths
        for name in sorted(imported(path))
        if any(name == banned or name.startswith(banned + ".") for banned in forbidden)
    ]


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_each_room_imports_only_what_flows_into_it(room):
    assert _violations(sorted((ROOT / "snrmon" / room).rglob("*.py")), FORBIDDEN[room]) == []


def test_only_the_callbacks_import_lightning():
    assert _violations(sorted((ROOT / "snrmon").rglob("*.py")), {"lightning", "pytorch_lightning"}) == []
    private = {"trainer._", "fit_loop", "_accelerator_connector", "_logger_connector"}
    for path in sorted((ROOT / "callbacks").glob("*.py")):
        if path.name != "_lightning.py":  # the one module that reads private Lightning attributes
            text = path.read_text()
            assert not [name for name in private if name in text], path.name


def test_the_fit_command_starts_without_torch(tmp_path):
    data = tmp_path / "run.csv"
    data.write_text("D,loss\n" + "\n".join(f"{d},{2 + 10 / d**0.3}" for d in range(1, 20)) + "\n")
    check = (
        "import sys; from snrmon.cli import main; "
        f"status = main(['fit', {str(data)!r}, '--law', 'power', '--bootstrap', '0', '--json']); "
        "assert status == 0; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
