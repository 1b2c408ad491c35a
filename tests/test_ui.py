"""The /ui try-it page in a real headless Chromium (Debian's chromium + chromedriver, Selenium):
load it, enter the key, upload a real clip, transcribe, read the transcript; screenshots are kept
in test-artifacts/."""

from __future__ import annotations

import shutil
import tempfile

import httpx
import pytest

from tests.conftest import API_KEY, ARTIFACTS, clip

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium/chromedriver not installed (scripts/setup installs them when run as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="openstt-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={profile}", "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def open_page(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.base + "/ui")
    key = browser.find_element(By.ID, "apiKey")
    key.clear()
    key.send_keys(API_KEY)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    WebDriverWait(browser, 30).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#model option")))
    return By, EC, WebDriverWait


def test_page_is_served_without_a_key(server):
    r = httpx.get(server.base + "/ui")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"] and "/v1/audio/transcriptions" in r.text


def test_transcribe_a_clip_with_segments(browser, server):
    By, EC, WebDriverWait = open_page(browser, server)
    models = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#model option")]
    assert models == ["whisper-tiny.en", "whisper-base", "gpt-4o-mini-transcribe → whisper-base"]
    browser.find_element(By.ID, "file").send_keys(str(clip("en/quick_brown_fox")))
    browser.find_element(By.ID, "words").click()
    browser.find_element(By.ID, "go").click()
    WebDriverWait(browser, 60).until(EC.text_to_be_present_in_element((By.ID, "transcript"), "quick brown fox"))
    assert browser.find_element(By.ID, "transcript").text == "The quick brown fox jumps over the lazy dog."
    rows = browser.find_elements(By.CSS_SELECTOR, "#segments tbody tr")
    assert rows and rows[0].find_elements(By.TAG_NAME, "td")[0].text == "00:00:00.000"
    links = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#downloads a")]
    assert links == ["download transcript.srt", "download transcript.vtt"]
    assert browser.find_element(By.ID, "status").text.startswith("Done in")
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "ui-transcript.png"))


def test_streaming_shows_text_live(browser, server):
    By, EC, WebDriverWait = open_page(browser, server)
    browser.find_element(By.ID, "file").send_keys(str(clip("en/hello_world")))
    browser.find_element(By.ID, "stream").click()
    browser.find_element(By.ID, "go").click()
    WebDriverWait(browser, 60).until(EC.text_to_be_present_in_element((By.ID, "status"), "Done in"))
    assert browser.find_element(By.ID, "transcript").text.lower().startswith("hello world")
    browser.save_screenshot(str(ARTIFACTS / "ui-stream.png"))


def test_errors_are_shown(browser, server):
    By, EC, WebDriverWait = open_page(browser, server)
    browser.find_element(By.ID, "file").send_keys(str(clip("en/hello_world").with_suffix(".txt")))
    browser.find_element(By.ID, "go").click()
    WebDriverWait(browser, 60).until(EC.text_to_be_present_in_element((By.ID, "status"), "Invalid file format"))
    assert "error" in browser.find_element(By.ID, "status").get_attribute("class")
