"""End to end in headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

Serves a registry with the 2023 reference rows, a measured model, a fine-tune of it (a --limit estimate) and
models named like XSS payloads; then sorts, filters, opens models and the family tree, checks what the DOM
shows, checks that no payload ran, and saves screenshots. The exported page gets the same safety checks.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from urllib.parse import quote

import pytest
from leaderboard_samples import write_lineage, write_results
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

from llamaherd.leaderboard import Registry, export_html, load_reference, make_server, record_results

pytestmark = pytest.mark.slow

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000")
XSS = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>"]
SCREENSHOT = Path("/tmp/leaderboard_screenshot.png")


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("browser")
    path = tmp / "db.sqlite"
    with Registry(path) as reg:
        load_reference(reg)
        base = {"arc": 29.44, "hellaswag": 42.05, "mmlu": 25.51, "truthfulqa": 39.52}
        record_results(reg, write_results(tmp / "base", "SmolLM2-135M", base, fingerprint="sha256:" + "ab" * 32))
        synthetic = {"recipe": "self-chat", "teacher": {"name": XSS[1], "teacher_id": "t", "kind": "http",
                                                        "base_url": "http://127.0.0.1:8000/v1"},
                     "manifest": "/synth/manifest.json", "matches_manifest": True}
        write_lineage(tmp / "ft", "smollm2-alpaca-lora", "SmolLM2-135M",
                      data_files=[{"path": "/synth/data.jsonl", "sha256": "cd" * 32, "synthetic": synthetic}])
        tuned = {"arc": 30.00, "hellaswag": 41.00, "mmlu": 26.00, "truthfulqa": 42.00}
        record_results(reg, write_results(tmp / "ft-eval", "smollm2-alpaca-lora", tuned, path=str(tmp / "ft"),
                                          limit=50))
        for i, name in enumerate(XSS):
            record_results(reg, write_results(tmp / f"x{i}", name, base, family="llama2"))
        reg.upsert_model(XSS[0], overwrite=True, notes=XSS[1], license="<b>mit</b>")
    return path


@pytest.fixture(scope="module")
def server(db):
    srv = make_server(db, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def driver():
    if CHROMIUM is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium chromium-driver)")
    if not Path(CHROMEDRIVER).exists():
        pytest.fail(f"chromium is installed but {CHROMEDRIVER} is not: apt-get install chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield d
    d.quit()


def _ready(d) -> None:
    WebDriverWait(d, 15).until(lambda x: x.execute_script("return document.body.dataset.ready === 'true'"))


def _assert_nothing_ran(d) -> None:
    with pytest.raises(TimeoutException):
        WebDriverWait(d, 0.5).until(expected_conditions.alert_is_present())
    assert d.execute_script("return document.querySelectorAll('img').length") == 0
    assert d.execute_script("return document.querySelectorAll('script:not([type=\"application/json\"])').length") == 1


def _errors(d) -> list[str]:
    """Console errors other than the favicon the browser asks for on its own."""
    return [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]]


def _rows(d) -> list[dict[str, str]]:
    script = """return [...document.querySelectorAll('#board-body tr')].map(tr => ({
        name: tr.dataset.name, kind: tr.dataset.kind, family: tr.dataset.family,
        average: tr.querySelector('[data-key="average"]').textContent,
        arc: tr.querySelector('[data-key="arc"]').textContent}));"""
    return d.execute_script(script)


def _numbers(cells: list[str]) -> list[float]:
    return [float(c.lstrip("~")) for c in cells if c != "–"]


def test_page_end_to_end(server, driver, tmp_path):
    d = driver
    d.get(server.url)
    _ready(d)
    rows = _rows(d)
    assert len(rows) == 25 + 4  # 25 reference rows, 4 measured
    assert [r["name"] for r in rows[:2]] == ["StableBeluga2 (FreeWilly2)", "StableBeluga1-Delta (FreeWilly1)"]
    lora = next(r for r in rows if r["name"] == "smollm2-alpaca-lora")
    assert lora["average"] == "~34.75"  # (30 + 41 + 26 + 42) / 4, marked as an estimate

    # The payloads are shown as text, and nothing ran.
    for name in XSS:
        assert d.find_element(By.LINK_TEXT, name).text == name
    _assert_nothing_ran(d)

    # Sort by average (best first, then reversed), then by ARC; empty scores stay last both ways.
    d.find_element(By.CSS_SELECTOR, 'th[data-key="average"]').click()
    avgs = [r["average"] for r in _rows(d)]
    assert _numbers(avgs) == sorted(_numbers(avgs), reverse=True) and avgs[-1] == "–"
    assert d.find_element(By.CSS_SELECTOR, 'th[data-key="average"]').get_attribute("aria-sort") == "descending"
    d.find_element(By.CSS_SELECTOR, 'th[data-key="average"]').click()
    avgs = [r["average"] for r in _rows(d)]
    assert _numbers(avgs) == sorted(_numbers(avgs)) and avgs[0] == "34.13" and avgs[-1] == "–"
    d.find_element(By.CSS_SELECTOR, 'th[data-key="arc"]').click()
    arcs = _numbers([r["arc"] for r in _rows(d)])
    assert arcs == sorted(arcs, reverse=True) and arcs[0] == 71.08

    # Filter by family, kind and text.
    Select(d.find_element(By.ID, "filter-family")).select_by_value("llama2")
    rows = _rows(d)
    assert {r["family"] for r in rows} == {"llama2"} and len(rows) == 7 + 2  # 7 reported + the two payloads
    Select(d.find_element(By.ID, "filter-kind")).select_by_value("reported")
    assert len(_rows(d)) == 7
    Select(d.find_element(By.ID, "filter-family")).select_by_value("")
    Select(d.find_element(By.ID, "filter-kind")).select_by_value("")
    d.find_element(By.ID, "filter-text").send_keys("vicuna")
    assert sorted(r["name"] for r in _rows(d)) == ["vicuna-13b-v1.3", "vicuna-7b-v1.3"]
    assert d.find_element(By.ID, "row-count").text == "2 of 29 rows"
    d.find_element(By.ID, "filter-text").clear()
    d.find_element(By.ID, "filter-text").send_keys("smollm2")
    d.save_screenshot(str(tmp_path / "filtered.png"))
    d.find_element(By.ID, "filter-text").clear()
    d.find_element(By.ID, "filter-text").send_keys(" ")  # fires input; the blank search matches everything
    d.find_element(By.CSS_SELECTOR, 'th[data-key="rank"]').click()
    d.save_screenshot(str(tmp_path / "table.png"))
    shutil.copy(tmp_path / "table.png", SCREENSHOT)

    # Open the fine-tune: per-task breakdown and the chart against its parent.
    d.find_element(By.LINK_TEXT, "smollm2-alpaca-lora").click()
    WebDriverWait(d, 5).until(lambda x: x.find_element(By.ID, "view-model").is_displayed())
    assert d.find_element(By.ID, "model-name").text == "smollm2-alpaca-lora"
    view = d.find_element(By.ID, "view-model")
    assert "Made from" in view.text and "SmolLM2-135M by lora-sft" in view.text
    assert view.find_element(By.CSS_SELECTOR, ".parent p.synthetic").text == (
        f"trained on synthetic data from {XSS[1]} (self-chat)")  # the teacher's name as text: nothing ran
    _assert_nothing_ran(d)
    tasks = [tr.find_elements(By.TAG_NAME, "td")[0].text for tr in view.find_elements(
        By.XPATH, ".//h3[starts-with(., 'Per-task')]/following-sibling::table[1]/tbody/tr")]
    assert sorted(tasks) == ["arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2"]
    assert "~30.00" in view.text and "1.23" in view.text  # ARC score (estimate) and its stderr, in percent
    chart = view.find_element(By.CSS_SELECTOR, "svg.chart")
    assert len(chart.find_elements(By.CSS_SELECTOR, "rect.bar-model")) == 5 + 1  # 4 benchmarks, average, legend
    assert len(chart.find_elements(By.CSS_SELECTOR, "rect.bar-parent")) == 5 + 1
    assert "parent: SmolLM2-135M" in chart.text
    d.set_window_size(1400, 1500)  # the whole model page
    d.save_screenshot(str(tmp_path / "model.png"))
    d.set_window_size(1400, 1000)
    shutil.copy(tmp_path / "model.png", SCREENSHOT.with_name("leaderboard_screenshot_model.png"))

    # The payload model's own page shows its name and notes as text.
    d.get(server.url + "#/model/" + "%3Cscript%3Ealert(1)%3C%2Fscript%3E")
    d.refresh()
    _ready(d)
    assert d.find_element(By.ID, "model-name").text == XSS[0]
    assert XSS[1] in d.find_element(By.ID, "view-model").text and "<b>mit</b>" in d.find_element(
        By.ID, "view-model").text
    _assert_nothing_ran(d)

    # Family tree: derivatives nested under their parents, each with its average.
    d.find_element(By.ID, "nav-tree").click()
    tree = d.find_element(By.ID, "view-tree")
    node = tree.find_element(By.CSS_SELECTOR, 'li[data-name="Llama-2-70b-hf"]')
    assert {li.get_attribute("data-name") for li in node.find_elements(By.CSS_SELECTOR, "ul > li")} == {
        "Llama-2-70b-chat-hf", "StableBeluga2 (FreeWilly2)"}
    assert "reported 67.35" in node.text and "rlhf →" in node.text
    smol = tree.find_element(By.CSS_SELECTOR, 'li[data-name="SmolLM2-135M"]')
    assert "measured 34.13" in smol.text and "lora-sft → smollm2-alpaca-lora" in smol.text
    d.save_screenshot(str(tmp_path / "tree.png"))
    shutil.copy(tmp_path / "tree.png", SCREENSHOT.with_name("leaderboard_screenshot_tree.png"))
    assert _errors(d) == []


def test_exported_page_works_offline_and_runs_no_payload(db, driver, tmp_path):
    page = export_html(db, tmp_path / "board.html")
    driver.get(page.as_uri())
    _ready(driver)
    assert len(_rows(driver)) == 29
    for name in XSS:
        assert driver.find_element(By.LINK_TEXT, name).text == name
    _assert_nothing_ran(driver)
    driver.find_element(By.LINK_TEXT, XSS[1]).click()
    assert driver.find_element(By.ID, "model-name").text == XSS[1]
    _assert_nothing_ran(driver)
    assert _errors(driver) == []  # the inline script and style pass the page's own hash-based CSP


# Object.prototype's own keys and a malformed %-escape: none is a model, each must say so.
NOT_MODELS = ["hasOwnProperty", "constructor", "toString", "__proto__", "valueOf", "isPrototypeOf",
              "__defineGetter__", "propertyIsEnumerable", "toLocaleString"]


def test_route_to_a_name_that_is_an_object_key_says_no_model(server, driver):
    d = driver
    d.get(server.url)
    _ready(d)
    d.get_log("browser")  # start with an empty console log
    for name in NOT_MODELS:
        d.execute_script("location.hash = arguments[0];", "#/model/" + quote(name, safe=""))
        WebDriverWait(d, 5).until(lambda x: x.find_element(By.ID, "view-model").is_displayed())
        assert d.find_element(By.ID, "model-missing").text == f"No model named {name}."
        d.execute_script("location.hash = '#/';")
    d.execute_script("location.hash = '#/model/%E0%A4%A';")  # not valid UTF-8 percent-encoding
    assert d.find_element(By.ID, "model-missing").text == "No model named %E0%A4%A."
    d.find_element(By.ID, "nav-tree").click()
    assert d.find_element(By.CSS_SELECTOR, 'li[data-name="SmolLM2-135M"]')  # the tree still reads the models
    d.execute_script("location.hash = '#/model/' + encodeURIComponent('SmolLM2-135M');")
    assert d.find_element(By.ID, "model-name").text == "SmolLM2-135M"
    assert _errors(d) == []
