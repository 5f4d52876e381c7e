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


class AppServer:
    """``streamlit run dashboard/app.py`` on a free localhost port, with its own workspace; can be restarted."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://localhost:{self.port}"
        self.environment = {**os.environ, "ANOMALY_WORKSPACE": str(folder / "workspace")}
        self.server: subprocess.Popen | None = None
        self.log = None

    def start(self) -> float:
        self.log = open(self.folder / "server.log", "a")
        started = time.time()
        self.server = subprocess.Popen(
            # Bound to localhost: the test never exposes the app to the network.
            [sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.port", str(self.port),
             "--server.address", "localhost", "--server.headless", "true"],
            cwd=REPO_ROOT, env=self.environment, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("localhost", self.port), timeout=1).close()
                return started
            except OSError:
                assert self.server.poll() is None, (self.folder / "server.log").read_text()
                time.sleep(0.3)
        raise AssertionError(f"the app did not listen on port {self.port} within 60 s")

    def stop(self) -> None:
        if self.server is not None:
            self.server.terminate()
            try:
                self.server.wait(10)
            except subprocess.TimeoutExpired:
                self.server.kill()
            self.server = None
        if self.log is not None:
            self.log.close()
            self.log = None


@pytest.fixture
def app_server(tmp_path):
    """The app on a free localhost port with an empty workspace: ``(url, launch time)``."""
    server = AppServer(tmp_path)
    started = server.start()
    try:
        yield server.url, started
    finally:
        server.stop()


@pytest.fixture
def restartable_server(tmp_path):
    server = AppServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def new_browser():
    """Headless Chromium (the system's) at a desktop window size."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1440,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=webdriver.ChromeService(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    return driver


@pytest.fixture
def browser():
    driver = new_browser()
    yield driver
    # The last screen, whatever happened: what a failed run looked like when it stopped.
    keep = Path(os.environ.get("SCREENSHOT_DIR", "/tmp/screens"))
    keep.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(keep / "e2e-last.png"))
    driver.quit()


def button(driver, text: str, timeout: float = 60):
    return WebDriverWait(driver, timeout).until(
        expected.element_to_be_clickable((By.XPATH, f"//button[.//*[contains(text(), '{text}')]]"))
    )


def wait_for_text(driver, text: str, timeout: float):
    Path(os.environ.get("SCREENSHOT_DIR", "/tmp/screens")).mkdir(parents=True, exist_ok=True)
    try:
        WebDriverWait(driver, timeout, poll_frequency=0.25).until(
            lambda d: text in d.find_element(By.TAG_NAME, "body").text
        )
    except Exception:
        # What the page said instead, and how it looked: the first thing anyone asks of a failed run.
        driver.save_screenshot(str(Path(os.environ.get("SCREENSHOT_DIR", "/tmp/screens")) / "failed-wait.png"))
        raise AssertionError(f"{text!r} not shown within {timeout} s; the page says:\n"
                             + driver.find_element(By.TAG_NAME, "body").text[-3000:]) from None


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


# ---------------------------------------------------------------------- the QA engineer's walk (issue 15.6)
def keyed(driver, key: str, inner: str = ""):
    """The element of the widget with this Streamlit key (Streamlit marks it with the class st-key-<key>)."""
    return driver.find_element(By.CSS_SELECTOR, f".st-key-{key} {inner}".strip())


def open_page(driver, page: str) -> None:
    WebDriverWait(driver, 60).until(expected.element_to_be_clickable(
        (By.XPATH, f"//a[@data-testid='stSidebarNavLink'][contains(@href, '{page}')]"))).click()


def body_text(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def picked(driver, key: str) -> str:
    """What a selectbox shows as chosen (its text, or its input's value: it depends on the Streamlit version).

    A key ending in "-" matches the widget whose key starts so (model pickers end in the newest model's id).
    """
    box = (driver.find_element(By.CSS_SELECTOR, f"[class*='st-key-{key}']") if key.endswith("-") else keyed(driver, key))
    values = [field.get_attribute("value") or "" for field in box.find_elements(By.TAG_NAME, "input")]
    return " ".join([box.get_attribute("textContent") or "", *values])


def mvtec_folder(tmp_path: Path) -> Path:
    """A small MVTec-style folder from the demo: 6 train/good, 2 test/good, the three defect folders' 000.jpg
    (same name, different pictures) with their masks, and one true duplicate (same bytes, another name)."""
    source, root = REPO_ROOT / "assets" / "demo" / "bottle", tmp_path / "upload" / "bottle"
    chosen = [f"train/good/{p.name}" for p in sorted((source / "train" / "good").iterdir())[:6]]
    chosen += [f"test/good/{p.name}" for p in sorted((source / "test" / "good").iterdir())[:2]]
    for defect in ("broken_large", "broken_small", "contamination"):
        chosen += [f"test/{defect}/000.jpg", f"ground_truth/{defect}/000_mask.png"]
    for relative in chosen:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / relative, root / relative)
    shutil.copyfile(root / chosen[6], root / "test" / "good" / "copy.jpg")
    return root


def current_threshold(driver) -> str:
    import re

    found = re.search(r"Working point of model #(\d+): threshold (\S+) \(([^)]*)\)", body_text(driver))
    assert found, "no working point shown"
    return found.group(0)


def test_qa_walk_upload_fit_threshold_restart_explain_review_refit(restartable_server, browser, tmp_path):
    began = time.time()
    server, driver = restartable_server, browser
    driver.get(server.url)
    open_page(driver, "data")
    name = WebDriverWait(driver, 60).until(
        expected.element_to_be_clickable((By.XPATH, "//input[@aria-label='Project name']")))
    name.send_keys("qa line")
    button(driver, "Create project").click()
    wait_for_text(driver, "Import into “qa line”", 30)

    # 1. A whole MVTec-style folder: colliding 000.jpg names across defect folders, masks, a duplicate.
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".st-key-upload-folder-mode label"))
    keyed(driver, "upload-folder-mode", "label").click()
    upload = WebDriverWait(driver, 30).until(lambda d: d.find_element(
        By.CSS_SELECTOR, "[data-testid='stFileUploader'] input[type='file'][webkitdirectory]"))
    upload.send_keys(str(mvtec_folder(tmp_path)))
    wait_for_text(driver, "11 images in 5 folders · 3 defect masks paired", 60)
    button(driver, "Import uploads").click()
    wait_for_text(driver, "imported 11 images", 60)
    assert "1 duplicates (same bytes" in body_text(driver)
    screenshot(driver, tmp_path, "qa-1-upload")

    # 2. Fit: the new model is the one shown.
    open_page(driver, "detect")
    button(driver, "Fit and score").click()
    wait_for_text(driver, "Working point of model #1", 90)
    assert "Only 6 normal images back this threshold" in body_text(driver)

    # 3. A working point for a 20 % target FPR, saved with the model.
    field = keyed(driver, "target-fpr-1", "input")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys("0.2", Keys.ENTER)
    time.sleep(0.5)
    button(driver, "Set for this FPR").click()
    wait_for_text(driver, "set for a 20.0% target FPR", 30)
    saved = current_threshold(driver)
    screenshot(driver, tmp_path, "qa-2-threshold")

    # ... and kept across a server restart (and a new browser session).
    server.stop()
    server.start()
    driver.get(server.url)
    open_page(driver, "detect")
    wait_for_text(driver, "Working point of model #1", 60)
    assert current_threshold(driver) == saved

    # 4. Explanation: the nearest normal patch, from the one layer left ticked.
    open_page(driver, "segment")
    button(driver, "Fit SPADE").click()
    wait_for_text(driver, "nearest normal patch to the peak", 120)
    layer_boxes = driver.find_elements(By.CSS_SELECTOR, "[class*='st-key-seg-stage-']")
    stages = [next(c for c in box.get_attribute("class").split() if c.startswith("st-key-seg-stage-"))
              .removeprefix("st-key-seg-stage-") for box in layer_boxes]
    assert len(stages) >= 2
    for stage in stages[:-1]:
        keyed(driver, f"seg-stage-{stage}", "label").click()
        time.sleep(0.3)
    wait_for_text(driver, f"({stages[-1]})): bottle/train/good/", 30)  # "... (stride 16 (block4)): ..."
    screenshot(driver, tmp_path, "qa-3-explanation")

    # 5. Review -> confirm a normal -> refit -> the new model is selected, with a done message.
    open_page(driver, "review")
    wait_for_text(driver, "Working point", 30)
    keyed(driver, "review-all", "label").click()
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "[class*='st-key-verdict-'] label"))
    verdict = next(label for label in driver.find_elements(By.CSS_SELECTOR, "[class*='st-key-verdict-'] label")
                   if label.text.strip().endswith("normal") and "anomalous" not in label.text)
    verdict.click()
    # A click that lands while the page is still redrawing after the verdict can be lost: retry it.
    for _ in range(5):
        button(driver, "Add 1 confirmed normals").click()
        try:
            WebDriverWait(driver, 10).until(lambda d: "added to the normal set" in body_text(d)
                                            or "Refitting" in body_text(d))
            break
        except Exception:  # noqa: BLE001 - the page did not take the click; the next try clicks again
            continue
    wait_for_text(driver, "done in", 240)
    WebDriverWait(driver, 30).until(lambda d: "#3 · SPADE" in picked(d, "review-model-"))
    screenshot(driver, tmp_path, "qa-4-refit")
    took = time.time() - began
    print(f"QA walk: {took:.0f} s")
    assert took < TIME_LIMIT
