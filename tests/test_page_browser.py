"""The page in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium) loads it from a live `tegaki serve`, generates, moves the temperature slider, and opens
the attention view, the logit lens and the parameter table. Skipped, with the reason, when no
browser is installed; .ci/run installs one.
"""

from __future__ import annotations

import shutil
import tempfile
import time

import pytest
from serve_models import running_server, write_model_folder

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="no Chromium and chromedriver found (apt-get install chromium chromium-driver)",
    ),
]
PROMPT = "吾輩は猫である。"


def headless_chromium(profile: str):
    """Chromium as CI can run it: no sandbox (containers), no GPU, no network of its own."""
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1200,1400",
        "--lang=en-US",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def wait_for(driver, script: str, timeout: float = 30.0):
    """Poll a JavaScript expression until it is truthy (bounded); return its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return ({script});")
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for: {script}")


def bar_widths(driver) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('#bars .bar-fill')].map(b => b.style.width);")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    folder = write_model_folder(tmp_path_factory.mktemp("page") / "tiny-ja")
    profile = tempfile.mkdtemp(prefix="tegaki-chromium-")
    with running_server(folder) as url:
        driver = headless_chromium(profile)
        try:
            driver.get(url + "/?lang=en")
            wait_for(driver, "document.body.dataset.ready === 'true'")
            yield driver
        finally:
            driver.quit()
            shutil.rmtree(profile, ignore_errors=True)


def test_generate_streams_tokens_with_their_alternatives(page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    prompt = page.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(PROMPT)
    page.execute_script(
        "document.getElementById('max-tokens').value = 20;document.getElementById('temperature').value = 0;"
    )
    page.find_element(By.ID, "generate-button").click()
    wait_for(page, "document.querySelectorAll('#generated .token').length > 5")
    wait_for(page, "!document.getElementById('generate-button').disabled")
    generated = page.find_element(By.ID, "generated").text
    assert generated.startswith("名前はまだ無い")
    token = page.find_elements(By.CSS_SELECTOR, "#generated .token")[0]
    ActionChains(page).move_to_element(token).perform()
    wait_for(page, "!document.getElementById('tooltip').hidden")
    assert "%" in page.find_element(By.ID, "tooltip").text
    token.click()
    assert page.find_elements(By.CSS_SELECTOR, "#token-info .bar-row")


def test_the_bars_follow_the_temperature_slider(page):
    wait_for(page, "document.querySelectorAll('#bars .bar-fill').length > 3")
    page.execute_script(
        "const s = document.getElementById('temperature'); s.value = 0.3;s.dispatchEvent(new Event('input'));"
    )
    wait_for(page, "JSON.parse(document.getElementById('bars').dataset.settings || '{}').temperature === 0.3")
    cool = bar_widths(page)
    page.execute_script(
        "const s = document.getElementById('temperature'); s.value = 1.8;s.dispatchEvent(new Event('input'));"
    )
    wait_for(page, "JSON.parse(document.getElementById('bars').dataset.settings || '{}').temperature === 1.8")
    hot = bar_widths(page)
    assert hot != cool
    assert float(hot[0].rstrip("%")) < float(cool[0].rstrip("%"))  # hotter: the top token loses share


def test_the_attention_view_renders(page):
    from selenium.webdriver.common.by import By

    page.find_element(By.CSS_SELECTOR, ".tab[data-view=attention]").click()
    wait_for(page, "Number(document.getElementById('attention-view').dataset.rendered) > 0")
    heads = page.find_elements(By.CSS_SELECTOR, "#head-grid .head")
    assert len(heads) == 4
    heads[2].click()
    assert page.execute_script("return document.getElementById('attention-head').value") == "2"
    # The big heatmap has been drawn: more than one colour on the canvas.
    colours = page.execute_script("""
        const c = document.getElementById('attention-canvas');
        const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const seen = new Set();
        for (let i = 0; i < data.length; i += 16) seen.add(data[i] + ',' + data[i + 1] + ',' + data[i + 2]);
        return seen.size;""")
    assert colours > 10


def test_the_logit_lens_and_the_parameter_table(page):
    from selenium.webdriver.common.by import By

    page.find_element(By.CSS_SELECTOR, ".tab[data-view=lens]").click()
    wait_for(page, "document.querySelectorAll('#lens-table tr').length === 3")  # header + 2 layers
    page.find_element(By.CSS_SELECTOR, ".tab[data-view=params]").click()
    wait_for(page, "document.querySelectorAll('#params-table tr').length > 3")
    assert "parameters" in page.find_element(By.ID, "params-total").text


def test_the_page_speaks_japanese(page):
    from selenium.webdriver.common.by import By

    page.find_element(By.CSS_SELECTOR, "[data-lang=ja]").click()
    assert page.find_element(By.CSS_SELECTOR, ".tab[data-view=attention]").text == "アテンション"
    assert page.find_element(By.ID, "generate-button").text == "生成"
    page.find_element(By.CSS_SELECTOR, "[data-lang=en]").click()
    assert page.find_element(By.ID, "generate-button").text == "Generate"
