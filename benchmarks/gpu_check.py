"""The GPU paths, run for real on an NVIDIA GPU: one table, or one line saying why it skipped.

Through a real host (started as a kernel would, with the GPU budget) it checks:

1. transformers on CUDA: SmolLM2 (the embedded GGUF, dequantised by transformers) loads with
   ``device=cuda``, answers a chat, and status shows the worker's GPU memory from NVML (by pid);
2. llama.cpp on CUDA, where the installed llama-cpp-python can offload (PyPI's wheel cannot:
   then the row says so);
3. load and unload a random ~1B-parameter Llama (built here from a config, bfloat16) 5 times,
   reading free GPU memory from NVML before, loaded and after: an unload must give back at least
   95 % of what its load took;
4. the same model in 4-bit through bitsandbytes, where bitsandbytes is installed;
5. continuous batching: 8 concurrent greedy chats against the same 8 one at a time (tokens/s).

Usage (on the GPU machine, in the project's venv with a CUDA build of torch):

    python benchmarks/gpu_check.py [--out gpu_check.md] [--params 1b|tiny]

Exits 0 and prints ``gpu_check: skipped: ...`` where there is no NVIDIA GPU; exits 1 when a
check fails.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_batching import PROMPTS as ALL_PROMPTS  # noqa: E402  (the same prompts as the CPU benchmark)

from llm_nb.config import format_bytes  # noqa: E402

GIVE_BACK_AT_LEAST = 0.95
PROMPTS = ALL_PROMPTS[:8]


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


def random_llama(folder: Path, size: str) -> Path:
    """A Llama with random weights, saved as an HF folder (bfloat16), with a small byte-level tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import build_tokenizer

    build_tokenizer(folder)
    shape = (
        dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16)
        if size == "1b"
        else dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    )
    config = LlamaConfig(
        vocab_size=384,
        max_position_embeddings=2048,
        num_key_value_heads=shape["num_attention_heads"] // 4 or 1,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
        **shape,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return folder


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []
        self.failed = False

    def add(self, check: str, result: str, ok: bool | None) -> None:
        verdict = "skipped" if ok is None else ("ok" if ok else "FAILED")
        self.failed |= ok is False
        self.rows.append((check, verdict, result))
        print(f"[{verdict}] {check}: {result}", flush=True)

    def markdown(self, device: str) -> str:
        lines = [f"GPU: {device}", "", "| check | verdict | measured |", "| --- | --- | --- |"]
        lines += [f"| {c} | {v} | {r} |" for c, v, r in self.rows]
        return "\n".join(lines)


def status_of(client, name: str) -> dict:
    return next(m for m in client.status()["models"] if m["name"] == name)


def check_transformers(client, table: Table) -> None:
    started = time.monotonic()
    client.load(
        "smollm2",
        backend="transformers",
        name="smollm2-hf",
        options={"device": "cuda", "dtype": "bfloat16"},
        keep_alive=-1,
    )
    took = time.monotonic() - started
    reply = client.chat("Say hello in French.", "smollm2-hf", max_tokens=16, temperature=0)
    model = status_of(client, "smollm2-hf")
    ok = model.get("device", "").startswith("cuda") and model["gpu_bytes"] > 0 and bool(reply)
    table.add(
        "transformers on CUDA (SmolLM2 GGUF, bf16)",
        f"device {model.get('device')}, loaded in {took:.1f} s, worker GPU memory {format_bytes(model['gpu_bytes'])} "
        f"(NVML by pid), reply {reply[:40]!r}",
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
    from llm_nb.client import Client

    def one(prompt: str, out: list) -> None:
        stream = Client(connection, autostart=False).chat(
            prompt, "smollm2-hf", stream=True, max_tokens=max_tokens, temperature=0
        )
        stream.read()
        out.append(stream.usage["completion_tokens"])

    def run(concurrent: bool) -> float:
        tokens: list[int] = []
        started = time.perf_counter()
        if concurrent:
            threads = [threading.Thread(target=one, args=(p, tokens)) for p in PROMPTS]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            for prompt in PROMPTS:
                one(prompt, tokens)
        return sum(tokens) / (time.perf_counter() - started)

    run(True)  # warm-up: CUDA kernels, allocator
    rounds = [(run(False), run(True)) for _ in range(3)]
    alone = statistics.median(r[0] for r in rounds)
    together = statistics.median(r[1] for r in rounds)
    table.add(
        f"continuous batching, {len(PROMPTS)} concurrent vs 1 at a time (SmolLM2 bf16, {max_tokens} tokens)",
        f"{together:.0f} vs {alone:.0f} tokens/s: {together / alone:.2f}x (median of 3 rounds)",
        together / alone >= 2.0,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the table as Markdown to this file")
    parser.add_argument("--params", choices=["1b", "tiny"], default="1b", help="size of the random Llama")
    args = parser.parse_args()
    reason = why_no_gpu()
    if reason:
        print(f"gpu_check: skipped: {reason}")
        return 0
    import torch

    from llm_nb.client import Client

    device = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    print(f"gpu_check on {device}", flush=True)
    table = Table()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["JUPYTER_RUNTIME_DIR"] = tmp
        os.environ["LLM_NB_CONNECTION"] = connection = str(Path(tmp) / "host.json")
        os.environ["LLM_NB_CATALOG"] = str(Path(tmp) / "catalog.json")
        client = Client()
        try:
            budget = client.status()
            table.add(
                "GPU budget",
                f"{format_bytes(budget['budget_bytes'])} of kind {budget['budget_kind']} (90 % of the GPU by default)",
                budget["budget_kind"] == "gpu",
            )
            check_transformers(client, table)
            check_llamacpp(client, table)
            folder = random_llama(Path(tmp) / "random-llama", args.params)
            bf16 = check_unload_gives_back(client, folder, table)
            check_4bit(client, folder, bf16, table)
            check_batching(Path(connection), table)
        except Exception as exc:  # a check that breaks is a failed row, and the table still prints
            table.add("run", f"{type(exc).__name__}: {exc}", False)
        finally:
            try:
                client.shutdown()
            except Exception:
                pass
    text = table.markdown(device)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
