"""report.html in a real browser (headless Chromium): every figure loads, nothing is fetched from outside, and
hostile text from the study file is shown as text, never run."""

import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from transferbench.cli import main
from transferbench.report.document import write_html

STUDIES = Path(__file__).parents[1] / "studies"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no chromium/chromedriver on this machine")

# Each would set window.__pwned if it reached the page as markup (or as a link that gets followed).
HOSTILE = ["<script>window.__pwned=1</script>", '<img src=x onerror="window.__pwned=2">',
           "[click](javascript:window.__pwned=3)", "<svg onload=window.__pwned=4>"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One tiny study (smoke with one backbone) whose description is hostile; shared by every browser check."""
    out = tmp_path_factory.mktemp("results")
    tiny = tmp_path_factory.mktemp("study") / "tiny.yaml"
    study = yaml.safe_load((STUDIES / "smoke.yaml").read_text())
    study["name"] = "tiny"
    study["description"] = "Hostile description:\n\n" + "\n\n".join(HOSTILE) + "\n"
    study["backbones"] = study["backbones"][:1]
    study["grid"].update(seed=[0, 1, 2], n_per_class=[2, 3])
    tiny.write_text(yaml.safe_dump(study, sort_keys=False))
    assert main(["study", str(tiny), "--results", str(out), "--no-progress"]) == 0
    return out / "tiny" / "report.html"


class Markup(HTMLParser):
    """The live elements of a page: (tag, attributes) of every start tag."""

    def __init__(self, html: str):
        super().__init__()
        self.tags = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    handle_startendtag = handle_starttag


def assert_no_live_hostile_markup(html: str) -> None:
    tags = Markup(html).tags
    assert not [t for t, _ in tags if t in ("script", "svg", "iframe", "object", "embed")], tags
    assert not [(t, a) for t, a in tags for name in a if name.startswith("on")]
    assert not [a for t, a in tags if t == "a" and not a.get("href", "").startswith(("http://", "https://", "#"))]
    assert all(a.get("src", "").startswith("data:image/png;base64,") for t, a in tags if t == "img")
    assert 'href="javascript:' not in html.lower() and "<script" not in html.lower() and "<svg" not in html.lower()


def open_in_chromium(page: Path, width: int = 1400, screenshot: Path | None = None) -> dict:
    """Load `page` in headless Chromium at `width` CSS pixels; what the page ended up as, seen from inside the
    browser. With `screenshot`, the whole page (up to 16,000 px tall) is saved there as PNG."""
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    try:
        metrics = dict(width=width, height=1000, deviceScaleFactor=1, mobile=False)
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        driver.get(page.as_uri())
        # a large page (inlined figures: several MB) may still be parsing when get() returns on a loaded machine
        loaded = "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"
        pytest.importorskip("selenium.webdriver.support.ui").WebDriverWait(driver, 60).until(
            lambda d: d.execute_script(loaded))
        seen = driver.execute_script("""return {
            images: Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt]),
            resources: performance.getEntriesByType('resource').map(e => e.name),
            links: Array.from(document.links).map(a => a.href),
            pwned: window.__pwned === undefined ? null : String(window.__pwned),
            text: document.body.innerText, title: document.title,
            scroll_width: document.documentElement.scrollWidth,
            height: document.documentElement.scrollHeight,
            image_widths: Array.from(document.images).map(i => i.getBoundingClientRect().width)}""")
        if screenshot:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            tall = metrics | {"height": min(seen["height"], 16000)}
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", tall)
            driver.save_screenshot(str(screenshot))
        return seen
    finally:
        driver.quit()


@pytest.mark.slow  # trains a tiny study through the CLI
def test_report_html_is_self_contained(report):
    html = report.read_text()
    assert "http://" not in html and "https://" not in html
    assert html.count("data:image/png;base64,") >= 4
    assert "When transfer fails" in html
    assert not list(report.parent.rglob(".tmp-*"))  # every output was renamed into place


@pytest.mark.slow  # trains a tiny study through the CLI
def test_hostile_description_is_escaped_in_report_html(report):
    html = report.read_text()
    assert_no_live_hostile_markup(html)
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in html
    assert "&lt;svg onload=window.__pwned=4&gt;" in html
    # report.md keeps the description as written: readable, and escaped only on the way to HTML
    assert all(h in (report.parent / "report.md").read_text() for h in HOSTILE)


@pytest.mark.slow
@needs_chromium
def test_report_opens_in_headless_chromium(report):
    page = open_in_chromium(report)
    assert len(page["images"]) >= 4
    assert all(complete and width > 0 for complete, width, _ in page["images"]), page["images"]
    assert not [r for r in page["resources"] if r.startswith(("http:", "https:"))]
    assert page["title"] == "transferbench: tiny"
    assert page["pwned"] is None
    assert not page["links"]
    assert "<script>window.__pwned=1</script>" in page["text"] and "<svg onload=window.__pwned=4>" in page["text"]


# Without training: write_html on a hand-written report.md carrying every trick we know of.
HOSTILE_MD = """# transferbench study: <img src=x onerror="window.__pwned='h1'">

<script>window.__pwned='script'</script>

<div onmouseover="window.__pwned='div'"><img src=x onerror="window.__pwned='block'"></div>

Inline <img src=x onerror="window.__pwned='inline'"> and <svg onload="window.__pwned='svg'"> in a paragraph.

[a](javascript:window.__pwned='link') [b]( JaVaScRiPt:window.__pwned='case') [c](java&#115;cript:alert(1))
[d](data:text/html,<script>alert(1)</script>) [ok](https://example.org/ok) [e][ref]

[ref]: javascript:window.__pwned='ref'

![x](x" onerror="window.__pwned='attr')

![y](data:image/svg+xml,<svg onload=alert(1)>)

![z](figures/../report.md) ![missing](figures/missing.png)

| name | note |
|---|---|
| <b onmouseover="window.__pwned='cell'">cell</b> | `<script>in code</script>` |

```
</code></pre><script>window.__pwned='fence'</script>
```

## Figures

![gain_heatmap](figures/gain_heatmap.png)
"""


@pytest.fixture
def hostile_page(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (tmp_path / "figures").mkdir()
    fig = plt.figure(figsize=(1, 1))
    fig.savefig(tmp_path / "figures" / "gain_heatmap.png")
    plt.close(fig)
    md = tmp_path / "report.md"
    md.write_text(HOSTILE_MD)
    return write_html(md, "<script>window.__pwned='title'</script>")


def test_write_html_renders_raw_html_and_script_urls_as_text(hostile_page):
    html = hostile_page.read_text()
    assert_no_live_hostile_markup(html)
    assert "<title>transferbench: &lt;script&gt;" in html
    assert "&lt;script&gt;window.__pwned='script'&lt;/script&gt;" in html
    assert '<a href="https://example.org/ok">ok</a>' in html
    assert html.count("<img") == 1 and "data:image/png;base64," in html  # only the report's own figure, inlined
    assert "figures/" not in html


@needs_chromium
def test_hostile_markdown_does_not_run_in_chromium(hostile_page):
    page = open_in_chromium(hostile_page)
    assert page["pwned"] is None
    assert page["links"] == ["https://example.org/ok"]
    assert [(c, w > 0) for c, w, _ in page["images"]] == [(True, True)]
    assert page["title"] == "transferbench: <script>window.__pwned='title'</script>"
    assert "<script>window.__pwned='script'</script>" in page["text"]


# The committed reference reports at a desktop width, kept as pictures a person can look at (CI keeps results/).
SCREENSHOTS = Path(__file__).parents[1] / "results" / "screenshots"
BASELINES = Path(__file__).parents[1] / "results" / "baselines"


@needs_chromium
@pytest.mark.parametrize("study", ["domain_gap", "smoke", "which_layers"])
def test_reference_report_at_1400_px(study):
    shot = SCREENSHOTS / f"{study}_report_1400px.png"
    shot.unlink(missing_ok=True)
    page = open_in_chromium(BASELINES / study / "report.html", width=1400, screenshot=shot)
    assert page["scroll_width"] <= 1400, "the page scrolls sideways at 1,400 px"
    assert len(page["images"]) >= 6 and all(complete and w > 0 for complete, w, _ in page["images"])
    assert all(0 < w <= 1400 for w in page["image_widths"])
    assert page["pwned"] is None and not [r for r in page["resources"] if r.startswith(("http:", "https:"))]
    assert shot.stat().st_size > 50_000  # a full page, not a blank one
