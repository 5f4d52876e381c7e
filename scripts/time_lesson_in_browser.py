"""Time the collapse lesson as a teacher starts it: in a real browser, from the Adapt page (a benchmark).

    python scripts/time_lesson_in_browser.py [FOLDER]     # run from the repository root

Starts the app on a free localhost port with a fresh workspace in FOLDER (default: a temporary folder),
opens the Fashion-MNIST demo in headless Chromium, waits for the demo's first model, opens the Adapt page,
clicks "Run the lesson" and prints the seconds until its three final ROC AUC figures show; then restarts the
server and checks that the lesson is still shown. Screenshots: FOLDER/lesson.png, lesson_after_restart.png.
Needs Debian's chromium and chromium-driver and selenium (requirements-dev.txt).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

from test_browser_e2e import AppServer, By, button, new_browser, wait_for_text  # noqa: E402


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    server = AppServer(folder)
    server.start()
    driver = new_browser()
    try:
        driver.get(server.url)
        button(driver, "Open the fashion demo").click()
        wait_for_text(driver, "Flagged test images", 600)  # the demo's first model, so the lesson runs alone
        driver.get(server.url + "/adapt")
        wait_for_text(driver, "The collapse lesson", 60)
        driver.find_element(By.XPATH, "//summary[.//*[contains(text(), 'The collapse lesson')]]").click()
        run = button(driver, "Run the lesson", 30)
        clicked = time.time()
        run.click()
        wait_for_text(driver, "EWC, last epoch", 900)
        print(f"the lesson from the Adapt page: {time.time() - clicked:.1f} s from the click to its figures")
        driver.save_screenshot(str(folder / "lesson.png"))
        server.stop()
        server.start()
        driver.get(server.url + "/adapt")
        wait_for_text(driver, "EWC, last epoch", 60)
        driver.save_screenshot(str(folder / "lesson_after_restart.png"))
        print(f"after a server restart the lesson is still shown; screenshots in {folder}")
    finally:
        driver.quit()
        server.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="lesson-walk-")))
