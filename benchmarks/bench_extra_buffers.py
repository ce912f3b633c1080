"""llama.cpp's extra buffer types on or off: the same GGUF, prompt and threads, side by side in one run.

On CPUs with AMX llama.cpp's AMX extra buffer crashes (llama.cpp issue 20824), so
the llama.cpp backend loads with extra buffers off there. This measures what
that choice costs where it is safe to compare, in this process: the model is
loaded twice (``use_extra_bufts`` on and off), and each round runs, on each,
one prefill of a long prompt and one greedy decode (the order flips every
round, so drift in machine load hits both alike). Usage:

    python benchmarks/bench_extra_buffers.py [MODEL.gguf] [--rounds 7] [--threads 1] [--tokens 64]

Refuses to force extra buffers on where the CPU has AMX (that is the crash).
Prints medians over rounds and the off/on ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm_nb.backends.base import GenerationRequest, TextDelta  # noqa: E402
from llm_nb.backends.llamacpp import LlamaCppBackend, system_info  # noqa: E402
from llm_nb.catalog import resolve  # noqa: E402
from llm_nb.cpu import has_amx  # noqa: E402

PROMPT = " ".join(["The history of the bicycle begins in the nineteenth century with wooden machines."] * 30)


def load(spec, extra: bool, threads: int) -> LlamaCppBackend:
    options = {**spec.options, "extra_buffers": str(extra).lower(), "n_threads": threads, "n_threads_batch": threads}
    backend = LlamaCppBackend(dataclasses.replace(spec, options=options))
    backend.load(lambda message, fraction=None: None)
    return backend


def one_round(backend: LlamaCppBackend, tokens: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one greedy completion from an empty cache."""
    backend.llm.reset()
    request = GenerationRequest(kind="completion", prompt=PROMPT, max_tokens=tokens, temperature=0)
    prompt_tokens = len(backend.tokenize(PROMPT)) + 1
    started = time.perf_counter()
    first = last = None
    produced = 0
    for event in backend.generate(request, threading.Event()):
        if isinstance(event, TextDelta):
            now = time.perf_counter()
            first = first or now
            last = now
            produced += 1
    assert first is not None and last is not None and produced > 1, "no tokens came out"
    return prompt_tokens / (first - started), (produced - 1) / (last - first)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    if has_amx():
        print("this CPU has AMX: forcing extra buffers on would crash (llama.cpp issue 20824); not measuring")
        return 2
    spec = resolve(args.model)
    print(f"model: {spec.path}\nllama.cpp: {system_info()}\nthreads: {args.threads}, rounds: {args.rounds}")
    backends = {extra: load(spec, extra, args.threads) for extra in (True, False)}
    for backend in backends.values():
        one_round(backend, 8)  # warm up: page the weights in
    results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for index in range(args.rounds):
        order = (True, False) if index % 2 == 0 else (False, True)
        for extra in order:
            results[extra].append(one_round(backends[extra], args.tokens))
    medians = {
        extra: (statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows))
        for extra, rows in results.items()
    }
    prompt_tokens = len(backends[True].tokenize(PROMPT)) + 1
    print(f"\n| extra buffers | prefill tok/s ({prompt_tokens} tokens) | decode tok/s ({args.tokens} tokens) |")
    print("|---|---|---|")
    for extra in (True, False):
        print(f"| {'on' if extra else 'off'} | {medians[extra][0]:.0f} | {medians[extra][1]:.1f} |")
    print(
        f"\noff/on: prefill {medians[False][0] / medians[True][0]:.3f}, decode {medians[False][1] / medians[True][1]:.3f}"
    )
    for backend in backends.values():
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
