"""The report of `salience review` in a real browser: headless Chromium (Debian's,
driven through Debian's chromedriver by Selenium) opens it from a file:// URL.

It must render (the timeline with a dot per frame, one thumbnail per frame, the
jumps flagged), load every image it embeds (naturalWidth > 0: the data URIs are
valid pictures), and show a frame large when its thumbnail or its dot is clicked.
The browser is never downloaded: a missing one fails with how to install it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest

from tests.conftest import RunningServer
from tests.e2e.review_clip import CLIP_FRAMES, SWERVES, driving_clip, report_data, write_frames

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Headless and offline: nothing the report needs comes from the network.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1000",
)
ENTRY_POINT = Path(sys.executable).with_name("salience")
CLI = [str(ENTRY_POINT)] if ENTRY_POINT.exists() else [sys.executable, "-m", "salience_client.cli"]
WAIT_S = 20


@pytest.fixture(scope="module", params=["embedded", "linked"])
def reviewed(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    demo_server: RunningServer,
) -> Path:
    """The report of a review of the demo clip, made by the command line: with its
    strips embedded (the default), and linking the PNGs instead (--link-strips).
    """
    served = demo_server
    root = tmp_path_factory.mktemp("chromium-review")
    images, _ = driving_clip()
    write_frames(root / "frames", images)
    link = ["--link-strips"] if request.param == "linked" else []
    done = subprocess.run(
        [*CLI, "review", "--target", served.target, "--model", "steering",
         str(root / "frames"), "--out", str(root / "out"), "--scale", "1", *link],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return root / "out" / "report.html"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} missing: `make install-test` installs Debian's chromium "
            "and chromium-driver"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    # Both paths given: Selenium looks nothing up and downloads nothing.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def src(report: Path, strip: str) -> str:
    """The URL the browser gives an image whose src is `strip` (an embedded PNG, or a
    file relative to the report).
    """
    return strip if strip.startswith("data:") else urljoin(report.as_uri(), strip)


def wait_for(driver: Any, script: str) -> Any:
    """Polls a JavaScript expression until it is truthy; returns its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script(f"return {script}"))


def test_the_report_renders_loads_its_images_and_shows_a_clicked_frame(
    reviewed: Path, browser: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    data = report_data(reviewed)
    frames = data["frames"]
    browser.get(reviewed.as_uri())
    wait_for(browser, "document.readyState === 'complete'")

    # The timeline: a line through every frame, a dot per frame, the jumps in red.
    svg = browser.find_element(By.ID, "timeline-svg")
    assert svg.is_displayed()
    assert svg.size["width"] > 600
    assert svg.size["height"] > 100
    points = browser.execute_script(
        "return document.querySelector('#timeline-svg .series').points.numberOfItems"
    )
    assert points == CLIP_FRAMES
    dots = browser.find_elements(By.CSS_SELECTOR, "#timeline-svg .dot")
    assert len(dots) == CLIP_FRAMES
    jumping = browser.find_elements(By.CSS_SELECTOR, "#timeline-svg .dot.jump")
    assert [int(d.get_attribute("data-index")) for d in jumping] == list(SWERVES)

    # One thumbnail per frame, the jumps' flagged.
    thumbs = browser.find_elements(By.CSS_SELECTOR, "#thumbs .thumb")
    assert len(thumbs) == CLIP_FRAMES
    assert len(browser.find_elements(By.CSS_SELECTOR, "#thumbs img")) == CLIP_FRAMES
    flagged = [k for k, t in enumerate(thumbs) if "jump" in t.get_attribute("class").split()]
    assert flagged == list(SWERVES)

    # Every image decoded: the thumbnails and the large view (N + 1 in all).
    sizes = wait_for(
        browser,
        "Array.from(document.images).every(i => i.complete) && "
        "Array.from(document.images).map(i => i.naturalWidth)",
    )
    assert len(sizes) == CLIP_FRAMES + 1
    assert all(width > 0 for width in sizes)

    large = browser.find_element(By.ID, "large")
    assert large.get_attribute("title") == frames[0]["id"]
    assert large.get_attribute("src") == src(reviewed, frames[0]["strip"])

    # Clicking a thumbnail shows that frame large, with its id and its value.
    k = SWERVES[0]
    browser.execute_script("arguments[0].scrollIntoView()", thumbs[k])
    thumbs[k].click()
    assert large.get_attribute("src") == src(reviewed, frames[k]["strip"])
    assert large.get_attribute("title") == frames[k]["id"]
    assert browser.find_element(By.ID, "detail-title").text == frames[k]["id"]
    detail = browser.find_element(By.ID, "detail-text").text
    assert f"steering {frames[k]['value']:+.4f}" in detail
    assert "jump" in detail
    assert "picked" in thumbs[k].get_attribute("class").split()
    assert "picked" not in thumbs[0].get_attribute("class").split()
    wait_for(browser, "document.getElementById('large').complete")
    assert browser.execute_script("return document.getElementById('large').naturalWidth") > 0

    # A dot of the timeline does the same; the arrow keys step from there.
    browser.execute_script(
        "arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", dots[3]
    )
    assert large.get_attribute("title") == frames[3]["id"]
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
    assert large.get_attribute("title") == frames[4]["id"]
    assert large.get_attribute("src") == src(reviewed, frames[4]["strip"])
