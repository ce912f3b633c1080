"""Non-generative transformers tasks: text classification, token classification, fill-mask.

Runs in a worker like every backend. transformers pipelines do the work; this
module returns plain results (label ids, scores, tokens) and the host shapes
them into KServe Open Inference Protocol v2 tensors.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import BackendUnavailable, InvalidRequest, ModelFailed
from .base import Backend, Progress

TASKS = ("text-classification", "token-classification", "fill-mask")
MAX_BATCH = 256


def pick_device(requested: str | None) -> str:
    import torch

    requested = (requested or "auto").lower()
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailable(f"device {requested!r} was asked for but CUDA is not available here; use device=cpu")
    return requested


class PipelineBackend(Backend):
    """A transformers pipeline for one of ``TASKS``."""

    name = "transformers"
    parallel = 1  # a batch of inputs arrives in one request; requests run in turn

    def load(self, progress: Progress) -> None:
        try:
            import torch  # noqa: F401 - fail here, clearly, if torch is missing
            from transformers import pipeline
        except ImportError as exc:
            raise BackendUnavailable(
                f"{exc}; install the transformers extra: pip install torch==2.13.0 'llm-nb[transformers]'"
            ) from exc
        task = self.spec.task
        if task not in TASKS:
            raise InvalidRequest(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        if not self.spec.path or not os.path.isdir(self.spec.path):
            raise ModelFailed(f"a {task} model must be a Hugging Face folder; {self.spec.path!r} is not one")
        self.device = pick_device(self.spec.options.get("device"))
        progress(f"building the {task} pipeline on {self.device}", 0.2)
        try:
            self.pipe = pipeline(task, model=self.spec.path, tokenizer=self.spec.path, device=self.device)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelFailed(f"transformers could not load {self.spec.path} for {task}: {exc}") from exc
        config = self.pipe.model.config
        self.labels = [config.id2label[i] for i in range(len(config.id2label))] if task != "fill-mask" else []
        self.label2id = {label: i for i, label in enumerate(self.labels)}
        progress("ready", 1.0)

    def classify(self, inputs: list[str], parameters: dict[str, Any]) -> dict[str, Any]:
        if not inputs:
            raise InvalidRequest("no inputs to classify")
        if len(inputs) > MAX_BATCH:
            raise InvalidRequest(f"at most {MAX_BATCH} inputs per request")
        task = self.spec.task
        if task == "text-classification":
            results = self.pipe(inputs, top_k=None, truncation=True)
            scores = []
            for ranked in results:
                row = [0.0] * len(self.labels)
                for item in ranked:
                    row[self.label2id[item["label"]]] = float(item["score"])
                scores.append(row)
            ids = [max(range(len(row)), key=row.__getitem__) for row in scores]
            return {"task": task, "label_ids": ids, "scores": scores, "labels": self.labels}
        if task == "token-classification":
            results = self.pipe(inputs, ignore_labels=[])
            if inputs and isinstance(results[0], dict):  # one input gives a flat list
                results = [results]
            return {
                "task": task,
                "tokens": [[t["word"] for t in tokens] for tokens in results],
                "label_ids": [[self.label2id[t["entity"]] for t in tokens] for tokens in results],
                "scores": [[float(t["score"]) for t in tokens] for tokens in results],
                "labels": self.labels,
            }
        mask = self.pipe.tokenizer.mask_token
        for text in inputs:
            if text.count(mask) != 1:
                raise InvalidRequest(f"each fill-mask input needs exactly one {mask}; got {text[:80]!r}")
        top_k = int(parameters.get("top_k", 5))
        if not 1 <= top_k <= 100:
            raise InvalidRequest("top_k must be between 1 and 100")
        results = self.pipe(inputs, top_k=top_k)
        if inputs and isinstance(results[0], dict):
            results = [results]
        return {
            "task": task,
            "top": [
                [
                    {"token": self._token_text(r), "token_id": int(r["token"]), "score": float(r["score"])}
                    for r in ranked
                ]
                for ranked in results
            ],
        }

    def _token_text(self, result: dict) -> str:
        # Some tokenizers decode a lone word piece to "" (no decoder saved): fall back to its vocab entry.
        return result["token_str"].strip() or self.pipe.tokenizer.convert_ids_to_tokens(int(result["token"]))

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "task": self.spec.task,
            "device": self.device,
            "labels": self.labels,
            "model_type": self.pipe.model.config.model_type,
        }
