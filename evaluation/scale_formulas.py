"""Memory formulas of the layer walk and its methods at scale, in bytes (evaluation/bench_scale.py).

Notation: T = N·L calibration tokens, b = one batch's tokens, H hidden, F FFN width, q = heads·head_dim,
kv = kv_heads·head_dim, s the activations' bytes per element (the model's dtype), 4 for float32
statistics. On CPU the "device" is the host, so the device terms are added to the host's.

* activations (the walk's cache of hidden states):     T·H·s
* one batch's forward transient (the MLP's gate/up/product, 3·F wide, with the residual, input,
  norm and output, 4·H wide):                           b·(3F + 4H)·s
* on the host only (CPU runs): the attention's temporaries of one batch (normed input, q, rotated q,
  k, v, the repeated k/v, the attention output and its contiguous copy, o's output: about 9·H + 3·kv
  wide), which the C allocator keeps in its heap after they are freed (each is at most 32 MiB at
  b = 2048, glibc's largest mmap threshold, so they come from the heap, not from mmap): b·(9H + 3kv)·s.
  Found by measurement: the empty walk's peak was 1.7 × the formula without this term.
* a method's solver phase (below) and the MLP transient do not overlap: the peak holds the larger
* staged carry (GPTQ, SlimGPT at the FFN point: the residual stream and the FFN activation):
                                                        T·(H + F)·s
* statistics of one observation point of width n:      n²·4 (the accumulator, lower triangle kept)
* GPTQ on a group of width n and m stacked output rows: the Hessian read out of the accumulator
  (n²·4) and the solver's n×n work matrices (its own copy of H, then two of: the act-order permuted
  copies, the damped matrix, its Cholesky factor, the inverse, its upper factor: ``GPTQ_SQUARES`` = 3
  alive at once, after the fixes in compress/methods/quantize/gptq.py and compress/stats.py), plus
  the weight copies (the stacked original, the working copy, the codes, float32): 3·m·n·4
* SlimGPT (float64 OBS) on o_proj (n = q) and down_proj (n = F): the accumulator and the Hessian read
  out of it (2·n²·4), and two n×n float64 matrices at a time (H and its factor, the factor and H⁻¹,
  H⁻¹ and the Schur update's product, H⁻¹ and its shrunk copy): 2·n²·8; the weight's float64 working
  copy H·n·8 (the compensated result is that copy; its cast back runs after H⁻¹ is freed). A first
  version counted three float64 weight copies and overshot the measured peak (0.86 ×)
* FLAP: channel norms only (O(n)); its finish() prunes on the host: the float64 copy of down_proj that
  the bias compensation reads (H·F·8) and one pruned matrix before the old one is freed (0.8·H·F·s)
* ILD (one hybrid layer): the teacher outputs T·H·s, a copy of the layer with the new mixer, the
  mixer's gradients and Adam's two moments (3 × the mixer's parameters, float32), and the autograd
  activations of one batch (``ILD_SAVED`` · b·(F + H)·s)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GPTQ_SQUARES = 3  # n×n float32 matrices alive at GPTQ's peak besides the accumulator and the Hessian
ILD_SAVED = 8  # widths of F + H per token that autograd keeps for one batch's backward (measured)


@dataclass
class Sizes:
    T: int  # calibration tokens
    b: int  # tokens per batch
    H: int
    F: int
    q: int
    kv: int
    s: int  # activation bytes per element
    layer_bytes: int
    model_bytes: int
    device: str

    @classmethod
    def of(cls, config, samples, seqlen, batch, dtype, device, params) -> "Sizes":
        from evaluation.scale_model import layer_parameters

        s = torch.finfo(dtype).bits // 8
        d = config.head_dim
        return cls(samples * seqlen, min(batch, samples) * seqlen, config.hidden_size, config.intermediate_size,
                   config.num_attention_heads * d, config.num_key_value_heads * d, s,
                   layer_parameters(config) * s, params * s, device)


def _gptq(z: Sizes) -> int:
    """The largest GPTQ group: (width n, stacked rows m) over q/k/v, o, gate/up, down."""
    groups = [(z.H, z.q + 2 * z.kv), (z.q, z.H), (z.H, 2 * z.F), (z.F, z.H)]
    return max((2 + GPTQ_SQUARES) * n * n * 4 + 3 * m * n * 4 for n, m in groups)


def _slimgpt(z: Sizes) -> int:
    return max(2 * n * n * 4 + 2 * n * n * 8 + z.H * n * 8 for n in (z.q, z.F))


def _ild(z: Sizes) -> int:
    mixer = 2 * z.H * z.q  # about the mixer's parameters (MLA / Mamba2 built from q, k, v, o)
    return z.layer_bytes + 3 * mixer * 4 + ILD_SAVED * z.b * (z.F + z.H) * z.s


SOLVER = {"gptq": ("GPTQ solver (statistics + n×n work + weight copies)", _gptq),
          "slimgpt": ("OBS solver (statistics + float64 n×n work + weights)", _slimgpt),
          "flap": ("finish (float64 copy of down_proj + one pruned copy)",
                   lambda z: z.H * z.F * 8 + int(0.8 * z.H * z.F * z.s)),
          "ild": ("student layer + Adam + autograd of one batch", _ild)}


def terms(method: str, z: Sizes) -> tuple[dict, dict]:
    """(host terms, device terms) of ``method``: what stays for the whole layer, plus the largest phase."""
    host = {"activations": z.T * z.H * z.s}
    if method in ("gptq", "slimgpt"):
        host["staged carry"] = z.T * (z.H + z.F) * z.s
    if method == "ild":
        host["teacher outputs"] = z.T * z.H * z.s
    mlp = z.b * (3 * z.F + 4 * z.H) * z.s
    phases = {"MLP transient of one batch": mlp}
    if method in SOLVER:
        label, fn = SOLVER[method]
        phases[label] = fn(z)
    peak = max(phases, key=phases.get)
    device = {f"max phase: {peak}": phases[peak]}
    if z.device == "cuda":
        device["one layer"] = z.layer_bytes
    else:  # glibc keeps the attention's hidden-sized temporaries (≤ 32 MiB each) in its heap once freed
        device["attention temporaries kept by the allocator"] = z.b * (9 * z.H + 3 * z.kv) * z.s
    return host, device
def host_formula(method: str, z: Sizes) -> dict:
    host, device = terms(method, z)
    if z.device != "cuda":
        host.update({f"{k} (device)": v for k, v in device.items()})
    host["total"] = sum(host.values())
    return host


def device_formula(method: str, z: Sizes) -> dict | None:
    if z.device != "cuda":
        return None
    device = terms(method, z)[1]
    device["total"] = sum(device.values())
    return device


def extrapolate(row: dict, z: Sizes, recipe: tuple[int, int], layers: int) -> dict:
    """Seconds per layer at the recipe's calibration size: forward and statistics scale with the tokens
    (attention's L² part is ignored), the solver does not; × ``layers``. An extrapolation."""
    samples, seqlen = recipe
    scale = samples * seqlen / z.T
    per = [r for r in row["layers"]]
    if not per:
        return {"samples": samples, "seqlen": seqlen, "per_layer": 0.0, "minutes": 0.0}
    fwd = sum(r["forward"] + r["statistics"] for r in per) / len(per)
    solver = sum(r["solver"] for r in per) / len(per)
    per_layer = fwd * scale + solver
    return {"samples": samples, "seqlen": seqlen, "per_layer": per_layer, "minutes": per_layer * layers / 60}
