"""Shared builders for the adapter/training tests: a tiny random Llama with the smollm2 tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from compress.models import resolve_model_path

    return AutoTokenizer.from_pretrained(str(resolve_model_path("smollm2-135m")))


def tiny_llama(seed: int = 0, layers: int = 2, tie: bool = True):
    """A random Llama: vocab 49152 (the smollm2 tokenizer's), hidden 32, FFN 64, 4 heads, 2 KV heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config).eval()


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Write a tiny random Llama plus the smollm2 tokenizer as a Hugging Face folder."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny_llama(seed).save_pretrained(folder)
    smollm2_tokenizer().save_pretrained(folder)
    return folder


def reverse_task(n: int, seed: int = 0, digits: int = 4) -> list[dict]:
    """Instruction pairs: reverse a string of digits (deterministic, checkable by exact match)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        s = "".join(rng.choice("0123456789") for _ in range(digits))
        rows.append({"instruction": f"Reverse {s}", "response": s[::-1]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
