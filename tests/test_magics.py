"""The magics and the Python API in an IPython InteractiveShell, against a real host."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
from IPython.core.displaypub import CapturingDisplayPublisher
from IPython.core.interactiveshell import InteractiveShell

from llm_nb.api import Session
from llm_nb.client import Client
from llm_nb.connection import pid_alive, read_connection
from llm_nb.display import reply_bundle
from llm_nb.magics import LlmMagics, interpolate

from .conftest import wait_for


# --- interpolation (no host) ---------------------------------------------------------------
class Obj:
    name = "Ada"


NS = {"x": 40, "items": [1, 2, 3], "table": {"key": "v", "n": 7}, "obj": Obj(), "city": "Oslo"}


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("What is {x} plus 2?", "What is 40 plus 2?"),
        ("{obj.name} lives in {city}", "Ada lives in Oslo"),
        ("first {items[0]}, last {items[-1]}", "first 1, last 3"),
        ("""{table["key"]} and {table['n']}""", "v and 7"),
        ("keep {{x}} as typed", "keep {x} as typed"),
        ("undefined {nope} and {obj.missing} and {items[9]}", "undefined {nope} and {obj.missing} and {items[9]}"),
        ("d = {'a': 1, 'b': {x}}", "d = {'a': 1, 'b': 40}"),
        ('{"json": {"nested": true}}', '{"json": {"nested": true}}'),
        ('print(f"{x + 1:>4} {len(items)}")', 'print(f"{x + 1:>4} {len(items)}")'),
        ("s = {1, 2} | set()", "s = {1, 2} | set()"),
        ("def f():\n    return {}\n", "def f():\n    return {}\n"),
        ("{len} is a builtin, not a variable", "{len} is a builtin, not a variable"),
    ],
)
def test_interpolation_replaces_only_variables_that_resolve(cell, expected):
    assert interpolate(cell, NS) == expected


def test_interpolation_never_runs_code():
    class Loud:
        def __getitem__(self, key):
            raise RuntimeError("boom")

    assert interpolate("{loud[0]} {__import__('os')}", {"loud": Loud()}) == "{loud[0]} {__import__('os')}"


def test_reply_bundle_has_plain_and_markdown_and_closes_open_fences():
    bundle = reply_bundle("```python\nprint(1)", "3 tokens", "markdown", streaming=True)
    assert set(bundle) == {"text/plain", "text/markdown"}
    assert bundle["text/markdown"].count("```") == 2  # the fence is closed before the footer
    assert reply_bundle("hi", "1 token", "text") == {"text/plain": "hi\n\n[1 token]"}
    assert reply_bundle("x = 1", "f", "code")["text/markdown"].startswith("```\nx = 1\n```")


# --- the shell ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shell() -> InteractiveShell:
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "llm_nb")
    return ip


@pytest.fixture
def outputs(shell) -> CapturingDisplayPublisher:
    """What the magics display, updates included."""
    saved = shell.display_pub
    shell.display_pub = CapturingDisplayPublisher()
    yield shell.display_pub
    shell.display_pub = saved


def notebook_session(connection) -> Session:
    """A session that the host sees as a notebook of its own (the fixtures' clients share this pid)."""
    session = Session(str(connection))
    tag = uuid.uuid4().hex[:8]
    session.client.identity.update(id=f"test-notebook:{tag}", name=f"magics test {tag}")
    return session


def use_magics(shell, connection, live: str = "display", **traits) -> LlmMagics:
    magics = LlmMagics(shell, session=notebook_session(connection))
    magics.live = live
    for key, value in traits.items():
        setattr(magics, key, value)
    shell.register_magics(magics)
    return magics


@pytest.fixture
def magics(shell, shared_host) -> LlmMagics:
    return use_magics(shell, shared_host.connection_file)


def test_load_ext_registers_every_magic_with_help(shell, capsys):
    line_magics = shell.magics_manager.magics["line"]
    assert {"llm_load", "llm_unload", "llm_status", "llm_history", "llm_panel"} <= set(line_magics)
    assert "llm_chat" in shell.magics_manager.magics["cell"]
    for magic in ("llm_load", "llm_unload", "llm_status", "llm_history", "llm_panel"):
        shell.run_line_magic(magic, "--help")
        assert f"%{magic}" in capsys.readouterr().out
    shell.run_cell_magic("llm_chat", "--help", "unused")
    out = capsys.readouterr().out
    assert "--max-tokens" in out and "-o VAR" in out and "--new" in out


def test_bad_options_are_one_usage_line(shell, magics, capsys):
    result = shell.run_cell("%%llm_chat --format fancy\nhi")
    assert "invalid choice" in capsys.readouterr().err
    assert result.error_in_exec is not None and "Traceback" not in str(result.error_in_exec)
    shell.run_cell("%%llm_chat -o 2bad\nhi")
    assert "-o takes a variable name" in capsys.readouterr().err


def test_user_errors_print_one_line_without_traceback(shell, magics, capsys):
    shell.run_cell("%llm_load /nowhere/model.gguf")
    captured = capsys.readouterr()
    err_lines = captured.err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("llm-nb: no model '/nowhere/model.gguf'")
    assert "Traceback" not in captured.out + captured.err
    shell.run_cell("%%llm_chat\n   \n")
    assert capsys.readouterr().err.strip() == "llm-nb: the message is empty: write what to ask the model"


def test_load_attaches_and_says_so(shell, magics, outputs, shared_host):
    shell.run_line_magic("llm_load", "smollm2")
    line = outputs.outputs[-1]["data"]["text/plain"]
    assert line.startswith("smollm2 · llamacpp · cpu · ") and "MiB" in line
    assert "attached in" in line and "already loaded for 1 other notebook" in line  # the fixture's own lease
    status = shared_host.client().status()
    assert len(status["models"]) == 1 and len(status["models"][0]["leases"]) == 2


def test_chat_streams_into_one_display_at_a_steady_rate(shell, magics, outputs):
    magics.refresh_interval = 0.3
    shell.user_ns["topic"] = "the sea"
    shell.run_cell("%%llm_chat --max-tokens 48 --temperature 0 -o reply\nWrite a short poem about {topic}.")
    first, *rest = outputs.outputs
    display_id = first["transient"]["display_id"]
    assert not first["update"] and rest and all(o["update"] for o in rest)
    assert {o["transient"]["display_id"] for o in rest} == {display_id}
    final = rest[-1]["data"]
    reply = shell.user_ns["reply"]
    assert reply and final["text/markdown"].startswith(reply)
    footer = final["text/plain"].rsplit("[", 1)[1]
    assert "tokens" in footer and "first token" in footer and "tokens/s" in footer
    tokens = int(footer.split()[0])
    # Updates come at the refresh rate, not once per token: far fewer than the tokens.
    assert len(rest) < tokens, (len(rest), tokens)
    history = magics.session.history("smollm2")
    assert history[0] == {"role": "user", "content": "Write a short poem about the sea."}
    assert history[1] == {"role": "assistant", "content": reply}


def test_conversation_goes_on_until_new_and_history_clears(shell, magics, outputs, capsys):
    shell.run_cell("%%llm_chat --max-tokens 8 --temperature 0 --system 'Answer in one word.'\nName a colour.")
    shell.run_cell("%%llm_chat --max-tokens 8 --temperature 0\nAnother one?")
    history = magics.session.history()
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user", "assistant"]
    shell.run_cell("%llm_history")
    shown = outputs.outputs[-1]["data"]
    assert "Another one?" in shown["text/plain"] and "**assistant**" in shown["text/markdown"]
    shell.run_cell("%%llm_chat --new --max-tokens 8 --temperature 0\nName a fruit.")
    assert [m["role"] for m in magics.session.history()] == ["user", "assistant"]
    shell.run_cell("%llm_history --clear")
    assert magics.session.history() == []
    assert "forgot every conversation" in capsys.readouterr().out


def test_format_text_and_terminal_mode(shell, shared_host, outputs, capsys):
    use_magics(shell, shared_host.connection_file, live="display", format="text")
    shell.run_cell("%%llm_chat --max-tokens 8 --temperature 0\nSay hi.")
    assert set(outputs.outputs[-1]["data"]) == {"text/plain"}
    magics = use_magics(shell, shared_host.connection_file, live="terminal")
    count = len(outputs.outputs)
    shell.run_cell("%%llm_chat --max-tokens 8 --temperature 0 -o said\nSay hi.")
    out = capsys.readouterr().out
    assert len(outputs.outputs) == count  # a terminal gets text, not display updates
    assert shell.user_ns["said"] in out and "tokens" in out.splitlines()[-1]
    assert magics.session.history()[-1]["content"] == shell.user_ns["said"]


def test_status_table_and_unload(shell, shared_host, outputs, capsys):
    magics = use_magics(shell, shared_host.connection_file)
    shell.run_line_magic("llm_load", "")
    shell.run_line_magic("llm_status", "")
    shown = outputs.outputs[-1]["data"]
    assert "smollm2" in shown["text/plain"] and "HELD BY" in shown["text/plain"]
    assert shown["text/markdown"].startswith("| model |") and "budget:" in shown["text/markdown"]
    me = magics.session.client.identity["name"]
    assert me in shown["text/plain"]
    others = len(shared_host.client().status()["models"][0]["leases"]) - 1  # earlier tests' notebooks hold it too
    assert others >= 1
    shell.run_line_magic("llm_unload", "")
    assert f"smollm2: released; {others} other notebook" in capsys.readouterr().out
    leases = shared_host.client().status()["models"][0]["leases"]
    assert me not in [lease["name"] for lease in leases]
    shell.run_line_magic("llm_unload", "--all")
    assert "this notebook holds no models" in capsys.readouterr().out


@pytest.fixture
def interruptible():
    """SIGINT raises KeyboardInterrupt here, as in a kernel running a cell.

    A process started in the background by a shell without job control (``make test &``)
    inherits SIGINT ignored, and Python keeps it ignored: an interrupt would then never arrive.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_interrupt_stops_generation_and_keeps_partial_reply(shell, shared_host, outputs, capsys, interruptible):
    magics = use_magics(shell, shared_host.connection_file)
    observer = shared_host.client()

    def smollm2_in_flight() -> int:
        return next(m for m in observer.status()["models"] if m["name"] == "smollm2")["in_flight"]

    def interrupt_when_streaming() -> None:
        # Tokens have arrived once the display was updated after its first showing.
        wait_for(lambda: len(outputs.outputs) >= 2, 60, 0.02, "the first tokens")
        assert smollm2_in_flight() == 1
        os.kill(os.getpid(), signal.SIGINT)  # what a kernel interrupt does

    thread = threading.Thread(target=interrupt_when_streaming)
    thread.start()
    try:
        # Greedy, so that the reply is long (500+ tokens) on every run; sampled, it can be one line.
        result = shell.run_cell(
            "%%llm_chat --max-tokens 2000 --temperature 0 -o partial\nWrite a very long essay about rivers."
        )
    finally:
        thread.join()
    interrupted = time.monotonic()
    assert type(result.error_in_exec).__name__ == "ChatInterrupted", result.error_in_exec
    wait_for(lambda: smollm2_in_flight() == 0, 1.0, 0.02, "the host to cancel")
    assert time.monotonic() - interrupted < 1.0
    partial = shell.user_ns["partial"]
    assert partial and magics.session.history()[-1] == {"role": "assistant", "content": partial}
    final = outputs.outputs[-1]["data"]["text/plain"]
    assert "interrupted" in final and final.startswith(partial)
    assert "stopped on the host" in capsys.readouterr().out  # one line, no traceback
    # The conversation goes on after an interrupt.
    shell.run_cell("%%llm_chat --max-tokens 4 --temperature 0\nStop.")
    assert len(magics.session.history()) == 4


def test_magic_restarts_a_host_that_died(shell, host, outputs, capsys):
    magics = use_magics(shell, host.connection_file)
    shell.run_line_magic("llm_load", "")
    old_pid = host.process.pid
    host.process.kill()
    host.process.wait(10)
    new_pid = None
    try:
        shell.run_cell("%%llm_chat --max-tokens 8 --temperature 0 -o after\nSay hi.")
        err = capsys.readouterr().err
        assert shell.user_ns["after"]
        new_pid = read_connection(host.connection_file)["pid"]
        assert new_pid != old_pid
        # One line says that a host was started, and why (this test's host was started without a launcher).
        assert err.splitlines() == [
            f"llm-nb: started a new host (pid {new_pid}): the previous one (pid {old_pid}) is gone "
            "(how it ended was not recorded)"
        ]
        status = Client(host.connection_file, autostart=False).status()
        assert [m["name"] for m in status["models"]] == ["smollm2"]  # loaded again, for this chat
        assert magics.session.history()[-1]["content"] == shell.user_ns["after"]
    finally:
        info = read_connection(host.connection_file)
        if info and info["pid"] != old_pid:  # the client started it detached: stop it here
            Client(host.connection_file, autostart=False).shutdown()
            wait_for(lambda: not pid_alive(info["pid"]), 20, 0.1, "the restarted host to stop")


# --- the Python API ------------------------------------------------------------------------------
def test_python_api_load_chat_stream_history_unload(shared_host):
    session = notebook_session(shared_host.connection_file)
    result = session.load()
    assert result["attached"] and "smollm2" in str(result)
    text = session.chat("Say hello.", max_tokens=8, temperature=0)
    assert isinstance(text, str) and text
    chunks = list(session.chat("Again.", stream=True, max_tokens=8, temperature=0))
    assert len(chunks) > 1
    assert [m["role"] for m in session.history()] == ["user", "assistant"] * 2
    assert session.history()[-1]["content"] == "".join(chunks)
    alone = session.chat("Unrelated.", keep=False, max_tokens=4)
    assert alone and len(session.history()) == 4
    # Closing a stream early stops it and keeps what came.
    stream = session.chat("Tell me a long story about a cat.", stream=True, max_tokens=200, temperature=0)
    first = next(stream)
    stream.close()
    assert session.history()[-1] == {"role": "assistant", "content": first}
    status = session.status()
    assert status.model("smollm2")["leases"] and "| smollm2 |" in status._repr_markdown_()
    assert not session.unload()["unloaded"]  # the fixture still holds it


def test_module_level_api_is_lazy_and_shared():
    code = (
        "import sys, llm_nb\n"
        "assert 'llm_nb.api' not in sys.modules\n"
        "assert callable(llm_nb.chat) and llm_nb.default_session() is llm_nb.default_session()\n"
        "from llm_nb.magics import LlmMagics\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "ip = InteractiveShell.instance(); ip.run_line_magic('load_ext', 'llm_nb')\n"
        "m = next(m for m in ip.magics_manager.registry.values() if isinstance(m, LlmMagics))\n"
        "assert m.session is llm_nb.default_session()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_importing_the_kernel_side_loads_no_model_library():
    code = (
        "import sys, llm_nb, llm_nb.client, llm_nb.magics, llm_nb.api\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "InteractiveShell.instance().run_line_magic('load_ext', 'llm_nb')\n"
        "heavy = {'torch', 'transformers', 'llama_cpp', 'ipywidgets', 'llm_nb.host', 'llm_nb.backends'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]"
    bare = subprocess.run(
        [sys.executable, "-c", "import sys, llm_nb; print(sorted({'aiohttp', 'ipywidgets'} & set(sys.modules)))"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bare.stdout.strip() == "[]"


# --- the panel ------------------------------------------------------------------------------------
def test_panel_polls_status_loads_chats_and_stops_when_closed(shared_host):
    from ipywidgets.widgets.widget import _instances as registered_widgets

    from llm_nb.widgets import Panel

    before = set(registered_widgets)
    session = notebook_session(shared_host.connection_file)
    panel = Panel(session, interval=0.2, chat_refresh=0.1)
    try:
        wait_for(lambda: panel.polls >= 2, 20, 0.05, "the panel to poll")
        assert "smollm2" in panel.models.value and panel.memory.value > 0 and panel.memory.max > panel.memory.value
        assert "%" in panel.memory_label.value and "smollm2" in panel.model_box.options
        panel.load_button.click()  # runs on a thread; the kernel stays free
        wait_for(lambda: "this notebook" in panel.models.value, 30, 0.1, "the panel's lease to show")
        assert "attached" in panel.message.value
        panel.prompt.value = "Say hi."
        panel.send_button.click()
        wait_for(lambda: "tokens" in panel.footer.value, 60, 0.1, "the panel's reply")
        assert session.history()[-1]["role"] == "assistant"
        assert session.history()[-1]["content"] in panel.reply.value or "&" in panel.reply.value
        panel.unload_button.click()
        wait_for(lambda: "this notebook" not in panel.models.value, 30, 0.1, "the lease to go")
        replacement = Panel(session, interval=0.2)  # a new panel closes the old one's poller
        wait_for(lambda: not panel.polling, 5, 0.05, "the old panel to stop polling")
        replacement.close()
        wait_for(lambda: not replacement.polling, 5, 0.05, "the closed panel to stop polling")
    finally:
        panel.close()
    # Closing gives back every widget it made, layouts and styles included.
    assert set(registered_widgets) - before == set()


def test_panel_lists_deployments_and_undeploys_on_a_confirmed_second_click(shared_host, tmp_path):
    from ipywidgets.widgets.widget import _instances as registered_widgets

    from llm_nb.widgets import Panel

    from .test_deployments import make_deployment

    client = shared_host.client()
    client.deploy("panel-echo", make_deployment(tmp_path / "panel-echo"))
    before = set(registered_widgets)
    panel = Panel(notebook_session(shared_host.connection_file), interval=0.2)
    try:
        wait_for(lambda: "panel-echo" in panel.deployment_rows, 20, 0.05, "the deployment's row")
        row = panel.deployment_rows["panel-echo"]
        assert "deployments" in panel.deployments_title.value
        for fact in ("<b>panel-echo</b> v1", "local", "replicas 1/1", "MiB", "ready", "0 served"):
            assert fact in row.facts.value, row.facts.value

        row.undeploy_button.click()  # the first click only asks
        assert row.armed and "Confirm" in row.undeploy_button.description
        polls = panel.polls
        wait_for(lambda: panel.polls >= polls + 2, 10, 0.05, "two more polls")
        assert panel.deployment_rows["panel-echo"] is row and row.armed, "a poll keeps the question open"
        row.cancel_button.click()
        assert not row.armed and client.deployments() != []

        row.undeploy_button.click()
        row.undeploy_button.click()
        wait_for(lambda: "panel-echo" not in panel.deployment_rows, 30, 0.1, "the row to go")
        assert client.deployments() == [] and "undeployed v1" in panel.message.value
        assert panel.deployments.children == () and panel.deployments_title.value == ""
    finally:
        panel.close()
        if client.deployments():
            client.undeploy("panel-echo")
    assert set(registered_widgets) - before == set()
