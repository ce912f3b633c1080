"""Hugging Face transformers backend: HF folders and GGUF files, on CUDA or CPU.

Generative models run through a continuous-batching engine
(``llm_nb.backends.batching``): concurrent ``generate`` calls, one per request
thread of the worker, join one running batch, so the host may send
``parallel`` requests at once. Encoder models (BERT-style) make embeddings:
mean pooling over real tokens, L2-normalised.

Options (``spec.options``, from ``--device/--dtype/--quantize`` or the load API; checked
and placed by ``llm_nb.backends.transformers_options``):

``device``      ``auto`` (CUDA when torch sees one, else CPU), ``cpu``, ``cuda``, ``cuda:N``
``dtype``       ``auto`` (float32 on CPU; the checkpoint's 16-bit type, else bfloat16, on CUDA),
                ``float16``, ``bfloat16``, ``float32``
``quantize``    ``4bit`` or ``8bit`` through bitsandbytes, CUDA only
``gguf_file``   a GGUF file inside the folder ``path`` (a ``.gguf`` path sets it by itself);
                transformers dequantises it to ``dtype``
``n_ctx``       context length (default: the model's, at most 4096)
``max_batch``   most requests decoded together (default 8 on CPU, 16 on CUDA)
``n_threads``   torch CPU threads (default: one fewer than the cores, at least 1)
``cache_bytes`` cap of the prompt cache (KV of recent prompts, reused by prompts that extend
                them); default a quarter of the weights, at least two full contexts' KV; 0: off
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

from ..errors import BackendUnavailable, ContextLengthExceeded, InvalidRequest, ModelFailed
from .base import Backend, GenerationEvent, GenerationRequest, Progress, check_token_ids, tokenize_chat_prompt
from .constraints import Constraint
from .transformers_options import (
    CACHE_MIN_CONTEXTS,
    CACHE_SHARE_OF_WEIGHTS,
    check_quantize,
    check_task,
    coerce_options,
    config_json,
    is_generative,
    model_location,
    positions,
    resolve_device,
    resolve_dtype,
)

DEFAULT_MAX_CTX = 4096
#: The fallback chat template for tokenizers that carry none (most instruct GGUFs do carry one).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TransformersBackend(Backend):
    name = "transformers"
    parallel = 8

    def load(self, progress: Progress) -> None:
        options = coerce_options(self.spec.options)
        check_task(self.spec.task)
        folder, gguf_file = model_location(self.spec.path, options)
        config = {} if gguf_file else config_json(folder)
        self.generative = is_generative(config, self.spec.task, gguf=bool(gguf_file))
        if gguf_file and not self.generative:
            raise InvalidRequest("a GGUF file holds a generative model here; embeddings need an encoder folder")
        if options.get("quantize") and gguf_file:
            raise InvalidRequest(
                "quantize does not apply to a GGUF file (it is quantized already, and transformers dequantises it); "
                "drop --quantize, or load the GGUF with the llamacpp backend"
            )
        # A context the model cannot hold is refused before gigabytes are read (GGUF: after).
        self._check_ctx(options.get("n_ctx"), positions(config))
        self.options = options
        self.gguf_file = gguf_file
        self.folder = folder

        progress("importing torch and transformers", 0.02)
        try:
            import torch
            import transformers
        except ImportError as exc:
            raise BackendUnavailable(
                f"the transformers backend needs torch and transformers ({exc}); install torch first "
                "(the build for your machine, e.g. `pip install torch`), then `pip install 'llm-nb[transformers]'`"
            ) from exc
        self.torch = torch
        device = resolve_device(torch, options["device"])
        if options.get("quantize"):
            check_quantize(device, options)
        if device.type == "cpu":
            # Leave a core to the host and this worker's streaming loop: when torch's
            # intra-op threads take every core, each parallel region waits on a thread
            # that the OS has given to someone else, and a step gets many times slower.
            spare = max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) - 1))
            torch.set_num_threads(options.get("n_threads") or spare)
        stored = config.get("dtype") or config.get("torch_dtype")
        dtype = resolve_dtype(torch, options["dtype"], device, stored)
        self.device, self.dtype = device, dtype

        common: dict[str, Any] = {"local_files_only": True}
        if options.get("trust_remote_code"):
            common["trust_remote_code"] = True
        if gguf_file:
            common["gguf_file"] = gguf_file
        progress(f"reading the tokenizer of {gguf_file or folder.name}", 0.05)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), **common)
        except Exception as exc:  # a folder without a usable tokenizer: say which
            raise ModelFailed(f"transformers could not read a tokenizer from {self.spec.path}: {exc}") from exc
        self.tokenizer_lock = threading.Lock()

        kwargs = dict(common, dtype=dtype)
        if options.get("attn_implementation"):
            kwargs["attn_implementation"] = options["attn_implementation"]
        if options.get("quantize"):
            bits = options["quantize"]
            kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=bits == "4bit",
                load_in_8bit=bits == "8bit",
                bnb_4bit_compute_dtype=dtype,
                bnb_4bit_quant_type="nf4",
            )
        if device.type == "cuda":
            kwargs["device_map"] = {"": device.index or 0}  # straight onto the GPU, no CPU copy first
        auto = transformers.AutoModelForCausalLM if self.generative else transformers.AutoModel
        what = f"{gguf_file} (dequantising to {str(dtype).removeprefix('torch.')})" if gguf_file else folder.name
        progress(f"reading weights of {what} onto {device}", 0.1)
        try:
            model = auto.from_pretrained(str(folder), **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelFailed(f"transformers could not load {self.spec.path}: {exc}") from exc
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                raise ModelFailed(
                    f"{device} ran out of memory loading {self.spec.path}: {exc}; "
                    "free memory, pick a smaller dtype or --quantize 4bit"
                ) from exc
            raise
        if device.type != "cuda":
            model = model.to(device)
        model.eval()
        self.model = model
        self.model_config = model.config
        self.max_positions = self._max_positions()
        wanted_ctx = options.get("n_ctx")
        self._check_ctx(wanted_ctx, self.max_positions)
        self.n_ctx = wanted_ctx or min(self.max_positions or DEFAULT_MAX_CTX, DEFAULT_MAX_CTX)
        self.chat_template = self._chat_template()

        if self.generative:
            from .batching import BatchEngine

            self.parallel = options.get("max_batch") or (16 if device.type == "cuda" else 8)
            self.eos_ids = self._eos_ids()
            cap = options.get("cache_bytes")
            if cap is None:
                weights = sum(p.numel() * p.element_size() for p in model.parameters())
                context_kv = self.n_ctx * self._kv_bytes_per_token()
                cap = max(int(weights * CACHE_SHARE_OF_WEIGHTS), CACHE_MIN_CONTEXTS * context_kv)
            self.engine = BatchEngine(
                model,
                self.tokenizer,
                self.tokenizer_lock,
                device=device,
                eos_ids=self.eos_ids,
                max_batch=self.parallel,
                cache_bytes=cap,
            )
        else:
            self.parallel = 1
            self.engine = None
            self.embed_lock = threading.Lock()
            self._specials: tuple[list[int], list[int]] | None = None
        progress("ready", 1.0)

    def _kv_bytes_per_token(self) -> int:
        """One token's keys and values over all layers, in the model's dtype (0 where the config says not)."""
        config = self.model_config
        layers, heads = getattr(config, "num_hidden_layers", None), getattr(config, "num_attention_heads", None)
        if not layers or not heads:
            return 0
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        itemsize = self.torch.empty((), dtype=self.model.dtype).element_size()
        return 2 * layers * kv_heads * head_dim * itemsize

    def _check_ctx(self, wanted: int | None, positions: int | None) -> None:
        if wanted and positions and wanted > positions:
            raise InvalidRequest(f"n_ctx={wanted} is more than {self.spec.name!r} supports ({positions} positions)")

    def _max_positions(self) -> int | None:
        value = positions(self.model_config.to_dict())
        if value:
            return value
        limit = getattr(self.tokenizer, "model_max_length", None)
        return limit if isinstance(limit, int) and 0 < limit < 10**9 else None

    def _chat_template(self) -> str | None:
        fmt = self.spec.chat_format
        if fmt:
            if fmt == "chatml":
                return CHATML_TEMPLATE
            if "{%" in fmt or "{{" in fmt:
                return fmt  # a Jinja template given whole
            raise InvalidRequest(
                f"chat format {fmt!r} is not known to the transformers backend: give 'chatml' or a Jinja template"
            )
        return None if getattr(self.tokenizer, "chat_template", None) else CHATML_TEMPLATE

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model_config):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        if self.chat_template is CHATML_TEMPLATE:  # our fallback ends turns with <|im_end|>
            end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
            if isinstance(end, int) and end != self.tokenizer.unk_token_id:
                ids.add(end)
        return ids

    # --- prompts -------------------------------------------------------------
    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        with self.tokenizer_lock:
            if request.kind == "chat":

                def render(messages: list[dict], tools: list | None) -> str:
                    return self.tokenizer.apply_chat_template(
                        messages,
                        tools=tools,
                        add_generation_prompt=True,
                        tokenize=False,
                        chat_template=self.chat_template,
                    )

                try:
                    messages, tools = self.chat_messages(request, render)
                    text = render(messages, tools)
                except Exception as exc:  # a template that refuses the messages (e.g. roles out of order)
                    raise InvalidRequest(f"the model's chat template rejected the messages: {exc}") from exc

                def encode(piece: str, special: bool, first: bool) -> list[int]:
                    # The template writes its own BOS where the model wants one.
                    return list(
                        self.tokenizer.encode(piece, add_special_tokens=False, split_special_tokens=not special)
                    )

                return tokenize_chat_prompt(text, [messages, tools], self._spells_control, encode)
            return list(self.tokenizer.encode(request.prompt or "", add_special_tokens=True))

    def _spells_control(self, text: str) -> bool:
        plain = self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        return self.tokenizer.encode(text, add_special_tokens=False) != plain

    def generate(self, request: GenerationRequest, cancelled: threading.Event) -> Iterator[GenerationEvent]:
        from .base import Finished
        from .batching import Sequence
        from .detokenizer import Detokenizer

        if not self.generative:
            return super().generate(request, cancelled)
        ids = self._prompt_ids(request)
        if len(ids) >= self.n_ctx:
            raise ContextLengthExceeded(
                f"the prompt has {len(ids)} tokens but {self.spec.name!r} was loaded with a context of {self.n_ctx}; "
                "shorten it, start a new conversation, or load the model with a larger n_ctx",
                prompt_tokens=len(ids),
                context_length=self.n_ctx,
            )
        room = self.n_ctx - len(ids)
        max_new = room if not request.max_tokens or request.max_tokens <= 0 else min(request.max_tokens, room)
        # Built here, not in the engine thread, so its first build never stalls a running batch.
        lltokenizer = None
        if request.grammar or request.logprobs is not None:
            try:
                lltokenizer = self.grammar_tokenizer()
            except Exception as exc:  # a tokenizer llguidance cannot read: logprobs fall back to decode()
                if request.grammar:
                    raise InvalidRequest(f"constrained decoding cannot use this model's tokenizer: {exc}") from exc
        seq = Sequence(
            request=request,
            prompt_ids=ids,
            max_new_tokens=max_new,
            stops=list(request.stop or []),
            cancelled=cancelled,
            detokenizer=Detokenizer(self.tokenizer, self.tokenizer_lock),
            constraint=Constraint(lltokenizer, request.grammar) if request.grammar else None,
            # llguidance knows each token's exact bytes; decoding one byte-level token alone may give U+FFFD.
            token_bytes=(lambda token: lltokenizer.decode_bytes([token])) if lltokenizer is not None else None,
        )
        return self._stream(seq, Finished)

    def grammar_tokenizer(self):
        """llguidance's view of the vocabulary, built on the first request that needs it."""
        with self.tokenizer_lock:
            if getattr(self, "_lltokenizer", None) is None:
                import llguidance.hf

                self._lltokenizer = llguidance.hf.from_tokenizer(self.tokenizer)
            return self._lltokenizer

    def _stream(self, seq, finished_type) -> Iterator[GenerationEvent]:
        self.engine.submit(seq)
        try:
            while True:
                event = seq.events.get()
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, finished_type):
                    event.prompt_cache = self._cache_stats()
                    yield event
                    return
                yield event
        finally:
            seq.abandoned = True  # a consumer that stops early takes its row out of the batch

    def tokenize(self, text: str) -> list[int]:
        with self.tokenizer_lock:
            return list(self.tokenizer.encode(text, add_special_tokens=False))

    # --- embeddings ------------------------------------------------------------
    def embed(self, inputs: list[str | list[int]]) -> tuple[list[list[float]], int]:
        if self.generative:
            return super().embed(inputs)
        torch = self.torch
        limit = self.max_positions or self.n_ctx
        check_token_ids(inputs, len(self.tokenizer), self.spec.name)
        vectors: list[list[float]] = []
        total = 0
        with self.embed_lock, torch.inference_mode():
            for start in range(0, len(inputs), 32):
                chunk = inputs[start : start + 32]
                with self.tokenizer_lock:
                    # Token ids (as OpenAI takes them) are the text without the special tokens
                    # the tokenizer adds around it: add those, as for a text.
                    prefix, suffix = self._special_tokens_around()
                    rows = [
                        prefix + item + suffix
                        if isinstance(item, list)
                        else self.tokenizer(str(item), truncation=False)["input_ids"]
                        for item in chunk
                    ]
                    encoded = self.tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
                lengths = encoded["attention_mask"].sum(dim=1)
                longest = int(lengths.max()) if len(chunk) else 0
                if longest > limit:
                    index = int(lengths.argmax()) + start
                    raise ContextLengthExceeded(
                        f"input {index} has {longest} tokens but {self.spec.name!r} takes at most {limit}; "
                        "split the text into smaller pieces",
                        prompt_tokens=longest,
                        context_length=limit,
                    )
                encoded = {k: v.to(self.device) for k, v in encoded.items()}
                hidden = self.model(**encoded).last_hidden_state.float()
                mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                vectors.extend(pooled.cpu().tolist())
                total += int(lengths.sum())
        return vectors, total

    def classify(self, inputs: list[str], parameters: dict[str, Any]) -> dict[str, Any]:
        if self.generative:
            return super().classify(inputs, parameters)
        raise InvalidRequest(
            f"model {self.spec.name!r} makes embeddings: use POST /v1/embeddings; "
            "for /v2 infer load a classifier with --task text-classification"
        )

    # --- status ------------------------------------------------------------------
    def _special_tokens_around(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after a text's own ([CLS] ... [SEP] for BERT).

        Read off one encoding with and without them: transformers 5 tokenizers no longer
        expose ``build_inputs_with_special_tokens``.
        """
        if self._specials is None:
            whole = self.tokenizer("a", truncation=False)["input_ids"]
            plain = self.tokenizer("a", add_special_tokens=False, truncation=False)["input_ids"]
            start = next((i for i in range(len(whole)) if whole[i : i + len(plain)] == plain), 0)
            self._specials = (whole[:start], whole[start + len(plain) :])
        return self._specials

    def info(self) -> dict[str, Any]:
        config = self.model_config
        architectures = getattr(config, "architectures", None) or [getattr(config, "model_type", "?")]
        info: dict[str, Any] = {
            "backend": self.name,
            "task": "generate" if self.generative else "embed",
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantize": self.options.get("quantize"),
            "parallel": self.parallel,
            "n_ctx": self.n_ctx,
            "architecture": architectures[0],
            "n_params": sum(p.numel() for p in self.model.parameters()),
            "chat_format": "tokenizer" if self.chat_template is None else "chatml",
            "gguf_file": self.gguf_file,
            "torch": self.torch.__version__,
            "n_threads": self.torch.get_num_threads() if self.device.type == "cpu" else None,
        }
        if not self.generative:  # what `dimensions` may ask for at most
            info["embedding_length"] = getattr(config, "hidden_size", None)
        if self.engine is not None:
            info["batch"] = self.engine.stats()
            info["prompt_cache"] = self._cache_stats()
        if self.device.type == "cuda":
            cuda = self.torch.cuda
            info["gpu_name"] = cuda.get_device_name(self.device)
            info["gpu_allocated_bytes"] = int(cuda.memory_allocated(self.device))
            info["gpu_reserved_bytes"] = int(cuda.memory_reserved(self.device))
            info["gpu_bytes"] = info["gpu_reserved_bytes"]
        return info

    def _cache_stats(self) -> dict[str, Any] | None:
        if getattr(self, "engine", None) is None:  # an encoder: nothing generates, nothing is cached
            return None
        return {**self.engine.prompt_cache.stats(), "device": self.device.type}

    def close(self) -> None:
        if getattr(self, "engine", None) is not None:
            self.engine.stop()
