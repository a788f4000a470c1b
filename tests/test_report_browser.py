"""report.html in a real browser (headless Chromium): every figure loads, nothing is fetched from outside."""

import shutil
from pathlib import Path

import pytest

from transferbench.cli import main

STUDIES = Path(__file__).parents[1] / "studies"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    tiny = tmp_path_factory.mktemp("study") / "tiny.yaml"
    tiny.write_text((STUDIES / "smoke.yaml").read_text().replace("name: smoke", "name: tiny")
                    .replace("  - {model: tf_efficientnet_lite1, weights: imagenet}\n", "")
                    .replace("seed: [0, 1]", "seed: [0, 1, 2]").replace("n_per_class: [2, 4]", "n_per_class: [2, 3]"))
    assert main(["study", str(tiny), "--results", str(out), "--no-progress"]) == 0
    return out / "tiny" / "report.html"


def test_report_html_is_self_contained(report):
    html = report.read_text()
    assert "http://" not in html and "https://" not in html
    assert html.count("data:image/png;base64,") >= 4
    assert "When transfer fails" in html


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no chromium/chromedriver on this machine")
def test_report_opens_in_headless_chromium(report):
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    try:
        driver.get(report.as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
        resources = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)")
        title = driver.title
    finally:
        driver.quit()
    assert len(images) >= 4
    assert all(complete and width > 0 for complete, width, _ in images), images
    assert not [r for r in resources if r.startswith(("http:", "https:"))]
    assert title == "transferbench: tiny"
