"""The report opens in headless Chromium: every image decodes and no script fails.

CI installs the Debian package `chromium`; without it this test fails (it is not skipped).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.browser

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--virtual-time-budget=10000"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium is needed for the report browser test: "
                "install the Debian package with `apt-get install -y chromium`")


def run_chromium(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    return subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=180)


def test_report_loads_in_chromium(report_dir, tmp_path):
    page = (report_dir / "report.html").as_uri()
    dom = run_chromium(["--dump-dom", page], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    status = re.search(r'<p id="report-status"([^>]*)>', dom.stdout)
    assert status, dom.stdout[:2000]
    attrs = dict(re.findall(r'data-(\w+)="(\d+)"', status.group(1)))
    assert attrs, f"the status script did not run: {status.group(0)}"
    n_images = len(list((report_dir / "figures").glob("*.png")))
    assert int(attrs["images"]) == n_images
    assert int(attrs["loaded"]) == n_images  # naturalWidth > 0 for every <img>
    assert int(attrs["errors"]) == 0

    shot = tmp_path / "report.png"
    result = run_chromium([f"--screenshot={shot}", "--window-size=1200,2400", page], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_report_is_self_contained(report_dir):
    text = (report_dir / "report.html").read_text()
    # No network: every image is inline, and no resource is fetched from anywhere.
    assert not re.search(r'\b(?:src|href)="(?:https?:)?//', text)
    assert text.count('src="data:image/png;base64,') == len(list((report_dir / "figures").glob("*.png")))
    # The SQL and parameters of every figure and table sit beside it (both halves of a pair drawn
    # with the authors' statistic beside the store's).
    pairs = text.count('<div class="pair">')
    assert pairs >= 8
    assert text.count("<details>") == text.count("<section") + pairs
    assert text.count("The paper's statistic (as its authors' code computed it)") == pairs
    assert "FROM self_repair_top($p)" in text
    assert "{&quot;p&quot;: 0.05, &quot;ablation&quot;: &quot;resample&quot;, &quot;sample&quot;: 0}" in text
    assert "Not drawn: only one resample draw was ingested for tiny-gpt2" in text
