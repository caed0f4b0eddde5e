"""docs/integrations.md promises a runnable snippet per training loop: run each as a user would, as a
script in a fresh directory, and check what it prints."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)


def snippet(marker: str) -> str:
    """The page's one Python snippet that contains ``marker``."""
    found = [code for code in SNIPPETS if marker in code]
    assert len(found) == 1, f"{len(found)} snippets in docs/integrations.md contain {marker!r}"
    return found[0]


def run(code: str, directory: Path) -> str:
    """Run ``code`` as a script in ``directory`` (one thread: a busy CI machine); its last output line."""
    script = directory / "snippet.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=directory, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def numbers(line: str) -> list[float]:
    return [float(token) for token in re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", line)]


def test_plain_loop(tmp_path):
    line = run(snippet("from snrmon import GradientMeter"), tmp_path)
    assert line.startswith("noise scale") and "groups ['total', '0', '2']" in line, line
    assert all(math.isfinite(value) for value in numbers(line))


def test_lightning_trainer(tmp_path):
    line = run(snippet("from snrmon.callbacks import BasinEarlyStopping, SNRMonitor"), tmp_path)
    noise_scale, ratio = numbers(line)
    assert noise_scale > 0 and ratio > 0, line


def test_fabric_one_device(tmp_path):
    line = run(snippet("from snrmon.callbacks import fabric_meter"), tmp_path)
    assert "groups ['total', '0', '2']" in line, line


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="the Hugging Face integration is an optional extra: pip install -e '.[hf]'",
)
def test_hugging_face_trainer(tmp_path):
    line = run(snippet("from snrmon.callbacks.transformers import"), tmp_path)
    assert math.isfinite(numbers(line)[0]), line
    assert (tmp_path / "out").is_dir()  # the Trainer's output directory, where the snippet ran
