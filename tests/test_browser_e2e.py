"""End to end in a real headless browser: launch the app, open the demo, fit, see a heatmap, move σ.

Uses the system Chromium and chromedriver (Debian packages ``chromium`` and
``chromium-driver``); nothing is downloaded. Screenshots go to the test's tmp
folder and, for people reading a report, a copy to ``$SCREENSHOT_DIR`` (default
``/tmp/screens``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TIME_LIMIT = int(os.environ.get("E2E_TIME_LIMIT", "170"))  # seconds for the whole test: the brief bounds it under 3 minutes

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-dev.txt)")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian packages chromium, chromium-driver)",
    ),
]

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as expected  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


@pytest.fixture
def app_server(tmp_path):
    """``streamlit run dashboard/app.py`` on a free localhost port with an empty workspace."""
    port = free_port()
    environment = {**os.environ, "ANOMALY_WORKSPACE": str(tmp_path / "workspace")}
    log = open(tmp_path / "server.log", "w")
    started = time.time()
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.port", str(port),
         "--server.headless", "true"],
        cwd=REPO_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("localhost", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()
                time.sleep(0.3)
        yield f"http://localhost:{port}", started
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1440,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=webdriver.ChromeService(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def button(driver, text: str, timeout: float = 60):
    return WebDriverWait(driver, timeout).until(
        expected.element_to_be_clickable((By.XPATH, f"//button[.//*[contains(text(), '{text}')]]"))
    )


def wait_for_text(driver, text: str, timeout: float):
    WebDriverWait(driver, timeout, poll_frequency=0.25).until(
        lambda d: text in d.find_element(By.TAG_NAME, "body").text
    )


def screenshot(driver, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    driver.save_screenshot(str(path))
    keep = Path(os.environ.get("SCREENSHOT_DIR", "/tmp/screens"))
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, keep / path.name)
    return path


def heatmap_source(driver) -> str:
    image = driver.find_element(By.CSS_SELECTOR, "[data-testid='stImage'] img[alt='heatmap']")
    return image.get_attribute("src")


def test_demo_to_heatmap_in_a_browser(app_server, browser, tmp_path):
    url, launched = app_server
    browser.get(url)
    button(browser, "Open the bottle demo").click()

    # The demo opens Detect with the first model fitting; its results appear when the fit ends.
    wait_for_text(browser, "Flagged test images", timeout=TIME_LIMIT - 30)
    screenshot(browser, tmp_path, "e2e-detect")

    # The demo's first model is SPADE: the same fit already computed the heatmaps.
    browser.find_element(By.XPATH, "//a[@data-testid='stSidebarNavLink'][contains(@href, 'segment')]").click()
    WebDriverWait(browser, 60, poll_frequency=0.25).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "[data-testid='stImage'] img[alt='heatmap']")
    )
    first_heatmap = time.time() - launched
    screenshot(browser, tmp_path, "e2e-segment")

    # σ: focus the slider, press a key, time until the new heatmap shows (the AppTest proves no backbone pass).
    before = heatmap_source(browser)
    slider = browser.find_element(By.XPATH, "//div[@data-testid='stSlider'][.//p[contains(text(), 'Smoothing')]]"
                                            "//input[@type='range']")
    browser.execute_script("arguments[0].focus()", slider)  # the range input is visually hidden
    pressed = time.time()
    ActionChains(browser).send_keys(Keys.ARROW_RIGHT * 4).perform()
    WebDriverWait(browser, 20, poll_frequency=0.05).until(lambda d: heatmap_source(d) != before)
    sigma_change = time.time() - pressed
    screenshot(browser, tmp_path, "e2e-segment-sigma")

    timings = f"launch to first heatmap: {first_heatmap:.1f} s; sigma change shown after {sigma_change:.2f} s"
    print(timings)
    (Path(os.environ.get("SCREENSHOT_DIR", "/tmp/screens")) / "e2e-timings.txt").write_text(timings + "\n")
    assert first_heatmap < TIME_LIMIT
    assert sigma_change < 5
