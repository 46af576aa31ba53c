"""What a person browsing MLflow sees: the real `mlflow ui` on loopback, driven by Debian's headless
chromium through Selenium. The ablation run's table (its variants and their metric columns) and a
pipeline run with its stage runs must be visible as text on the page.

Screenshots go to tmp_path, and to ``$UDPDIFF_SCREENSHOT_DIR`` when set (``make screenshots``
refreshes ``docs/images/mlflow-*.png`` for the README). Without chromium/chromedriver the tests skip,
except under ``CI`` where a missing browser fails them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import mlflow
import pytest

from flows import tracking
from udpdiff.config import load_params
from udpdiff.evaluation.tables import ablation_frame

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 60  # every wait on the page is bounded by this
SERVER_START_S = 120
_HSCROLL = ".ag-body-horizontal-scroll-viewport"
ABLATION_TITLE = "Tab 5 — task conditioning"
STAGES = ["data", "validate", "encode", "autoencoder", "latents", "train", "sample", "evaluate", "report"]
VARIANTS = {"text-prompt": {"train.task_conditioning": "text"},
            "task-embedding": {"train.task_conditioning": "embedding"}}
VARIANT_METRICS = {
    "text-prompt": {"depth/subject_consistency": 0.9121, "depth/motion_smoothness_flow": 0.9702,
                    "depth/gt_delta1": 0.6113, "segmentation/gt_miou": 0.4208},
    "task-embedding": {"depth/subject_consistency": 0.9254, "depth/motion_smoothness_flow": 0.9731,
                       "depth/gt_delta1": 0.6540, "segmentation/gt_miou": 0.4467},
}


def _browser() -> tuple[str, str]:
    """Paths of the system chromium and chromedriver (skip locally, fail under CI, when absent)."""
    chromium = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium") if p and os.path.exists(p)), None)
    driver = next((p for p in ("/usr/bin/chromedriver", shutil.which("chromedriver")) if p and os.path.exists(p)),
                  None)
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[dev]')")
    if missing:
        reason = (f"{' and '.join(missing)} not found; install with `apt-get install chromium chromium-driver` "
                  "(.ci/run does)")
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"CI needs the browser for the MLflow UI test: {reason}")
        pytest.skip(reason)
    return chromium, driver


@pytest.fixture(scope="module")
def browser_paths() -> tuple[str, str]:
    return _browser()


@pytest.fixture(scope="module")
def store(tmp_path_factory, browser_paths) -> dict[str, str]:
    """An MLflow store written through flows.tracking: a pipeline run with its stage runs, and the
    ablation run of Tab 5 with its two variants."""
    root = tmp_path_factory.mktemp("mlflow-ui")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    env = {"UDPDIFF_MLFLOW_TRACKING_URI": uri, "UDPDIFF_MLFLOW_ARTIFACT_ROOT": str(root / "mlartifacts")}
    clean = {k: v for k, v in os.environ.items()
             if k not in ("UDPDIFF_MLFLOW_PARENT_RUN_ID", "UDPDIFF_MLFLOW_TAGS", "MLFLOW_RUN_ID")}
    previous_uri = mlflow.get_tracking_uri()
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        p = load_params(REPO / "params.yaml", profile="tiny")
        experiment_id = tracking.use_experiment(p)
        with tracking.pipeline_run(p, "make repro", "make") as (pipeline, _):
            for i, stage in enumerate(STAGES):
                with tracking.stage_run(stage, p):
                    mlflow.log_metrics({"seconds": 2.0 + i, "outputs": float(i + 1)})
        rows = []
        with tracking.ablation_run(p, "tab5", ABLATION_TITLE) as (ablation, _):
            for variant, overrides in VARIANTS.items():
                with tracking.variant_run(p, ablation.info.run_id, "tab5", variant, overrides) as (run, _):
                    tracking.log_variant_metrics(run.info.run_id, VARIANT_METRICS[variant])
                    rows.append({"variant": variant, **VARIANT_METRICS[variant]})
            tracking.log_ablation_table(ablation.info.run_id, ABLATION_TITLE, ablation_frame(rows, VARIANTS),
                                        root / "tables")
        client = mlflow.MlflowClient(uri)
        view_url = client.get_run(ablation.info.run_id).data.tags["udpdiff.view_url"]
        pipeline_view_url = client.get_run(pipeline.info.run_id).data.tags["udpdiff.view_url"]
    mlflow.set_tracking_uri(previous_uri)
    return {"uri": uri, "root": str(root), "experiment_id": experiment_id, "pipeline": pipeline.info.run_id,
            "ablation": ablation.info.run_id, "view_url": view_url, "pipeline_view_url": pipeline_view_url}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(store) -> Iterator[str]:
    """`mlflow ui` on loopback over the store; always terminated (its whole process group)."""
    port = _free_port()
    log_path = Path(store["root"]) / "mlflow-ui.log"
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store["uri"],
                                 "--host", "127.0.0.1", "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow ui exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow ui not healthy after {SERVER_START_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)


@pytest.fixture
def driver(browser_paths):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = browser_paths
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000",
                "--disable-dev-shm-usage", "--lang=en-US"):
        options.add_argument(arg)
    # an explicit driver path: Selenium Manager never looks for (or downloads) one
    d = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        d.set_page_load_timeout(WAIT_S)
        d.set_script_timeout(WAIT_S)
        yield d
    finally:
        d.quit()


def _text(d) -> str:
    """The page's visible text; a runs table wider than the window is scrolled through, since the grid
    only renders the columns in view."""
    from selenium.webdriver.common.by import By

    texts = [d.find_element(By.TAG_NAME, "body").text]
    size = d.execute_script(f"const v = document.querySelector('{_HSCROLL}'); "
                            "return v ? [v.scrollWidth, v.clientWidth] : null;")
    if size and size[0] > size[1] > 0:
        for x in range(size[1] // 2, size[0], size[1] // 2)[:20]:
            d.execute_script(f"document.querySelector('{_HSCROLL}').scrollLeft = arguments[0];", x)
            time.sleep(0.2)  # the grid renders the newly visible columns
            texts.append(d.find_element(By.TAG_NAME, "body").text)
        d.execute_script(f"document.querySelector('{_HSCROLL}').scrollLeft = 0;")
    return "\n".join(texts)


def _run_names(d) -> set[str]:
    """The run names visible in the runs table."""
    from selenium.webdriver.common.by import By

    return {el.text.strip() for el in d.find_elements(By.CSS_SELECTOR, "[col-id='attributes.`Run Name`'] a")}


def _wait_for_text(d, texts: list[str], shot: Path, run_names: list[str] = ()) -> str:
    """Wait (bounded) until every one of ``texts`` is visible on the page and every one of ``run_names``
    is a visible run name; on timeout keep a screenshot and say what is missing."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    def missing() -> list[str]:
        body, names = _text(d), _run_names(d)
        return [t for t in texts if t not in body] + [f"run {n!r}" for n in run_names if n not in names]

    try:
        WebDriverWait(d, WAIT_S, poll_frequency=0.5, ignored_exceptions=(Exception,)).until(lambda _: not missing())
    except TimeoutException:
        d.save_screenshot(str(shot))
        pytest.fail(f"not visible after {WAIT_S} s: {missing()} (screenshot {shot}); page text:\n{_text(d)[-3000:]}")
    return _text(d)


def _expand(d, run_id: str, shot: Path) -> None:
    """Click the expander of a parent run's row in the runs table."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    selector = f"[row-id='{run_id}'] [col-id='attributes.`Run Name`'] button"
    try:
        button = WebDriverWait(d, WAIT_S).until(ec.element_to_be_clickable((By.CSS_SELECTOR, selector)))
    except TimeoutException:
        d.save_screenshot(str(shot))
        pytest.fail(f"no expandable row for run {run_id} after {WAIT_S} s (screenshot {shot}):\n{_text(d)[-3000:]}")
    button.click()


def _tidy(d) -> None:
    """More room for the table: close the assistant panel and the shared-view banner, fold the sidebar."""
    from selenium.webdriver.common.by import By

    for component in ("mlflow.assistant.chat_panel.close", "mlflow.experiment_page.shared_view.dismiss",
                      "mlflow_header.toggle_sidebar_button"):
        for el in d.find_elements(By.CSS_SELECTOR, f"button[data-component-id='{component}']"):
            with contextlib.suppress(Exception):
                el.click()


def _screenshot(d, tmp_path: Path, name: str) -> Path:
    time.sleep(1.0)  # let the last layout pass (column widths) settle before the picture
    path = tmp_path / name
    d.save_screenshot(str(path))
    target = os.environ.get("UDPDIFF_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(target) / name)
    return path


def test_ablation_parent_shows_the_papers_table(server, store, driver, tmp_path):
    """Through the shared view linked from the ablation run (tag ``udpdiff.view_url``): its variant runs
    with their metric and override columns."""
    driver.get(f"{server}/{store['view_url']}")
    _expand(driver, store["ablation"], tmp_path / "ablation-failed.png")
    _tidy(driver)
    metric_names = sorted({k for m in VARIANT_METRICS.values() for k in m})
    text = _wait_for_text(driver, [*metric_names, "train.task_conditioning"], tmp_path / "ablation-failed.png",
                          run_names=[ABLATION_TITLE, *VARIANTS])
    assert "0.9254" in text and "embedding" in text  # the values are in the cells, not just the headers
    assert (_screenshot(driver, tmp_path, "mlflow-ablation.png")).stat().st_size > 10_000


def test_pipeline_parent_shows_its_stage_runs(server, store, driver, tmp_path):
    """Through the link on the pipeline run (tag ``udpdiff.view_url``): its stage runs."""
    driver.get(f"{server}/{store['pipeline_view_url']}")
    _expand(driver, store["pipeline"], tmp_path / "pipeline-failed.png")
    _tidy(driver)
    _wait_for_text(driver, [], tmp_path / "pipeline-failed.png", run_names=["make repro", *STAGES])
    assert (_screenshot(driver, tmp_path, "mlflow-pipeline.png")).stat().st_size > 10_000
