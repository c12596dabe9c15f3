"""Peer run (benchmark only, inside the llm-compressor venv): GPTQModifier W4A16 on given tokens.

    /tmp/peer-venv/bin/python evaluation/peers/llmcompressor_gptq.py MODEL_DIR TOKENS.safetensors OUT_DIR [GROUP]

Writes a compressed-tensors checkpoint to OUT_DIR and prints one JSON line with the wall time of
oneshot (model load and save excluded).
"""

import json
import sys
import time

import llmcompressor
import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, tokens_file, out_dir = sys.argv[1:4]
group = int(sys.argv[4]) if len(sys.argv) > 4 else 64
tokens = load_file(tokens_file)["tokens"]  # (samples, seqlen)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
data = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}
recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
start = time.perf_counter()
oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=tokens.shape[1],
        num_calibration_samples=tokens.shape[0])
seconds = time.perf_counter() - start
model.save_pretrained(out_dir, save_compressed=True)
tokenizer.save_pretrained(out_dir)
print(json.dumps({"peer": "llm-compressor GPTQModifier", "seconds": seconds, "group_size": group,
                  "samples": int(tokens.shape[0]), "seqlen": int(tokens.shape[1]),
                  "version": llmcompressor.__version__, "threads": torch.get_num_threads()}))
