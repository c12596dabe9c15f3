"""Peer run (benchmark only, inside the GPTQModel venv): GPTQModel GPTQ W4A16 on given tokens, on CPU.

    /tmp/gptqmodel-venv/bin/python evaluation/peers/gptqmodel_gptq.py MODEL_DIR TOKENS.safetensors OUT_DIR [GROUP]

TOKENS.safetensors holds one int64 tensor "tokens" (samples, seqlen); each row is one calibration
sample with an all-ones attention mask. 4 bits, symmetric, GROUP columns a group (default 64),
desc_act off, lm_head kept; every other GPTQModel setting is its default. The model is loaded in
float32, like the llm-compressor peer. Writes a GPTQ-format checkpoint (GPTQModel's default) and
the tokenizer to OUT_DIR and prints one JSON line with the wall time of quantize() (model load and
save excluded). The first run on a machine also JIT-compiles GPTQModel's CPU packing extension
(~20-30 s, cached in ~/.cache/gptqmodel) inside quantize(): time a later run.

Its checkpoint needs GPTQModel's kernels to load, which the benchmark's venv does not have, so the
script also writes OUT_DIR/dequantized: a plain float32 Llama checkpoint whose every quantized Linear
holds W = (q − z) · s unpacked from the saved GPTQ tensors, for the benchmark to score with stock
transformers (GPTQModel's CPU kernel computes with the same grid, in lower precision).
"""

import glob
import json
import os
import sys
import time

# GPTQModel 7.7 gives the CPU pool (cpu_count + 1) // 2 workers but its model-loader pool asks for 2,
# so on a 2-core machine GPTQModel.load fails ("requests 2 workers but parent 'cpu' only has 1").
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import gptqmodel  # noqa: E402
import torch  # noqa: E402
from gptqmodel import GPTQModel, QuantizeConfig  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

model_dir, tokens_file, out_dir = sys.argv[1:4]
group = int(sys.argv[4]) if len(sys.argv) > 4 else 64
tokens = load_file(tokens_file)["tokens"]  # (samples, seqlen)
config = QuantizeConfig(bits=4, group_size=group, sym=True, desc_act=False, lm_head=False)
model = GPTQModel.load(model_dir, config, device="cpu", dtype=torch.float32)
calibration = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in tokens]
start = time.perf_counter()
model.quantize(calibration, calibration_data_min_length=0)
seconds = time.perf_counter() - start
model.save(out_dir)
AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)

# The dequantized copy: unpack the saved GPTQ v1 tensors (b-bit codes in int32 words along the input
# dimension, zero points stored as z − 1, float16 scales, g_idx) into W = (q − z) · s, with the
# repository's own unpacker (plain torch; this venv does not have compress installed).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from compress.methods.quantize.pack import unpack_int32  # noqa: E402

saved = {}
for file in sorted(glob.glob(os.path.join(out_dir, "*.safetensors"))):
    saved.update(load_file(file))
plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
unpacked = 0
with torch.no_grad():
    for name, module in plain.named_modules():
        if f"{name}.qweight" not in saved:
            continue
        codes = unpack_int32(saved[f"{name}.qweight"], config.bits, module.in_features)  # (in, out)
        zeros = unpack_int32(saved[f"{name}.qzeros"], config.bits, module.out_features, dim=1) + 1  # (groups, out)
        scales = saved[f"{name}.scales"].float()
        g_idx = saved[f"{name}.g_idx"].long()
        module.weight.copy_(((codes - zeros[g_idx]).float() * scales[g_idx]).t())
        unpacked += 1
if not unpacked:
    raise SystemExit(f"no GPTQ tensors found in {out_dir}")
plain.save_pretrained(os.path.join(out_dir, "dequantized"))
AutoTokenizer.from_pretrained(model_dir).save_pretrained(os.path.join(out_dir, "dequantized"))
print(json.dumps({"peer": "GPTQModel", "seconds": seconds, "group_size": group,
                  "samples": int(tokens.shape[0]), "seqlen": int(tokens.shape[1]),
                  "version": gptqmodel.__version__, "dequantized_modules": unpacked,
                  "threads": torch.get_num_threads()}))
