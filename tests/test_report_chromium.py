"""The report renders in headless Chromium with every plot decoded, offline.

Fails (does not skip) when Chromium is missing: ``.ci/run`` installs the Debian package ``chromium``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.test_report import build_report

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--hide-scrollbars",
    "--run-all-compositor-stages-before-draw",
    "--virtual-time-budget=10000",
]

# Appended to a copy of the report (never to the report itself): records, after load, whether each image
# decoded and whether the page is wider than the window (tables or figures overflowing).
CHECK_JS = """
<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const out = {
    images: imgs.map(i => ({id: i.id, ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth, h: i.naturalHeight,
                            shown: i.getBoundingClientRect().width})),
    bodyWidth: document.body.scrollWidth, windowWidth: window.innerWidth,
    h2: Array.from(document.querySelectorAll('h2')).map(h => h.textContent),
  };
  const pre = document.createElement('pre');
  pre.id = 'render-check';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert exe, "headless Chromium is required for this test: apt-get install chromium (.ci/run does it)"
    return exe


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    return build_report(tmp_path_factory.mktemp("chrome"))


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [chromium(), *FLAGS, f"--user-data-dir={cwd / 'profile'}", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_every_image_decodes_in_chromium(report: Path, tmp_path: Path) -> None:
    html = (report / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", CHECK_JS + "</body>"))
    dom = _run(["--window-size=1200,2000", "--dump-dom", probe.as_uri()], tmp_path).stdout
    m = re.search(r"<pre id=\"render-check\">(.*?)</pre>", dom, re.S)
    assert m, "the check script did not run: " + dom[-500:]
    check = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    n_expected = html.count("<img ")
    assert len(check["images"]) == n_expected >= 7
    bad = [i for i in check["images"] if not i["ok"] or i["w"] < 50 or i["h"] < 50 or i["shown"] < 50]
    assert not bad, f"images that did not decode or show: {bad}"
    assert check["bodyWidth"] <= check["windowWidth"], "the page overflows the window horizontally"
    assert "Operating points (chosen on validation, reported on test)" in check["h2"]


def test_screenshot_shows_the_plots(report: Path, tmp_path: Path) -> None:
    from PIL import Image

    shot = tmp_path / "shot.png"
    _run([f"--screenshot={shot}", "--window-size=1200,5000", (report / "report.html").as_uri()], tmp_path)
    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert img.shape[0] >= 5000 - 1 and img.shape[1] >= 1199
    grey = img.mean(2)
    assert grey.std() > 20, "the screenshot is blank"
    colourful = (img.max(2) - img.min(2)) > 60  # plot lines, warnings, heat maps; text is grey
    assert colourful.mean() > 0.002, f"no plot colour on the page ({colourful.mean():.4%})"
    rows_with_content = np.flatnonzero((grey < 245).any(1))
    assert rows_with_content.max() > 4000, "the page is much shorter than the report"


def test_print_to_pdf_works_offline(report: Path, tmp_path: Path) -> None:
    pdf = tmp_path / "printed.pdf"
    _run([f"--print-to-pdf={pdf}", "--no-pdf-header-footer", (report / "report.html").as_uri()], tmp_path)
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF") and len(data) > 50_000  # embedded plots make it large
