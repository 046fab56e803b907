"""`bench report` (static HTML), `bench compare`, the cost columns and the reasons for missing values, on one tiny run
shared by the module; the page is rendered in headless Chromium (skipped, with the reason, when none is installed)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench.cli import main
from tests.conftest import write_suite

SUITE = """
name: report-mini
datasets: [{name: synthetic, num_subjects: 2}]
defenses: [none, {name: random-noise, label: noise-4, eps: 4}, {name: random-noise, label: noise-8, eps: 8}]
scenarios: [clean]
attacks: [{name: dreambooth, max_train_steps: 2, num_class_images: 2}]
metrics: [linf, psnr, brisque, ism]
seeds: [0]
"""

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
NO_BROWSER = "no headless Chromium on PATH (Debian: apt-get install chromium; .ci/install does it where apt exists)"


@pytest.fixture(scope="module")
def run(tmp_path_factory, warm_models) -> Path:
    d = tmp_path_factory.mktemp("report")
    out = d / "out"
    shutil.copytree(warm_models, out / "cache" / "model")
    assert main(["run", "--suite", str(write_suite(d, SUITE)), "--out", str(out)]) == 0
    assert main(["report", "--out", str(out)]) == 0
    return out


def test_report_folder_is_self_contained(run):
    report = run / "report"
    page = (report / "index.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) >= 20  # 3 defenses x (clean, protected, difference, generated) + plots
    assert all(not s.startswith(("http:", "https:", "//", "/")) and (report / s).is_file() for s in srcs)
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched at view time
    plots = sorted(p.name for p in (report / "plots").iterdir())
    assert any("scenario" in p for p in plots) and any("frontier" in p for p in plots)
    assert any("budget-random-noise" in p for p in plots)  # the suite sweeps random-noise's eps: 4, 8 (none at 0)
    # provenance: code revision, model weight hashes, protocol ids with their meaning
    import sqlite3

    rev = str(pd.read_csv(run / "leaderboards" / "report-mini.csv").code_rev.iloc[0]).split(";")[0]
    assert rev and f"<code>{rev}</code>" in page

    cell = json.loads(sqlite3.connect(run / "ledger.sqlite").execute("SELECT provenance FROM cells").fetchone()[0])
    sha = next(iter(next(iter(cell["weights_sha256"].values())).values()))
    assert sha in page and "linf/255/protected-vs-clean" in page and "max |protected - clean|" in page
    # a report folder is replaced, but never a folder the report did not write
    assert main(["report", "--out", str(run)]) == 0
    (run / "other").mkdir()
    (run / "other" / "keep.txt").write_text("x")
    assert main(["report", "--out", str(run), "--to", str(run / "other")]) == 2
    assert (run / "other" / "keep.txt").is_file()


def test_reasons_cost_columns_and_compare(run, capsys):
    md = (run / "leaderboards" / "report-mini.md").read_text()
    assert "not applicable: ism is defined for face subjects (class noun person) only" in md
    assert "inf (" in md and "identical to its clean original" in md  # PSNR of `none`: inf, explained
    df = pd.read_csv(run / "leaderboards" / "report-mini.csv").set_index("defense")
    assert df.loc["none", "psnr/skimage/protected-vs-clean n"] == 2  # inf counted, not "n = 0"
    assert (df["protect s/image"] > 0).all() and (df["protect peak RSS MB"] > 50).all()
    rec = json.loads(next((run / "cache" / "protect").glob("*/done.json")).read_text())
    assert rec["peak_rss_scope"] == "stage" and rec["extra"]["n_images"] >= 1
    assert main(["compare", "--out", str(run), "noise-4", "noise-8"]) == 0
    out = capsys.readouterr().out
    assert "linf/255/protected-vs-clean" in out and "rank_biserial" in out
    assert list((run / "leaderboards").glob("report-mini.compare.noise-4.vs.noise-8.csv"))
    assert main(["compare", "--out", str(run), "noise-4", "aspl"]) == 2


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                           f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120)


def inspect_page(index: Path, work: Path) -> dict:
    """Load ``index`` in an iframe of a probe page (same file:// origin) and report its images that did not load
    and every console message it logged (the report logs none)."""
    probe = work / "probe.html"
    probe.write_text(f"""<html><body><pre id="result">pending</pre>
<iframe id="f" src="{index.as_uri()}" width="1280" height="900"></iframe>
<script>document.getElementById("f").addEventListener("load", function () {{
  var d = document.getElementById("f").contentDocument;
  var bad = Array.prototype.filter.call(d.images, function (i) {{ return !i.complete || i.naturalWidth === 0; }});
  document.getElementById("result").textContent = JSON.stringify({{images: d.images.length,
    broken: bad.map(function (i) {{ return i.getAttribute("src"); }})}});
}});</script></body></html>""")
    res = _chromium(["--allow-file-access-from-files", "--enable-logging=stderr", "--v=0",
                     "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], work / "profile")
    found = re.search(r'<pre id="result">(.*?)</pre>', res.stdout, re.S)
    assert found, f"probe page did not render: {res.stderr[-2000:]}"
    result = json.loads(found.group(1).replace("&quot;", '"'))
    result["console"] = [line for line in res.stderr.splitlines() if ":CONSOLE" in line]
    return result


def blank(png: Path) -> bool:
    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
    return float(pixels.std()) < 5 or float((pixels < 200).mean()) < 0.01


def screenshot(index: Path, work: Path) -> Path:
    shot = work / "shot.png"
    _chromium(["--window-size=1280,1600", f"--screenshot={shot}", index.as_uri()], work / "profile")
    assert shot.is_file(), "Chromium wrote no screenshot"
    return shot


@pytest.mark.skipif(BROWSER is None, reason=NO_BROWSER)
def test_report_renders_in_chromium(run, tmp_path):
    index = run / "report" / "index.html"
    page = inspect_page(index, tmp_path)
    assert page["images"] >= 20 and page["broken"] == [] and page["console"] == []
    assert not blank(screenshot(index, tmp_path))


@pytest.mark.skipif(BROWSER is None, reason=NO_BROWSER)
def test_browser_checks_catch_a_missing_image_and_a_blank_page(run, tmp_path):
    report = tmp_path / "report"
    shutil.copytree(run / "report", report)
    victim = sorted((report / "img").iterdir())[0]
    victim.unlink()
    assert inspect_page(report / "index.html", tmp_path)["broken"] == [f"img/{victim.name}"]
    (tmp_path / "empty.html").write_text("<html><body></body></html>")
    assert blank(screenshot(tmp_path / "empty.html", tmp_path))
