"""The walk and its methods on CUDA against the same on the CPU (GPU-marked: skipped without CUDA).

``COMPRESS_GPU_TEST_DEVICE=cpu`` runs them with the CPU in the GPU's place (cpu against cpu), which is
how ``evaluation/gpu_check.sh --dry-run`` keeps the test code itself from rotting on a machine without
a GPU.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from compress.plugin import build_method
from compress.staged import StagedForward, check_layer
from compress.walk import capture_inputs, walk
from tests.helpers import make_tiny_llama

DEVICE = os.environ.get("COMPRESS_GPU_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")]
TOKENS = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(1))
# tiny Llama, 4 heads of 32 in 2 KV groups, FFN 192: every width divisible by the group size 32
SHAPE = dict(hidden_size=128, intermediate_size=192, head_dim=32, num_hidden_layers=2)


def _walked(model, device, methods=(), **kwargs):
    result = walk(model, TOKENS, list(methods), device=device, batch_size=4, keep_hidden=True, **kwargs)
    return torch.cat(result.hidden).float(), result


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _method(name, model, options):
    method = build_method(name, options)
    method.prepare(model)
    return method


def test_empty_walk_on_cuda_equals_the_cpu_walk_and_the_model():
    model = make_tiny_llama(**SHAPE)
    seen = []
    handle = model.model.layers[-1].register_forward_hook(
        lambda module, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model.model(input_ids=TOKENS, use_cache=False)
    handle.remove()
    reference = seen[0]  # the last decoder layer's output, before the final norm (what keep_hidden returns)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cpu, _ = _walked(copy.deepcopy(model), "cpu")
    gpu, _ = _walked(model, DEVICE)
    assert _rel(gpu, cpu) < 1e-5 and _rel(cpu, reference.float()) < 1e-5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # back on the host, unchanged
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_gptq_walk_on_cuda_equals_the_cpu_walk():
    """W4 g32 act-order: GPTQ's column loop on either device from Hessians that differ by float32 round-off;
    a code may flip where a value sits on a rounding tie, so almost all codes agree, not all."""
    options = {"bits": 4, "group_size": 32, "act_order": True}
    cpu_model, gpu_model = make_tiny_llama(**SHAPE), make_tiny_llama(**SHAPE)
    cpu, cpu_result = _walked(cpu_model, "cpu", [_method("gptq", cpu_model, options)])
    gpu, gpu_result = _walked(gpu_model, DEVICE, [_method("gptq", gpu_model, options)])
    assert _rel(gpu, cpu) < 1e-2
    cpu_state, gpu_state = cpu_model.state_dict(), gpu_model.state_dict()
    for name, weight in cpu_state.items():
        if name.endswith("proj.weight"):
            same = (gpu_state[name].float() == weight.float()).float().mean().item()
            assert same > 0.99, (name, same)
    for a, b in zip(cpu_result.records, gpu_result.records):
        for module, rec in a["gptq"].items():
            assert abs(rec["output_err"] - b["gptq"][module]["output_err"]) <= 0.05 * rec["output_err"] + 1e-6


@torch.no_grad()
def test_staged_forward_on_cuda_matches_the_layer_and_the_cpu():
    model = make_tiny_llama(**SHAPE)
    device = torch.device(DEVICE)
    inputs = capture_inputs(model, TOKENS, device, 4)
    layer = model.model.layers[0].to(device)
    ok, reason = check_layer(layer, inputs.hidden[0], inputs.kwargs[0], device)
    assert ok, reason
    staged = StagedForward(layer, inputs.hidden, inputs.kwargs, device).finish()
    assert all(t.device.type == "cpu" for t in staged)
    if device.type == "cuda":
        assert all(t.is_pinned() for t in staged)
    layer.to("cpu")
    cpu_inputs = capture_inputs(model, TOKENS, torch.device("cpu"), 4)
    cpu = StagedForward(layer, cpu_inputs.hidden, cpu_inputs.kwargs, torch.device("cpu")).finish()
    assert _rel(torch.cat(staged), torch.cat(cpu)) < 1e-5


def test_slimgpt_on_cuda_equals_the_cpu_within_tolerance():
    """SlimGPT 20 %, float64 OBS: the same heads and channels kept, weights and outputs within 1e-4."""
    options = {"ratio": 0.2, "schedule": "uniform"}
    cpu_model, gpu_model = make_tiny_llama(**SHAPE), make_tiny_llama(**SHAPE)
    cpu, cpu_result = _walked(cpu_model, "cpu", [_method("slimgpt", cpu_model, options)])
    gpu, gpu_result = _walked(gpu_model, DEVICE, [_method("slimgpt", gpu_model, options)])
    for a, b in zip(cpu_result.records, gpu_result.records):
        kept = {k: v for k, v in a["slimgpt"].items() if k.endswith("_kept") or k == "removed_units"}
        assert kept and kept == {k: b["slimgpt"][k] for k in kept}
    cpu_state, gpu_state = cpu_model.state_dict(), gpu_model.state_dict()
    assert cpu_state.keys() == gpu_state.keys()
    for name, weight in cpu_state.items():
        assert gpu_state[name].shape == weight.shape and _rel(gpu_state[name], weight) < 1e-4, name
    assert _rel(gpu, cpu) < 1e-4


def test_mixed_precision_bf16_model_float32_statistics():
    """A bfloat16 model walks in bfloat16 (activations, weights) while every Hessian accumulates in float32;
    its outputs stay within bf16 round-off of the float32 walk, and GPTQ keeps the weights bf16 and finite."""
    from compress.stats import HessianAccumulator

    seen = []
    original = HessianAccumulator.add_batch

    def add_batch(self, inp):
        seen.append((inp.dtype, self.dtype, (self._lower if self._lower is not None else self.sq).dtype))
        return original(self, inp)

    reference, _ = _walked(make_tiny_llama(**SHAPE), "cpu")
    model = make_tiny_llama(**SHAPE).to(torch.bfloat16)
    empty, result = _walked(copy.deepcopy(model), DEVICE)
    assert _rel(empty, reference) < 3e-2
    HessianAccumulator.add_batch = add_batch
    try:
        gptq, _ = _walked(model, DEVICE, [_method("gptq", model, {"bits": 4, "group_size": 32, "act_order": True})])
    finally:
        HessianAccumulator.add_batch = original
    assert seen and all(s == (torch.bfloat16, torch.float32, torch.float32) for s in seen), set(seen)
    assert torch.isfinite(gptq).all() and _rel(gptq, reference) < 0.5
    for name, param in model.named_parameters():
        assert param.dtype == torch.bfloat16 and torch.isfinite(param).all(), name
