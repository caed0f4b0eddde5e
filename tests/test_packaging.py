"""The package a wheel would ship: every subpackage of ``snrmon`` is listed in ``pyproject.toml``.

The editable install used for development finds any folder, so a subpackage missing from the list works here
and is absent from a real install.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_for_the_wheel():
    # (tomllib is Python 3.11+; the project supports 3.10)
    pyproject = (ROOT / "pyproject.toml").read_text()
    line = re.search(r"^packages = (\[.*?\])$", pyproject, re.MULTILINE | re.DOTALL)
    listed = set(ast.literal_eval(line.group(1)))
    found = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "snrmon").rglob("__init__.py")
    } | {  # callbacks/ is installed as snrmon.callbacks (package-dir)
        ".".join(("snrmon", *init.parent.relative_to(ROOT).parts))
        for init in (ROOT / "callbacks").rglob("__init__.py")
    }
    assert found == listed, found ^ listed
