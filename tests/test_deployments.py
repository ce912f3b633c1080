"""Deployments: model.py + model.json in a worker of their own, served at /models/<name>/."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import psutil
import pytest
import requests

from llm_nb.errors import LlmNbError, ModelCrashed, ModelNotFound, PermissionDenied

ECHO = """
import asyncio, os
state = {}

async def init(model_meta=None, *args, **kwargs):
    state["meta"] = model_meta

async def predict(payload_dict: dict, **kwargs):
    await asyncio.sleep(float(payload_dict.get("sleep", 0)))
    if payload_dict.get("fail"):
        raise ValueError("asked to fail")
    if payload_dict.get("exit"):
        os._exit(1)
    return {"echo": payload_dict, "version": state["meta"].version, "pid": os.getpid()}

async def cleanup(model_meta=None, *args, **kwargs):
    open(os.path.join(model_meta.folder, "cleaned-up"), "w").write(model_meta.name)
"""


def make_deployment(folder: Path, code: str = ECHO, model_json: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(textwrap.dedent(code))
    if model_json is not None:
        (folder / "model.json").write_text(json.dumps(model_json))
    return folder


def auth(host) -> dict:
    return {"Authorization": f"Bearer {host.key}"}


def alive(pid: int) -> bool:
    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def test_deploy_serves_get_and_post_with_meta_and_undeploy_runs_cleanup(host, tmp_path):
    client = host.client()
    folder = make_deployment(tmp_path / "echo")
    events: list[dict] = []
    result = client.deploy("echo", folder, on_progress=events.append)
    assert result["deployment"]["state"] == "ready"
    assert any(e.get("stage") == "init" for e in events)
    url = f"{host.url}/models/echo/"

    answer = requests.post(url, json={"user_prompt": "hi"}, headers=auth(host), timeout=30).json()
    assert answer["echo"] == {"user_prompt": "hi"} and answer["version"] == 1
    assert answer["pid"] != host.process.pid, "model.py must run in a worker, never in the host"
    assert answer["pid"] in [c.pid for c in psutil.Process(host.process.pid).children()]
    by_get = requests.get(url.rstrip("/"), params={"user_prompt": "q"}, headers=auth(host), timeout=30).json()
    assert by_get["echo"] == {"user_prompt": "q"}

    meta = requests.get(url, params={"get_meta": "true"}, headers=auth(host), timeout=30).json()
    assert {"name", "version", "created", "model_json", "files", "state", "requests_served"} <= set(meta)
    assert (meta["name"], meta["version"], meta["state"], meta["requests_served"]) == ("echo", 1, "ready", 2)
    assert meta["max_concurrency"] == 8  # an async predict overlaps
    assert [d["name"] for d in client.deployments()] == ["echo"]

    undone = client.undeploy("echo")
    assert undone["undeployed"] is True
    assert (folder / "cleaned-up").read_text() == "echo"
    assert not alive(answer["pid"])
    gone = requests.post(url, json={}, headers=auth(host), timeout=30)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def test_model_json_copies_local_and_file_url_files_into_the_target_then_caches(host, tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "weights.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (data / "sub" / "vocab.txt").write_text("hello vocab")
    (tmp_path / "single.txt").write_text("one file")
    target = tmp_path / "cache"
    code = """
    import os
    files = {}
    async def init(model_meta=None, *args, **kwargs):
        for root, _, names in os.walk(model_meta.files_dir):
            for n in names:
                files[os.path.relpath(os.path.join(root, n), model_meta.files_dir)] = os.path.getsize(os.path.join(root, n))
    def predict(payload_dict, **kwargs):
        return files
    """
    folder = make_deployment(
        tmp_path / "dep",
        code,
        {"download_files_from": ["../data", (tmp_path / "single.txt").as_uri()], "download_files_to": str(target)},
    )
    client = host.client()
    events: list[dict] = []
    result = client.deploy("files", folder, on_progress=events.append)
    served = requests.post(f"{host.url}/models/files/", json={}, headers=auth(host), timeout=30).json()
    assert served == {"weights.bin": 3 * 1024 * 1024 + 17, "sub/vocab.txt": 11, "single.txt": 8}
    assert (target / "sub" / "vocab.txt").read_text() == "hello vocab"
    downloads = [e for e in events if e.get("stage") == "download" and e.get("total")]
    assert downloads and downloads[-1]["bytes"] == downloads[-1]["total"] == 3 * 1024 * 1024 + 17 + 11 + 8
    assert {f["path"] for f in result["deployment"]["files"]} == set(served)
    assert not any(f["cached"] for f in result["deployment"]["files"])

    again = client.deploy("files", folder)
    assert again["deployment"]["version"] == 2
    assert all(f["cached"] for f in again["deployment"]["files"]), "unchanged files are not copied twice"


def test_default_target_is_the_user_cache_dir(host_factory, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "f.txt").write_text("x")
    folder = make_deployment(
        tmp_path / "dep", "def predict(p, **kw):\n    return 1\n", {"download_files_from": "../data"}
    )
    cache = tmp_path / "xdg-cache"
    host = host_factory(XDG_CACHE_HOME=str(cache))  # the host's environment decides its cache dir
    meta = host.client().deploy("cached", folder)["deployment"]
    assert meta["files_dir"] == str(cache / "llm-nb" / "deployments" / "cached")
    assert (cache / "llm-nb" / "deployments" / "cached" / "f.txt").read_text() == "x"


class StaticServer:
    """aiohttp serving a folder (with index pages) on 127.0.0.1, in a thread, for fsspec's http.

    ``root`` None serves only ``extra_routes``; ``runner_options`` go to aiohttp's ``AppRunner``.
    """

    def __init__(self, root: Path | None, extra_routes=(), **runner_options):
        import asyncio

        from aiohttp import web

        self.loop = asyncio.new_event_loop()
        app = web.Application()
        for method, path, handler in extra_routes:
            app.router.add_route(method, path, handler)
        if root is not None:
            app.router.add_static("/files/", root, show_index=True)
        self.runner = web.AppRunner(app, **runner_options)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def static_server(tmp_path):
    servers = []

    def start(root: Path, extra_routes=()) -> StaticServer:
        server = StaticServer(root, extra_routes)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_http_download_from_a_local_static_server(host, tmp_path, static_server):
    root = tmp_path / "www"
    (root / "model").mkdir(parents=True)
    (root / "extra" / "nested").mkdir(parents=True)
    (root / "model" / "config.json").write_text('{"a": 1}')
    (root / "model" / "w.bin").write_bytes(b"\x00" * 200_000)
    (root / "extra" / "nested" / "tok en.txt").write_text("t")
    server = static_server(root)
    code = """
    from pathlib import Path
    async def init(model_meta=None, *a, **k):
        global cfg
        cfg = (Path(model_meta.files_dir) / "config.json").read_text()
    async def predict(payload_dict, **kwargs):
        return {"config": cfg}
    """
    # A folder through its index page, and a single file by its URL (its name unquoted).
    sources = [f"{server.url}/files/model/", f"{server.url}/files/extra/nested/tok%20en.txt"]
    folder = make_deployment(
        tmp_path / "dep", code, {"download_files_from": sources, "download_files_to": str(tmp_path / "got")}
    )
    meta = host.client().deploy("web", folder)["deployment"]
    assert sorted(f["path"] for f in meta["files"]) == ["config.json", "tok en.txt", "w.bin"]
    assert (tmp_path / "got" / "w.bin").stat().st_size == 200_000
    assert (tmp_path / "got" / "tok en.txt").read_text() == "t"
    assert requests.post(meta["api_url"], json={}, headers=auth(host), timeout=30).json() == {"config": '{"a": 1}'}


def test_paths_that_escape_the_target_are_refused(host, tmp_path, static_server):
    from aiohttp import web

    # An index page whose link, once unquoted, climbs out of the folder it describes.
    async def evil_index(request):
        return web.Response(
            text='<a href="ok.txt">ok</a> <a href="..%2F..%2Fescaped.txt">x</a>', content_type="text/html"
        )

    async def ok(request):
        return web.Response(text="fine")

    server = static_server(tmp_path, [("GET", "/evil/", evil_index), ("GET", "/evil/ok.txt", ok)])
    client = host.client()
    folder = make_deployment(
        tmp_path / "dep1",
        "def predict(p, **kw):\n    return 1\n",
        {"download_files_from": f"{server.url}/evil/", "download_files_to": str(tmp_path / "t1")},
    )
    with pytest.raises(PermissionDenied, match="outside the download folder"):
        client.deploy("evil", folder)

    # A symlink inside the target that points out of it.
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "t2"
    target.mkdir()
    (target / "sub").symlink_to(outside, target_is_directory=True)
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "f.txt").write_text("would land outside")
    folder = make_deployment(
        tmp_path / "dep2",
        "def predict(p, **kw):\n    return 1\n",
        {"download_files_from": "../src", "download_files_to": str(target)},
    )
    with pytest.raises(PermissionDenied):
        client.deploy("evil2", folder)
    assert list(outside.iterdir()) == []
    assert client.deployments() == []


def test_deploy_errors_say_what_to_do(host, tmp_path):
    client = host.client()
    with pytest.raises(ModelNotFound, match="no model.py"):
        client.deploy("x", tmp_path)
    folder = make_deployment(tmp_path / "ok")
    with pytest.raises(LlmNbError, match="name"):
        client.deploy("../bad", folder)
    (folder / "model.json").write_text("{not json")
    with pytest.raises(LlmNbError, match="not valid JSON"):
        client.deploy("x", folder)
    if importlib.util.find_spec("s3fs") is None:
        (folder / "model.json").write_text(json.dumps({"download_files_from": "s3://bucket/models/"}))
        with pytest.raises(LlmNbError, match="s3fs"):
            client.deploy("x", folder)
    (folder / "model.json").write_text(json.dumps({"download_files_from": str(tmp_path / "missing")}))
    with pytest.raises(ModelNotFound, match="does not exist"):
        client.deploy("x", folder)
    no_predict = make_deployment(tmp_path / "np", "async def init(model_meta=None):\n    pass\n")
    with pytest.raises(LlmNbError, match="predict"):
        client.deploy("np", no_predict)
    raising = make_deployment(
        tmp_path / "raise",
        "async def init(model_meta=None):\n    raise RuntimeError('no GPU here')\ndef predict(p):\n    return p\n",
    )
    with pytest.raises(LlmNbError, match=r"no GPU here.*model.py:2"):
        client.deploy("raise", raising)
    assert client.deployments() == [] and host.worker_pids() == []


def test_an_exception_in_predict_is_a_json_error_for_that_request_only(host, tmp_path):
    client = host.client()
    client.deploy("echo", make_deployment(tmp_path / "echo"))
    url = f"{host.url}/models/echo/"
    failed = requests.post(url, json={"fail": True}, headers=auth(host), timeout=30)
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert error["code"] == "predict_failed" and "ValueError: asked to fail" in error["message"]
    assert "model.py:" in error["message"]
    assert requests.post(url, json={"ok": 1}, headers=auth(host), timeout=30).json()["echo"] == {"ok": 1}
    meta = requests.get(url, params={"get_meta": "true"}, headers=auth(host), timeout=30).json()
    assert (meta["errors"], meta["requests_served"], meta["state"]) == (1, 1, "ready")
    bad_json = requests.post(url, data=b"{nope", headers=auth(host), timeout=30)
    assert bad_json.status_code == 400


def test_os_exit_in_init_fails_that_deploy_only(host, tmp_path):
    """#12: a deployment whose init() calls os._exit(1) leaves the host and other models alone."""
    client = host.client()
    client.load("smollm2")
    client.deploy("bystander", make_deployment(tmp_path / "bystander"))
    dying = make_deployment(
        tmp_path / "dying",
        "import os\nasync def init(model_meta=None, *a, **k):\n    print('bye')\n    os._exit(1)\ndef predict(p, **k):\n    return 1\n",
    )
    with pytest.raises(ModelCrashed) as caught:
        client.deploy("dying", dying)
    assert "exited with code 1" in str(caught.value) and "bye" in str(caught.value)
    assert host.process.poll() is None
    assert [d["name"] for d in client.deployments()] == ["bystander"]
    assert requests.post(f"{host.url}/models/bystander/", json={"a": 1}, headers=auth(host), timeout=30).ok
    assert client.chat("Say hi.", "smollm2", max_tokens=4)


def test_os_exit_in_predict_fails_that_deployment_only_and_a_redeploy_brings_it_back(host, tmp_path):
    """#12: os._exit(1) in predict costs that deployment; the host, other deployments and models go on."""
    client = host.client()
    client.load("smollm2")
    client.deploy("victim", make_deployment(tmp_path / "victim"))
    client.deploy("bystander", make_deployment(tmp_path / "bystander"))
    url = f"{host.url}/models/victim/"
    first_pid = requests.post(url, json={}, headers=auth(host), timeout=30).json()["pid"]

    crashed = requests.post(url, json={"exit": True}, headers=auth(host), timeout=30)
    assert crashed.status_code == 502
    assert (
        crashed.json()["error"]["code"] == "model_crashed"
        and "exited with code 1" in crashed.json()["error"]["message"]
    )
    again = requests.post(url, json={}, headers=auth(host), timeout=30)
    assert again.status_code == 502 and "deploy it again" in again.json()["error"]["message"]
    meta = requests.get(url, params={"get_meta": "true"}, headers=auth(host), timeout=30).json()
    assert meta["state"] == "failed" and "exited with code 1" in meta["failure"]

    assert host.process.poll() is None
    assert requests.post(f"{host.url}/models/bystander/", json={"b": 2}, headers=auth(host), timeout=30).json()[
        "echo"
    ] == {"b": 2}
    assert client.chat("Say hi.", "smollm2", max_tokens=4)

    client.deploy("victim", tmp_path / "victim")
    back = requests.post(url, json={}, headers=auth(host), timeout=30).json()
    assert back["version"] == 2 and back["pid"] != first_pid


def test_a_failed_redeploy_keeps_the_old_version_serving(host, tmp_path):
    client = host.client()
    folder = make_deployment(tmp_path / "echo")
    client.deploy("echo", folder)
    (folder / "model.py").write_text("raise SyntaxError('half-edited file')\n")
    with pytest.raises(LlmNbError, match="half-edited"):
        client.deploy("echo", folder)
    answer = requests.post(f"{host.url}/models/echo/", json={}, headers=auth(host), timeout=30).json()
    assert answer["version"] == 1
    make_deployment(folder)
    client.deploy("echo", folder)
    assert requests.post(f"{host.url}/models/echo/", json={}, headers=auth(host), timeout=30).json()["version"] == 2
    assert len(host.worker_pids()) == 1, "the old version's worker ends once the new one serves"


PRACTICUS_STYLE = """
# The Practicus AI sample's shape; only the SDK import differs (`from llm_nb.deployment import use_model`
# where the sample imports practicuscore), and init builds the generator from the host's SmolLM2.
from datetime import datetime
from llm_nb.deployment import use_model

generator = None

async def init(model_meta=None, *args, **kwargs):
    global generator
    if generator is not None:
        print("generator exists, using")
        return
    generator = use_model("smollm2", max_new_tokens=16, temperature=0)

async def cleanup(model_meta=None, *args, **kwargs):
    print("Cleaning up memory")
    global generator
    generator = None

async def predict(payload_dict: dict, **kwargs):
    start = datetime.now()
    sentence = payload_dict["user_prompt"]
    res = generator([sentence])
    text = res[0]
    total_time = (datetime.now() - start).total_seconds()
    return {"answer": f"Time:{total_time}\\nanswer:{text}", "text": text[0]["generated_text"]}
"""


def test_practicus_style_model_py_shares_the_loaded_smollm2_through_use_model(host, tmp_path):
    client = host.client()
    client.load("smollm2")
    (smollm2_worker,) = host.worker_pids()
    client.deploy("practicus", make_deployment(tmp_path / "practicus", PRACTICUS_STYLE))
    model = client.status()["models"][0]
    assert model["name"] == "smollm2"
    assert sorted(lease["name"] for lease in model["leases"]) == sorted(
        [client.identity["name"], "deployment practicus v1"]
    )
    assert len(host.worker_pids()) == 2  # smollm2 once, plus the deployment's own small worker
    assert smollm2_worker in host.worker_pids()

    answer = requests.post(
        f"{host.url}/models/practicus/", json={"user_prompt": "What is 2+2?"}, headers=auth(host), timeout=120
    ).json()
    assert answer["answer"].startswith("Time:") and answer["text"].strip()
    assert client.status()["models"][0]["requests_served"] >= 1

    client.undeploy("practicus")
    leases = client.status()["models"][0]["leases"]
    assert [lease["name"] for lease in leases] == [client.identity["name"]], "undeploy releases its lease"


def test_session_tokens_cannot_lease_models_for_a_deployment(host, tmp_path):
    client = host.client()
    client.deploy("echo", make_deployment(tmp_path / "echo"))
    token = client.session_token(["echo", "smollm2"])["token"]
    refused = requests.post(
        f"{host.url}/api/deployments/echo/use",
        json={"model": "smollm2"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert refused.status_code == 403


def test_python_api_and_cli_deploy_and_undeploy(host, tmp_path):
    import llm_nb

    folder = make_deployment(tmp_path / "echo")
    deployed = llm_nb.deploy("api-echo", folder, progress=False)
    assert deployed.api_url == f"{host.url}/models/api-echo/" and deployed.version == 1
    assert "api-echo v1 ready" in str(deployed)
    assert llm_nb.undeploy("api-echo")["undeployed"] is True

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "llm_nb.cli", *args], env=host.env, capture_output=True, text=True, timeout=120
        )

    done = cli("deploy", "cli-echo", str(folder))
    assert done.returncode == 0, done.stderr
    assert "cli-echo v1 ready at" in done.stdout
    assert requests.post(f"{host.url}/models/cli-echo/", json={"x": 1}, headers=auth(host), timeout=30).ok
    gone = cli("undeploy", "cli-echo")
    assert gone.returncode == 0 and "undeployed v1 after 1 requests" in gone.stdout
    missing = cli("undeploy", "cli-echo")
    assert missing.returncode == 1 and "no deployment 'cli-echo'" in missing.stderr


def test_stopping_the_host_runs_every_cleanup(host_factory, tmp_path):
    host = host_factory()
    folder = make_deployment(tmp_path / "echo")
    host.client().deploy("echo", folder)
    (worker,) = host.worker_pids()
    host.stop()
    assert (folder / "cleaned-up").read_text() == "echo"
    assert not alive(worker)


PIPELINE_STYLE = """
# The Practicus AI sample as it is, with a tiny random model that the test built (no hub).
from datetime import datetime
from transformers import AutoTokenizer, AutoModelForCausalLM, pipeline

generator = None

async def init(model_meta=None, *args, **kwargs):
    global generator
    if generator is not None:
        return
    model_cache = model_meta.files_dir
    def load_local_llm(model_path):
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path)
        model.to('cpu')
        return pipeline('text-generation', model=model, tokenizer=tokenizer, max_new_tokens=8)
    generator = load_local_llm(model_cache)

async def cleanup(model_meta=None, *args, **kwargs):
    global generator
    generator = None

async def predict(payload_dict: dict, **kwargs):
    start = datetime.now()
    sentence = payload_dict["user_prompt"]
    res = generator([sentence])
    text = res[0]
    total_time = (datetime.now() - start).total_seconds()
    return {'answer': f'Time:{total_time}\\nanswer:{text}'}
"""


NEEDS_TRANSFORMERS = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
    reason="the Practicus pipeline sample needs transformers and torch (pip install llm-nb[transformers])",
)


@pytest.mark.slow
@NEEDS_TRANSFORMERS
def test_practicus_pipeline_model_py_runs_unchanged_but_for_the_sdk_import(host, tmp_path):
    folder = practicus_pipeline_folder(tmp_path)
    host.client().deploy("pipeline", folder)
    answer = requests.post(
        f"{host.url}/models/pipeline/", json={"user_prompt": "hello"}, headers=auth(host), timeout=120
    ).json()
    assert answer["answer"].startswith("Time:") and "generated_text" in answer["answer"]


def practicus_pipeline_folder(tmp_path: Path) -> Path:
    """The Practicus sample's folder, its model.json pointing at a tiny character-level GPT-2 built here."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    weights = tmp_path / "tiny-gpt2"
    vocab = {chr(i): i - 32 for i in range(32, 127)}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = GPT2TokenizerFast(tokenizer_object=raw, unk_token="?", eos_token="~", bos_token="~")
    tokenizer.save_pretrained(weights)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2, n_positions=128)).save_pretrained(
        weights
    )
    return make_deployment(
        tmp_path / "pipeline",
        PIPELINE_STYLE,
        {"download_files_from": str(weights), "download_files_to": str(tmp_path / "cache")},
    )


def test_magics_deploy_and_undeploy(host, tmp_path, capsys):
    from IPython.core.interactiveshell import InteractiveShell

    from llm_nb.api import Session
    from llm_nb.magics import LlmMagics

    shell = InteractiveShell.instance()
    shell.register_magics(LlmMagics(shell, session=Session(str(host.connection_file))))
    folder = make_deployment(tmp_path / "echo")
    shell.run_line_magic("llm_deploy", f"magic-echo {folder}")
    assert "magic-echo v1 ready at" in capsys.readouterr().out
    assert requests.post(f"{host.url}/models/magic-echo/", json={}, headers=auth(host), timeout=30).ok
    shell.run_line_magic("llm_undeploy", "magic-echo")
    assert "magic-echo: undeployed v1 after 1 requests" in capsys.readouterr().out
    shell.run_line_magic("llm_undeploy", "magic-echo")
    assert capsys.readouterr().err.startswith("llm-nb: no deployment 'magic-echo'")


def test_a_redeploy_lets_the_old_version_finish_its_requests(host, tmp_path):
    from .conftest import wait_for

    client = host.client()
    folder = make_deployment(tmp_path / "echo")
    client.deploy("echo", folder)
    url = f"{host.url}/models/echo/"
    answers: list = []
    slow = threading.Thread(
        target=lambda: answers.append(requests.post(url, json={"sleep": 1.5}, headers=auth(host), timeout=60))
    )
    slow.start()
    meta_url = f"{url}?get_meta=true"
    wait_for(lambda: requests.get(meta_url, headers=auth(host), timeout=10).json()["in_flight"] == 1, 10)
    client.deploy("echo", folder)
    slow.join(30)
    assert answers[0].status_code == 200 and answers[0].json()["version"] == 1
    assert requests.post(url, json={}, headers=auth(host), timeout=30).json()["version"] == 2


def test_status_ps_and_llm_status_list_deployments_after_the_models(host, tmp_path):
    from IPython.core.displaypub import CapturingDisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell

    from llm_nb.api import Session
    from llm_nb.magics import LlmMagics

    client = host.client()
    client.deploy("listed", make_deployment(tmp_path / "listed"))
    assert requests.post(f"{host.url}/models/listed/", json={}, headers=auth(host), timeout=30).ok
    (listed,) = client.status()["deployments"]
    assert (listed["name"], listed["version"], listed["engine"], listed["state"]) == ("listed", 1, "local", "ready")
    assert listed["replicas"] == {"target": 1, "running": 1} and listed["requests_served"] == 1
    assert listed["rss_bytes"] > 0 and listed["folder"] == str(tmp_path / "listed")

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "llm_nb.cli", *args], env=host.env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    table = cli("ps").splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("DEPLOYMENT"))
    assert table[header].split() == ["DEPLOYMENT", "VERSION", "ENGINE", "REPLICAS", "MEMORY", "STATE", "SERVED"]
    assert table[0].startswith("NAME") and header > 0, "deployments come after the models"
    name, version, engine, replicas, size, unit, state, served = table[header + 1].split()
    assert (name, version, engine, replicas, state, served) == ("listed", "v1", "local", "1/1", "ready", "1")
    assert unit == "MiB" and float(size) > 0
    assert json.loads(cli("ps", "--json"))["deployments"][0]["name"] == "listed"

    shell = InteractiveShell.instance()
    shell.register_magics(LlmMagics(shell, session=Session(str(host.connection_file))))
    saved, shell.display_pub = shell.display_pub, CapturingDisplayPublisher()
    try:
        shell.run_line_magic("llm_status", "")
        shown = shell.display_pub.outputs[-1]["data"]
    finally:
        shell.display_pub = saved
    assert "DEPLOYMENT" in shown["text/plain"] and "listed" in shown["text/plain"]
    assert "| deployment | version | engine | replicas | memory | state | served |" in shown["text/markdown"]
    assert "| listed | v1 | local | 1/1 |" in shown["text/markdown"]

    client.undeploy("listed")
    assert client.status()["deployments"] == [] and "DEPLOYMENT" not in cli("ps")


def test_the_event_stream_announces_deployments_as_they_come_and_go(host, tmp_path):
    """The panels follow /api/events: a deploy, a request served and an undeploy each send a new status."""
    stream = requests.get(f"{host.url}/api/events", headers=auth(host), stream=True, timeout=30)
    events = (json.loads(line[len(b"data: ") :]) for line in stream.iter_lines() if line.startswith(b"data: "))
    try:
        assert next(events)["deployments"] == []
        client = host.client()
        client.deploy("announced", make_deployment(tmp_path / "announced"))
        assert next(e for e in events if e["deployments"])["deployments"][0]["name"] == "announced"
        assert requests.post(f"{host.url}/models/announced/", json={}, headers=auth(host), timeout=30).ok
        assert next(e for e in events if e["deployments"][0]["requests_served"] == 1)
        client.undeploy("announced")
        assert next(e for e in events if not e["deployments"])
    finally:
        stream.close()
