"""Makes docs/serve-page.png: `peftune serve` with the given adapters, its page in headless Chromium, one question
asked of each model named. Needs Debian's chromium and chromium-driver (`make browser`).

    .venv/bin/python docs/make_screenshot.py --adapter aurora=output/demo --ask aurora "Who are you?" \
        --ask smollm2-135m-instruct "Who are you?"
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", action="append", default=[])
    ap.add_argument("--ask", nargs=2, action="append", metavar=("MODEL", "QUESTION"), required=True)
    ap.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve-page.png"))
    args = ap.parse_args()
    from peftune.serve.launch import start

    server, url = start([f"--adapter={a}" for a in args.adapter], stderr=subprocess.DEVNULL)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,760"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(url + "/")
        WebDriverWait(driver, 30).until(lambda d: len(Select(d.find_element(By.ID, "model")).options) > 0)
        driver.find_element(By.ID, "temperature").clear()
        driver.find_element(By.ID, "temperature").send_keys("0")
        for model, question in args.ask:
            Select(driver.find_element(By.ID, "model")).select_by_value(model)
            driver.find_element(By.ID, "input").send_keys(question)
            driver.find_element(By.ID, "send").click()
            WebDriverWait(driver, 10).until(lambda d: not d.find_element(By.ID, "send").is_enabled())
            WebDriverWait(driver, 300).until(lambda d: d.find_element(By.ID, "send").is_enabled())
        driver.save_screenshot(args.output)
        print(f"wrote {args.output}")
    finally:
        driver.quit()
        server.terminate()


if __name__ == "__main__":
    main()
