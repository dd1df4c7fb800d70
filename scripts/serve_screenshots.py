"""Take the screenshots of the page in docs/serving.md: a live `tegaki serve` in headless Chromium.

    python scripts/serve_screenshots.py --model runs/demo --out docs/img

Needs what the browser test needs (selenium, Debian's chromium and chromium-driver). Writes
serve-page.png (English, a generation with one token clicked), serve-attention.png,
serve-lens.png, serve-params.png and serve-page-ja.png (the Japanese page with a Japanese prompt).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

ROOT = Path(__file__).resolve().parents[1]


def wait_for(driver, script: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not driver.execute_script(f"return ({script});"):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {script}")
        time.sleep(0.1)


def generate(driver, prompt: str, max_tokens: int, seed: int) -> None:
    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    driver.execute_script(
        f"document.getElementById('max-tokens').value = {max_tokens};document.getElementById('seed').value = {seed};"
    )
    driver.find_element(By.ID, "generate-button").click()
    wait_for(driver, "document.querySelectorAll('#generated .token').length > 3")
    wait_for(driver, "!document.getElementById('generate-button').disabled")
    time.sleep(0.5)  # the bars refresh after the generation


def hide_tooltip(driver) -> None:
    """The pinned details stay below the text; the hover box would cover the text in a picture."""
    driver.execute_script("document.getElementById('tooltip').hidden = true;")


def shoot(driver, element_id: str, path: Path) -> None:
    """One section, scrolled into view first (a part outside the window would come out blank)."""
    element = driver.find_element(By.ID, element_id)
    driver.execute_script("arguments[0].scrollIntoView();", element)
    time.sleep(0.3)
    element.screenshot(str(path))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", default=str(ROOT / "docs" / "img"))
    p.add_argument("--port", type=int, default=8741)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tegaki", "serve", "--model", args.model, "--port", str(args.port)]
    server = subprocess.Popen(command, env=env)
    profile = tempfile.mkdtemp(prefix="tegaki-shots-")
    driver = None
    try:
        url = f"http://127.0.0.1:{args.port}"
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or shutil.which("google-chrome")
        for flag in (
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--window-size=1180,1400",
            "--hide-scrollbars",
        ):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        driver.get(url + "/?lang=en")
        wait_for(driver, "document.body.dataset.ready === 'true'")
        generate(driver, "ROMEO:\nBut soft, what light", 40, 3)
        driver.find_elements(By.CSS_SELECTOR, "#generated .token")[2].click()
        hide_tooltip(driver)
        driver.save_screenshot(str(out / "serve-page.png"))
        driver.find_element(By.CSS_SELECTOR, ".tab[data-view=attention]").click()
        driver.execute_script(
            "document.getElementById('attention-layer').value = '1';"
            "document.getElementById('attention-layer').dispatchEvent(new Event('change'));"
        )
        wait_for(driver, "Number(document.getElementById('attention-view').dataset.rendered) > 0")
        time.sleep(0.5)
        shoot(driver, "attention-view", out / "serve-attention.png")
        driver.find_element(By.CSS_SELECTOR, ".tab[data-view=lens]").click()
        wait_for(driver, "document.querySelectorAll('#lens-table tr').length > 2")
        shoot(driver, "lens-view", out / "serve-lens.png")
        driver.find_element(By.CSS_SELECTOR, ".tab[data-view=params]").click()
        wait_for(driver, "document.querySelectorAll('#params-table tr').length > 3")
        shoot(driver, "params-view", out / "serve-params.png")
        driver.get(url + "/?lang=ja")
        wait_for(driver, "document.body.dataset.ready === 'true'")
        generate(driver, "ロミオ：恋とは", 30, 5)
        driver.find_elements(By.CSS_SELECTOR, "#generated .token")[0].click()
        hide_tooltip(driver)
        driver.save_screenshot(str(out / "serve-page-ja.png"))
        print(f"wrote 5 screenshots to {out}")
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
