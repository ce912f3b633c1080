"""engine="ray": the same model.py on Ray Serve replicas, on a real local Ray head that the host starts and owns."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from llm_nb import consume
from llm_nb.backends.ray_serve import app_name
from llm_nb.errors import BackendUnavailable, InvalidRequest, LlmNbError
from llm_nb.widgets import Panel

from .conftest import start_host, wait_for
from .test_deployments import ECHO, NEEDS_TRANSFORMERS, auth, make_deployment, practicus_pipeline_folder
from .test_magics import notebook_session

pytestmark = pytest.mark.ray

# Pure-Python work (no sleeping, no GIL release): only more processes make it faster.
BUSY = """
import os, time

def init(model_meta=None, *args, **kwargs):
    global meta
    meta = model_meta

def predict(payload_dict: dict, **kwargs):
    if payload_dict.get("exit"):
        os._exit(1)
    start, spins = time.perf_counter(), 0
    while time.perf_counter() - start < float(payload_dict.get("seconds", 0.05)):
        spins += 1
    return {"pid": os.getpid(), "version": meta.version, "spins": spins}

def cleanup(model_meta=None, *args, **kwargs):
    with open(os.path.join(model_meta.folder, "cleaned-up"), "a") as f:
        f.write(f"{os.getpid()}\\n")
"""
FIRE = {"concurrency": 4, "compare_sequential": False, "progress": False, "retries": 0, "timeout": 60}


@pytest.fixture(scope="module")
def ray_host(tmp_path_factory):
    host = start_host(tmp_path_factory.mktemp("ray-host"))
    yield host
    host.stop()


def best_of_two(url: str, prompts: list[str], token: str):
    """The faster of two runs: one timing on a 2-core machine is at the mercy of whatever else wakes up."""
    runs = [consume.fire(url, prompts, token=token, params={"seconds": 0.05}, **FIRE) for _ in range(2)]
    assert [run.summary["errors"] for run in runs] == [0, 0], [r.error for run in runs for r in run.errors]
    return max(runs, key=lambda run: run.summary["requests_per_s"])


def meta_of(host, name: str) -> dict:
    return requests.get(
        f"{host.url}/models/{name}/", params={"get_meta": "true"}, headers=auth(host), timeout=30
    ).json()


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def ray_processes(host) -> list[psutil.Process]:
    """What the host started for Ray: the head's keeper and everything below it (GCS, raylet, replicas)."""
    keepers = [p for p in descendants(host.process.pid) if "llm_nb.ray_head" in " ".join(p.cmdline())]
    return [proc for keeper in keepers for proc in [keeper, *descendants(keeper.pid)]]


def replica_processes(name: str) -> list[psutil.Process]:
    marker = f"ServeReplica:{app_name(name)}:"
    return [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]


def all_gone(processes: list[psutil.Process]) -> bool:
    return not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_engine_ray_without_ray_installed_is_a_one_line_error_and_local_refuses_ray_options(host_factory, tmp_path):
    fake = tmp_path / "no-ray"
    (fake / "ray").mkdir(parents=True)
    (fake / "ray" / "__init__.py").write_text("raise ImportError('this Python has no Ray')\n")
    host = host_factory(PYTHONPATH=str(fake))
    folder = make_deployment(tmp_path / "echo", ECHO)
    with pytest.raises(BackendUnavailable) as missing:
        host.client().deploy("echo", folder, engine="ray")
    assert "pip install 'llm-nb[ray]'" in str(missing.value) and "\n" not in missing.value.message
    with pytest.raises(InvalidRequest, match="replicas apply to engine='ray' only"):
        host.client().deploy("echo", folder, replicas=2)
    assert host.client().deploy("echo", folder)["deployment"]["engine"] == "local"  # the host is fine


@pytest.mark.slow
def test_two_replicas_serve_a_cpu_bound_model_py_faster_and_a_redeploy_rolls_without_errors(ray_host, tmp_path):
    client = ray_host.client()
    folder = make_deployment(tmp_path / "busy", BUSY)
    url = f"{ray_host.url}/models/busy/"
    try:
        client.deploy("busy", folder, engine="ray", replicas=1)
        token = consume.get_session_token(url, ray_host.key)
        meta = consume.get_meta(url, token)
        assert meta["engine"] == "ray" and meta["replicas"] == {"target": 1, "running": 1}
        assert meta["ray"]["status"] == "RUNNING" and "address" not in meta["ray"], "a token's view"
        assert meta_of(ray_host, "busy")["ray"]["local_head"] is True  # the key's view
        prompts = [f"prompt {i}" for i in range(16)]
        one = best_of_two(url, prompts, token)

        # A redeploy with two replicas while a run is in flight: the version that serves keeps serving.
        during: dict = {}
        runner = threading.Thread(
            target=lambda: during.update(report=consume.fire(url, prompts * 2, token=token, **FIRE))
        )
        runner.start()
        client.deploy("busy", folder, engine="ray", replicas=2)
        runner.join(120)
        assert during["report"].summary["errors"] == 0, [r.error for r in during["report"].errors]
        meta = consume.get_meta(url, token)
        assert meta["version"] == 2 and meta["replicas"] == {"target": 2, "running": 2}

        two = best_of_two(url, prompts, token)
        assert len({json.loads(r.text)["pid"] for r in two.results}) == 2, "both replicas served"
        speedup = two.summary["requests_per_s"] / one.summary["requests_per_s"]
        print(
            f"ray 1 replica {one.summary['requests_per_s']:.1f} req/s, 2 replicas "
            f"{two.summary['requests_per_s']:.1f} req/s: {speedup:.2f}x"
        )
        assert speedup >= 1.5, (one.summary, two.summary)
    finally:
        client.undeploy("busy")
    cleaned = (folder / "cleaned-up").read_text().split()
    assert len(cleaned) >= 3, "cleanup() ran on every replica: the one replaced by the redeploy, then both"


@pytest.mark.slow
def test_a_killed_replica_fails_only_its_requests_and_ray_replaces_it(ray_host, tmp_path):
    client = ray_host.client()
    folder = make_deployment(tmp_path / "victim", BUSY)
    url = f"{ray_host.url}/models/victim/"
    client.deploy("victim", folder, engine="ray", replicas=2)
    try:
        token = consume.get_session_token(url, ray_host.key)
        pids = {consume.predict(url, {"seconds": 0.01}, token)["pid"] for _ in range(8)}
        assert len(pids) == 2
        outcome: dict = {}

        def run() -> None:
            prompts = [f"prompt {i}" for i in range(40)]
            outcome["report"] = consume.fire(url, prompts, token=token, params={"seconds": 0.1}, **FIRE)

        runner = threading.Thread(target=run)
        started = time.monotonic()
        runner.start()
        wait_for(lambda: meta_of(ray_host, "victim")["requests_served"] >= 10, 60, message="the run under way")
        os.kill(min(pids), signal.SIGKILL)
        runner.join(FIRE["timeout"] + 30)
        assert not runner.is_alive(), "the run hung"
        report = outcome["report"]
        print(
            f"killed a replica mid-run: {report.summary['errors']} of 40 failed in {time.monotonic() - started:.1f} s"
        )
        # What the dead replica held fails (at most one predict at a time each, and one it was being
        # handed); none if it died between two. The others all succeed.
        assert report.summary["errors"] <= 2 and len(report.results) == 40
        assert all("replica" in r.error and "died" in r.error for r in report.errors), report.errors[0].error
        wait_for(lambda: meta_of(ray_host, "victim")["replicas"]["running"] == 2, 90, message="Ray replaced it")
        assert consume.predict(url, {"seconds": 0.01}, token)["pid"] not in {min(pids)} | {None}
    finally:
        client.undeploy("victim")


@pytest.mark.slow
@NEEDS_TRANSFORMERS
def test_the_practicus_sample_folder_deploys_on_ray_unchanged(ray_host, tmp_path):
    folder = practicus_pipeline_folder(tmp_path)
    client = ray_host.client()
    client.deploy("pipeline", folder, engine="ray")
    try:
        answer = requests.post(
            f"{ray_host.url}/models/pipeline/", json={"user_prompt": "hello"}, headers=auth(ray_host), timeout=120
        ).json()
        assert answer["answer"].startswith("Time:") and "generated_text" in answer["answer"]
        assert meta_of(ray_host, "pipeline")["engine"] == "ray"
    finally:
        client.undeploy("pipeline")


@pytest.mark.slow
def test_a_lost_cluster_fails_its_deployment_the_host_serves_on_and_stop_leaves_no_ray_process(host_factory, tmp_path):
    host = host_factory()
    client = host.client()
    client.deploy("on-ray", make_deployment(tmp_path / "on-ray", BUSY), engine="ray")
    client.deploy("local", make_deployment(tmp_path / "local", ECHO))
    head = ray_processes(host)
    assert len(head) > 3, "the keeper, GCS, raylet and a replica at least"
    head[0].kill()  # the keeper, as the OOM killer might: the head's processes lose their owner
    wait_for(lambda: meta_of(host, "on-ray")["state"] == "failed", 30, message="the deployment marked failed")
    wait_for(lambda: all_gone(head), 10, message="the orphaned head's processes ended by the host")
    meta = meta_of(host, "on-ray")
    assert "Ray head ended" in meta["failure"]
    answer = requests.post(f"{host.url}/models/on-ray/", json={}, headers=auth(host), timeout=30)
    assert answer.status_code == 502 and "Ray head ended" in answer.json()["error"]["message"]
    assert requests.post(f"{host.url}/models/local/", json={"x": 1}, headers=auth(host), timeout=30).ok

    # Deploying again starts a fresh head; `llm-nb stop` then ends every process of it.
    client.deploy("on-ray", tmp_path / "on-ray", engine="ray")
    assert client.deployments()[0]["state"] == "ready"
    head = ray_processes(host)
    stopped = time.monotonic()
    subprocess.run([sys.executable, "-m", "llm_nb.cli", "stop"], env=host.env, check=True, timeout=30)
    wait_for(lambda: all_gone(head), 10, message="no Ray process left 10 s after llm-nb stop")
    print(f"llm-nb stop: {len(head)} Ray processes gone in {time.monotonic() - stopped:.1f} s")
    assert (tmp_path / "on-ray" / "cleaned-up").exists(), "cleanup() ran before the head went"


@pytest.mark.slow
def test_a_users_ray_token_does_not_lock_the_host_out_of_its_head_and_kill_9_of_the_host_leaves_no_ray_process(
    host_factory, tmp_path
):
    # Any plain ray.init() leaves ~/.ray/auth_token, and Ray then starts every head in token mode.
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("a-token-of-the-users-own-" + "0" * 40)
    host = host_factory(HOME=str(home))
    host.client().deploy("orphan", make_deployment(tmp_path / "orphan", BUSY), engine="ray")
    answer = requests.post(f"{host.url}/models/orphan/", json={"seconds": 0.01}, headers=auth(host), timeout=60)
    assert answer.status_code == 200, answer.text
    tokens = list(host.runtime_dir.rglob("ray-auth-token"))
    assert len(tokens) == 1 and tokens[0].stat().st_mode & 0o777 == 0o600, "the head's own token, for this user"
    assert tokens[0].read_text() != (home / ".ray" / "auth_token").read_text()

    head = ray_processes(host)
    killed = time.monotonic()
    host.process.kill()
    wait_for(lambda: all_gone(head), 10, message="no Ray process left 10 s after kill -9 of the host")
    print(f"kill -9: {len(head)} Ray processes gone in {time.monotonic() - killed:.1f} s")
    assert not list(Path("/tmp").glob(f"llmnb-ray-{os.getuid()}-{host.process.pid}-*")), "its temp dir went too"


def test_ray_options_are_checked_before_anything_starts(ray_host, tmp_path):
    client = ray_host.client()
    folder = make_deployment(tmp_path / "checked", ECHO)
    with pytest.raises(InvalidRequest, match="replicas or autoscaling, not both"):
        client.deploy("checked", folder, engine="ray", replicas=2, autoscaling={"min_replicas": 1, "max_replicas": 2})
    with pytest.raises(LlmNbError, match="greater than or equal to 1"):
        client.deploy("checked", folder, engine="ray", replicas=0)
    with pytest.raises(LlmNbError, match="engine"):
        client.deploy("checked", folder, engine="kubernetes")


def test_autoscaling_reaches_ray_serve_and_get_meta_shows_its_bounds(ray_host, tmp_path):
    client = ray_host.client()
    folder = make_deployment(tmp_path / "scaled", ECHO)
    deployed = client.deploy("scaled", folder, engine="ray", autoscaling={"min_replicas": 1, "max_replicas": 2})
    try:
        replicas = deployed["deployment"]["replicas"]
        assert replicas["target"] is None and (replicas["min"], replicas["max"]) == (1, 2)
        assert replicas["running"] >= 1
        answer = requests.post(f"{ray_host.url}/models/scaled/", json={"a": 1}, headers=auth(ray_host), timeout=60)
        assert answer.json()["echo"] == {"a": 1}
        # An async predict runs 8 at a time in each replica: the host lets up to 2 x 8 through.
        assert meta_of(ray_host, "scaled")["max_concurrency"] == 16
    finally:
        client.undeploy("scaled")


BROKEN_INIT = """
def init(model_meta=None, *args, **kwargs):
    raise RuntimeError("the weights are missing")

def predict(payload_dict: dict, **kwargs):
    return {"never": True}
"""


@pytest.mark.slow
def test_a_failed_init_on_ray_says_why_and_a_failed_redeploy_leaves_the_serving_version(ray_host, tmp_path):
    client = ray_host.client()
    broken = make_deployment(tmp_path / "broken", BROKEN_INIT)
    with pytest.raises(LlmNbError, match="RuntimeError: the weights are missing"):
        client.deploy("broken", broken, engine="ray")
    assert "broken" not in [d["name"] for d in client.deployments()]
    wait_for(lambda: not replica_processes("broken"), 15, message="the failed application deleted, not retried")

    folder = make_deployment(tmp_path / "steady", BUSY)
    deployed = subprocess.run(
        [sys.executable, "-m", "llm_nb.cli", "deploy", "steady", str(folder), "--engine", "ray", "--replicas", "2"],
        env=dict(ray_host.env, LLM_NB_CONNECTION=str(ray_host.connection_file)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deployed.returncode == 0 and "on Ray (2 of 2 replicas)" in deployed.stdout, deployed.stderr
    try:
        url = f"{ray_host.url}/models/steady/"
        with pytest.raises(LlmNbError, match="the weights are missing"):
            client.deploy("steady", broken, engine="ray", replicas=2)
        meta = meta_of(ray_host, "steady")  # put back: both replicas of version 1 again
        assert meta["version"] == 1 and meta["replicas"] == {"target": 2, "running": 2}, meta
        assert meta["ray"]["status"] == "RUNNING"
        answers = [requests.post(url, json={"seconds": 0.01}, headers=auth(ray_host), timeout=60) for _ in range(6)]
        assert [a.status_code for a in answers] == [200] * 6 and {a.json()["version"] for a in answers} == {1}
    finally:
        client.undeploy("steady")


def listed(host, name: str) -> dict | None:
    return next((d for d in host.client().deployments() if d["name"] == name), None)


def deploy_in_background(client, *args, **kwargs) -> tuple[threading.Thread, dict]:
    outcome: dict = {"events": []}

    def run() -> None:
        try:
            outcome["result"] = client.deploy(*args, on_progress=outcome["events"].append, **kwargs)
        except LlmNbError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


@pytest.mark.slow
def test_replicas_ray_cannot_place_are_refused_or_waited_for_with_the_reason_and_undeploy_ends_the_wait(
    ray_host, tmp_path
):
    """On the host's 2-CPU head: `a` holds one CPU; `b` asks for two one-CPU replicas."""
    client = ray_host.client()
    folder = make_deployment(tmp_path / "busy", BUSY)
    client.deploy("a", folder, engine="ray", replicas=1)
    url_a = f"{ray_host.url}/models/a/"
    answers: list[int] = []
    keep_asking = threading.Event()

    def ask_a() -> None:  # `a` must answer throughout
        while not keep_asking.wait(0.3):
            answers.append(requests.post(url_a, json={"seconds": 0.01}, headers=auth(ray_host), timeout=30).status_code)

    asker = threading.Thread(target=ask_a)
    asker.start()
    try:
        # More than the whole cluster: refused at once, nothing reaches Ray.
        started = time.monotonic()
        with pytest.raises(LlmNbError) as never:
            client.deploy("b", folder, engine="ray", replicas=3)
        assert never.value.status == 409 and never.value.code == "ray_cannot_fit", never.value
        assert "3 replicas can never fit" in never.value.message and "0 of 2 CPUs free" not in never.value.message
        assert "even empty it holds only 2 such replicas" in never.value.message
        print(f"never fits: refused in {time.monotonic() - started:.1f} s")

        # Fits an empty cluster, not beside `a`, and the caller will not wait: 409 at once, naming `a`.
        with pytest.raises(LlmNbError) as busy:
            client.deploy("b", folder, engine="ray", replicas=2, wait_for_resources=0)
        message = busy.value.message
        assert busy.value.status == 409 and busy.value.code == "ray_resources_busy", busy.value
        assert "each replica needs 1 CPU; the cluster has 1 of 2 CPUs free" in message, message
        assert "held by 'a' (1 replica × 1 CPU)" in message, message
        assert listed(ray_host, "b") is None and not replica_processes("b")

        # Waits 5 s, saying why, then fails the same way and leaves no Serve application.
        started = time.monotonic()
        thread, outcome = deploy_in_background(client, "b", folder, engine="ray", replicas=2, wait_for_resources=5)
        thread.join(90)
        waited = time.monotonic() - started
        error = outcome.get("error")
        assert error is not None and error.code == "ray_resources_busy" and error.status == 409, outcome
        assert "Ray could not place the replicas within 5 s" in error.message and "held by 'a'" in error.message
        said = [e["message"] for e in outcome["events"] if "cannot be placed" in (e.get("message") or "")]
        assert said and "0 of 2 CPUs free" in said[-1] and "'a'" in said[-1], outcome["events"][-3:]
        print(f"--wait-for-resources 5: failed after {waited:.1f} s (the driver's start included)")
        assert waited < 40
        wait_for(lambda: not replica_processes("b"), 20, message="b's Serve application removed")

        # The default wait (120 s): the listing and `llm-nb ps` say why; an undeploy ends the wait at once.
        started = time.monotonic()
        thread, outcome = deploy_in_background(client, "b", folder, engine="ray", replicas=2)

        def waiting() -> dict | None:
            b = listed(ray_host, "b") or {}
            ray = b.get("ray") or {}
            pending = (ray.get("waiting_for_resources") or {}).get("pending_replicas")
            # Its first replica placed, the second waiting (Ray's free count follows within a moment).
            return b if pending == 1 and "0 of 2 CPUs free" in ray.get("message", "") else None

        why = wait_for(waiting, 30, message="the listing to say why b waits")
        print(f"the reason was listed {time.monotonic() - started:.1f} s after the deploy began")
        assert why["state"] == "deploying" and "held by 'a' (1 replica × 1 CPU)" in why["ray"]["message"]
        ps = subprocess.run(
            [sys.executable, "-m", "llm_nb.cli", "ps"],
            env=dict(ray_host.env, LLM_NB_CONNECTION=str(ray_host.connection_file)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "b waits for Ray: 1 of 2 replicas cannot be placed" in ps.stdout, ps.stdout
        panel = Panel(notebook_session(ray_host.connection_file), interval=0.2)  # the ipywidgets panel
        try:
            row = wait_for(lambda: panel.deployment_rows.get("b"), 20, 0.05, "b's row in the panel")
            wait_for(lambda: "waits for Ray: 1 of 2 replicas" in row.facts.value, 20, 0.05, "the panel to say why")
        finally:
            panel.close()
        undeploying = time.monotonic()
        client.undeploy("b")
        returned = time.monotonic() - undeploying
        thread.join(30)
        assert outcome.get("error") is not None and outcome["error"].code == "deploy_cancelled", outcome
        print(f"undeploy of a waiting deploy returned in {returned:.1f} s")
        assert returned < 10
        wait_for(lambda: not replica_processes("b"), 20, message="b's replicas gone after the undeploy")
        assert listed(ray_host, "b") is None
    finally:
        keep_asking.set()
        asker.join(30)
        client.undeploy("a")
    assert answers and set(answers) == {200}, f"a answered {len(answers)} times: {sorted(set(answers))}"
