"""The web console in a real browser: Debian's headless Chromium, driven by Playwright.

Playwright's own browser downloads are never used (no `playwright install`): the test launches
/usr/bin/chromium, and skips, saying what to install, where it is missing.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from urllib.request import urlopen

import pytest

from maas.training.v1 import training_pb2 as t
from maas.training.v1 import training_pb2_grpc
from tests.e2e.test_training import wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts"
DEFAULT_MODELS = ("digits-mlp", "digits-cnn", "sine-gru", "karate-gcn", "minilm-l6-v2", "sentiment")
# Every change of the curve's epoch count and of the state shown, in order, as the page made them.
RECORD_CHANGES = """document.addEventListener('DOMContentLoaded', () => {
  window.seen = [];
  const note = () => window.seen.push([document.querySelector('#job-state')?.textContent || '',
                                       Number(document.querySelector('#curve')?.dataset.epochs || 0)]);
  new MutationObserver(note).observe(document.body, {subtree: true, childList: true, attributes: true,
                                                     attributeFilter: ['data-epochs']});
});"""


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("chromium not found at /usr/bin/chromium: apt-get install -y chromium (.ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -r requirements-test.lock")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors
    yield page
    context.close()


def until(page, condition, timeout_s: float, what: str) -> None:
    """Polls from here: the console's Content-Security-Policy forbids the eval wait_for_function needs."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        page.wait_for_timeout(200)


def text(page, selector: str) -> str:
    return page.inner_text(selector) if page.query_selector(selector) else ""


def keep(page, tmp_path: Path, name: str) -> Path:
    """A full-page screenshot, under the test's tmp dir and in build/test-artifacts/."""
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / name)
    return shot


def test_the_models_page_lists_the_default_models(cluster, page, tmp_path):
    page.goto(f"http://127.0.0.1:{cluster.ports.gateway_http}/console")
    page.wait_for_selector("tr[data-model='digits-mlp']", timeout=30_000)
    listed = page.eval_on_selector_all("tr[data-model]", "rows => rows.map(r => r.dataset.model)")
    assert set(DEFAULT_MODELS) <= set(listed)
    row = page.inner_text("tr[data-model='digits-mlp']")
    assert "READY" in row and "CPUExecutionProvider" in row and "accuracy" in row
    assert "admin" in page.inner_text("#who")  # no keys: the one caller is an admin, so the buttons show
    until(page, lambda: "requests/s" in text(page, "#stat-line"), 30, "the gateway's rates")
    assert keep(page, tmp_path, "console-models.png").stat().st_size > 10_000
    assert not page.errors


def job_state(training, job_id: str) -> int:
    return training.GetJob(t.GetJobRequest(job_id=job_id), timeout=30).job.state


def test_a_job_page_draws_its_curve_as_the_epochs_arrive(cluster, gateway_channel, page, tmp_path):
    base = f"http://127.0.0.1:{cluster.ports.gateway_http}"
    training = training_pb2_grpc.TrainingServiceStub(gateway_channel)
    # The family's one trainer is kept busy, so the job waits in the queue until the page is open and
    # following its events: however fast training is, its epochs arrive while the page watches.
    blocker = training.SubmitJob(t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", epochs=5000,
                                                    builtin_dataset="iris", output_model="iris-console-blocker"),
                                 timeout=30).job  # fmt: skip
    try:
        wait_for(lambda: job_state(training, blocker.job_id) == t.JOB_STATE_RUNNING, timeout=120,
                 what="the blocking job to start")  # fmt: skip
        job = training.SubmitJob(t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", epochs=20,
                                                    builtin_dataset="iris", output_model="iris-console"),
                                 timeout=30).job  # fmt: skip
        page.add_init_script(RECORD_CHANGES)
        page.goto(f"{base}/console/jobs/{job.job_id}")
        until(page, lambda: text(page, "#job-state") == "QUEUED", 60, "the page to follow the queued job")
    finally:
        training.CancelJob(t.CancelJobRequest(job_id=blocker.job_id), timeout=30)
    until(page, lambda: text(page, "#job-state") in ("SUCCEEDED", "FAILED", "CANCELLED"), 240, "the job to end")
    assert page.inner_text("#job-state") == "SUCCEEDED"
    until(page, lambda: page.get_attribute("#curve", "data-epochs") == "20", 10, "the 20th epoch drawn")
    seen = page.evaluate("window.seen")
    counts = [epochs for _, epochs in seen]
    assert counts == sorted(counts) and counts[-1] == 20, seen  # one point per epoch, never redrawn backwards
    assert len(set(counts) - {0}) >= 2, seen  # drawn as events arrived, not once at the end
    assert any(state == "RUNNING" and 0 < epochs < 20 for state, epochs in seen), seen  # while the job ran
    assert page.locator("#curve canvas").count() == 1
    legend = page.inner_text("#curve").lower()  # uPlot shows its legend in capitals
    assert "train loss" in legend and "validation accuracy" in legend
    assert keep(page, tmp_path, "console-job.png").stat().st_size > 10_000

    page.goto(f"{base}/console#jobs")
    page.wait_for_selector(f"tr[data-job='{job.job_id}']", timeout=30_000)
    assert "SUCCEEDED" in page.inner_text(f"tr[data-job='{job.job_id}']")
    assert not page.errors


def console_models(base: str) -> dict:
    with urlopen(f"{base}/console/api/models", timeout=30) as response:
        return {m["name"]: m for m in json.loads(response.read())["models"]}


def test_promote_and_rollback_buttons_call_set_default_version(cluster, gateway_channel, page):
    """Two versions of a model trained here; the buttons move its default through SetDefaultVersion."""
    base = f"http://127.0.0.1:{cluster.ports.gateway_http}"
    training = training_pb2_grpc.TrainingServiceStub(gateway_channel)
    for _ in range(2):
        job = training.SubmitJob(t.SubmitJobRequest(family=t.FAMILY_DENSE, architecture="mlp", epochs=2,
                                                    builtin_dataset="iris", output_model="iris-buttons"),
                                 timeout=30).job  # fmt: skip
        events = [r.event for r in training.WatchJob(t.WatchJobRequest(job_id=job.job_id), timeout=240)]
        assert events[-1].state == t.JOB_STATE_SUCCEEDED
    wait_for(lambda: (m := console_models(base).get("iris-buttons")) and m["default_version"] == 2
             and {v["state"] for v in m["versions"]} == {"READY"}, timeout=60, what="both versions served")
    page.goto(f"{base}/console")
    row = "tr[data-model='iris-buttons']"
    page.wait_for_selector(f"{row} [data-rollback]", timeout=30_000)
    page.click(f"{row} [data-rollback]")
    until(page, lambda: "default is now v1" in text(page, "#change-result"), 30, "the rollback")
    assert console_models(base)["iris-buttons"]["default_version"] == 1
    page.click(f"{row} [data-promote='iris-buttons:2']")
    until(page, lambda: "default is now v2" in text(page, "#change-result"), 30, "the promotion")
    assert console_models(base)["iris-buttons"]["default_version"] == 2
    assert not page.errors


def test_the_page_and_the_vendored_chart_library_are_served(cluster):
    base = f"http://127.0.0.1:{cluster.ports.gateway_http}"
    for path in ("/console", "/console/jobs/any", "/console/static/console.js", "/console/static/uPlot.min.css"):
        with urlopen(base + path, timeout=30) as response:
            assert response.status == 200, path
    with urlopen(base + "/console", timeout=30) as response:  # the page loads only its own files, unframed
        assert "default-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["x-frame-options"] == "DENY"
    with urlopen(base + "/console/static/uPlot.iife.min.js", timeout=30) as response:
        assert b"MIT License" in response.read(400)  # the license header travels with the file
