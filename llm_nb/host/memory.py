"""The memory budget: what the host may spend, what a load will cost, what it did cost.

Estimates decide only whether a load is admitted; status always shows what
was measured from the model's worker afterwards (RSS, and on CUDA the GPU
memory that NVML attributes to the worker's pid).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

from ..backends.prompt_cache import DEFAULT_CONTEXTS
from ..backends.transformers_options import CACHE_MIN_CONTEXTS, CACHE_SHARE_OF_WEIGHTS
from ..catalog import ModelSpec

log = logging.getLogger("llm_nb.host.memory")

#: A worker's own cost before any weights: interpreter, aiohttp, the backend's libraries.
WORKER_OVERHEAD_BYTES = {"llamacpp": 60 * 1024**2, "transformers": 450 * 1024**2}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "auto": 2}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
_DTYPE_ALIASES.update({name: name for name in _DTYPE_BYTES})


@dataclass
class GpuInfo:
    total: int
    free: int
    name: str


@functools.lru_cache(maxsize=1)
def _nvml():
    """NVML, initialised once; None where there is no library, driver or GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no library, no driver, no GPU: all mean "no CUDA here"
        return None


def gpu_info() -> GpuInfo | None:
    """Totals for GPU 0 through NVML, without importing torch."""
    nvml = _nvml()
    if nvml is None or nvml.nvmlDeviceGetCount() == 0:
        return None
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    name = nvml.nvmlDeviceGetName(handle)
    return GpuInfo(total=int(mem.total), free=int(mem.free), name=name.decode() if isinstance(name, bytes) else name)


def gpu_memory_by_pid() -> dict[int, int]:
    """GPU bytes used per process, as the driver sees it."""
    nvml = _nvml()
    if nvml is None:
        return {}
    used: dict[int, int] = {}
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.usedGpuMemory:
                used[proc.pid] = used.get(proc.pid, 0) + int(proc.usedGpuMemory)
    return used


def default_budget() -> tuple[int, str]:
    """90 % of GPU memory with CUDA, else 50 % of RAM; and which it is."""
    gpu = gpu_info()
    if gpu is not None:
        return int(gpu.total * 0.9), "gpu"
    return int(psutil.virtual_memory().total * 0.5), "ram"


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Keep glibc from giving each executor thread its own arena.

    The host runs blocking probes on threads; with one malloc arena per thread,
    memory freed after a load stays mapped in arenas that are rarely reused, and
    the host's RSS creeps up with every load/unload cycle.
    """
    try:
        import ctypes

        M_ARENA_MAX = -8
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, arenas)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc only), e.g. after an unload."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def process_rss(pid: int) -> int:
    """RSS of a process and its children (a worker may spawn helpers)."""
    try:
        proc = psutil.Process(pid)
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return 0


def _files_size(folder: Path, patterns: tuple[str, ...]) -> int:
    return sum(p.stat().st_size for pattern in patterns for p in folder.glob(pattern) if p.is_file())


def _gguf_shape(path: str) -> dict:
    """Layers, heads and context from GGUF metadata, read once per version of a file."""
    try:
        stat = os.stat(path)
    except OSError:
        return {}
    return dict(_read_gguf_shape(path, stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=64)
def _read_gguf_shape(path: str, size: int, mtime_ns: int) -> dict:
    # GGUFReader builds every metadata array (a tokenizer's 50 k strings) on an executor
    # thread; doing that at every load left the host a few MiB larger each time (measured
    # by tests/test_budget.py's 20 load/unload cycles), so read each file once.
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path, "r")
    except Exception as exc:  # an unreadable header: the worker's load will say why
        log.debug("cannot read GGUF metadata of %s: %s", path, exc)
        return {}
    fields = reader.fields
    arch_field = fields.get("general.architecture")
    if arch_field is None:
        return {}
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode()

    def value(key: str):
        field = fields.get(f"{arch}.{key}")
        if field is None or not field.data:
            return None
        return int(field.parts[field.data[0]][0])

    return {
        "layers": value("block_count"),
        "hidden": value("embedding_length"),
        "heads": value("attention.head_count"),
        "kv_heads": value("attention.head_count_kv"),
        "context": value("context_length"),
    }


def _hf_shape(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    hidden = config.get("hidden_size") or config.get("n_embd")
    heads = config.get("num_attention_heads") or config.get("n_head")
    return {
        "layers": layers,
        "hidden": hidden,
        "heads": heads,
        "kv_heads": config.get("num_key_value_heads") or heads,
        "context": config.get("max_position_embeddings") or config.get("n_positions"),
        "dtype": config.get("torch_dtype"),
    }


def kv_cache_bytes(shape: dict, n_ctx: int, bytes_per_value: int = 2) -> int:
    layers, hidden, heads = shape.get("layers"), shape.get("hidden"), shape.get("heads")
    if not (layers and hidden and heads):
        return 0
    kv_heads = shape.get("kv_heads") or heads
    head_dim = hidden // heads
    return 2 * layers * n_ctx * kv_heads * head_dim * bytes_per_value


def _transformers_dtype(options: dict, stored: str | None = None) -> str:
    """The dtype the transformers backend will load in: ``auto`` is float32 on CPU, 16-bit on a GPU."""
    wanted = _DTYPE_ALIASES.get(str(options.get("dtype") or "auto").lower(), "auto")
    if wanted != "auto":
        return wanted
    if str(options.get("device") or "auto").lower() == "cpu" or gpu_info() is None:
        return "float32"
    return "float16" if stored == "float16" else "bfloat16"


#: vLLM's own processes (API server, engine core, worker: each a Python with torch) before weights
#: and KV cache, as measured on CPU (RSS of the tree) and, on a GPU, its CUDA contexts and activations.
VLLM_OVERHEAD_BYTES = {"ram": 2560 * 1024**2, "gpu": 1536 * 1024**2}
#: vLLM's KV cache by default: room for this many full-length sequences (it pre-allocates all of it).
VLLM_KV_CONTEXTS = {"ram": 8, "gpu": 32}
VLLM_MIN_KV_BYTES = 256 * 1024**2


def vllm_plan(spec: ModelSpec) -> dict:
    """What a vLLM engine is given: its context (``--max-model-len``), its KV cache (``--kv-cache-memory-bytes``:
    vLLM pre-allocates it, so the budget admits exactly this) and the weights and overhead it adds to them."""
    options = spec.options or {}
    kind = "gpu" if gpu_info() is not None and str(options.get("device") or "auto") != "cpu" else "ram"
    path = Path(spec.path) if spec.path else None
    shape: dict = {}
    weights = 0
    if path is not None and path.is_file():
        shape = _gguf_shape(str(path))
        weights = int(path.stat().st_size * _DTYPE_BYTES["bfloat16"] / 0.6)  # dequantised to bfloat16 for vLLM
    elif path is not None and path.is_dir():
        shape = _hf_shape(path)
        weights = _files_size(path, ("*.safetensors", "*.bin", "*.pt"))
    n_ctx = int(options.get("n_ctx") or options.get("max_model_len") or min(shape.get("context") or 4096, 4096))
    context_kv = kv_cache_bytes(shape, n_ctx)
    if options.get("kv_cache_bytes") is not None:
        kv = int(options["kv_cache_bytes"])
    else:
        kv = max(VLLM_MIN_KV_BYTES, VLLM_KV_CONTEXTS[kind] * context_kv)
    kv = max(kv, context_kv)  # vLLM refuses a cache that cannot hold one full-length sequence
    return {
        "kind": kind,
        "max_model_len": n_ctx,
        "kv_cache_bytes": kv,
        "weights_bytes": weights,
        "overhead_bytes": VLLM_OVERHEAD_BYTES[kind],
    }


def estimate(spec: ModelSpec) -> int:
    """Bytes a load of ``spec`` will need: weights, KV cache at its context, worker overhead."""
    if spec.backend == "remote":
        return 0
    if spec.backend == "vllm":
        plan = vllm_plan(spec)
        return plan["weights_bytes"] + plan["kv_cache_bytes"] + plan["overhead_bytes"]
    overhead = WORKER_OVERHEAD_BYTES.get(spec.backend, 100 * 1024**2)
    path = Path(spec.path) if spec.path else None
    if path is None or not path.exists():
        return overhead
    options = spec.options or {}
    gguf_file = options.get("gguf_file")
    if path.is_file() or gguf_file:
        gguf = path if path.is_file() else path / gguf_file
        weights = gguf.stat().st_size
        shape = _gguf_shape(str(gguf))
        if spec.backend == "transformers":
            # transformers dequantises GGUF to its dtype: about 2 bytes a parameter in
            # half precision from ~0.6 byte in Q4, 4 in float32.
            factor = _DTYPE_BYTES[_transformers_dtype(options)]
            weights = int(weights * factor / 0.6)
    else:
        weights = _files_size(path, ("*.safetensors", "*.bin", "*.pt"))
        shape = _hf_shape(path)
        stored = shape.get("dtype") or "float32"
        wanted = _transformers_dtype(options, stored) if spec.backend == "transformers" else "auto"
        if wanted != "auto" and stored in _DTYPE_BYTES:
            weights = int(weights * _DTYPE_BYTES[wanted] / _DTYPE_BYTES[stored])
        if options.get("quantize") == "4bit":
            weights //= 4
        elif options.get("quantize") == "8bit":
            weights //= 2
    n_ctx = int(options.get("n_ctx") or options.get("ctx") or min(shape.get("context") or 4096, 4096))
    kv = kv_cache_bytes(shape, n_ctx)
    # What a full context's KV takes in the cache: transformers keeps it in the model's dtype.
    cached_kv = (
        kv_cache_bytes(shape, n_ctx, _DTYPE_BYTES[_transformers_dtype(options)])
        if spec.backend == "transformers"
        else kv
    )
    return weights + kv + prompt_cache_bytes(spec, cached_kv, weights) + overhead


def prompt_cache_bytes(spec: ModelSpec, context_kv: int, weights: int) -> int:
    """The cap of a model's conversation cache, as its backend sets it by default (llama.cpp: four full
    contexts' KV; transformers: a quarter of the weights, at least two contexts' KV), admitted with the
    model so that the cache can fill up without taking the budget past its size."""
    asked = (spec.options or {}).get("cache_bytes")
    if asked is not None:
        try:
            return max(0, int(asked))
        except (TypeError, ValueError):  # the worker refuses it, by name
            return 0
    if spec.backend == "llamacpp":
        return DEFAULT_CONTEXTS * context_kv
    if spec.backend == "transformers" and not spec.task:
        return max(int(weights * CACHE_SHARE_OF_WEIGHTS), CACHE_MIN_CONTEXTS * context_kv)
    return 0


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (vLLM's engine core and workers hold the GPU memory, not its API server)."""
    try:
        proc = psutil.Process(pid)
        return [pid] + [child.pid for child in proc.children(recursive=True)]
    except psutil.Error:
        return []


def measure(pid: int | None, gpu_by_pid: dict[int, int] | None = None) -> dict:
    """What a worker really holds now, over its process tree: RSS, and GPU bytes where NVML knows the pids."""
    if not pid:
        return {"rss_bytes": 0, "gpu_bytes": 0}
    by_pid = gpu_by_pid if gpu_by_pid is not None else gpu_memory_by_pid()
    gpu = sum(by_pid.get(member, 0) for member in process_tree(pid)) if by_pid else 0
    return {"rss_bytes": process_rss(pid), "gpu_bytes": gpu}
