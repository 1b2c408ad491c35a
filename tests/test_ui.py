"""The /ui try-it page in a real headless Chromium (Debian's chromium + chromedriver, Selenium):
load it, enter the key, upload a real clip, transcribe, read the transcript; and its Live mode,
with a recording played as Chromium's fake microphone. Screenshots are kept in test-artifacts/."""

from __future__ import annotations

import contextlib
import shutil
import tempfile

import httpx
import numpy as np
import pytest

from tests.conftest import API_KEY, ARTIFACTS, FOX, clip, needs_asterisk, normalize

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@contextlib.contextmanager
def chromium(*extra_flags: str):
    """A headless Chromium with a fresh profile; ``extra_flags`` are launch-time switches (e.g. a
    fake microphone), which is why a test that needs them starts its own browser."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium/chromedriver not installed (scripts/setup installs them when run as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="openstt-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={profile}", "--window-size=1100,900", *extra_flags):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


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
    assert browser.find_element(By.ID, "transcript").text == FOX
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


# Three of Debian's asterisk prompts (Allison's read speech), each a turn of its own.
LIVE_PROMPTS = ("tt-weasels", "tt-monkeysintro", "conf-onlyperson")


def live_recording(path) -> list[str]:
    """Writes the prompts, 1 s of silence before and between them and 2 s after, as a 16-bit WAV
    (Chromium's fake microphone plays it, in a loop); returns the reference's normalized words."""
    import soundfile as sf

    from openstt.audio import SAMPLE_RATE, decode_audio
    from scripts.kit.speech import ASTERISK_SOUNDS, asterisk_prompts

    prompts = asterisk_prompts()
    pieces = [np.zeros(SAMPLE_RATE, np.float32)]
    for name in LIVE_PROMPTS:
        pieces += [decode_audio((ASTERISK_SOUNDS / f"{name}.wav").read_bytes()), np.zeros(SAMPLE_RATE, np.float32)]
    pieces.append(np.zeros(SAMPLE_RATE, np.float32))
    sf.write(str(path), np.concatenate(pieces), SAMPLE_RATE, subtype="PCM_16")
    return normalize(" ".join(prompts[n] for n in LIVE_PROMPTS)).split()


@needs_asterisk
def test_live_microphone_shows_the_words(server, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import Select

    wav = tmp_path / "live.wav"
    reference = live_recording(wav)
    finals = "return [...document.querySelectorAll('#liveTranscript .final')].map((p) => p.textContent)"

    def heard(driver) -> bool:
        # the interim text (grey) is only a preview: what counts is the final text of the turns
        words = set(normalize(" ".join(driver.execute_script(finals))).split())
        return sum(w in words for w in reference) >= 0.6 * len(reference)

    with chromium("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                  f"--use-file-for-fake-audio-capture={wav}") as browser:
        By, EC, WebDriverWait = open_page(browser, server)
        Select(browser.find_element(By.ID, "model")).select_by_value("whisper-tiny.en")
        browser.find_element(By.ID, "liveStart").click()
        try:
            WebDriverWait(browser, 60, poll_frequency=0.3).until(heard)
        except TimeoutException:
            pytest.fail(f"after 60 s the live transcript is {browser.find_element(By.ID, 'liveTranscript').text!r} "
                        f"(status {browser.find_element(By.ID, 'status').text!r}); expected most of {reference}")
        assert browser.find_elements(By.CSS_SELECTOR, "#liveTranscript p.final")
        status = browser.find_element(By.ID, "status")
        assert "error" not in status.get_attribute("class"), status.text
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "ui-live.png"))

        browser.find_element(By.ID, "liveStop").click()
        WebDriverWait(browser, 10).until(EC.element_to_be_clickable((By.ID, "liveStart")))
        assert "error" not in status.get_attribute("class"), status.text
        assert status.text == "Live transcription stopped."
        assert not browser.find_element(By.ID, "liveStop").is_enabled()


def test_live_resampler_keeps_its_phase_across_frames(browser, server):
    """The page's fallback resampler (for browsers that will not run an AudioContext at 24 kHz):
    a 44.1 kHz ramp in uneven frames comes out as the whole ramp resampled at once."""
    open_page(browser, server)
    chunked, whole = browser.execute_script("""
        const ramp = Float32Array.from({ length: 4801 }, (_, i) => i / 4800);
        const cut = new Resampler(44100, 24000), once = new Resampler(44100, 24000);
        const out = [];
        for (let i = 0, n = 1; i < ramp.length; i += n, n = n * 3 % 997 + 1) out.push(...cut.push(ramp.subarray(i, i + n)));
        return [out, [...once.push(ramp)]];
    """)
    assert len(chunked) == len(whole) == 2613  # floor(4800 * 24000 / 44100) + 1 samples
    assert np.allclose(chunked, whole, atol=1e-5)
    assert np.allclose(whole, np.arange(2613) * (44100 / 24000) / 4800, atol=1e-5)
