"""The dashboard in a real browser: Debian's chromium, headless, driven by selenium through /usr/bin/chromedriver.

`distillery serve` runs real jobs submitted through the API (a static_int8 quantization and a distillation with
compare_baseline): the page shows them reach succeeded; a job's report has its own URL (#/jobs/<id>) that loads
directly, reloads, and moves with back/forward; the report's figures are written as app.client.fmt writes them (the
CLI's formats); the artifact downloads (its sha256 checked); the distillation's labels-only comparison is shown; at
800 px the page does not scroll sideways and the chart's labels stay inside the plot; and a poll that brings nothing
new costs one request and redraws nothing. With keys required (PostgreSQL + Redis + a Celery worker), the page asks
for a key before it shows anything, then shows the report its URL names and downloads the artifact with the key.

DISTILLERY_TEST_SCREENSHOTS=1 also runs the example's models (`distillery example`: digits_cnn) through
static_int8, prune and distill on a `distillery serve` and writes docs/img/dashboard-jobs.png and
docs/img/dashboard-job.png.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app.client import fmt
from tests.conftest import REQUIRE_SERVICES, make_settings
from tests.e2e.conftest import free_port, settings_env, wait_http
from tests.helpers import digits_npz_bytes, mlp_onnx_bytes

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOTS = os.environ.get("DISTILLERY_TEST_SCREENSHOTS") == "1"
QUICK_BENCH = {"batch_sizes": [1, 16], "repeats": 3, "warmup": 1}


def _need_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (test extra)")
    if missing:
        reason = (f"headless browser tests need {', '.join(missing)} "
                  "(apt-get install chromium chromium-driver; pip install -e '.[test]')")
        if REQUIRE_SERVICES:
            pytest.fail(f"{reason} (required: DISTILLERY_TEST_REQUIRE_SERVICES=1)")
        pytest.skip(reason)


@pytest.fixture
def browser(tmp_path):
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--hide-scrollbars", "--force-device-scale-factor=1",
                "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(driver, condition, timeout: float = 60.0, message: str = ""):
    """Poll the DOM until condition(driver) is truthy (no sleeps), up to a deadline."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2, ignored_exceptions=(
        StaleElementReferenceException, IndexError)).until(condition, message)


class Cell:
    """A table cell's text and data-value read in one go: the page re-renders a report when a poll brings news,
    which would leave a held element stale between two reads."""

    def __init__(self, text: str, value: str | None):
        self.text, self.value = text, value

    def get_attribute(self, name: str) -> str | None:
        assert name == "data-value", name
        return self.value


def read_cell(driver, selector: str) -> Cell:
    got = driver.execute_script(
        "const e = document.querySelector(arguments[0]);"
        "return e ? [e.innerText.trim(), e.getAttribute('data-value')] : null;", selector)
    assert got is not None, f"no element {selector}"
    return Cell(*got)


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def text_of(driver, selector: str) -> str:
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : null",
                                 selector)


def console_errors(driver) -> list[dict]:
    """Errors the page logged (a CSP violation, a failed request, a script error)."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def downloaded(driver, name: str, timeout: float = 60.0) -> bytes:
    """The file the browser saved under `name` once complete (Chromium writes NAME.crdownload until then)."""
    path = driver.downloads / name
    wait_until(driver, lambda d: path.exists() and not (driver.downloads / f"{name}.crdownload").exists(), timeout,
               f"{name} was not downloaded: {sorted(p.name for p in driver.downloads.iterdir())}")
    return path.read_bytes()


def report_shows(driver, job_id: str) -> bool:
    return text_of(driver, "#job-id") == job_id and css(driver, "#job-panel")[0].is_displayed()


class Server:
    """`distillery serve` or `distillery api` as a process of its own."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, cwd: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "app.cli", *args, "--host", "127.0.0.1",
                                      "--port", str(self.port)], env={**env, "PYTHONUNBUFFERED": "1"},
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
        wait_http(self.base + "/readyz", proc=self.proc)

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def serve_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    env["DISTILLERY_DATA_DIR"] = str(tmp_path / "distillery-data")
    return env


@pytest.fixture
def serve(tmp_path):
    server = Server(["serve"], serve_env(tmp_path), tmp_path / "serve.log", tmp_path)
    yield server
    server.stop()


def submit(c: httpx.Client, body: dict) -> dict:
    resp = c.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.text
    return resp.json()


def quantize(model_id: str, dataset_id: str | None, method: str, bench=QUICK_BENCH) -> dict:
    body = {"kind": "quantize", "model_id": model_id, "config": {"method": method, "benchmark": bench}}
    if dataset_id:
        body["dataset_id"] = dataset_id
    return body


def wait_finished_on_page(driver, job_id: str, server: Server, timeout: float = 300) -> None:
    row = f"tr#job-{job_id}"
    wait_until(driver, lambda d: css(d, row), 30, f"job {job_id} did not appear on the page")
    wait_until(driver, lambda d: css(d, row)[0].get_attribute("data-status") in ("succeeded", "failed", "cancelled"),
               timeout, f"job {job_id} did not finish on screen: {server.tail()}")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the page's number formats are the CLI's --------------------------------------------------------------------

def page_speedup(x: float) -> str:
    """fmt.speedup as the page words it (the terminal's capitals are the page's red)."""
    return fmt.speedup(x).replace("SLOWER", "slower")


JS_FORMATS = {"fmtBytes": fmt.size, "fmtRatio": fmt.ratio, "fmtPct": fmt.percent, "fmtPt": fmt.points,
              "fmtMs": fmt.ms, "fmtCount": fmt.count, "fmtSpeedup": page_speedup}


def format_samples() -> dict[str, list[float]]:
    """Values at the edges of each format (exact halves, unit and digit boundaries, -0.0), plus random ones."""
    rng = random.Random(20261203)
    halves = [k / 2 ** m for k in range(1, 40, 2) for m in (1, 2, 3, 4)]
    return {
        "fmtBytes": [0, 1, 512, 1023, 1023.4, 1023.6, 1024, 1536, 826_359, 826_368, 845_210, 1024 ** 2 - 20,
                     1024 ** 2, 1.25 * 1024 ** 2, int(1.2 * 1024 ** 2), int(3.4 * 1024 ** 3), 5 * 1024 ** 4]
        + [rng.randrange(0, 2 ** 40) for _ in range(200)] + [rng.uniform(0, 2 ** 30) for _ in range(100)],
        "fmtRatio": [0.0, 0.001, 0.0049, 0.005, 0.0999, 0.1, 0.125, 0.26, 1.0, 1.005, 1.01, 4.1234, 12.0]
        + [h / 100 for h in halves] + [rng.uniform(0, 50) for _ in range(200)],
        "fmtPct": [0.0, -0.0, -0.0001, 0.5, 0.978, 0.97849, 0.5625, 0.3125, 1.0, 0.841667, 0.944444]
        + [h / 100 for h in halves] + [rng.random() for _ in range(200)],
        "fmtPt": [0.0, -0.0, 0.003, -0.012, -0.0003, 0.0004, -0.00049, 0.1, 0.0125, -0.0125, -0.102777, 0.0005,
                  -0.0005] + [(h - 10) / 100 for h in halves] + [rng.uniform(-0.3, 0.3) for _ in range(200)],
        "fmtMs": [0.0, 0.123, 0.12345, 1.0, 1.234, 2.125, 9.996, 0.9996, 99.96, 12.34, 100.0, 123.4, 999.4, 999.5,
                  999.6, 1234.4, 98765.4, 0.0123, 0.0617, 0.001, 0.09999]
        + halves + [10 ** rng.uniform(-3, 5) for _ in range(300)],
        "fmtCount": [0, 1, 999, 1000, 1074, 206_282, 1_234_567, 2.5, 4_899_530]
        + [rng.randrange(0, 10 ** 12) for _ in range(100)],
        "fmtSpeedup": [0.001, 0.8, 0.999, 1.0, 1.005, 2.0, 4.35, 25.09] + [rng.uniform(0, 30) for _ in range(100)],
    }


def check_formats_match_the_cli(driver) -> None:
    samples = format_samples()
    js = driver.execute_script("""
        const f = window.distilleryFormat, out = {};
        for (const [name, values] of Object.entries(arguments[0])) out[name] = values.map((v) => f[name](v));
        return out;""", samples)
    for name, values in samples.items():
        expected = [JS_FORMATS[name](v) for v in values]
        wrong = [(v, got, want) for v, got, want in zip(values, js[name], expected) if got != want]
        assert not wrong, f"{name}: the page writes (value, page, CLI) {wrong[:10]}"


# -- the main test ------------------------------------------------------------------------------------------------


def test_jobs_reports_urls_downloads_and_layout_on_the_page(browser, serve):
    browser.get(serve.base + "/")
    wait_until(browser, lambda d: css(d, "#main")[0].is_displayed() and css(d, "#jobs-empty")[0].is_displayed(),
               message="the page did not load its (empty) job list")
    assert not css(browser, "#auth")[0].is_displayed()  # open mode: no key asked
    check_formats_match_the_cli(browser)

    with httpx.Client(base_url=serve.base, timeout=30) as c:
        model = c.post("/v1/models", files={"file": ("digits-mlp.onnx", mlp_onnx_bytes())},
                       data={"name": "digits-mlp"}).json()
        ds = c.post("/v1/datasets", files={"file": ("digits.npz", digits_npz_bytes())}).json()
        qjob = submit(c, quantize(model["id"], ds["id"], "static_int8"))
        djob = submit(c, {"kind": "distill", "model_id": model["id"], "dataset_id": ds["id"], "config": {
            "student": {"arch": "mlp", "hidden": [32]}, "epochs": 4, "lr": 0.01, "min_steps": 0, "compare_baseline": True,
            "benchmark": QUICK_BENCH}})

        row = f"tr#job-{qjob['id']}"
        wait_until(browser, lambda d: css(d, row), 30, "the submitted job did not appear on the page")
        wait_finished_on_page(browser, qjob["id"], serve)
        wait_finished_on_page(browser, djob["id"], serve)
        qjob, djob = (c.get(f"/v1/jobs/{j['id']}").json() for j in (qjob, djob))
        assert qjob["status"] == "succeeded" and djob["status"] == "succeeded", (qjob, djob, serve.tail())
        wait_until(browser, lambda d: css(d, f"{row} .status")[0].text == "succeeded", 30)
        wait_until(browser, lambda d: css(d, f"{row} .pct")[0].text == "100%", 30)
        artifact = c.get(f"/v1/artifacts/{qjob['artifact_id']}").json()
        content = c.get(f"/v1/artifacts/{qjob['artifact_id']}/content").content
        assert sha256(content) == artifact["sha256"]

    # a click on a row opens its report at the job's own URL
    css(browser, f"{row} td.progress")[0].click()
    wait_until(browser, lambda d: d.current_url.endswith(f"/#/jobs/{qjob['id']}"), 30, "the URL did not follow")
    wait_until(browser, lambda d: report_shows(d, qjob["id"]) and css(d, "#metrics")[0].is_displayed(), 30,
               "the job's report did not show")
    assert "selected" in css(browser, row)[0].get_attribute("class")
    m = qjob["metrics"]

    def cell(metric: str, side: str) -> Cell:
        return read_cell(browser, f'#metrics td[data-metric="{metric}"][data-side="{side}"]')

    # the API's values, written as the CLI writes them
    for side in ("baseline", "result"):
        size = cell("size_bytes", side)
        assert int(size.get_attribute("data-value")) == m[side]["size_bytes"]
        assert size.text == fmt.size(m[side]["size_bytes"])
        params = cell("params", side)
        assert int(params.get_attribute("data-value")) == m[side]["params"]
        assert params.text == fmt.count(m[side]["params"])
        acc = cell("accuracy", side)
        assert float(acc.get_attribute("data-value")) == pytest.approx(m[side]["accuracy"])
        assert acc.text == fmt.percent(m[side]["accuracy"])
        for batch in ("1", "16"):
            p50 = cell(f"latency_ms_p50_{batch}", side)
            assert float(p50.get_attribute("data-value")) == pytest.approx(m[side]["latency_ms"][batch]["p50"])
            assert p50.text == fmt.ms(m[side]["latency_ms"][batch]["p50"])
    assert cell("accuracy", "change").text == fmt.points(-m["accuracy_drop"])
    assert cell("size_bytes", "change").text == f"{fmt.ratio(m['ratios']['size'])} the size"
    assert float(cell("agreement", "result").get_attribute("data-value")) == pytest.approx(m["result"]["agreement"])
    assert cell("agreement", "result").text == fmt.percent(m["result"]["agreement"])
    assert float(cell("cosine", "result").get_attribute("data-value")) == pytest.approx(m["result"]["cosine"])
    for batch in ("1", "16"):
        assert cell(f"latency_ms_p50_{batch}", "change").text == page_speedup(m["ratios"]["speedup"][batch])
    assert bool(css(browser, "#flag-slower")) == m["slower_than_baseline"]
    if m["result"].get("quant_params"):  # the scales and zero points a quantization adds, as the CLI says it
        from app.client.report import params_line

        assert text_of(browser, "#params-line") == params_line(m)
    assert not css(browser, "#comparison")[0].is_displayed()  # not a distillation

    # the artifact downloads: the same bytes as the API's
    link = css(browser, "#artifact-download")[0]
    wait_until(browser, lambda d: artifact["filename"] in link.text, 30, "the artifact's name did not show")
    assert link.get_attribute("href").endswith(f"/v1/artifacts/{artifact['id']}/content")
    link.click()
    assert sha256(downloaded(browser, artifact["filename"])) == artifact["sha256"]

    # the chart: this job is a point beside the original model; every label inside the plot
    point = f'#chart circle.point[data-job-id="{qjob["id"]}"]'
    wait_until(browser, lambda d: css(d, point) and css(d, f'#chart circle.point[data-job-id="{djob["id"]}"]'), 30,
               "the jobs are not on their model's chart")
    assert css(browser, "#chart .baseline rect") and float(css(browser, point)[0].get_attribute("r")) > 0
    assert css(browser, "#chart-model")[0].get_attribute("value") == model["id"]
    assert_chart_labels_inside(browser)

    # the distillation's report (a link in the list): its labels-only comparison
    css(browser, f"tr#job-{djob['id']} a.job-link")[0].click()
    wait_until(browser, lambda d: report_shows(d, djob["id"]) and css(d, "#comparison")[0].is_displayed(), 30,
               "the distillation's comparison did not show")
    assert browser.current_url.endswith(f"/#/jobs/{djob['id']}")
    check_comparison(browser, djob["metrics"]["method"]["comparison"])

    # back and forward move between the reports; close goes back to the list alone
    browser.back()
    wait_until(browser, lambda d: report_shows(d, qjob["id"]), 30, "back did not show the previous report")
    browser.forward()
    wait_until(browser, lambda d: report_shows(d, djob["id"]), 30, "forward did not show the next report")
    css(browser, "#job-close")[0].click()
    wait_until(browser, lambda d: not css(d, "#job-panel")[0].is_displayed(), 30, "close did not close the report")
    assert not browser.current_url.split("#", 1)[-1].startswith("/jobs/")
    browser.back()
    wait_until(browser, lambda d: report_shows(d, djob["id"]), 30, "back did not reopen the report")

    # the URL loads the report directly: a reload, and a fresh page opened at it
    browser.refresh()
    wait_until(browser, lambda d: report_shows(d, djob["id"]) and css(d, "#comparison")[0].is_displayed(), 30,
               "a reload of the report's URL did not show it")
    browser.get("about:blank")
    browser.get(f"{serve.base}/#/jobs/{qjob['id']}")
    wait_until(browser, lambda d: report_shows(d, qjob["id"]) and css(d, "#metrics")[0].is_displayed(), 30,
               "the report's URL did not load the report")
    assert cell("size_bytes", "result").text == fmt.size(m["result"]["size_bytes"])

    # a poll that brings nothing new: one request (the job list), nothing redrawn
    assert_quiet_polls(browser, qjob["id"])

    # 800 px wide: no sideways scroll of the page, with the list, a report and the chart on it
    browser.set_window_size(800, 1000)
    wait_until(browser, lambda d: d.execute_script("return window.innerWidth") <= 800, 30)
    for shown in (djob["id"], qjob["id"], None):
        url = f"{serve.base}/#/jobs/{shown}" if shown else f"{serve.base}/#/"
        browser.get(url)
        wait_until(browser, lambda d: css(d, f"tr#job-{djob['id']}") and css(d, "#chart svg"), 30)
        if shown:
            wait_until(browser, lambda d, i=shown: report_shows(d, i) and css(d, "#metrics")[0].is_displayed(), 30)
        else:
            wait_until(browser, lambda d: not css(d, "#job-panel")[0].is_displayed(), 30)
        widths = browser.execute_script("const e = document.documentElement; return [e.scrollWidth, e.clientWidth]")
        assert widths[0] <= widths[1], f"{url}: the page scrolls sideways at 800 px: {widths}"
        # the short ids and the "took" times stay on one line each
        lines = browser.execute_script("""
            const lines = (node) => { const r = document.createRange(); r.selectNodeContents(node);
              return new Set([...r.getClientRects()].map((x) => Math.round(x.top))).size; };
            return [...document.querySelectorAll('#jobs a.job-link, #jobs td.took')].map(lines);""")
        assert lines and all(n == 1 for n in lines), lines
        assert_chart_labels_inside(browser)

    assert console_errors(browser) == []  # no CSP violation, no failed request, no script error

    # a job that does not exist: said so on the page
    browser.get(f"{serve.base}/#/jobs/{'0' * 32}")
    wait_until(browser, lambda d: "no job" in (text_of(d, "#job-error") or ""), 30, "an unknown job was not reported")


def check_comparison(driver, comparison: dict) -> None:
    def value(key: str):
        return css(driver, f'#comparison td[data-metric="{key}"]')[0]

    assert value("kd").text == fmt.percent(comparison["kd"])
    assert value("labels_only").text == fmt.percent(comparison["labels_only"])
    assert float(value("kd").get_attribute("data-value")) == pytest.approx(comparison["kd"])
    assert value("delta").text == fmt.points(comparison.get("delta", comparison["kd"] - comparison["labels_only"]))
    assert text_of(driver, "#comparison-split") == comparison.get("split", "test")
    kept = comparison.get("kept")
    if kept:  # which student is the artifact, and why
        kept_line = css(driver, "#comparison-kept")[0]
        assert kept_line.get_attribute("data-kept") == kept
        assert css(driver, f'#comparison tr.kept[data-metric="{kept}"]')
        if comparison.get("kept_reason"):
            assert comparison["kept_reason"] in kept_line.text


def assert_chart_labels_inside(driver) -> None:
    """Every point's and the original's label lies inside the plot area (nothing clipped by the SVG's edge)."""
    boxes = driver.execute_script("""
        const svg = document.querySelector('#chart svg');
        const [l, t, r, b] = svg.dataset.plot.split(' ').map(Number);
        return [...svg.querySelectorAll('g.point text, g.baseline text')].map((e) => {
          const x = e.getBBox(); return [e.textContent, x.x, x.y, x.x + x.width, x.y + x.height, l, t, r, b]; });""")
    assert any(b[0] == "original" for b in boxes), boxes
    for name, x0, y0, x1, y1, left, top, right, bottom in boxes:
        assert x0 >= left - 0.5 and x1 <= right + 0.5 and y0 >= top - 0.5 and y1 <= bottom + 0.5, \
            (name, (x0, y0, x1, y1), (left, top, right, bottom))


def assert_quiet_polls(driver, job_id: str) -> None:
    """With every job finished and nothing new, each 1.5 s tick reads the job list only, and redraws nothing."""
    driver.execute_script("""
        performance.setResourceTimingBufferSize(10000); performance.clearResourceTimings();
        document.getElementById(arguments[0]).dataset.mark = 'kept';
        document.querySelector('#metrics tbody tr').dataset.mark = 'kept';""", f"job-{job_id}")
    polls = "/v1/jobs?limit=100"
    requests = """return performance.getEntriesByType('resource').map((e) => new URL(e.name).pathname +
                  new URL(e.name).search).filter((p) => p.startsWith('/v1/'));"""
    wait_until(driver, lambda d: sum(p == polls for p in d.execute_script(requests)) >= 4, 30,
               "the page stopped polling")
    seen = driver.execute_script(requests)
    assert set(seen) == {polls}, seen
    assert driver.execute_script("""return document.getElementById(arguments[0]).dataset.mark === 'kept' &&
        document.querySelector('#metrics tbody tr').dataset.mark === 'kept'""", f"job-{job_id}"), \
        "an unchanged poll redrew the page"


# -- keys required ------------------------------------------------------------------------------------------------


def test_with_keys_required_the_page_asks_for_a_key_and_downloads_with_it(browser, tmp_path, pg_url, redis_url,
                                                                          start_worker):
    import redis

    from app.auth.keys import create_key
    from app.core.db import Database

    redis.Redis.from_url(redis_url).flushdb()  # the test's own Redis database (DISTILLERY_TEST_REDIS_URL)
    settings = make_settings(tmp_path, pg_url, redis_url, auth="required", auth_cache_s=0.0)
    db = Database(settings)
    with db.session() as s:
        _, key = create_key(s, "alice")
    db.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    server = Server(["api", "--workers", "1"], {**env, **settings_env(settings)}, tmp_path / "api.log", tmp_path)
    try:
        with httpx.Client(base_url=server.base, timeout=30, headers={"Authorization": f"Bearer {key}"}) as c:
            model = c.post("/v1/models", files={"file": ("m.onnx", mlp_onnx_bytes())}).json()
            job = submit(c, quantize(model["id"], None, "dynamic_int8"))  # no worker yet: it stays queued

            # the report's URL, opened without a key: the prompt, and nothing else
            browser.get(f"{server.base}/#/jobs/{job['id']}")
            wait_until(browser, lambda d: css(d, "#auth")[0].is_displayed(), 30, "the page did not ask for a key")
            assert not css(browser, "#main")[0].is_displayed()
            assert job["id"] not in browser.page_source and model["id"] not in browser.page_source

            css(browser, "#key")[0].send_keys("dk_0123456789abcdef.not-a-real-key-at-all")
            css(browser, "#key-save")[0].click()
            wait_until(browser, lambda d: "refused" in css(d, "#auth-error")[0].text, 30, "a bad key was not refused")
            assert not css(browser, "#main")[0].is_displayed()

            # with the key, the report the URL names
            css(browser, "#key")[0].send_keys(key)
            css(browser, "#key-save")[0].click()
            row = f"tr#job-{job['id']}"
            wait_until(browser, lambda d: css(d, row) and report_shows(d, job["id"]), 30,
                       "the job's report did not show after the key was entered")
            assert css(browser, row)[0].get_attribute("data-status") == "queued"
            assert css(browser, "#job-status .status")[0].text == "queued"
            assert not css(browser, "#job-download")[0].is_displayed()  # no artifact yet
            assert not css(browser, "#auth")[0].is_displayed()
            assert browser.execute_script("return sessionStorage.getItem('distillery.apiKey')") == key

            # a worker runs it; the report follows, and the download carries the key
            start_worker(settings, "dashboard@test")
            wait_finished_on_page(browser, job["id"], server)
            done = c.get(f"/v1/jobs/{job['id']}").json()
            assert done["status"] == "succeeded", done
            artifact = c.get(f"/v1/artifacts/{done['artifact_id']}").json()
            assert httpx.get(f"{server.base}/v1/artifacts/{artifact['id']}/content").status_code == 401
        wait_until(browser, lambda d: css(d, "#job-download")[0].is_displayed()
                   and artifact["filename"] in css(d, "#artifact-download")[0].text, 30, "no download link")
        css(browser, "#artifact-download")[0].click()
        assert sha256(downloaded(browser, artifact["filename"])) == artifact["sha256"]
        assert css(browser, "#download-error")[0].text == ""

        css(browser, "#forget-key")[0].click()  # back to the prompt, and the data is gone from the page
        wait_until(browser, lambda d: css(d, "#auth")[0].is_displayed(), 30, "forgetting the key did not lock")
        assert browser.execute_script("return sessionStorage.getItem('distillery.apiKey')") is None
        assert job["id"] not in browser.page_source
        # the two 401s above are the only errors the page saw (the browser logs each refused request)
        assert all("401" in e["message"] for e in console_errors(browser))
    finally:
        server.stop()


# -- the README's pictures ----------------------------------------------------------------------------------------


@pytest.mark.skipif(not SCREENSHOTS, reason="writes docs/img/dashboard-*.png: DISTILLERY_TEST_SCREENSHOTS=1")
@pytest.mark.timeout(3600)
def test_screenshots_of_the_example_models(browser, tmp_path):
    """`distillery example`'s digits_cnn through static_int8, prune and distill (compare_baseline) and two more
    quantizations on `distillery serve`; the list and the distillation's report as the README's pictures."""
    example = tmp_path / "example"
    out = subprocess.run([sys.executable, "-m", "app.cli", "example", "--out", str(example)], cwd=tmp_path,
                         env=serve_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    server = Server(["serve"], serve_env(tmp_path), tmp_path / "serve.log", tmp_path)
    try:
        bench = {"batch_sizes": [1, 32], "repeats": 20, "warmup": 2}
        with httpx.Client(base_url=server.base, timeout=60) as c:
            onnx = (example / "digits_cnn.onnx").read_bytes()
            model = c.post("/v1/models", files={"file": ("digits_cnn.onnx", onnx)}, data={"name": "digits_cnn"}).json()
            data = c.post("/v1/datasets", files={"file": ("digits.npz", (example / "digits.npz").read_bytes())},
                          data={"name": "digits"}).json()
            jobs = [submit(c, body) for body in (
                quantize(model["id"], data["id"], "static_int8", bench),
                {"kind": "prune", "model_id": model["id"], "dataset_id": data["id"], "config": {
                    "method": "channels", "ratio": 0.5, "fine_tune": {"epochs": 3, "lr": 0.003}, "benchmark": bench}},
                {"kind": "distill", "model_id": model["id"], "dataset_id": data["id"], "config": {
                    "student": {"arch": "cnn", "channels": [16, 32], "hidden": [64]}, "epochs": 15, "lr": 0.003,
                    "compare_baseline": True, "benchmark": bench}},
                quantize(model["id"], data["id"], "fp16", bench),
                quantize(model["id"], data["id"], "dynamic_int8", bench),
            )]
        browser.get(server.base + "/")
        for job in jobs:
            wait_finished_on_page(browser, job["id"], server, timeout=2400)
        assert all(css(browser, f"tr#job-{j['id']}")[0].get_attribute("data-status") == "succeeded" for j in jobs)
        wait_until(browser, lambda d: len(css(d, "#chart circle.point")) == len(jobs), 30)
        (ROOT / "docs" / "img").mkdir(exist_ok=True)
        assert browser.save_screenshot(str(ROOT / "docs" / "img" / "dashboard-jobs.png"))
        distill = jobs[2]
        browser.get(f"{server.base}/#/jobs/{distill['id']}")
        wait_until(browser, lambda d: report_shows(d, distill["id"]) and css(d, "#comparison")[0].is_displayed()
                   and css(d, "#chart svg"), 30)
        # the whole page, down to the comparison with labels alone (a headless window is no taller than its screen)
        height = min(1800, browser.execute_script("return document.documentElement.scrollHeight"))
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 1400, "height": height,
                                                                      "deviceScaleFactor": 1, "mobile": False})
        wait_until(browser, lambda d: d.execute_script("return window.innerHeight") == height, 30)
        browser.execute_script("window.scrollTo(0, 0)")
        assert browser.save_screenshot(str(ROOT / "docs" / "img" / "dashboard-job.png"))
        print(json.dumps({"jobs": [j["id"] for j in jobs], "model": model["id"]}))
    finally:
        server.stop()
