"""The dashboard in a real browser: Debian's chromium, headless, driven by selenium through /usr/bin/chromedriver.

`distillery serve` runs a real job submitted through the API; the page shows it reach succeeded, its report and a
point on its model's chart. With keys required (PostgreSQL + Redis), the page asks for a key before it shows
anything. DISTILLERY_TEST_SCREENSHOTS=1 also writes docs/img/dashboard-jobs.png and docs/img/dashboard-job.png.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

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
def browser():
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--hide-scrollbars", "--force-device-scale-factor=1",
                "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(driver, condition, timeout: float = 60.0, message: str = ""):
    """Poll the DOM until condition(driver) is truthy (no sleeps), up to a deadline."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,)
                         ).until(condition, message)


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def console_errors(driver) -> list[dict]:
    """Errors the page logged (a CSP violation, a failed request, a script error)."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


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


@pytest.fixture
def serve(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    env["DISTILLERY_DATA_DIR"] = str(tmp_path / "distillery-data")
    server = Server(["serve"], env, tmp_path / "serve.log", tmp_path)
    yield server
    server.stop()


def submit(c: httpx.Client, model_id: str, dataset_id: str | None, method: str) -> dict:
    body = {"kind": "quantize", "model_id": model_id, "config": {"method": method, "benchmark": QUICK_BENCH}}
    if dataset_id:
        body["dataset_id"] = dataset_id
    resp = c.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.text
    return resp.json()


def test_a_job_submitted_through_the_api_reaches_succeeded_on_the_page(browser, serve):
    browser.get(serve.base + "/")
    wait_until(browser, lambda d: css(d, "#main")[0].is_displayed() and css(d, "#jobs-empty")[0].is_displayed(),
               message="the page did not load its (empty) job list")
    assert not css(browser, "#auth")[0].is_displayed()  # open mode: no key asked

    with httpx.Client(base_url=serve.base, timeout=30) as c:
        model = c.post("/v1/models", files={"file": ("digits-mlp.onnx", mlp_onnx_bytes())},
                       data={"name": "digits-mlp"}).json()
        ds = c.post("/v1/datasets", files={"file": ("digits.npz", digits_npz_bytes())}).json()
        job = submit(c, model["id"], ds["id"], "static_int8")
        extra = [submit(c, model["id"], None, "dynamic_int8"), submit(c, model["id"], ds["id"], "fp16")] \
            if SCREENSHOTS else []  # more points on the chart for the pictures

        row = f"tr#job-{job['id']}"
        wait_until(browser, lambda d: css(d, row), 30, "the submitted job did not appear on the page")
        wait_until(browser, lambda d: css(d, row)[0].get_attribute("data-status") in ("queued", "running",
                                                                                        "succeeded"))
        wait_until(browser, lambda d: css(d, row)[0].get_attribute("data-status") in ("succeeded", "failed"),
                   240, f"the job did not finish on screen: {serve.tail()}")
        job = c.get(f"/v1/jobs/{job['id']}").json()
        assert job["status"] == "succeeded", (job, serve.tail())
        # the row is redrawn when any job changes: read it through the same stale-tolerant wait
        wait_until(browser, lambda d: css(d, f"{row} .status")[0].text == "succeeded", 30)
        wait_until(browser, lambda d: css(d, f"{row} .pct")[0].text == "100%", 30)
        for other in extra:
            wait_until(browser, lambda d, o=other: css(d, f"tr#job-{o['id']}")[0].get_attribute("data-status")
                       in ("succeeded", "failed"), 240, "a screenshot job did not finish")

    if SCREENSHOTS:
        (ROOT / "docs" / "img").mkdir(exist_ok=True)
        assert browser.save_screenshot(str(ROOT / "docs" / "img" / "dashboard-jobs.png"))

    # the job's report: real values, the same as the API's
    wait_until(browser, lambda d: css(d, row)[0].click() or True, 30)
    wait_until(browser, lambda d: css(d, "#metrics")[0].is_displayed(), 30, "the job's metrics did not show")
    assert css(browser, "#job-id")[0].text == job["id"]
    m = job["metrics"]

    def cell(metric: str, side: str):
        return css(browser, f'#metrics td[data-metric="{metric}"][data-side="{side}"]')[0]

    for side in ("baseline", "result"):
        size = cell("size_bytes", side)
        assert int(size.get_attribute("data-value")) == m[side]["size_bytes"] and size.text.endswith("B")
        assert int(cell("params", side).get_attribute("data-value")) == m[side]["params"]
        acc = cell("accuracy", side)
        assert float(acc.get_attribute("data-value")) == pytest.approx(m[side]["accuracy"]) and acc.text.endswith("%")
        for batch in ("1", "16"):
            p50 = cell(f"latency_ms_p50_{batch}", side)
            assert float(p50.get_attribute("data-value")) == pytest.approx(m[side]["latency_ms"][batch]["p50"])
            assert p50.text.endswith(" ms")
    assert float(cell("agreement", "result").get_attribute("data-value")) == pytest.approx(m["result"]["agreement"])
    assert float(cell("cosine", "result").get_attribute("data-value")) == pytest.approx(m["result"]["cosine"])
    for batch in ("1", "16"):
        assert "speedup" in cell(f"latency_ms_p50_{batch}", "change").text
    assert bool(css(browser, "#flag-slower")) == m["slower_than_baseline"]

    # the model's chart: this job is a point on it, beside the original model
    point = f'#chart circle.point[data-job-id="{job["id"]}"]'
    wait_until(browser, lambda d: css(d, point), 30, "the job is not on its model's chart")
    assert css(browser, "#chart .baseline rect")
    assert float(css(browser, point)[0].get_attribute("r")) > 0
    assert css(browser, "#chart-model")[0].get_attribute("value") == model["id"]
    if SCREENSHOTS:
        browser.execute_script("document.getElementById('job-panel').scrollIntoView()")
        assert browser.save_screenshot(str(ROOT / "docs" / "img" / "dashboard-job.png"))

    assert console_errors(browser) == []  # no CSP violation, no failed request, no script error


def test_with_keys_required_the_page_asks_for_a_key_and_shows_nothing_without_one(browser, tmp_path, pg_url,
                                                                                    redis_url):
    import redis

    from app.auth.keys import create_key
    from app.core.db import Database

    broker = redis_url.rsplit("/", 1)[0] + f"/{1 + os.getpid() % 14}"
    redis.Redis.from_url(broker).flushdb()
    settings = make_settings(tmp_path, pg_url, broker, auth="required", auth_cache_s=0.0)
    db = Database(settings)
    with db.session() as s:
        _, key = create_key(s, "alice")
    db.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    server = Server(["api", "--workers", "1"], {**env, **settings_env(settings)}, tmp_path / "api.log", tmp_path)
    try:
        with httpx.Client(base_url=server.base, timeout=30, headers={"Authorization": f"Bearer {key}"}) as c:
            model = c.post("/v1/models", files={"file": ("m.onnx", mlp_onnx_bytes())}).json()
            job = submit(c, model["id"], None, "dynamic_int8")  # no worker: it stays queued

        browser.get(server.base + "/")
        wait_until(browser, lambda d: css(d, "#auth")[0].is_displayed(), 30, "the page did not ask for a key")
        assert not css(browser, "#main")[0].is_displayed()
        assert job["id"] not in browser.page_source and model["id"] not in browser.page_source

        css(browser, "#key")[0].send_keys("dk_0123456789abcdef.not-a-real-key-at-all")
        css(browser, "#key-save")[0].click()
        wait_until(browser, lambda d: "refused" in css(d, "#auth-error")[0].text, 30, "a bad key was not refused")
        assert not css(browser, "#main")[0].is_displayed()

        css(browser, "#key")[0].send_keys(key)
        css(browser, "#key-save")[0].click()
        row = f"tr#job-{job['id']}"
        wait_until(browser, lambda d: css(d, row), 30, "the job did not appear after the key was entered")
        assert css(browser, row)[0].get_attribute("data-status") == "queued"
        assert not css(browser, "#auth")[0].is_displayed()
        assert browser.execute_script("return sessionStorage.getItem('distillery.apiKey')") == key

        css(browser, "#forget-key")[0].click()  # back to the prompt, and the data is gone from the page
        wait_until(browser, lambda d: css(d, "#auth")[0].is_displayed(), 30, "forgetting the key did not lock")
        assert browser.execute_script("return sessionStorage.getItem('distillery.apiKey')") is None
        assert job["id"] not in browser.page_source
        # the two 401s above are the only errors the page saw (the browser logs each refused request)
        assert all("401" in e["message"] for e in console_errors(browser))
    finally:
        server.stop()
