"""The review page in a real browser: headless Chromium opens review.html from a run folder.

The store is a tiny synthetic loop written with segrl's own writers (tests/_review_store.py,
no Ray); the page is opened as a file (as a user opens a copied run folder), so every image
must resolve relative to the run folder. The browser is Debian's ``chromium`` package
(``SEGRL_CHROMIUM`` names another binary): when it is missing and the test runs as root with
apt-get, the setup installs it, as the issue asks; otherwise the test is skipped, saying how.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from _review_store import write_review_run
from PIL import Image
from playwright.sync_api import sync_playwright

from segrl.loop.review import PAGE, write_review

pytestmark = pytest.mark.integration
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
FRAMES_PER_ROUND = 2


def chromium_binary() -> str | None:
    """Debian's chromium (installed now if missing and we may), or SEGRL_CHROMIUM."""
    named = os.environ.get("SEGRL_CHROMIUM") or shutil.which("chromium")
    if named:
        return named
    if os.geteuid() == 0 and shutil.which("apt-get"):
        for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
            done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                                  env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            if done.returncode != 0:
                print(f"{' '.join(command)} failed: {done.stderr[-500:]}")
                return None
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def chromium() -> str:
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no Chromium: apt-get install chromium (Debian), or set SEGRL_CHROMIUM to a binary")
    return binary


def test_review_page_renders_every_round_and_thumbnail_without_console_errors(tmp_path: Path, chromium: str):
    run = write_review_run(tmp_path, f"report.frames_per_round={FRAMES_PER_ROUND}")
    data = write_review(run.store, run.cfg, run.state, run.rows, truth=run.truth, model_of=run.model_of)
    page_file = Path(run.store.uri(PAGE))
    shown = [min(n, FRAMES_PER_ROUND) for n in run.images_per_round]
    # per frame: the request and the truth; a prediction from round 1 on (round 0 has no model yet)
    thumbs = sum(n * (2 if r == 0 else 3) for r, n in enumerate(shown))
    assert [len(rd["frames"]) for rd in data["rounds"]] == shown[::-1]

    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"failed to load {r.url}: {r.failure}"))
        page.goto(page_file.as_uri())
        page.wait_for_load_state("load")
        sections = page.locator("section.round").count()
        frames = page.locator("figure.frame").count()
        images = page.eval_on_selector_all("img.thumb", "els => els.map(e => [e.naturalWidth, e.getAttribute('src')])")
        plots = page.eval_on_selector_all("section#curve img", "els => els.map(e => e.naturalWidth)")
        rounds_order = page.eval_on_selector_all("section.round", "els => els.map(e => e.dataset.round)")
        shot = tmp_path / "review.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    print(f"\nreview page {page_file} ({page_file.stat().st_size} bytes): {sections} round sections, "
          f"{frames} frames, {len(images)} thumbnails, {len(plots)} plots, rounds {rounds_order}; "
          f"screenshot {shot}; console/page problems: {problems or 'none'}")

    assert not problems, "\n".join(problems)
    assert sections == len(run.images_per_round)
    assert rounds_order == ["2", "1", "0"]  # newest first
    assert frames == sum(shown)
    assert len(images) == thumbs
    assert all(width > 0 for width, _ in images), images  # every thumbnail decoded
    assert len(plots) == 3 and all(width > 0 for width in plots)
    pixels = np.asarray(Image.open(shot).convert("RGB"), np.float32)
    assert pixels.shape[0] >= 900 and pixels.std() > 20, "the screenshot is blank"
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 200  # photos and plots, not flat colour
