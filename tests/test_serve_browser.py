"""``hyperfeatures serve`` in a real browser: headless Chromium driven by selenium.

The command runs as a subprocess on a free loopback port with the tiny random-weight model;
the test picks two sample images, clicks a point on the source image and waits for the
match marker, the heat map and the result text. Skipped (with the reason) when Gradio,
selenium, Chromium or chromedriver is missing: ``apt-get install chromium chromium-driver``
and ``pip install -e ".[test,demo]"`` provide them. Nothing is downloaded.

Set ``HYPERFEATURES_SERVE_SCREENSHOT=docs/images/serve.png`` to save a screenshot of the page
after the click (the README's).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

WAIT_S = 90  # slow shared CI machines: normally a few seconds
SERVER_ARGS = ("--num-steps", "5", "--steps", "all", "--cache-items", "8", "--threads", "1")
RESULT = re.compile(r"match: \(([-\d.]+), ([-\d.]+)\) px in the target; similarity ([-\d.]+)")


def _missing() -> str | None:
    """Why the browser test cannot run here, or ``None``."""
    for module, hint in (("gradio", 'pip install "hyperfeatures[demo]"'), ("selenium", "")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({hint or 'pip install selenium'})"
    if _chromium() is None:
        return "Chromium is not installed (apt-get install chromium chromium-driver)"
    if shutil.which("chromedriver") is None:
        return "chromedriver is not installed (apt-get install chromium-driver)"
    return None


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``hyperfeatures serve`` on a free loopback port; stopped (SIGTERM) at the end, when
    its upload folder must be gone."""
    reason = _missing()
    if reason:
        print(f"skipping the browser test: {reason}")
        pytest.skip(reason)
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "hyperfeatures", "serve", "--port", str(port), *SERVER_ARGS]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited ({process.returncode}):\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no page at {url} after {WAIT_S} s:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield {"url": url, "log": log_path}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
    found = re.search(r"uploads in (\S+?);", log_path.read_text())
    assert found, log_path.read_text()
    assert not Path(found[1]).exists(), f"upload folder {found[1]} left behind"


@pytest.fixture(scope="module")
def browser(server: dict[str, Any]) -> Iterator[Any]:
    """Headless Chromium (the system's; selenium downloads nothing)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")
    options = Options()
    options.binary_location = _chromium() or ""
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1400",
        "--hide-scrollbars",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _value(driver: Any, elem_id: str) -> str:
    from selenium.webdriver.common.by import By

    boxes = driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    return boxes[0].get_attribute("value") or "" if boxes else ""


def _image_src(driver: Any, elem_id: str) -> str:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")
    return (found[0].get_attribute("src") or "") if found else ""


def _pick(driver: Any, elem_id: str, name: str) -> None:
    from selenium.webdriver.common.by import By

    for label in driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} label"):
        if label.text.strip() == name:
            label.click()
            return
    raise AssertionError(f"no sample {name!r} in #{elem_id}")


def test_click_shows_the_match_and_the_heat_map(server: dict[str, Any], browser: Any) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT_S, poll_frequency=0.25)
    browser.get(server["url"])
    wait.until(lambda d: _image_src(d, "hf-source") and _image_src(d, "hf-target"))
    assert not _image_src(browser, "hf-match") and not _image_src(browser, "hf-heatmap")

    # pick two sample images (other than the ones shown at start)
    for elem_id, view, name in (
        ("hf-source-pick", "hf-source", "coffee.jpg"),
        ("hf-target-pick", "hf-target", "astronaut.jpg"),
    ):
        before = _image_src(browser, view)
        _pick(browser, elem_id, name)
        wait.until(lambda d, v=view, b=before: _image_src(d, v) not in ("", b))
        wait.until(lambda d, n=name: n in _value(d, "hf-status"))

    # click a point of the source image (offsets from its centre)
    source = browser.find_element(By.CSS_SELECTOR, "#hf-source img")
    shown_before = _image_src(browser, "hf-source")
    ActionChains(browser).move_to_element_with_offset(source, -40, -20).click().perform()
    wait.until(lambda d: RESULT.search(_value(d, "hf-result")))
    wait.until(lambda d: _image_src(d, "hf-match") and _image_src(d, "hf-heatmap"))
    x, y, similarity = (float(v) for v in RESULT.search(_value(browser, "hf-result")).groups())
    assert 0 <= x < 256 and 0 <= y < 256 and -1.001 <= similarity <= 1.001  # astronaut: 256 px
    assert _image_src(browser, "hf-source") != shown_before  # the click is marked
    status = _value(browser, "hf-status")
    assert status.startswith("hyperfeatures on tiny-sd: source (") and "2 computed" in status
    match_img = browser.find_element(By.CSS_SELECTOR, "#hf-match img")
    wait.until(lambda d: d.execute_script("return arguments[0].naturalWidth", match_img) > 0)
    assert browser.execute_script("return arguments[0].naturalWidth", match_img) == 256

    shot = os.environ.get("HYPERFEATURES_SERVE_SCREENSHOT")
    if shot:
        time.sleep(1.0)  # let the images finish painting
        Path(shot).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(shot)

    # a second click on the same pair uses the cached descriptors
    first = _value(browser, "hf-result")
    heat_before = _image_src(browser, "hf-heatmap")
    source = browser.find_element(By.CSS_SELECTOR, "#hf-source img")
    ActionChains(browser).move_to_element_with_offset(source, 50, 30).click().perform()
    wait.until(lambda d: _value(d, "hf-result") != first and "cached" in _value(d, "hf-status"))
    assert _image_src(browser, "hf-heatmap") != heat_before
    assert "Traceback" not in browser.page_source
