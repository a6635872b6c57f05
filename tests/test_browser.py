"""The page at "/": typed into and read back in headless Chromium, against a real seq2seq-serve.

The browser is Debian's `chromium` package driven by Playwright (never a browser
download); scripts/setup.sh installs it where it can. Without it this test fails, with
the command that installs it: a missing browser must not pass as a skipped test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from seq2seq.translate import Translator

from .test_serve import running_server

CHROMIUM = Path("/usr/bin/chromium")

# cells of the heatmap are blue-ish; labels and background are grey or white
COUNT_CELL_PIXELS = """() => {
  const canvas = document.getElementById("heatmap");
  if (!canvas.width || !canvas.height) return 0;
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let cells = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i + 2] > data[i] + 20 && data[i] < 235) cells++;
  }
  return cells;
}"""


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: the page test drives Debian's chromium. Install it with "
                    f"`apt-get install -y chromium` (as root), or run `bash scripts/setup.sh test`, which does.")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[test]'")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


def test_the_page_translates_and_draws_the_attention_of_the_first_sentence(toy_run, browser, tmp_path):
    model = toy_run["model"]
    first, second = (toy_run["data"] / "test.src").read_text().splitlines()[:2]
    translator = Translator.from_checkpoint(model)
    with running_server(model) as (_, url):
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        page.goto(f"{url}/")
        page.wait_for_function("document.getElementById('card').textContent.includes('parameters')")

        # mouse: type two lines, press the button
        page.get_by_label("Sentences to translate (one per line)").fill(f"{first}\n{second}")
        page.get_by_role("button", name="Translate").click()
        page.wait_for_function("document.getElementById('output').textContent.length > 0")
        assert page.locator("#output").text_content() == "\n".join(translator.translate([first, second], beam_size=5))
        assert page.evaluate(COUNT_CELL_PIXELS) > 500, "the heatmap canvas has no coloured cells"
        rows = page.locator("#weights tr")
        assert rows.count() == 1 + len(translator.translate_hypotheses(
            [first], return_attention=True)[0][0].attention)           # a header, then one row per output step
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

        # keyboard only: Ctrl+Enter in the text area translates; Tab shows where focus is
        source = page.get_by_label("Sentences to translate (one per line)")
        source.fill(second)
        source.press("Control+Enter")
        page.wait_for_function("document.getElementById('output').textContent.split('\\n').length === 1")
        assert page.locator("#output").text_content() == translator.translate(second, beam_size=5)
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "beam"
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "translate"
        assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"
        page.screenshot(path=str(tmp_path / "keyboard.png"), full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 10_000
