"""The LLM side panel in a real browser: Debian's chromium, driven by Playwright, on a real ``jupyter lab``.

A notebook loads a model with the magics; the panel shows it with that
notebook as holder; the playground streams a reply; a force-unload from the
panel (after its confirmation) makes the notebook's next ``%%llm_chat`` say
that the model is gone. A deployment shows in a section of its own and is
undeployed from there, after its confirmation. Screenshots of the panel go to
``.artifacts/``.

Needs ``apt-get install chromium`` and ``pip install playwright`` (never
``playwright install``: the browser is Debian's).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import requests

from .jupyter_servers import RunningJupyter, start_jupyter, wait_until, write_notebook

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

CHROMIUM = Path(os.environ.get("LLM_NB_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / ".artifacts"
MODEL_S = 120_000  # ms: loading on a busy 2-core machine
UI_S = 30_000


def _missing(reason: str) -> None:
    # On CI a missing browser is a broken install, not a reason to skip.
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> RunningJupyter:
    tmp = tmp_path_factory.mktemp("lab")
    # No "would you like news?" toast over the panel.
    settings = tmp / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    server = start_jupyter(tmp, "lab", "--LabApp.expose_app_in_browser=True")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        _missing(f"no chromium at {CHROMIUM}: apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed: pip install playwright")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_notebook(browser, lab: RunningJupyter, name: str):
    write_notebook(lab.root / name)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(UI_S)
    page.goto(f"{lab.url}/lab/tree/{name}?token={lab.token}")
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=MODEL_S)
    return page


def run_cell(page, source: str, index: int) -> str:
    """Type ``source`` into cell ``index`` (adding it if needed), run it, and return its output text."""
    cells = page.locator(".jp-Notebook .jp-Cell")
    if cells.count() <= index:
        page.locator(".jp-Notebook").click()
        page.keyboard.press("Escape")
        page.keyboard.press("b")  # insert a cell below, as a person would
        cells.nth(index).wait_for()
    cell = cells.nth(index)
    editor = cell.locator(".cm-content")
    editor.click()
    page.keyboard.type(source)  # key by key: CodeMirror must see the edit before the cell runs
    _wait_on_cell(page, cell, lambda: editor.inner_text().split() == source.split(), UI_S, "the editor to hold it")
    prompt = cell.locator(".jp-InputPrompt")
    # A page that is still settling (layout restored, kernel just connected) can move the
    # focus and swallow a keypress; a person would try again, then use the toolbar's Run
    # button. "[*]:" means it is queued or running.
    run_button = page.locator('.jp-NotebookPanel-toolbar [data-command="notebook:run-cell-and-select-next"]')
    for attempt in range(3):
        if attempt < 2:
            page.keyboard.press("Shift+Enter")
        else:
            run_button.click()
        try:
            wait_until(lambda: prompt.inner_text().strip() not in ("", "[ ]:"), 10, message="the cell to start")
            break
        except AssertionError:
            print(f"cell {index} did not start after try {attempt + 1}: {_page_state(page, cell)}")
            editor.click()
    # "[n]:" when done.
    _wait_on_cell(page, cell, lambda: re.search(r"\[\d+\]", prompt.inner_text()), MODEL_S, "the cell to run")
    return cell.locator(".jp-OutputArea").inner_text()


def _wait_on_cell(page, cell, predicate, timeout_ms: float, message: str):
    """``wait_until``, and on a time-out say what the page showed then."""
    try:
        return wait_until(predicate, timeout_ms / 1000, message=message)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the page showed: {_page_state(page, cell)}") from None


def _page_state(page, cell) -> str:
    """What the page shows, for a failure message; a screenshot lands in ``.artifacts/``."""
    with contextlib.suppress(Exception):
        shoot(page, "failure.png")
    texts = {
        "prompt": cell.locator(".jp-InputPrompt"),
        "editor": cell.locator(".cm-content"),
        "output": cell.locator(".jp-OutputArea"),
        "dialog": page.locator(".jp-Dialog"),
    }
    parts = {}
    # A diagnostic must not hide the real failure: anything it cannot read, it names.
    try:
        parts["kernel"] = page.locator(".jp-Notebook-ExecutionIndicator").first.get_attribute(
            "data-status", timeout=1000
        )
    except Exception as exc:  # noqa: BLE001
        parts["kernel"] = f"<{type(exc).__name__}>"
    for name, locator in texts.items():
        try:
            if locator.count():
                parts[name] = locator.first.inner_text(timeout=1000)[-500:]
        except Exception as exc:  # noqa: BLE001
            parts[name] = f"<{type(exc).__name__}>"
    return "; ".join(f"{k}={v!r}" for k, v in parts.items())


def show_panel(page):
    tab = page.locator('.jp-SideBar [data-id="llm-nb-panel"]')
    tab.wait_for()
    header = page.locator("#llm-nb-panel .jp-LlmNb-header")
    deadline = time.monotonic() + UI_S / 1000
    # JupyterLab restores the last layout as it starts, and may open the panel itself a moment
    # after the tab shows: a click then would close it. Click only while the tab is not current.
    while not header.is_visible():
        assert time.monotonic() < deadline, "the LLM panel did not open"
        if "lm-mod-current" not in (tab.get_attribute("class") or ""):
            tab.click()
        page.wait_for_timeout(300)
    return page.locator("#llm-nb-panel")


def shoot(locator, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    locator.screenshot(path=str(path))
    return path


def test_panel_shows_the_notebook_as_holder_chats_and_force_unloads(lab, browser):
    page = open_notebook(browser, lab, "holder.ipynb")
    try:
        out = run_cell(page, "%load_ext llm_nb\n%llm_load smollm2", 0)
        assert "smollm2" in out, out

        panel = show_panel(page)
        card = panel.locator('.jp-LlmNb-model[data-model="smollm2"]')
        card.locator(".jp-LlmNb-holder", has_text="holder.ipynb").wait_for()
        assert card.locator(".jp-LlmNb-state").inner_text() in ("ready", "idle")
        facts = card.locator(".jp-LlmNb-modelFacts").inner_text()
        assert "llamacpp" in facts and "cpu" in facts and "MiB" in facts
        assert "RAM budget" in panel.locator(".jp-LlmNb-budgetLabel").inner_text()
        shoot(panel, "panel-holder.png")

        # The playground streams a reply from the model the notebook loaded.
        panel.get_by_label("Chat message").fill("Name one colour.")
        panel.get_by_label("Chat message").press("Enter")
        panel.locator(".jp-LlmNb-chat button", has_text="Stop").wait_for()
        panel.locator(".jp-LlmNb-chat button", has_text="Send").wait_for(timeout=MODEL_S)
        reply = panel.locator(".jp-LlmNb-turn-assistant").last
        assert reply.inner_text().strip() not in ("", "…")
        assert "jp-mod-error" not in (reply.get_attribute("class") or "")
        # The model's conversation cache, updated after the chat: entries, bytes of its cap, hit rate.
        cache = card.locator(".jp-LlmNb-cache", has_text="hits")
        cache.wait_for(timeout=MODEL_S)
        assert re.search(r"cache \d+ · .* of .*MiB · \d+% hits", cache.inner_text()), cache.inner_text()
        shoot(panel, "panel-chat.png")

        # Ticked "JSON" with a schema, the reply is JSON of that shape (decoding is constrained on the host).
        panel.get_by_label("JSON reply").check()
        schema = {
            "type": "object",
            "properties": {"colour": {"enum": ["red", "green", "blue"]}},
            "required": ["colour"],
        }
        panel.get_by_label("JSON schema").fill(json.dumps(schema))
        turns = panel.locator(".jp-LlmNb-turn-assistant").count()
        panel.get_by_label("Chat message").fill("Name one colour, as JSON.")
        panel.get_by_label("Chat message").press("Enter")
        deadline = time.monotonic() + MODEL_S / 1000
        answer = None
        while answer is None and time.monotonic() < deadline:
            if panel.locator(".jp-LlmNb-turn-assistant").count() > turns:
                with contextlib.suppress(ValueError):
                    answer = json.loads(panel.locator(".jp-LlmNb-turn-assistant").last.inner_text())
            time.sleep(0.2)
        assert isinstance(answer, dict) and answer["colour"] in ("red", "green", "blue"), answer
        shoot(panel, "panel-chat-json.png")

        # Force unload asks first, naming the notebook that holds the model.
        card.locator("button", has_text="Force unload").click()
        dialog = page.locator(".jp-Dialog")
        dialog.wait_for()
        assert "holder.ipynb" in dialog.inner_text()
        shoot(page, "panel-force-unload-dialog.png")
        dialog.locator("button", has_text="Force unload").click()
        card.wait_for(state="detached", timeout=MODEL_S)
        panel.locator(".jp-LlmNb-note", has_text="No model is loaded").wait_for()
        shoot(panel, "panel-unloaded.png")

        # The notebook's next call says plainly that the model is gone.
        out = run_cell(page, "%%llm_chat smollm2\nSay hello.", 1)
        assert "smollm2" in out and re.search(r"not loaded|unloaded|is gone|load it", out, re.I), out
    except AssertionError:
        print(f"--- end of {lab.log_path.name}:\n{lab.log()[-4000:]}")  # shown by pytest on failure
        raise
    finally:
        page.close()


def unload_everything(lab: RunningJupyter) -> None:
    for model in lab.snapshot()["models"]:
        lab.api().post(lab.llm("models/unload"), json={"model": model["name"], "force": True}, timeout=60)


def test_panel_loads_and_unloads_by_itself_in_the_dark_theme(lab, browser):
    unload_everything(lab)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(UI_S)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    try:
        page.goto(f"{lab.url}/lab?token={lab.token}")
        panel = show_panel(page)
        page.evaluate("window.jupyterapp.commands.execute('apputils:change-theme', {theme: 'JupyterLab Dark'})")
        page.wait_for_function("document.body.dataset.jpThemeLight === 'false'")

        panel.get_by_label("Model to load").select_option("smollm2")
        panel.locator("button[type=submit]", has_text="Load").click()
        card = panel.locator('.jp-LlmNb-model[data-model="smollm2"]')
        card.locator(".jp-LlmNb-state", has_text=re.compile("ready|idle")).wait_for(timeout=MODEL_S)
        card.locator(".jp-LlmNb-holders", has_text="Held by this panel").wait_for()
        shoot(panel, "panel-dark.png")

        # Nobody else holds it: a plain unload frees it at once, with no dialog.
        card.locator("button", has_text=re.compile(r"^Unload$")).click()
        card.wait_for(state="detached", timeout=MODEL_S)
        assert page.locator(".jp-Dialog").count() == 0

        # The command palette has the panel's commands.
        page.keyboard.press("Control+Shift+C")
        page.keyboard.type("force-unload")
        page.locator(".lm-CommandPalette-item", has_text="Force-Unload a Model").wait_for()
        page.keyboard.press("Escape")

        # A host that crashes is restarted, and the panel says so.
        os.kill(lab.host_pid(), signal.SIGKILL)
        alert = panel.locator(".jp-LlmNb-alert", has_text="was killed by SIGKILL")
        alert.wait_for(timeout=MODEL_S)
        wait_until(lambda: lab.snapshot()["host"]["state"] == "running", 60, message="the restarted host")
        alert.locator("text=was restarted").wait_for()
        page.locator(".jp-toast-message", has_text="model host was killed by SIGKILL").wait_for()
        shoot(panel, "panel-host-restarted.png")
        ours = [e for e in errors if "llm-nb" in e or "LlmNb" in e or "llm_nb" in e]
        assert not ours, ours
    finally:
        page.evaluate("window.jupyterapp.commands.execute('apputils:change-theme', {theme: 'JupyterLab Light'})")
        page.close()


def test_panel_lists_a_deployment_and_undeploys_it_after_confirming(lab, browser, tmp_path):
    from llm_nb.client import Client

    from .test_deployments import make_deployment

    api = lab.api()
    api.post(lab.llm("host"), json={"action": "start"}, timeout=60).raise_for_status()
    host = Client(lab.runtime_dir / f"llm-nb-host-{lab.process.pid}.json", autostart=False)
    host.deploy("panel-echo", make_deployment(tmp_path / "panel-echo"))
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(UI_S)
    try:
        # A request through the server's route to the deployment: the panel counts it.
        served = api.post(f"{lab.url}/llm-nb/models/panel-echo/", json={"user_prompt": "hi"}, timeout=30)
        assert served.status_code == 200 and served.json()["echo"] == {"user_prompt": "hi"}

        page.goto(f"{lab.url}/lab?token={lab.token}")
        panel = show_panel(page)
        section = panel.locator("section[aria-label='Deployments']")
        card = section.locator('.jp-LlmNb-deployment[data-deployment="panel-echo"]')
        card.locator(".jp-LlmNb-served", has_text="1 served").wait_for()
        assert card.locator(".jp-LlmNb-state").inner_text() == "ready"
        assert card.locator(".jp-LlmNb-engine").inner_text() == "local"
        facts = card.locator(".jp-LlmNb-modelFacts").inner_text()
        assert "v1" in facts and "1/1 replicas" in facts and "MiB" in facts, facts
        shoot(panel, "panel-deployment.png")

        # Undeploy asks first; Cancel leaves it serving.
        card.locator("button", has_text="Undeploy").click()
        dialog = page.locator(".jp-Dialog")
        dialog.wait_for()
        assert "Undeploy panel-echo?" in dialog.inner_text()
        shoot(page, "panel-undeploy-dialog.png")
        dialog.locator("button", has_text="Cancel").click()
        dialog.wait_for(state="detached")
        assert [d["name"] for d in host.deployments()] == ["panel-echo"]

        card.locator("button", has_text="Undeploy").click()
        dialog.locator("button", has_text="Undeploy").click()
        card.wait_for(state="detached", timeout=MODEL_S)
        section.locator(".jp-LlmNb-note", has_text="Nothing is deployed").wait_for()
        assert host.deployments() == []
        assert api.get(lab.llm("deployments"), timeout=30).json()["deployments"] == []
        gone = api.post(f"{lab.url}/llm-nb/models/panel-echo/", json={}, timeout=30)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    except AssertionError:
        print(f"--- end of {lab.log_path.name}:\n{lab.log()[-4000:]}")
        raise
    finally:
        page.close()
        if host.deployments():
            host.undeploy("panel-echo")


def test_the_panel_api_refuses_a_browser_without_the_token(lab, browser):
    # A fresh browser context has no login cookie: the same routes the panel uses are refused.
    context = browser.new_context()
    try:
        for path in ("status", "events", "catalog", "host", "deployments"):
            response = context.request.get(lab.llm(path))
            assert response.status == 403, path
        posted = context.request.post(lab.llm("models/load"), data={"model": "smollm2"})
        assert posted.status == 403
        assert context.request.post(lab.llm("deployments/undeploy"), data={"name": "x"}).status == 403
        assert context.request.post(f"{lab.url}/llm-nb/models/x/", data={}).status == 403
    finally:
        context.close()
    assert requests.get(lab.llm("status"), timeout=10).status_code == 403
