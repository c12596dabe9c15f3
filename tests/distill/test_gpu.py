"""The distillation on CUDA with a bfloat16 teacher: ILD in a float32 copy of each layer, KD on float32
weights under bf16 autocast, the hybrid back in bfloat16 (needs a CUDA device)."""

from __future__ import annotations

import pytest
import torch

from compress.distill.config import DistillConfig
from compress.distill.run import Distillation
from tests.helpers import WIKI_TRAIN
from tests.helpers.adapt import smollm2_tokenizer, tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_teacher_on_cuda(tmp_path):
    data = tmp_path / "train.txt"
    data.write_text(WIKI_TRAIN.read_text()[:40000])
    teacher = tiny_llama(seed=1).to(torch.bfloat16)
    config = DistillConfig(data=str(data), seqlen=32, ild_tokens=256, ild_epochs=3, smart_tokens=64, kd_tokens=512,
                           batch_size=4, n_mla=1, save_every=0, lr=1e-3)
    result = Distillation(teacher, smollm2_tokenizer(), config, tmp_path / "zebra", device="cuda").run()
    assert next(result.model.parameters()).dtype == torch.bfloat16
    for layer in result.record["ild"]["layers"]:
        for kind in ("mla", "mamba2"):
            assert layer[kind]["after"] <= layer[kind]["before"]
    assert layer["mamba2"]["after"] < layer["mamba2"]["before"]  # Mamba2 starts far from the teacher layer
    kl = result.record["kd"]["eval_kl"]
    assert kl[-1][1] < kl[0][1]  # KD lowered the held-out KL
    ids = torch.randint(0, 49152, (1, 16), device="cuda")
    with torch.no_grad():
        assert torch.isfinite(result.model.cuda()(input_ids=ids).logits.float()).all()
