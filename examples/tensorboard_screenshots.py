"""Screenshots of TensorBoard showing a log directory, as a browser shows it (for docs/monitor.md).

    .venv/bin/python examples/tensorboard_screenshots.py runs docs/img

Starts ``tensorboard --logdir LOGDIR`` on a free local port, waits until it has read the scalars, and has
headless Chromium (Debian: ``apt-get install chromium``) save one PNG per tab in OUT_DIR:
``tensorboard_custom_scalars.png`` (snrmon's layout), ``tensorboard_time_series.png`` (the page TensorBoard
opens on), ``tensorboard_scalars.png`` (the Scalars tab with the tag filter ``TAG_FILTER`` typed in, as the
page's URL can carry it) and ``tensorboard_text.png`` (BasinEarlyStopping's warnings). The server is stopped
at the end.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

TAG_FILTER = "loss|snr/(ratio|noise_scale)$"  # the losses, the total SNR and noise scale
# URL fragment: (file, window width and height); the custom scalars window is tall enough for the groups
TABS = {
    "custom_scalars": ("tensorboard_custom_scalars.png", "1600,2000"),
    "timeseries": ("tensorboard_time_series.png", "1600,1400"),
    "scalars&tagFilter=" + urllib.parse.quote(TAG_FILTER, safe=""): ("tensorboard_scalars.png", "1600,1200"),
    "text": ("tensorboard_text.png", "1600,700"),
}
WAIT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_scalars(base: str, server: subprocess.Popen) -> None:
    """Until the server lists scalar tags (it reads the event files in the background after it starts)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"tensorboard exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(base + "/data/plugin/scalars/tags", timeout=5) as response:
                if any(json.load(response).values()):
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet
        time.sleep(1)
    sys.exit(f"tensorboard showed no scalars within {WAIT_S} s")


def screenshot(chromium: str, url: str, out: Path, window: str) -> None:
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: no state from an earlier run
        subprocess.run(
            [
                chromium,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile}",
                f"--screenshot={out}",
                f"--window-size={window}",
                "--virtual-time-budget=20000",  # let the page fetch and draw its charts
                url,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )


def main(logdir: str, out_dir: str) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("needs Chromium (Debian: apt-get install chromium)")
    tensorboard = Path(sys.executable).parent / "tensorboard"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [str(tensorboard), "--logdir", logdir, "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_scalars(base, server)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for tab, (name, window) in TABS.items():
            screenshot(chromium, f"{base}/#{tab}", Path(out_dir) / name, window)
            print(Path(out_dir) / name)
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
