"""The sweep report and the MLflow UI, checked in a real headless Chromium (Selenium).

A tiny sweep runs through Ray Tune for real, with the project's MLflowSweepCallback, but its trials are a test-local
function trainable that reports closed-form metrics (as in tests/test_tracking.py), so no detector is trained. Then:

- ``sweep_report.html`` (an artifact of the sweep run) is opened from file://: it loads without console errors,
  needs no resource outside itself, every figure is decoded and shown, and its table lists every trial;
- ``mlflow server`` on the sweep's sqlite store is opened: the experiment opens in "Model training" mode (the runs
  table, not the GenAI overview), the sweep run lists its nested trial runs, and the sweep-level metrics are columns.

Screenshots of both pages are written to docs/sweep_report.png and docs/mlflow_ui.png (overwritten on each run).

Chromium and chromedriver are the Debian packages (``apt-get install chromium chromium-driver``; .ci/run installs
them in CI). Locally the module can be skipped with LTSWEEP_SKIP_BROWSER=1 (ignored when CI=true); otherwise a
missing browser is a failure that says how to install it.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import test_tracking
from test_tracking import _free_port, expected_metrics, stop_process_group, synthetic_trial

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL = "sudo apt-get update && sudo apt-get install -y chromium chromium-driver"
SKIP = os.environ.get("LTSWEEP_SKIP_BROWSER") == "1" and os.environ.get("CI") != "true"
WIDTH, HEIGHT = 1280, 900
WAIT_S = 60  # the UI on a busy 2-core machine
NAME = "browser-sweep"
LAMS, XIS, REPORTS = (0.0, 0.5, 1.0), (0.2, 0.7), 3
SWEEP_METRICS = ("AP", "AP50", "APr", "APc", "APf", "trials", "stopped_early", "errored", "trial_epochs")


# ---------------------------------------------------------------------------------------------------------------
# the browser: present, or a failure that says how to get it
@pytest.fixture(scope="module", autouse=True)
def chromium_available():
    """Runs before anything else of the module (autouse), so a missing browser costs no sweep."""
    if SKIP:
        pytest.skip("LTSWEEP_SKIP_BROWSER=1: the headless-Chromium checks are skipped locally (never in CI)")
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: the browser tests need Debian's Chromium and its driver. "
            f"Install them with `{INSTALL}` (.ci/run does this in CI), or skip this module locally with "
            "LTSWEEP_SKIP_BROWSER=1.",
            pytrace=False,
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail(
            "selenium is not installed: `.venv/bin/python -m pip install -e '.[test]'` (or `make install-test`)",
            pytrace=False,
        )


@pytest.fixture
def browser(tmp_path, monkeypatch):
    """A fresh headless Chromium (own profile, so no UI state carries over between tests), viewport 1280x900,
    with the browser console log enabled. Never lets Selenium Manager look for a driver online."""
    monkeypatch.setenv("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        f"--window-size={WIDTH},{HEIGHT}",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    log = open(tmp_path / "chromedriver.log", "w")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=log), options=opts)
    try:
        driver.set_page_load_timeout(WAIT_S)
        # the page itself is exactly WIDTH x HEIGHT (a headless window's size includes no-longer-drawn chrome)
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
        )
        yield driver
    finally:
        driver.quit()
        log.close()


def wait(driver, condition, what: str, timeout: float = WAIT_S):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except TimeoutException:
        pytest.fail(f"timed out after {timeout} s waiting for {what} (at {driver.current_url})")


def save_screenshot(driver, name: str, tmp_dir: Path) -> Path:
    """The viewport as a PNG, checked to be 1280x900 and not blank. It goes to docs/<name> (replaced atomically)
    when LTSWEEP_UPDATE_SCREENSHOTS=1 (how the README's screenshots are made), else to ``tmp_dir``, so a test run
    leaves the working tree as it was."""
    from PIL import Image

    out = DOCS if os.environ.get("LTSWEEP_UPDATE_SCREENSHOTS") == "1" else tmp_dir
    out.mkdir(exist_ok=True)
    png = driver.get_screenshot_as_png()
    tmp = out / f".{name}.tmp"
    tmp.write_bytes(png)
    os.replace(tmp, out / name)
    with Image.open(out / name) as im:
        assert im.size == (WIDTH, HEIGHT), im.size
        assert len(im.convert("RGB").getcolors(maxcolors=WIDTH * HEIGHT) or []) > 16  # not a blank page
    return out / name


# ---------------------------------------------------------------------------------------------------------------
# the sweep: Ray Tune + MLflowSweepCallback with a synthetic trainable (shipped to the workers by value)
# the synthetic trainable and its closed-form metrics are tests/test_tracking.py's


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A finished 6-trial grid sweep (λ x ξ, 3 reports each) in a local sqlite store, and `mlflow server` on that
    store (started once the schema exists, so it boots while the sweep runs)."""
    import ray
    from mlflow import MlflowClient
    from ray import tune

    from pipelines.mlflow_io.client import make_client
    from pipelines.mlflow_io.reads import search_tagged
    from pipelines.tracking.callback import MLflowSweepCallback

    root = tmp_path_factory.mktemp("browser_sweep")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    make_client(uri)  # creates the schema (under the project's file lock) before the server opens the store
    port = _free_port()
    server_log = root / "server.log"
    log = open(server_log, "w")
    # no background job runner (MLflow 3's GenAI jobs: extra Python processes we do not need on 2 cores)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            # the trainable lives in this test module, which Ray's workers cannot import: ship it by value
            ray.cloudpickle.register_pickle_by_value(test_tracking)
            params = {
                "name": NAME,
                "dataset_fingerprint": "d" * 64,
                "scheduler": {"metric": "AP", "mode": "max"},
                "stage2": {"epochs": REPORTS},
                "eval": {"every": 1},
                "space": {"lam": {"grid": list(LAMS)}, "xi": {"grid": list(XIS)}},
            }
            cb = MLflowSweepCallback(uri, NAME, params, ["lam", "xi"])
            results = tune.Tuner(
                tune.with_resources(synthetic_trial, {"cpu": 0.5}),
                param_space={
                    "lam": tune.grid_search(list(LAMS)),
                    "xi": tune.grid_search(list(XIS)),
                    "reports": REPORTS,
                    "sha": "a" * 64,
                },
                tune_config=tune.TuneConfig(metric="AP", mode="max"),
                run_config=tune.RunConfig(name=NAME, storage_path=str(root / "tune"), callbacks=[cb], verbose=0),
            ).fit()
        finally:
            ray.shutdown()
        assert not results.errors, results.errors
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(NAME)
        parents = search_tagged(client, exp.experiment_id, {"ltsweep.role": "sweep"})
        trials = search_tagged(client, exp.experiment_id, {"ltsweep.role": "trial"})
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        parent = parents[0]
        assert "ltsweep.report_error" not in parent.data.tags, parent.data.tags["ltsweep.report_error"]
        tune_ids = sorted(r.metrics["trial_id"] for r in results)
        assert len(tune_ids) == len(LAMS) * len(XIS)
        assert sorted(r.data.tags["ltsweep.trial_id"] for r in trials) == tune_ids  # one run per trial
        assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials)
        # wait (bounded) for the server; its log is shown if it never answers
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{server_log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200 and r.read().strip() == b"OK":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after 120 s:\n{server_log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield {
            "uri": uri,
            "url": url,
            "root": root,
            "client": client,
            "experiment": exp,
            "parent": parent,
            "trials": {r.data.tags["ltsweep.trial_id"]: r for r in trials},
            "server_log": server_log,
        }
    finally:
        stop_process_group(proc)
        log.close()


# ---------------------------------------------------------------------------------------------------------------
# the report
_IMAGES_JS = """return Array.from(document.images).map(i => {const r = i.getBoundingClientRect();
  return {src: i.getAttribute('src').slice(0, 30), complete: i.complete, nw: i.naturalWidth, nh: i.naturalHeight,
          w: r.width, h: r.height, alt: i.alt};});"""
# every URL the page refers to (attributes and inline styles) that is not a data: URI or an in-page anchor
_EXTERNAL_JS = """const out = [];
for (const e of document.querySelectorAll('*')) {
  for (const a of ['src', 'href', 'srcset', 'poster', 'data', 'action', 'background']) {
    const v = e.getAttribute(a); if (v && !v.startsWith('data:') && !v.startsWith('#')) out.push(a + '=' + v);
  }
}
for (const s of document.querySelectorAll('style')) {
  for (const m of s.textContent.matchAll(/url\\(([^)]*)\\)|@import/g)) out.push('css ' + m[0]);
}
return out;"""
_TABLE_JS = """const t = document.querySelector('table');
return t ? Array.from(t.rows).map(r => Array.from(r.cells).map(c => c.textContent.trim())) : null;"""


def test_report_renders_self_contained_with_every_trial(sweep, browser, tmp_path):
    client, parent = sweep["client"], sweep["parent"]
    page_dir = tmp_path / "report"  # alone in its directory: a relative reference would fail to load
    page_dir.mkdir()
    path = Path(client.download_artifacts(parent.info.run_id, "sweep_report.html", str(page_dir)))
    assert [p.name for p in page_dir.iterdir()] == ["sweep_report.html"]

    browser.get_log("browser")  # drain anything logged before the page
    browser.get(path.as_uri())
    wait(
        browser,
        lambda d: d.execute_script(
            "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"
        ),
        "the report and its images to load",
    )
    assert browser.title == f"ltsweep sweep {NAME}"

    # every figure is an embedded PNG, decoded and shown with a non-zero size
    images = browser.execute_script(_IMAGES_JS)
    assert len(images) == 5, images  # λ, ξ, buckets per trial, evaluations per trial, AP by frequency rank
    for im in images:
        assert im["src"].startswith("data:image/png;base64,"), im
        assert im["nw"] > 0 and im["nh"] > 0, f"image not decoded: {im}"
        assert im["w"] > 0 and im["h"] > 0, f"image not shown: {im}"

    # self-contained: no reference to anything outside the page, and no resource was fetched
    assert browser.execute_script(_EXTERNAL_JS) == []
    fetched = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith('data:'))"
    )
    assert fetched == [], fetched

    # the trials table: one row per trial (its Tune trial id), each finished after all its evaluations
    rows = browser.execute_script(_TABLE_JS)
    assert rows is not None, "the report has no table"
    assert rows[0][:3] == ["trial", "status", "evals"], rows[0]
    listed = {r[0]: r for r in rows[1:]}
    assert len(listed) == len(rows) - 1  # no trial listed twice
    assert set(listed) == set(sweep["trials"]), (sorted(listed), sorted(sweep["trials"]))
    for _trial_id, r in listed.items():
        assert r[1] == "FINISHED" and r[2] == str(REPORTS), r
    best = max(LAMS), max(XIS)
    best_id = next(
        t for t, run in sweep["trials"].items() if (float(run.data.params["lam"]), float(run.data.params["xi"])) == best
    )
    assert browser.find_element("css selector", "tr.best td").text == best_id  # the best trial is highlighted

    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], f"console errors on the report page: {severe}"
    save_screenshot(browser, "sweep_report.png", tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# the MLflow UI
def _prepare_ui(driver, url: str) -> None:
    """Keep MLflow's assistant side panel (auto-opened on a first visit) closed, so that it does not cover the runs
    table. Only the assistant's own keys are set: the UI's workflow type (GenAI / Model training) stays unset, as
    for a first-time user."""
    driver.get(url + "/health")  # same origin as the UI, so its localStorage
    driver.execute_script(
        "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
        "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
    )


def _close_assistant(driver) -> None:
    for b in driver.find_elements("css selector", "button[aria-label='Close'][data-component-id*='assistant']"):
        if b.is_displayed():
            b.click()


def test_mlflow_ui_opens_experiment_in_model_training_mode(sweep, browser, tmp_path):
    """The link ltsweep prints after a sweep (pipelines.mlflow_io.client.runs_table_url) opens the sweep's experiment on
    its runs table in "Model training" mode, not on the GenAI overview. The experiment is also tagged
    mlflow.experimentKind=custom_model_development; MLflow 3.17's UI does not follow that tag (its mode comes from
    the URL or the browser's last choice), which is why the printed link names the mode."""
    from pipelines.mlflow_io.client import runs_table_url

    exp = sweep["experiment"]
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    url = sweep["url"]
    _prepare_ui(browser, url)
    browser.get(runs_table_url(exp.experiment_id, ui=url))
    wait(
        browser,
        lambda d: d.find_elements("xpath", "//*[@role='columnheader'][normalize-space()='Run Name']"),
        "the runs table",
    )
    landed = browser.current_url
    if f"#/experiments/{exp.experiment_id}/runs" not in landed or "workflowType=genai" in landed:
        shot = tmp_path / "experiment_page.png"
        browser.save_screenshot(str(shot))
        pytest.fail(f"the printed link did not open the runs table in Model training mode: {landed} ({shot})")
    assert "workflowType=machine_learning" in landed, landed
    # the page shows the sweep's runs, not the GenAI traces overview
    assert not browser.find_elements("xpath", "//*[normalize-space()='Traces'][@aria-selected='true']")


def _tree_titles(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('[class*=tree-treenode]')).map(n => n.innerText.trim())"
    )


def _set_column(driver, title: str, on: bool) -> None:
    """Tick (on) or untick the column selector's entry `title` (the checkbox beside its label), if it is not so."""
    nodes = [
        n
        for n in driver.find_elements(
            "xpath", f"//span[contains(@class,'tree-node-content-wrapper')][@title='{title}']/.."
        )
        if n.is_displayed()
    ]
    assert len(nodes) == 1, f"column selector entry {title!r}: {len(nodes)} matches"
    if ("tree-treenode-checkbox-checked" in nodes[0].get_attribute("class")) != on:
        nodes[0].find_element("xpath", "./span[contains(@class,'tree-checkbox')]").click()


def test_mlflow_runs_table_nests_trials_under_sweep_with_sweep_metrics(sweep, browser, tmp_path):
    from selenium.webdriver.common.by import By

    exp, parent, trials = sweep["experiment"], sweep["parent"], sweep["trials"]
    url = sweep["url"]
    pid = parent.info.run_id
    _prepare_ui(browser, url)
    # the runs table in Model training mode: the link the sweep summary prints
    from pipelines.mlflow_io.client import runs_table_url

    browser.get(runs_table_url(exp.experiment_id, ui=url))
    row = f"div[role=row][row-id='{pid}']"
    name_cell = f"{row} div[col-id='attributes.`Run Name`']"
    wait(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, f"{name_cell} a[href$='/runs/{pid}']"),
        "the sweep run in the runs table",
    )
    assert browser.find_element(By.CSS_SELECTOR, f"{name_cell} a[href$='/runs/{pid}']").text == NAME
    _close_assistant(browser)

    # the sweep run's nested trial runs: collapsed under it by default; expanding it lists all of them
    def trial_rows(d):
        return [
            e
            for e in d.find_elements(By.CSS_SELECTOR, "div[role=row][row-id]")
            if e.get_attribute("row-id") in {r.info.run_id for r in trials.values()}
        ]

    if len(trial_rows(browser)) < len(trials):
        expanders = browser.find_elements(By.CSS_SELECTOR, f"{name_cell} button")
        assert len(expanders) == 1, "the sweep run has no expander for its nested runs"
        expanders[0].click()
    wait(
        browser,
        lambda d: {e.get_attribute("row-id") for e in trial_rows(d)} >= {r.info.run_id for r in trials.values()},
        "every trial run listed under the expanded sweep run",
    )
    parent_link = browser.find_element(By.CSS_SELECTOR, f"{name_cell} a[href$='/runs/{pid}']")
    parent_index = int(browser.find_element(By.CSS_SELECTOR, row).get_attribute("row-index"))
    for trial_id, run in trials.items():
        rid = run.info.run_id
        link = browser.find_element(By.CSS_SELECTOR, f"div[role=row][row-id='{rid}'] a[href$='/runs/{rid}']")
        assert link.text == run.info.run_name and trial_id in link.text, (link.text, trial_id)
        assert link.location["x"] > parent_link.location["x"], f"trial run {trial_id} not indented under the sweep"
        trial_row = browser.find_element(By.CSS_SELECTOR, f"div[role=row][row-id='{rid}']")
        assert int(trial_row.get_attribute("row-index")) > parent_index  # listed below the sweep run

    # the sweep-level metrics are columns: offered under Metrics by the column selector, shown once ticked
    browser.find_element(By.XPATH, "//button[normalize-space()='Columns']").click()
    wait(browser, lambda d: any(t.startswith("Metrics (") for t in _tree_titles(d)), "the column selector")
    titles = _tree_titles(browser)
    start = next(i for i, t in enumerate(titles) if t.startswith("Metrics ("))
    end = next(
        (i for i in range(start + 1, len(titles)) if re.match(r"^(Attributes|Parameters|Tags)\b", titles[i])),
        len(titles),
    )
    offered = set(titles[start + 1 : end])
    assert offered >= set(SWEEP_METRICS), sorted(set(SWEEP_METRICS) - offered)
    shown = ("AP", "trials", "stopped_early", "errored", "trial_epochs")
    for title in shown:
        _set_column(browser, title, True)
    for title in ("Dataset", "Source", "Models"):  # empty here: room for the metrics in a 1280 px screenshot
        _set_column(browser, title, False)
    browser.find_element(By.XPATH, "//button[normalize-space()='Columns']").click()  # close the selector
    wait(browser, lambda d: not any(t.startswith("Metrics (") for t in _tree_titles(d)), "the selector to close")

    def cell(d, key):
        found = d.find_elements(By.CSS_SELECTOR, f"{row} div[col-id='metrics.`{key}`']")
        return found[0].text.strip() if found and found[0].text.strip() else None

    wait(
        browser,
        lambda d: (
            all(d.find_elements(By.CSS_SELECTOR, f".ag-header-cell[col-id='metrics.`{k}`']") for k in shown)
            and all(cell(d, k) for k in shown)
        ),
        "the metric columns and the sweep run's values",
    )
    headers = {
        e.get_attribute("col-id"): e.text.strip()
        for e in browser.find_elements(By.CSS_SELECTOR, ".ag-header-cell[col-id^='metrics.']")
    }
    assert {headers[f"metrics.`{k}`"] for k in shown} == set(shown), headers
    n = len(LAMS) * len(XIS)
    best_ap = expected_metrics({"lam": max(LAMS), "xi": max(XIS)}, REPORTS)["AP"]  # one seed: the best run's AP
    values = {k: cell(browser, k) for k in shown}
    assert math.isclose(float(values["AP"]), best_ap, abs_tol=5e-4), values
    assert {k: float(values[k]) for k in shown[1:]} == {
        "trials": n,
        "stopped_early": 0,
        "errored": 0,
        "trial_epochs": n * REPORTS,
    }, values
    _close_assistant(browser)
    save_screenshot(browser, "mlflow_ui.png", tmp_path)
