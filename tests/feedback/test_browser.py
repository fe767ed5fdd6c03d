"""The rating page in a real headless browser (Chromium through Selenium): a rater gives every kind of
judgment with the keyboard, and each one is in the store.

Needs Debian's ``chromium`` and ``chromium-driver`` packages (``apt-get install chromium chromium-driver``;
``.ci/run`` installs them) and selenium (the ``dev`` extra); skipped with that message otherwise.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the feedback server needs pip install 'rlfb[feedback]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (pip install -e '.[dev]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
if CHROMIUM is None or DRIVER is None:
    pytest.skip("the browser test needs Chromium and its driver: apt-get install chromium chromium-driver",
                allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from rlfb.feedback.simulated import free_port, start_grammar_server  # noqa: E402
from rlfb.feedback.store import FeedbackStore  # noqa: E402


def browser() -> object:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,760"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))


def test_a_rater_judges_every_kind_with_the_keyboard_and_the_store_has_each(tmp_path: Path) -> None:
    store_path = tmp_path / "store.sqlite"
    token = FeedbackStore(store_path).add_rater("ada")
    port = free_port()
    server = start_grammar_server(store_path, port)
    driver = browser()
    try:
        driver.get(f"http://127.0.0.1:{port}/#token={token}")
        wait = WebDriverWait(driver, 30)
        judged: list[str] = []
        edit_text = "The acting was <b>wonderful</b>, edited by a person."
        wanted = ["binary", "rating", "edit", "choice"]
        for _ in range(40):  # items come single or paired at random: judge each with the kind it allows
            if not wanted:
                break
            wait.until(lambda d: d.find_element(By.ID, "item").is_displayed()
                       and d.find_element(By.ID, "prompt").text != "")
            item_id_before = driver.execute_script("return state.item.item_id")
            pair = len(driver.find_elements(By.CSS_SELECTOR, "#completions .completion")) == 2
            # Only the controls of the kinds this item allows are shown.
            assert driver.find_element(By.ID, "choose-a").is_displayed() == pair
            assert driver.find_element(By.ID, "up").is_displayed() == (not pair)
            kind = next((k for k in wanted if (k == "choice") == pair), None)
            if kind is None:  # nothing left to do on this shape of item: skip it with a thumbs up
                kind = "choice" if pair else "binary"
            else:
                wanted.remove(kind)
            body = driver.find_element(By.TAG_NAME, "body")
            if len(judged) == 0:
                driver.save_screenshot(str(tmp_path / "page.png"))
            if kind == "binary":
                body.send_keys("y")
            elif kind == "rating":
                body.send_keys("4")
            elif kind == "choice":
                body.send_keys("b")
            else:
                body.send_keys("e")
                editor = wait.until(lambda d: d.find_element(By.ID, "edit-text"))
                wait.until(lambda d, editor=editor: editor.is_displayed())
                editor.clear()
                editor.send_keys(edit_text)
                editor.send_keys(Keys.CONTROL, Keys.ENTER)
            judged.append(kind)
            wait.until(lambda d, before=item_id_before: d.execute_script("return state.item && state.item.item_id")
                       != before)
        assert not wanted, f"never got an item for {wanted} in 40 items"
        progress = driver.find_element(By.ID, "progress-text").text
        assert progress.startswith(f"{len(judged)} judged"), progress
        # The page shows model text as text: the edited completion's markup is never parsed.
        assert driver.find_elements(By.CSS_SELECTOR, "#completions b") == []
    finally:
        driver.quit()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    stored = list(FeedbackStore(store_path).judgments())
    assert [judgment.kind for judgment in stored] == judged
    values = {judgment.kind: judgment.value for judgment in stored}
    assert set(values) == {"binary", "rating", "choice", "edit"}, judged
    assert values["binary"] == {"label": 1} and values["rating"]["rating"] == 4
    assert values["choice"] == {"chosen": 1} and values["edit"] == {"text": edit_text}
    assert all(judgment.rater == "ada" for judgment in stored)
    if os.environ.get("RLFB_SCREENSHOT"):  # docs/feedback_page.png: RLFB_SCREENSHOT=docs/feedback_page.png pytest ...
        shutil.copyfile(tmp_path / "page.png", os.environ["RLFB_SCREENSHOT"])
