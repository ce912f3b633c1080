"""Constrained decoding's cost: the same chat request with and without a nested JSON schema, in one run.

One host, SmolLM2-135M-Instruct loaded twice from its GGUF: by llama.cpp and by
transformers (CPU). Each round sends, per backend, one greedy streamed request
without ``response_format`` and one with a strict nested ``json_schema`` (the
order flips every round, so drift in machine load hits both alike), with the
same prompt and max_tokens. Usage:

    python benchmarks/bench_structured.py [--rounds 5] [--max-tokens 200] [--threads 1]

Decode speed is (completion tokens - 1) / (last token - first token), since the
two requests end at different lengths (the schema's JSON closes, free text runs
on); time to first token is shown beside it. Also prints the grammar's compile
time (schema -> llguidance grammar, validation, and the matcher against the
model's 49k-token vocabulary), measured in this process, and checks that every
constrained reply validates against the schema. Medians over rounds; aim: the
constrained run keeps >= 85 % of the unconstrained speed.

``--engines`` adds the engine comparison behind the choice of llguidance: in this
process, llama.cpp on the same GGUF and prompt, greedy, unconstrained against the
schema through llguidance's mask and through llama.cpp's own GBNF grammar
(``LlamaGrammar.from_json_schema``). (xgrammar, the third candidate, needs torch
and triton, which the llama.cpp install does not have.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _host import running_host  # noqa: E402

from llm_nb.catalog import smollm2_path  # noqa: E402

PROMPT = "Describe a fictional employee of a bicycle shop: name, age, address, skills and past jobs, as JSON."
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 16, "maximum": 99},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "skills": {"type": "array", "items": {"enum": ["repair", "sales", "wheels", "brakes"]}, "maxItems": 4},
        "jobs": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"company": {"type": "string"}, "years": {"type": "number"}},
                "required": ["company", "years"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 3,
        },
        "full_time": {"type": "boolean"},
    },
    "required": ["name", "age", "address", "skills", "jobs", "full_time"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "employee", "schema": SCHEMA, "strict": True}}


def one_request(client: openai.OpenAI, model: str, max_tokens: int, constrained: bool) -> dict:
    extra = {"response_format": RESPONSE_FORMAT} if constrained else {}
    sent = time.perf_counter()
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        **extra,
    )
    first = last = None
    parts, tokens = [], 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    first, last = first or time.perf_counter(), last or time.perf_counter()
    rate = (tokens - 1) / (last - first) if tokens > 1 and last > first else float("nan")
    return {"ttft": first - sent, "rate": rate, "tokens": tokens, "text": "".join(parts)}


def compile_times(path: str) -> dict:
    """Seconds to turn the schema into a grammar, validate it, and build a matcher on the model's vocabulary."""
    import llguidance
    import llguidance.llamacpp
    from llama_cpp import Llama

    vocab_only = Llama(model_path=path, vocab_only=True, verbose=False)
    start = time.perf_counter()
    tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(vocab_only._model.vocab)
    tokenizer_s = time.perf_counter() - start
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            SCHEMA, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        )
        error = llguidance.LLMatcher.validate_grammar(grammar)
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        matcher.compute_bitmask()  # the first mask: where lazy work would show
        runs.append(time.perf_counter() - start)
        assert not error and not matcher.is_error(), error or matcher.get_error()
    return {"tokenizer_s": tokenizer_s, "compile_s": statistics.median(runs)}


def engine_comparison(path: str, threads: int, max_tokens: int, rounds: int) -> dict[str, float]:
    """Decode tokens/s in this process: no grammar, llguidance's mask, llama.cpp's GBNF grammar."""
    import llama_cpp
    import llguidance
    import llguidance.llamacpp
    import numpy as np
    from llama_cpp import Llama, LlamaGrammar

    llm = Llama(model_path=path, n_ctx=2048, n_threads=threads, verbose=False)
    prompt = llm.tokenize(f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n".encode(), special=True)
    tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(llm._model.vocab)
    compact = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=compact)
    gbnf = LlamaGrammar.from_json_schema(json.dumps(SCHEMA), verbose=False)

    def run(kind: str) -> float:
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0) if kind == "llguidance" else None

        def mask(_ids, logits):
            bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
            logits[~bits[: len(logits)].astype(bool)] = -np.inf
            return logits

        extra = {"logits_processor": [mask]} if matcher else {"grammar": gbnf} if kind == "gbnf" else {}
        tokens, first = 0, None
        for token in llm.generate(prompt, temp=0, top_k=1, top_p=1, min_p=0, **extra):
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                break
            first = first or time.perf_counter()
            tokens += 1
            if matcher is not None:
                matcher.consume_token(token)
                if matcher.is_stopped():
                    break
            if tokens >= max_tokens:
                break
        return (tokens - 1) / (time.perf_counter() - first)

    results: dict[str, list[float]] = {"unconstrained": [], "llguidance": [], "gbnf": []}
    for index in range(rounds):
        kinds = list(results) if index % 2 == 0 else list(results)[::-1]
        for kind in kinds:
            results[kind].append(run(kind))
    return {kind: statistics.median(rates) for kind, rates in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="threads for both backends (equal settings)")
    parser.add_argument("--backends", default="llamacpp,transformers")
    parser.add_argument("--model", default=smollm2_path())
    parser.add_argument("--engines", action="store_true", help="also compare llguidance with llama.cpp's GBNF")
    args = parser.parse_args()
    backends = args.backends.split(",")

    from llm_nb.client import Client

    results: dict[tuple[str, bool], list[dict]] = {}
    infos = {}
    with tempfile.TemporaryDirectory() as tmp, running_host(Path(tmp)) as (_, conn):
        llm_nb = Client(conn, autostart=False)
        names = {}
        for backend in backends:
            name = f"bench-{backend}"
            options = {"n_threads": args.threads, "n_ctx": 2048}
            if backend == "transformers":
                options["dtype"] = "float32"
            loaded = llm_nb.load(args.model, name=name, backend=backend, options=options)
            infos[backend] = loaded["model"]["info"]
            names[backend] = name
        info = llm_nb.host_info()
        client = openai.OpenAI(base_url=info["url"] + "/v1", api_key=info["key"], max_retries=0)
        for backend in backends:  # warm up both paths: first-call allocations, the grammar tokenizer
            one_request(client, names[backend], 8, False)
            one_request(client, names[backend], 8, True)
        for index in range(args.rounds):
            for backend in backends:
                order = (False, True) if index % 2 == 0 else (True, False)
                for constrained in order:
                    run = one_request(client, names[backend], args.max_tokens, constrained)
                    results.setdefault((backend, constrained), []).append(run)
            print(f"round {index + 1} done", flush=True)

    valid = 0
    for backend in backends:
        for run in results[(backend, True)]:
            jsonschema.validate(json.loads(run["text"]), SCHEMA)
            valid += 1
    times = compile_times(args.model)
    print(
        f"\nmodel {Path(args.model).name}, greedy, {args.threads} thread(s) on both backends, "
        f"max_tokens {args.max_tokens}, {args.rounds} rounds (medians)"
    )
    print(f"{'backend':<14} {'request':<14} {'decode tok/s':>13} {'TTFT ms':>8} {'tokens':>7}")
    for backend in backends:
        rates = {}
        for constrained in (False, True):
            runs = results[(backend, constrained)]
            rates[constrained] = statistics.median(r["rate"] for r in runs)
            label = "json_schema" if constrained else "unconstrained"
            ttft = statistics.median(r["ttft"] for r in runs) * 1000
            tokens = statistics.median(r["tokens"] for r in runs)
            print(f"{backend:<14} {label:<14} {rates[constrained]:>13.1f} {ttft:>8.0f} {tokens:>7.0f}")
        print(f"{backend:<14} constrained / unconstrained = {rates[True] / rates[False]:.2f}  (aim >= 0.85)")
    print(f"constrained replies valid against the schema: {valid}/{valid}")
    print(
        f"grammar compile (schema -> grammar -> validate -> matcher, first mask): {times['compile_s'] * 1000:.2f} ms; "
        f"llguidance tokenizer for the vocabulary (once per model): {times['tokenizer_s'] * 1000:.0f} ms"
    )
    if args.engines:
        rates = engine_comparison(args.model, args.threads, args.max_tokens, args.rounds)
        print(f"\nengines, llama.cpp in this process, {args.threads} thread(s), greedy (medians, decode tok/s):")
        for kind, rate in rates.items():
            print(f"  {kind:<14} {rate:>7.1f}   ({rate / rates['unconstrained']:.2f} of unconstrained)")


if __name__ == "__main__":
    main()
