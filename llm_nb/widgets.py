"""The ipywidgets panel (``%llm_panel``, ``llm_nb.panel()``) for any front end: Lab, classic, VS Code.

Live status (a background thread polls the host and stops when the panel is
closed), a memory bar against the host's budget, load and unload controls, the
deployments with an Undeploy button that asks to be clicked twice, and a
small chat box that streams into the same conversation as ``%%llm_chat``; its
"JSON reply" box asks for a JSON object, or JSON valid against the schema typed
under it.

Long calls (a load, a reply) run on a thread of their own, so the kernel keeps
answering while they run. One panel per kernel polls: showing a new one closes
the ones before it, so a re-run cell does not leave a poller behind.
"""

from __future__ import annotations

import html
import json
import threading
import time
import weakref
from datetime import datetime

import ipywidgets as w

from .api import ChatReply, Session, Status
from .config import DEFAULT_MODEL, format_bytes
from .display import one_line
from .errors import InvalidRequest, LlmNbError
from .results import cache_cell, deployment_cells, deployment_wait, holders_text

_live_panels: weakref.WeakSet[Panel] = weakref.WeakSet()


class Panel(w.VBox):
    """The llm-nb panel. ``close()`` (or its Close button) stops its polling."""

    def __init__(self, session: Session, interval: float = 2.0, chat_refresh: float = 0.15, **kwargs):
        self.session = session
        self.interval = interval
        self.chat_refresh = chat_refresh
        self.polls = 0
        self.last_status: Status | None = None
        self._stop = threading.Event()
        self._rows_lock = threading.Lock()  # polls, actions and close() all touch the deployment rows
        self._chat_stop = threading.Event()
        self._reply: ChatReply | None = None
        self._poll_client = None

        self.header = w.HTML("<b>llm-nb</b> · connecting…")
        self.host_notice = w.HTML("")  # "started a new host: the previous one ... was killed by SIGKILL"
        self.memory = w.FloatProgress(value=0, min=0, max=1, description="memory", bar_style="success")
        self.memory_label = w.Label("")
        self.models = w.HTML("")
        self.deployments_title = w.HTML("")
        self.deployments = w.VBox([])  # a DeploymentRow per deployment, kept across polls
        self.deployment_rows: dict[str, DeploymentRow] = {}
        self.model_box = w.Combobox(
            value=session.current_model(),
            options=[DEFAULT_MODEL],
            placeholder="alias or path",
            description="model",
            ensure_option=False,
        )
        self.load_button = w.Button(description="Load", icon="play", tooltip="load the model, or attach to it")
        self.unload_button = w.Button(description="Unload", icon="stop", tooltip="give up this notebook's lease")
        self.force = w.Checkbox(value=False, description="force (for everyone)", indent=False)
        self.close_button = w.Button(description="Close", icon="times", tooltip="close the panel and stop polling")
        self.message = w.HTML("")
        self.prompt = w.Textarea(placeholder="Ask the model… (the conversation is shared with %%llm_chat)", rows=3)
        self.send_button = w.Button(description="Send", button_style="primary", icon="paper-plane")
        self.stop_button = w.Button(description="Stop", icon="stop", disabled=True, tooltip="stop the reply")
        self.new_chat = w.Checkbox(value=False, description="new conversation", indent=False)
        self.json_reply = w.Checkbox(value=False, description="JSON reply", indent=False)
        self.schema = w.Textarea(
            placeholder='JSON schema, e.g. {"type": "object", "properties": {"name": {"type": "string"}}} '
            "(empty: any JSON object)",
            rows=3,
            layout=w.Layout(display="none"),
        )
        self.parsed = None  # the last JSON reply, parsed and validated
        self.reply = w.HTML("")
        self.footer = w.HTML("")

        self.load_button.on_click(lambda _: self._in_thread(self._load))
        self.unload_button.on_click(lambda _: self._in_thread(self._unload))
        self.send_button.on_click(lambda _: self._in_thread(self._chat))
        self.stop_button.on_click(lambda _: self._chat_stop.set())
        self.close_button.on_click(lambda _: self.close())
        self.json_reply.observe(
            lambda change: setattr(self.schema.layout, "display", None if change["new"] else "none"), "value"
        )

        super().__init__(
            [
                self.header,
                self.host_notice,
                w.HBox([self.memory, self.memory_label]),
                self.models,
                self.deployments_title,
                self.deployments,
                w.HBox([self.model_box, self.load_button, self.unload_button, self.force, self.close_button]),
                self.message,
                self.prompt,
                w.HBox([self.send_button, self.stop_button, self.new_chat, self.json_reply]),
                self.schema,
                self.reply,
                self.footer,
            ],
            **kwargs,
        )
        for other in list(_live_panels):
            other.close()
        _live_panels.add(self)
        self._poller = threading.Thread(target=self._poll_forever, name="llm-nb-panel", daemon=True)
        self._poller.start()

    # --- lifecycle -------------------------------------------------------------------
    @property
    def polling(self) -> bool:
        return self._poller.is_alive()

    def close(self) -> None:
        with self._rows_lock:  # a poll in progress must not add a row after this
            self._stop.set()
        self._chat_stop.set()
        _live_panels.discard(self)
        _close_tree(self)

    def _in_thread(self, target) -> None:
        threading.Thread(target=self._guard(target), daemon=True).start()

    def _guard(self, target):
        def run() -> None:
            try:
                with self.session.notices_to(self._notice):  # "started a new host: ..." shows in the panel
                    target()
            except LlmNbError as exc:
                self._say(one_line(exc), error=True)
            except Exception as exc:  # a panel thread must report, never die silently
                self._say(f"{type(exc).__name__}: {exc}", error=True)

        return run

    def _notice(self, text: str) -> None:
        """What happened to the host (a new one was started, and how the previous one ended): stays in view."""
        stamp = datetime.now().strftime("%H:%M:%S")
        self.host_notice.value = f'<span style="color:var(--jp-warn-color1, #a60)">{stamp} · {html.escape(text)}</span>'

    def _say(self, text: str, error: bool = False) -> None:
        color = "var(--jp-error-color1, #c00)" if error else "inherit"
        self.message.value = f'<span style="color:{color}">{html.escape(text)}</span>'

    # --- status ------------------------------------------------------------------------
    def _poll_forever(self) -> None:
        from .client import Client

        # Its own client: status polls never share a connection with the user's calls, and never
        # start a host (a panel watching should not bring back a host that was stopped).
        self._poll_client = Client(self.session.connection, autostart=False, timeout=10, on_notice=self._notice)
        try:
            self.model_box.options = sorted({DEFAULT_MODEL, *self._poll_client.catalog()})
        except (LlmNbError, OSError):
            pass
        wait = 0.0
        while not self._stop.wait(wait):
            try:
                self.refresh()
                wait = self.interval
            except LlmNbError as exc:
                self.header.value = f"<b>llm-nb</b> · host not reachable: {html.escape(one_line(exc))}"
                wait = min(max(wait * 2, self.interval), 30.0)  # back off while the host is away

    def refresh(self) -> Status:
        """Ask the host now and redraw."""
        client = self._poll_client
        if client is None:
            from .client import Client

            client = self._poll_client = Client(
                self.session.connection, autostart=False, timeout=10, on_notice=self._notice
            )
        status = Status(client.status())
        self.polls += 1
        self.last_status = status
        self._render(status)
        return status

    def _render(self, status: Status) -> None:
        used, budget = status.get("used_bytes", 0), max(status.get("budget_bytes") or 1, 1)
        fraction = used / budget
        self.memory.max = budget
        self.memory.value = min(used, budget)
        self.memory.bar_style = "success" if fraction < 0.7 else "warning" if fraction < 0.9 else "danger"
        kind = str(status.get("budget_kind", "ram")).upper()
        self.memory_label.value = f"{format_bytes(used)} of {format_bytes(budget)} {kind} ({100 * fraction:.0f} %)"
        uptime = status.get("uptime") or 0
        self.header.value = (
            f"<b>llm-nb</b> · host pid {status.get('pid')} at {html.escape(str(status.get('url')))}"
            f" · up {uptime / 60:.0f} min · {datetime.now():%H:%M:%S}"
        )
        me = self.session.client.identity["id"]
        rows = []
        for m in status.get("models", []):
            holders = ", ".join(
                ("<b>this notebook</b>" if lease["client"].endswith(me) else html.escape(lease["name"]))
                for lease in m["leases"]
            )
            if m.get("holders"):  # a JupyterHub's shared host: other users are a count
                holders = html.escape(holders_text(m))
            state = html.escape(m["state"])
            if m.get("progress") and m["progress"].get("message"):
                state += f" ({html.escape(str(m['progress']['message']))})"
            rows.append(
                f"<tr><td>{html.escape(m['name'])}</td><td>{html.escape(m['backend'])}</td>"
                f"<td>{html.escape(str(m.get('device') or '—'))}</td><td>{state}</td>"
                f"<td>{format_bytes(m['memory_bytes'])}</td><td>{html.escape(cache_cell(m))}</td>"
                f"<td>{holders or '—'}</td><td>{m['in_flight']}</td></tr>"
            )
        if rows:
            self.models.value = (
                "<table><tr><th>model</th><th>backend</th><th>device</th><th>state</th><th>memory</th>"
                "<th>cache</th><th>held by</th><th>in flight</th></tr>" + "".join(rows) + "</table>"
            )
        else:
            self.models.value = "<i>no models loaded</i>"
        self._render_deployments(status.deployments)

    def _render_deployments(self, deployments: list[dict]) -> None:
        """Update the rows in place: a row being confirmed must survive the next poll."""
        with self._rows_lock:
            if self._stop.is_set():
                return
            for name in set(self.deployment_rows) - {d["name"] for d in deployments}:
                _close_tree(self.deployment_rows.pop(name))
            for dep in deployments:
                row = self.deployment_rows.get(dep["name"])
                if row is None:
                    row = self.deployment_rows[dep["name"]] = DeploymentRow(dep["name"], self._undeploy)
                row.show(dep)
            rows = tuple(self.deployment_rows[d["name"]] for d in deployments)
            if rows != self.deployments.children:
                self.deployments.children = rows
            self.deployments_title.value = "<b>deployments</b>" if rows else ""

    # --- actions -------------------------------------------------------------------------
    def _selected(self) -> str:
        return self.session.current_model((self.model_box.value or "").strip() or None)

    def _load(self) -> None:
        model = self._selected()
        self.load_button.disabled = True
        self._say(f"loading {model}…")
        started = time.monotonic()

        def progress(event: dict) -> None:
            self._say(f"loading {model}: {event.get('message') or ''} ({time.monotonic() - started:.0f} s)")

        try:
            result = self.session.load(model, on_progress=progress)
            self._say(result.summary)
        finally:
            self.load_button.disabled = False
        self._refresh_quietly()

    def _unload(self) -> None:
        model = self._selected()
        self._say(str(self.session.unload(model, force=self.force.value)))
        self._refresh_quietly()

    def _undeploy(self, row: DeploymentRow) -> None:
        def run() -> None:
            try:
                self._say(str(self.session.undeploy(row.deployment)))
            finally:
                row.undeploy_button.disabled = False  # for a refused undeploy; a done one's row goes
                self._refresh_quietly()

        self._in_thread(run)

    def _refresh_quietly(self) -> None:
        try:
            self.refresh()
        except LlmNbError:
            pass

    def _chat(self) -> None:
        prompt = self.prompt.value
        if not prompt.strip():
            self._say("write a message first", error=True)
            return
        schema = self._schema()
        self._chat_stop.clear()
        self.send_button.disabled = True
        self.stop_button.disabled = False
        self.reply.value = "<i>waiting for the first token…</i>"
        self.footer.value = ""
        try:
            reply = self._reply = self.session.stream(prompt, self._selected(), new=self.new_chat.value, schema=schema)
            self.new_chat.value = False
            last = 0.0
            for _ in reply:
                if self._chat_stop.is_set():
                    break
                now = time.monotonic()
                if now - last >= self.chat_refresh:  # a steady refresh, not one message per token
                    last = now
                    self._show_reply(reply.text + " ▌")
            reply.close()  # stops the generation on the host if the loop was broken off
            self._show_reply(reply.text)
            self.footer.value = f"<small>{html.escape(reply.footer())}</small>"
            if schema is not None and reply.finished:
                self.parsed = reply.parse()  # one that does not validate shows as the panel's error line
                self._show_reply(json.dumps(self.parsed, indent=2, ensure_ascii=False, default=str))
            self.prompt.value = ""
        finally:
            self.send_button.disabled = False
            self.stop_button.disabled = True
            self._reply = None

    def _schema(self) -> dict | str | None:
        """None (plain chat), "json" (any JSON object), or the JSON schema typed in the box."""
        if not self.json_reply.value:
            return None
        text = self.schema.value.strip()
        if not text:
            return "json"
        try:
            schema = json.loads(text)
        except ValueError as exc:
            raise InvalidRequest(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise InvalidRequest("a JSON schema is a JSON object: {...}")
        return schema

    def _show_reply(self, text: str) -> None:
        self.reply.value = f'<div style="white-space: pre-wrap">{html.escape(text)}</div>'


class DeploymentRow(w.HBox):
    """One deployment: its facts, and Undeploy, which a second click confirms (Cancel disarms it)."""

    def __init__(self, deployment: str, undeploy):
        self.deployment = deployment
        self._undeploy = undeploy
        self.facts = w.HTML("")
        self.undeploy_button = w.Button(
            description="Undeploy", icon="trash", tooltip=f"undeploy {deployment} (asks first)"
        )
        self.cancel_button = w.Button(description="Cancel", layout=w.Layout(display="none"))
        self.undeploy_button.on_click(lambda _: self._clicked())
        self.cancel_button.on_click(lambda _: self.disarm())
        super().__init__([self.facts, self.undeploy_button, self.cancel_button])

    @property
    def armed(self) -> bool:
        return self.cancel_button.layout.display != "none"

    def show(self, dep: dict) -> None:
        name, version, engine, replicas, memory, state, served = map(html.escape, deployment_cells(dep))
        facts = f"<b>{name}</b> {version} · {engine} · replicas {replicas} · {memory} · {state} · {served} served"
        if dep.get("failure"):
            facts += f' · <span style="color:var(--jp-error-color1, #c00)">{html.escape(dep["failure"])}</span>'
        if wait := deployment_wait(dep):
            facts += f' · <span class="llm-nb-wait">waits for Ray: {html.escape(wait)}</span>'
        self.facts.value = facts

    def _clicked(self) -> None:
        if not self.armed:
            self.undeploy_button.description = f"Confirm: undeploy {self.deployment}"
            self.undeploy_button.button_style = "danger"
            self.cancel_button.layout.display = None
            return
        self.disarm()
        self.undeploy_button.disabled = True  # while the host undeploys it
        self._undeploy(self)

    def disarm(self) -> None:
        self.undeploy_button.description = "Undeploy"
        self.undeploy_button.button_style = ""
        self.cancel_button.layout.display = "none"


def _close_tree(widget: w.Widget) -> None:
    """Close a widget, its children and their layout and style widgets.

    ``Widget.close()`` closes only the widget itself: the rest would stay registered in the
    kernel, and be closed later by ``__del__`` at whatever moment the garbage collector picks.
    """
    for child in getattr(widget, "children", ()):
        _close_tree(child)
    for part in (getattr(widget, "layout", None), getattr(widget, "style", None)):
        if isinstance(part, w.Widget):
            part.close()
    w.Widget.close(widget)
