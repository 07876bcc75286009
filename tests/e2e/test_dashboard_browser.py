"""The dashboard in a real browser: Debian's Chromium driven by chromedriver (Selenium),
headless. Logs in with a token, loads every page, watches a deployment's progress arrive live
(server-sent events, no reload), rolls back through the confirmation, approves a promotion
gate, checks the audit verification, the phone width and that the console stays clean.
Screenshots go to ``.test-logs/dashboard/``."""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from castiron.ports import free_port
from testkit import wait_for

from .conftest import Project
from .servekit import serving, token

pytestmark = [pytest.mark.slow, pytest.mark.browser]

SCREENSHOTS = Path(__file__).resolve().parents[2] / ".test-logs" / "dashboard"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

SLOW_APP = textwrap.dedent(
    """
    import os, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    time.sleep(float(os.environ.get("START_DELAY", "0")))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = (os.environ.get("VERSION", "?") + "\\n").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
    """
)

SPEC = """
app: dash
image:
  context: ./app
  entrypoint: ["python3", "app.py"]
service:
  port: 8000
  replicas: 1
  health: {{http: /healthz, interval: 200ms, timeout: 2s, start_period: 30s}}
  env:
    VERSION: ${{VERSION:-one}}
    START_DELAY: ${{START_DELAY:-0}}
environments:
  staging:
    listen: 127.0.0.1:{staging}
    deploy_timeout: 30s
    drain_timeout: 1s
    keep_warm: 10m
    isolation: none
  production:
    listen: 127.0.0.1:{production}
    promote_from: staging
    deploy_timeout: 30s
    drain_timeout: 1s
    isolation: none
    policy:
      approvals: 1
"""


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A headless Chromium with a fresh profile (fails in CI when it is missing)."""
    if not (Path(CHROMIUM).exists() and shutil.which(CHROMEDRIVER)):
        pytest.skip("chromium and chromium-driver are not installed")
    monkeypatch.setenv("SE_OFFLINE", "true")  # the system chromedriver: never download one
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(
        options=options,
        service=Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "driver.log")),
    )
    driver.set_page_load_timeout(30)
    # After a click that navigates, look-ups wait for the next page rather than race it.
    driver.implicitly_wait(10)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def text(driver: Any, css: str) -> str:
    """The text of the element at ``css``; empty while the page that holds it is still
    loading (after a click that navigates, the old page may be gone and the new one not yet
    there), so that ``wait_for`` polls again instead of failing."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return str(driver.find_element(By.CSS_SELECTOR, css).text)
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def test_the_dashboard_in_chromium(make_project: Callable[..., Project], browser: Any) -> None:
    from selenium.webdriver.common.by import By

    project = make_project(replicas=1)
    (project.root / "app" / "app.py").write_text(SLOW_APP)
    project.root.joinpath("castiron.yaml").write_text(
        SPEC.format(staging=project.port, production=free_port())
    )
    project.bake("v1")
    first = project.deploy("v1", "one")
    project.bake("v2")
    ops = token(project, "ops", "admin")
    ci = token(project, "ci", "deployer")

    with serving(project, extra={"VERSION": "two", "START_DELAY": "3"}) as server:
        # Log in: an unknown token is refused, a real one opens a session.
        browser.get(server.url + "/")
        assert browser.current_url.startswith(server.url + "/login")
        browser.find_element(By.ID, "token").send_keys("cit_not-a-token")
        browser.find_element(By.ID, "login").click()
        wait_for(
            lambda: text(browser, "#login-error") == "unknown or revoked token",
            what="the login refusal",
        )
        browser.find_element(By.ID, "token").send_keys(ops)
        browser.find_element(By.ID, "login").click()
        wait_for(lambda: browser.find_elements(By.ID, "environments"), what="home page")
        rows = browser.find_elements(By.CSS_SELECTOR, "#environments tbody tr")
        assert [r.get_attribute("data-env") for r in rows] == ["staging"]
        assert first["release"] in rows[0].text and "ok 1/1" in rows[0].text
        shot(browser, "home")

        browser.get(server.url + "/environments/staging")
        assert text(browser, "#release") == first["release"]
        assert "yes" in text(browser, "#instances tbody")
        assert "e2e@test" in text(browser, "#history tbody")
        shot(browser, "environment")

        # A deployment's progress arrives live over server-sent events, without a reload.
        started = server.call(
            "POST", "/api/v1/environments/staging/deploy", ci, body={"image": "v2", "wait": False}
        )
        assert started.status == 202, started.text
        job = wait_for(
            lambda: server.call("GET", f"/api/v1/jobs/{started.json['id']}", ci).json[
                "deployment"
            ],
            what="the deployment to start",
        )
        browser.get(f"{server.url}/deployments/{job}")
        assert text(browser, "#outcome") == "running"
        before = len(browser.find_elements(By.CSS_SELECTOR, "#steps tbody tr"))
        browser.execute_script("window.stillTheSamePage = true;")
        wait_for(lambda: text(browser, "#outcome") == "succeeded", what="the live outcome")
        assert browser.execute_script("return window.stillTheSamePage === true;")
        assert browser.execute_script("return document.body.dataset.live;") == "done"
        after = browser.find_elements(By.CSS_SELECTOR, "#steps tbody tr")
        assert len(after) > before and after[-1].text.startswith(f"{len(after)} finish")
        shot(browser, "deployment-live")
        assert project.served() == "two"

        # Rollback asks for confirmation first.
        browser.get(server.url + "/environments/staging")
        browser.find_element(By.ID, "rollback").click()
        assert "Roll back staging?" in text(browser, "h1")
        shot(browser, "rollback-confirm")
        browser.find_element(By.ID, "confirm-rollback").click()
        wait_for(lambda: "/deployments/" in browser.current_url, what="the rollback page")
        wait_for(lambda: text(browser, "#outcome") == "succeeded", what="the rollback")
        assert project.served() == "one"
        assert "token:ops" in text(browser, "dl.facts")

        # Promotion gates: approve the candidate as this token's identity.
        browser.get(server.url + "/environments/production/gates")
        candidate = text(browser, "#candidate")
        assert "would refuse" in text(browser, "#gates")
        browser.find_element(By.ID, "approve").click()
        wait_for(lambda: "token:ops" in text(browser, "#approvals"), what="the approval")
        assert "passes" in text(browser, "#gates")
        shot(browser, "gates")
        gates = server.call("GET", "/api/v1/environments/production/gates", ci).json
        assert gates["candidate"]["release"] == candidate
        assert [a["actor"] for a in gates["approvals"]] == ["token:ops"]

        # The audit log with its verification, and a form without its CSRF token refused.
        browser.get(server.url + "/audit")
        assert text(browser, "#verify").startswith("chain verified:")
        assert "release.approve" in text(browser, "#audit")
        shot(browser, "audit")
        forged = browser.execute_script(
            "return fetch('/environments/staging/rollback', {method: 'POST'})"
            ".then(r => r.status);"
        )
        assert forged == 403
        assert project.served() == "one"

        # Usable on a phone: nothing wider than the screen but the tables' own scrollers.
        browser.set_window_size(390, 844)
        for path in ("/", "/environments/staging", "/audit"):
            browser.get(server.url + path)
            assert browser.execute_script(
                "return document.documentElement.scrollWidth <= window.innerWidth + 1;"
            ), path
            shot(browser, "phone" + path.replace("/", "-").rstrip("-"))

        # Only the forged request above may have failed.
        errors = [e for e in console_errors(browser) if "rollback - Failed to load" not in e]
        assert errors == []
