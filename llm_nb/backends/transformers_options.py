"""What a transformers load asks for, checked before a byte of weights is read.

Its options (coerced and checked by name), the torch device and dtype they
choose, where the model is (a Hugging Face folder, or a GGUF file that
transformers dequantises) and whether it generates text or makes embeddings.
Kept apart from the backend so that a wrong option or a missing GPU is refused
with the same message everywhere, and the backend module holds the running model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailable, InvalidRequest, ModelFailed
from .base import coerce_option

#: Options a load may set, with their types; anything else is refused by name.
LOAD_OPTIONS: dict[str, type] = {
    "device": str,
    "dtype": str,
    "quantize": str,
    "gguf_file": str,
    "n_ctx": int,
    "max_batch": int,
    "n_threads": int,
    "trust_remote_code": bool,
    "attn_implementation": str,
    "cache_bytes": int,
}
#: The conversation cache's default cap: a share of the weights' bytes (the cache lives where the model
#: does, on a GPU beside the batch's own KV, so it is sized by what the model already takes), but room
#: for at least this many full contexts' KV, which small models with long contexts need.
CACHE_SHARE_OF_WEIGHTS = 0.25
CACHE_MIN_CONTEXTS = 2
DTYPES = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
QUANTIZE = {"4bit": "4bit", "4": "4bit", "int4": "4bit", "nf4": "4bit", "8bit": "8bit", "8": "8bit", "int8": "8bit"}
EMBEDDING_TASKS = {"embed", "embedding", "embeddings", "feature-extraction", "sentence-similarity"}
GENERATION_TASKS = {"generate", "text-generation", "chat", "completion"}


def coerce_options(options: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (options or {}).items():
        if value is not None or key not in LOAD_OPTIONS:
            out[key] = coerce_option("transformers", key, value, LOAD_OPTIONS)
    dtype = str(out.get("dtype", "auto")).lower()
    if dtype not in DTYPES:
        raise InvalidRequest(f"dtype {dtype!r} is not one of auto, float16, bfloat16, float32")
    out["dtype"] = DTYPES[dtype]
    if out.get("quantize"):
        quantize = str(out["quantize"]).lower()
        if quantize in ("none", "no", "off", ""):
            out.pop("quantize")
        elif quantize not in QUANTIZE:
            raise InvalidRequest(f"quantize {quantize!r} is not one of 4bit, 8bit")
        else:
            out["quantize"] = QUANTIZE[quantize]
    for key in ("n_ctx", "max_batch", "n_threads"):
        if key in out and out[key] <= 0:
            raise InvalidRequest(f"option {key} must be positive, not {out[key]}")
    out["device"] = str(out.get("device", "auto")).lower()
    return out


def resolve_device(torch, wanted: str):
    """The torch device for ``wanted``, or an error that says what is missing."""
    if wanted == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if wanted == "cpu":
        return torch.device("cpu")
    if wanted == "cuda" or wanted.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise BackendUnavailable(
                f"device={wanted!r} was asked for, but torch {torch.__version__} ({build}) sees no CUDA GPU; "
                "load with --device cpu (or auto), or run the host where a GPU and a CUDA build of torch are"
            )
        index = 0 if wanted == "cuda" else wanted.split(":", 1)[1]
        try:
            index = int(index)
        except ValueError:
            raise InvalidRequest(f"device {wanted!r} is not cuda:N") from None
        count = torch.cuda.device_count()
        if not 0 <= index < count:
            raise InvalidRequest(f"device {wanted!r} does not exist: this machine has {count} CUDA device(s)")
        return torch.device(f"cuda:{index}")
    if wanted == "mps" and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    raise InvalidRequest(f"device {wanted!r} is not one of auto, cpu, cuda, cuda:N")


def resolve_dtype(torch, wanted: str, device, stored: str | None):
    """float32 on CPU unless asked (half precision is slow there); 16-bit on a GPU."""
    if wanted != "auto":
        return getattr(torch, wanted)
    if device.type == "cpu":
        return torch.float32
    if stored == "float16":
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def model_location(path: str | None, options: dict[str, Any]) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for a spec's path and options."""
    if not path:
        raise ModelFailed("the transformers backend needs a path: a Hugging Face model folder or a .gguf file")
    location = Path(path)
    if not location.exists():
        raise ModelFailed(f"{path} does not exist")
    if location.is_file():
        if location.suffix.lower() != ".gguf":
            raise ModelFailed(f"{path} is a file but not a .gguf; give the model's folder instead")
        return location.parent, location.name
    gguf = options.get("gguf_file")
    if gguf:
        if not (location / gguf).is_file():
            raise ModelFailed(f"gguf_file {gguf!r} is not in {path}")
        return location, gguf
    if not (location / "config.json").is_file():
        raise ModelFailed(f"{path} has no config.json: it is not a Hugging Face model folder")
    return location, None


def config_json(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def check_task(task: str | None) -> None:
    if task and task not in GENERATION_TASKS | EMBEDDING_TASKS:
        from .tasks import TASKS

        raise InvalidRequest(
            f"unknown task {task!r} for the transformers backend; choose one of "
            f"{', '.join(sorted(GENERATION_TASKS | EMBEDDING_TASKS | set(TASKS)))}, or none to tell from the model"
        )


def positions(config: dict) -> int | None:
    """The most positions a model's config allows, if it says."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def is_generative(config: dict, task: str | None, gguf: bool = False) -> bool:
    if task in EMBEDDING_TASKS:
        return False
    if task in GENERATION_TASKS:
        return True
    check_task(task)
    if gguf:  # transformers reads GGUF files as causal LMs only
        return True
    if config.get("is_encoder_decoder"):
        raise InvalidRequest(
            f"{config.get('model_type')!r} is an encoder-decoder model, which this backend does not serve; "
            "use a decoder-only (causal LM) or an encoder (embeddings) model"
        )
    architectures = config.get("architectures") or []
    if architectures:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    encoders = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "deberta", "deberta-v2")
    return config.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.get("model_type") not in encoders


def check_quantize(device, options: dict[str, Any]) -> None:
    """4- and 8-bit loading runs through bitsandbytes on a CUDA GPU: refuse it elsewhere, saying why."""
    bits = options["quantize"]
    if device.type != "cuda":
        if options["device"] == "auto":
            raise BackendUnavailable(
                f"quantize={bits} runs through bitsandbytes on a CUDA GPU, and torch sees none here; "
                "load without --quantize (on CPU) or on a machine with a GPU"
            )
        raise InvalidRequest(
            f"quantize={bits} needs device cuda (bitsandbytes), not {device}; drop --quantize or use --device cuda"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable(
            f"quantize={bits} needs bitsandbytes ({exc}); install it with `pip install bitsandbytes`"
        ) from exc
