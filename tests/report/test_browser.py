"""The report in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium) opens the file, and the visible text of the top entries is what the library computed.
`bash run.sh test` installs the browser; outside CI a machine without it skips, in CI it fails."""

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from dropinf import Attributor, Dropout

from ..helpers import ce_loss, loader, tiny_data, tiny_mlp

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def _driver():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        selenium = None
    else:
        selenium = True
    if not (CHROMIUM and DRIVER and selenium):
        msg = (f"headless Chromium test needs chromium ({CHROMIUM}), chromedriver ({DRIVER}) and selenium "
               f"({selenium}): apt-get install chromium chromium-driver; pip install selenium (bash run.sh test does)")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    opts = Options()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,1400",
              "--disable-gpu"):
        opts.add_argument(a)
    opts.binary_location = CHROMIUM
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


WORDS = ["storm", "sunny", "<b>bold</b>", "quiet", "<script>alert(1)</script>", "late", "train", "happy"]


def text_of(i: int) -> str:
    return f"example {i}: " + " ".join(WORDS[(i * k) % len(WORDS)] for k in (1, 3, 5))


def test_report_renders_in_chromium(tmp_path):
    driver = _driver()
    try:
        model = tiny_mlp().double()
        tr, q = tiny_data(400), tiny_data(300, seed=2)          # hundreds of queries
        attr = Attributor(model, ce_loss, compressor=Dropout(r=16), progress=False)
        attr.featurize(loader(tr, 64))
        # content from plain lists of strings indexed by dataset id (the default renderer shows them)
        path = attr.report(loader(q, 64), tmp_path / "report.html", k=5, train_data=[text_of(i) for i in range(400)],
                           query_data=[f"query {i}" for i in range(300)], marks={7: "flipped"})
        top = attr.topk(loader(q, 64), k=5)
        t0 = time.perf_counter()
        driver.get(path.resolve().as_uri())
        detail = driver.find_element("id", "qdetail").text
        load_s = time.perf_counter() - t0
        shot = tmp_path / "report.png"
        driver.save_screenshot(str(shot))
        print(f"screenshot: {shot} (page with 300 queries loaded in {load_s:.2f} s)")
        assert load_s < 30
        # the top harmful entry of query 0: its id, its score as shown, its text — visible, escaped
        first = int(top.harmful_idx[0, 0])
        assert f"train id {first}" in detail
        assert text_of(first) in detail                        # literal '<script>…' text, nothing executed
        assert f"{top.harmful_scores[0, 0]:.4f}" in detail
        helpful = int(top.helpful_idx[0, 0])
        assert f"train id {helpful}" in detail and text_of(helpful) in detail
        assert "page 1 of 6 (300 queries)" in driver.find_element("id", "pageinfo").text
        # open another query from the list
        driver.find_elements("class name", "qitem")[3].click()
        detail = driver.find_element("id", "qdetail").text
        assert detail.startswith("Query id 3") and f"train id {int(top.harmful_idx[3, 0])}" in detail
        sus = driver.find_element("id", "suspicious").text
        assert "Most suspicious training examples" in sus and "train id" in sus
        assert "harmful" in driver.find_element("id", "guidance").text
        assert driver.find_elements("css selector", "#distributions svg")
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()



def test_generation_view_in_chromium(tmp_path):
    """An LM query: its completion token by token, coloured by the selected training document's
    influence on each token (from token_scores); clicking another document switches the colours."""
    pytest.importorskip("transformers")
    from dropinf import lm
    from tests.test_lm import CharTokenizer, tiny_lm
    driver = _driver()
    try:
        model, tok = tiny_lm(), CharTokenizer()
        docs = ["the cat sat on the mat", "paris is in france", "dogs bark at night", "the capital is paris"]
        attr = Attributor(model, lm.lm_loss(), compressor=Dropout(r=8, seed=0), progress=False)
        attr.featurize(lm.documents(tok, docs).loader(2))
        query = lm.prompts(tok, ["the capital of france is"], [" paris"]).loader(1)
        path = attr.report(query, tmp_path / "lm.html", k=2, token_measure=lm.token_losses, tokenizer=tok,
                           train_data=docs, query_data=["the capital of france is ▶ paris"], suspicious=None)
        per_token = attr.token_scores(query, lm.token_losses)[0]                # (T, n_train)
        cols = [t for t in range(per_token.shape[0]) if (per_token[t] != 0).any()]
        top = attr.topk(query, k=2)
        driver.get(path.resolve().as_uri())
        spans = driver.find_elements("css selector", ".gen .tok")
        assert [s.get_attribute("textContent") for s in spans] == list(" paris")                     # the completion's 6 byte tokens
        harmful = int(top.harmful_idx[0, 0])
        gen = driver.find_element("css selector", ".gen").text
        assert f"train id {harmful}" in gen
        shown = [float(s.get_attribute("data-score")) for s in spans]
        np.testing.assert_allclose(shown, per_token[cols, harmful], rtol=1e-4, atol=1e-6)
        helpful = int(top.helpful_idx[0, 0])
        entries = driver.find_elements("css selector", ".col.helpful .entry")
        entries[0].click()
        assert f"train id {helpful}" in driver.find_element("css selector", ".gen").text
        shown = [float(s.get_attribute("data-score")) for s in driver.find_elements("css selector", ".gen .tok")]
        np.testing.assert_allclose(shown, per_token[cols, helpful], rtol=1e-4, atol=1e-6)
        driver.save_screenshot(str(tmp_path / "lm.png"))
    finally:
        driver.quit()
