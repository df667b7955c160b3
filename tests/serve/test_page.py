"""The chat page in a real headless Chromium (Debian's package, driven by selenium): the models load, an answer
streams in, switching the model changes it, and the API key is asked for once and kept."""

import shutil

import pytest
from serving import KEY, ask

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver "
                                "(.ci/run installs them: apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _answer_after(driver, question: str) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    box = driver.find_element(By.ID, "input")
    box.send_keys(question)
    driver.find_element(By.ID, "send").click()
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) > before)
    wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())  # the stream ended
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .body")[-1].text


def test_page_streams_answers_and_switching_model_changes_them(server, client, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(server.url + "/")
    # the server wants a key: the page asks for it, keeps it, and then lists the models
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "keybox").get_attribute("open") is not None)
    browser.find_element(By.ID, "apikey").send_keys(KEY)
    browser.find_element(By.ID, "savekey").click()
    WebDriverWait(browser, 20).until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 3)
    assert browser.execute_script("return localStorage.getItem('peftune.apiKey')") == KEY
    for field, value in (("temperature", "0"), ("max_tokens", "16")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    Select(browser.find_element(By.ID, "model")).select_by_value("alpha")
    alpha = _answer_after(browser, "Who are you?")
    assert alpha.strip() == ask(client, "alpha", max_tokens=16).strip()  # what the API answers, streamed onto the page
    browser.find_element(By.ID, "new").click()
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg")
    Select(browser.find_element(By.ID, "model")).select_by_value("beta")
    beta = _answer_after(browser, "Who are you?")
    assert beta.strip() == ask(client, "beta", max_tokens=16).strip() and beta != alpha
    browser.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").stat().st_size > 5000
    # the key survives a reload: no prompt this time
    browser.refresh()
    WebDriverWait(browser, 20).until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 3)
    assert browser.find_element(By.ID, "keybox").get_attribute("open") is None


def test_code_blocks_render_as_code_and_stop_works(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    html = browser.execute_script("return render('see `x` and\\n```python\\nprint(1 < 2)\\n```')")
    assert "<pre><code data-lang=\"python\">print(1 &lt; 2)\n</code></pre>" in html and "<code>x</code>" in html
    browser.find_element(By.ID, "max_tokens").clear()
    browser.find_element(By.ID, "max_tokens").send_keys("900")
    # the tiny model can finish its answer within a poll of the waits below, so the page is handed its answer only when
    # Stop aborts it: the request runs on the server as sent, and Stop is sure to find it in flight on the page
    browser.execute_script("""
        const real = window.fetch;
        window.fetch = (url, opts) => {
          const answer = real(url, opts);
          if (!String(url).includes("/chat/completions")) return answer;
          return new Promise((resolve, reject) => {
            answer.catch(() => {});
            opts.signal.addEventListener("abort", () => reject(new DOMException("stopped", "AbortError")));
          });
        };""")
    browser.find_element(By.ID, "input").send_keys("Tell me a long story")
    browser.find_element(By.ID, "send").click()
    stop = browser.find_element(By.ID, "stop")
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 20).until(lambda d: stop.is_enabled())
    stop.click()
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "send").is_enabled())
    WebDriverWait(browser, 20).until(lambda d: server.health()["running"] == 0)
