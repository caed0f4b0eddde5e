"""The package a wheel would ship: every subpackage of ``snrmon`` is listed in ``pyproject.toml``.

The editable install used for development finds any folder, so a subpackage missing from the list works here
and is absent from a real install.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_for_the_wheel():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "snrmon").rglob("__init__.py")
    } | {"snrmon.callbacks"}
    assert found == listed, found ^ listed
