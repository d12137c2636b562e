"""The page in a real browser: ``fusedit serve`` (a subprocess, the command users run) on a tiny trained shapes run,
driven by Selenium through headless Chromium and chromedriver (Debian's ``chromium`` and ``chromium-driver``;
``.ci/run`` installs them). Open the page, type a prompt, generate, wait for an image of the requested size; the same
seed gives the same image, another seed a different one; 0 steps shows an error in the page and the next request
still works. Then Gradio's API (``gradio_client``) on the same server. The screenshots stay in the test's temporary
folder.

Without a browser the test fails, saying what to install; it is skipped only when ``FUSEDIT_SKIP_BROWSER`` says
why (``.ci/run`` sets it, loudly, when apt-get cannot install the browser)."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusedit.experiment import load_experiment
from fusedit.train.launch import train_run

pytestmark = pytest.mark.slow

PROMPT = "a red circle above a blue square"
WIDTH, HEIGHT, STEPS = 32, 24, 3
CHROME_FLAGS = (
    "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking "
    "--disable-component-update --disable-sync --disable-dev-shm-usage --window-size=1280,1100"
).split()


def browser_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver") if Path(p).is_file()), None
    )
    if browser and driver:
        return browser, driver
    reason = os.environ.get("FUSEDIT_SKIP_BROWSER")
    if reason:
        pytest.skip(f"NO BROWSER TEST: {reason}")
    pytest.fail("headless Chromium and chromedriver are needed: apt-get install chromium chromium-driver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llm_dir, demo_overrides):
    runs = tmp_path_factory.mktemp("runs")
    run = runs / "tiny" / "fusedit"
    train_run(load_experiment("demo", demo_overrides(tiny_llm_dir)), run, device="cpu", progress=False)
    port = free_port()
    log = open(runs / "serve.log", "w")  # noqa: SIM115  (closed below)
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost"}
    command = [sys.executable, "-m", "fusedit.cli", "serve", str(run), "--runs-dir", str(runs), "--port", str(port)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 600  # a busy 2-core machine may take minutes to import torch and Gradio
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"fusedit serve did not start: {(runs / 'serve.log').read_text()[-3000:]}")
            time.sleep(1)
        yield url, str(run)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, chromedriver = browser_paths()
    options = Options()
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.binary_location = browser
    web = webdriver.Chrome(options=options, service=Service(chromedriver))
    web.set_page_load_timeout(60)
    yield web
    web.quit()


def set_value(driver, selector: str, value) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    # Gradio renders its components one after another: wait for this one (it was not there yet in one CI run)
    field = WebDriverWait(driver, 60).until(lambda d: next(iter(d.find_elements(By.CSS_SELECTOR, selector)), False))
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(str(value))
    field.send_keys(Keys.TAB)  # Gradio takes a number field's value when it loses focus


def generate(driver, timeout: float = 180) -> str:
    """Click Generate and wait for the server's next answer (the status line starts ``#N:``, N counting the server's
    answers) and its image in the gallery; returns the image's address. (An identical image may come back under the
    same address: Gradio names its files by content.)"""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    before = driver.find_element(By.ID, "status").text
    driver.find_element(By.ID, "generate").click()

    def answered(d):
        status = d.find_element(By.ID, "status").text
        sources = [img.get_attribute("src") for img in d.find_elements(By.CSS_SELECTOR, "#gallery img")]
        return sources[0] if status.startswith("#") and status != before and sources and sources[0] else False

    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(answered)


def pixels(src: str) -> np.ndarray:
    with urllib.request.urlopen(src, timeout=30) as response:
        return np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))


def test_the_page_generates_images_in_a_real_browser(server, driver, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    driver.get(url)
    # Gradio renders its components one after another: wait for every one the test touches
    needed = (
        "#prompt textarea",
        "#steps input",
        "#seed input",
        "#width input",
        "#height input",
        "#generate",
        "#status",
    )
    WebDriverWait(driver, 60).until(lambda d: all(d.find_elements(By.CSS_SELECTOR, css) for css in needed))
    driver.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys(PROMPT)
    set_value(driver, "#steps input", STEPS)
    set_value(driver, "#seed input", 7)
    set_value(driver, "#width input[type=number]", WIDTH)
    set_value(driver, "#height input[type=number]", HEIGHT)

    first = generate(driver)
    size = driver.execute_script(
        "const i = document.querySelector('#gallery img'); return [i.naturalWidth, i.naturalHeight];"
    )
    assert size == [WIDTH, HEIGHT], f"the page shows a {size[0]}x{size[1]} image, {WIDTH}x{HEIGHT} was asked for"
    driver.save_screenshot(str(tmp_path / "generated.png"))
    image = pixels(first)
    assert image.shape == (HEIGHT, WIDTH, 3)

    same = generate(driver)
    assert np.array_equal(pixels(same), image), "the same seed must give the same image"
    set_value(driver, "#seed input", 8)
    other = generate(driver)
    assert not np.array_equal(pixels(other), image), "another seed must give another image"

    set_value(driver, "#steps input", 0)
    driver.find_element(By.ID, "generate").click()
    toast = WebDriverWait(driver, 60).until(
        lambda d: next((t for t in d.find_elements(By.CSS_SELECTOR, ".toast-body") if "Steps must" in t.text), False)
    )
    assert "Steps must be at least 1 (got 0)" in toast.text
    driver.save_screenshot(str(tmp_path / "error.png"))

    set_value(driver, "#steps input", STEPS)
    set_value(driver, "#seed input", 7)
    after = generate(driver)
    assert np.array_equal(pixels(after), image), "after the error the server still answers, and the same seed"
    driver.save_screenshot(str(tmp_path / "after-error.png"))
    assert all((tmp_path / name).stat().st_size > 0 for name in ("generated.png", "error.png", "after-error.png"))


def test_gradio_api_works_for_scripts(server):
    from gradio_client import Client

    url, run = server
    client = Client(url, verbose=False)
    gallery, seed, note = client.predict(run, PROMPT, "", STEPS, 4.0, 11, False, WIDTH, HEIGHT, 2, api_name="/generate")
    assert seed == 11 and len(gallery) == 2 and "seed 11" in note
    assert Image.open(gallery[0]["image"]).size == (WIDTH, HEIGHT)
    with pytest.raises(Exception, match="Steps must be at least 1"):
        client.predict(run, PROMPT, "", 0, 4.0, 11, False, WIDTH, HEIGHT, 1, api_name="/generate")
