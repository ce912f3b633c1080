"""Turn a GGUF file into a Hugging Face folder that vLLM serves (run as a script, in vLLM's venv).

    python gguf_to_hf.py MODEL.gguf DEST_FOLDER

transformers reads the GGUF (``gguf_file=``), dequantises its weights to
bfloat16 and writes them as safetensors, with the tokenizer and its chat
template. The folder is written under a temporary name and renamed when
complete, so a conversion cut short is never mistaken for a finished one.

This file is run by the python of the vLLM environment, which has torch,
transformers and gguf but not llm-nb: it imports nothing from llm_nb.
Each line it prints is one step, shown as the load's progress.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path


def say(message: str) -> None:
    print(f"llm-nb convert: {message}", flush=True)


def convert(gguf: Path, dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    say(f"reading the tokenizer of {gguf.name}")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    say(f"dequantising {gguf.name} to bfloat16 (once: the folder is kept for the next load)")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    # transformers marks a model read from GGUF as GGUF-quantised and refuses to save it; its weights
    # are plain bfloat16 tensors by now, so drop the mark and save them as an ordinary model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    say("writing safetensors")
    model.save_pretrained(str(partial), safe_serialization=True)
    tokenizer.save_pretrained(str(partial))
    try:
        partial.rename(dest)
    except OSError:
        if not dest.exists():
            raise
        shutil.rmtree(partial, ignore_errors=True)  # another load converted the same file meanwhile
    say(f"done in {time.monotonic() - started:.1f} s: {dest}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    gguf, dest = Path(argv[0]), Path(argv[1])
    if dest.exists():
        return 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    convert(gguf, dest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
