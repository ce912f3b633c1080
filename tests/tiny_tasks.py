"""Tiny BERT-style task models built from a config into a folder (real loading code, no hub)."""

from __future__ import annotations

from pathlib import Path

WORDS = "the a cat dog sat on mat paris is in france berlin germany good bad movie great awful i love hate this".split()
LABELS = {
    "text-classification": ["NEGATIVE", "POSITIVE"],
    "token-classification": ["O", "B-LOC", "I-LOC", "B-PER"],
}


def build_task_model(folder: Path, task: str, seed: int = 0) -> Path:
    """Save a randomly initialised tiny BERT with the head ``task`` needs, and its tokenizer."""
    import torch
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        BertForSequenceClassification,
        BertForTokenClassification,
        BertTokenizerFast,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}, do_lower_case=True)
    labels = LABELS.get(task, [])
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        id2label=dict(enumerate(labels)) if labels else None,
        label2id={label: i for i, label in enumerate(labels)} if labels else None,
    )
    torch.manual_seed(seed)
    model_class = {
        "text-classification": BertForSequenceClassification,
        "token-classification": BertForTokenClassification,
        "fill-mask": BertForMaskedLM,
    }[task]
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
