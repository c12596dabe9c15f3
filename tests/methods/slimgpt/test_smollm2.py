"""SlimGPT on the real smollm2-135m (slow): the realised ratio, a lossless save/reload, generation."""

from __future__ import annotations

import pytest
import torch

from compress.data import calibration_tokens, evaluation_stream
import compress
from compress.models import load_model
from compress.metrics.perplexity import perplexity


@pytest.mark.slow
def test_smollm2_log_schedule_prunes_saves_and_reloads(smollm2_folder, tmp_path):
    loaded = load_model(smollm2_folder)
    model, tok = loaded.model, loaded.tokenizer
    tokens = calibration_tokens(model, tok, "wikitext2", samples=4, seqlen=128, seed=0)
    stream = evaluation_stream(tok, "wikitext2")
    dense_ppl = perplexity(model, stream, 128, windows=8).perplexity
    summary = compress.prune(model, tokens=tokens, ratio=0.2, schedule="log", device="cpu")
    # every layer meets its ratio to one FFN channel (1728 parameters of 3.5M), the norms are not pruned
    assert summary["decoder_removed_fraction"] == pytest.approx(0.2, abs=2e-3)
    heads = [layer["heads"] for layer in summary["layers"]]
    assert set(heads) <= {3, 6, 9} and heads == sorted(heads, reverse=True)  # GQA: whole heads per KV group
    pruned_ppl = perplexity(model, stream, 128, windows=8).perplexity
    assert dense_ppl < pruned_ppl < 5 * dense_ppl  # 4 × 128 calibration tokens only: a loose bound

    out = compress.save(model, tmp_path / "smol-20", tokenizer=tok, record={"test": True})
    reloaded = load_model(out).model
    ids = stream[:256].unsqueeze(0)
    with torch.no_grad():
        diff = (reloaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-5
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(reloaded.generate(prompt, max_new_tokens=8, do_sample=False),
                       model.generate(prompt, max_new_tokens=8, do_sample=False))
