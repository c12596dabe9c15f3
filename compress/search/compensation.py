"""OBS-compensated candidates: the kept o_proj / down_proj columns refit to the parent's output.

A sliced candidate keeps the first units of a reordered layer and simply drops the rest of the o_proj
and down_proj input columns. Structured pruners (SlimGPT) instead update the kept columns so that the
projection's output on the calibration inputs changes as little as possible, and a structure that is
poor as a slice (every layer a little narrower) can be the best one once compensated. Scoring candidates
as slices steers the search towards what slices well (fewer layers, whole attentions removed); scoring
them compensated lets it find what the export's compensation will be good at.

For one projection with inputs X (the parent's, in the reordered basis), H = XᵀX and kept columns S
(the rest R), the least-squares update is W'_S = W_S + W_R H_RS H_SS⁻¹. In an order where every option
keeps a prefix (FFN channels and KV groups are prefixes already; query units are taken unit by unit),
the damped Cholesky factor H = L Lᵀ gives H_RS H_SS⁻¹ = L_RS L_SS⁻¹, so W'_S is one triangular solve,
and the output error left after the update is Σ_{j ≥ k} ‖(W L)_{:,j}‖²: one product and a suffix sum
for every width of the layer at once.

The factors are computed once by the profiling walk (float32; o_proj heads·d and down_proj FFN squared
per layer, about 0.3 GB for smollm2-135m, 26 GB for an 8B model: ``--candidates slice`` skips them).
Compensated weights are cached per (layer, width) up to a byte budget: a search revisits the same
per-layer options many times.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from compress import arch
from compress.search.space import Option, SearchSpace

CANDIDATES = ("obs", "slice")
DAMPING = 0.01  # of the mean diagonal, as SlimGPT's default
CACHE_BYTES = 1 << 30


def unit_permutation(space: SearchSpace) -> torch.Tensor:
    """o_proj input columns of a reordered layer in the order the attention units are added: the
    columns the first ``a`` units keep are the first ``a · kv_heads · head_dim`` (query units) or
    ``a · groups · head_dim`` (kv units)."""
    from compress.search.profile import unit_heads

    order: list[int] = []
    for u in range(space.attention_units):
        seen = set(unit_heads(space, u))
        order += [h for h in unit_heads(space, u + 1) if h not in seen]
    return arch.head_channels(order, space.head_dim).cpu()


def damped_factor(xtx: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Lower Cholesky factor (float32) of XᵀX damped as SlimGPT damps its Hessians (float64 for the
    factorization)."""
    from compress.methods.slimgpt.obs import damp_

    return torch.linalg.cholesky(damp_(xtx.double().clone(), damping)).float()


def o_kept(space: SearchSpace, a: int) -> int:
    """o_proj input columns the first ``a`` attention units keep."""
    from compress.search.profile import unit_heads

    return len(unit_heads(space, a)) * space.head_dim


def residual_errors(weight: torch.Tensor, factor: torch.Tensor, sizes: list[int]) -> list[float]:
    """Output error Σ‖W'_S X_S − W X‖² left after the update, for every kept prefix size in ``sizes``
    (``weight``'s columns already in the factor's order)."""
    energy = (weight.double() @ factor.double()).pow(2).sum(0)  # ‖(W L)_{:,j}‖² per column j
    suffix = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    return [float(suffix[k]) for k in sizes]


def sliced_errors(weight: torch.Tensor, xtx: torch.Tensor, sizes: list[int]) -> list[float]:
    """Σ‖W_S X_S − W X‖² = tr(W_R H_RR W_Rᵀ) of the plain slice, per kept prefix size."""
    W, H = weight.double(), xtx.double()
    return [float(((W[:, k:] @ H[k:, k:]) * W[:, k:]).sum()) for k in sizes]


class Compensation:
    """Per layer, the damped factors of the o_proj and down_proj input Gram matrices (reordered basis, in
    prefix order), and the compensated weights of any option's kept columns."""

    def __init__(self, space: SearchSpace, factors: dict[int, dict[str, torch.Tensor]],
                 cache_bytes: int = CACHE_BYTES):
        self.space = space
        self.factors = factors  # layer → {"o": L (heads·d²), "down": L (ffn²)}
        self.perm = unit_permutation(space)
        self.cache: OrderedDict = OrderedDict()
        self.cache_bytes, self._bytes = cache_bytes, 0

    @torch.no_grad()
    def o_weight(self, index: int, weight: torch.Tensor, a: int) -> torch.Tensor:
        """The compensated o_proj of ``a`` units: (hidden, kept columns) in the reordered layer's order
        of the kept heads (as :func:`compress.search.subnet.subnet` slices them)."""
        def compute():
            k = o_kept(self.space, a)
            perm = self.perm.to(weight.device)
            solved = self._solve(weight[:, perm], self.factors[index]["o"].to(weight.device), k)
            return solved[:, torch.argsort(perm[:k])]  # back to increasing positions (group by group)
        return self._cached((index, "o", a), compute)

    @torch.no_grad()
    def down_weight(self, index: int, weight: torch.Tensor, f: int) -> torch.Tensor:
        """The compensated down_proj of the first ``f`` FFN steps: (hidden, width)."""
        k = self.space.ffn_width(f)
        return self._cached((index, "down", f),
                            lambda: self._solve(weight, self.factors[index]["down"].to(weight.device), k))

    @staticmethod
    def _solve(weight: torch.Tensor, L: torch.Tensor, k: int) -> torch.Tensor:
        """W_S + (W_R L_RS) L_SS⁻¹ for the first ``k`` columns (W and L in the same order)."""
        W = weight.detach().float()
        if k >= W.shape[1]:
            return W.to(weight.dtype)
        update = torch.linalg.solve_triangular(L[:k, :k], W[:, k:] @ L[k:, :k], upper=False, left=False)
        return (W[:, :k] + update).to(weight.dtype)

    def _cached(self, key, compute) -> torch.Tensor:
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        value = compute()
        size = value.numel() * value.element_size()
        if size <= self.cache_bytes:
            self.cache[key] = value
            self._bytes += size
            while self._bytes > self.cache_bytes:
                _, old = self.cache.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()
        return value

    def clear(self) -> None:
        """Forget the cached weights (the parent's weights changed, e.g. after super-network training)."""
        self.cache.clear()
        self._bytes = 0

    # --- whole-model helpers ----------------------------------------------------------------------
    @torch.no_grad()
    def full_weights(self, index: int, layer, option: Option) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Full-size o_proj / down_proj weights whose kept columns are compensated (the others unchanged:
        the shrinking drops them), for :func:`compress.search.subnet.materialize`; None where the option
        keeps the projection whole or removes it."""
        from compress.search.profile import unit_heads

        o = d = None
        s = self.space
        if 0 < option.a < s.attention_units:
            w = arch.projection(layer, arch.O).weight
            o = w.detach().clone()
            cols = arch.head_channels(unit_heads(s, option.a), s.head_dim, w.device)
            o[:, cols] = self.o_weight(index, w, option.a)
        if 0 < option.f < s.ffn_options:
            w = arch.projection(layer, arch.DOWN).weight
            d = w.detach().clone()
            d[:, :s.ffn_width(option.f)] = self.down_weight(index, w, option.f)
        return o, d


def layer_orders(space: SearchSpace, heads: list[int], channels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_proj, down_proj) input columns of the parent in each factor's order: the reordering's importance
    orders, the o_proj's taken unit by unit."""
    q_index = arch.head_channels(heads, space.head_dim).cpu()
    return q_index[unit_permutation(space)], torch.tensor(channels, dtype=torch.long)


def layer_factors(space: SearchSpace, o_xtx: torch.Tensor, down_xtx: torch.Tensor, heads: list[int],
                  channels: list[int], layer=None) -> tuple[dict[str, torch.Tensor], tuple | None]:
    """A layer's factors from its o_proj / down_proj input Gram matrices in the parent's basis, given the
    importance orders (heads, channels) the reordering applies; with the (parent) ``layer``, also the
    refit's gains per attention width a (0..A) and FFN width f (0..F): how much of the sliced
    projection's output error (Σ‖·‖² over the calibration tokens) the update removes."""
    o_index, f_index = layer_orders(space, heads, channels)
    grams = {"o": o_xtx.cpu()[o_index][:, o_index], "down": down_xtx.cpu()[f_index][:, f_index]}
    factors = {name: damped_factor(xtx) for name, xtx in grams.items()}
    if layer is None:
        return factors, None
    weights = {"o": arch.projection(layer, arch.O).weight.detach().cpu()[:, o_index],
               "down": arch.projection(layer, arch.DOWN).weight.detach().cpu()[:, f_index]}
    sizes = {"o": [o_kept(space, a) for a in range(space.attention_units + 1)],
             "down": [space.ffn_width(f) for f in range(space.ffn_options + 1)]}
    gains = []
    for name in ("o", "down"):
        sliced = sliced_errors(weights[name], grams[name], sizes[name])
        left = residual_errors(weights[name], factors[name], sizes[name])
        gains.append([max(s - r, 0.0) for s, r in zip(sliced, left)])
    return factors, (gains[0], gains[1])


def profile_factors(model, tokens, space: SearchSpace, device, batch_size: int, orders: dict) -> Compensation:
    """The compensation of a recorded search (its importance ``orders``): one read-only walk of the
    parent (not reordered) on the search's calibration ``tokens`` for the Gram matrices."""
    from compress.search.profile import SearchProfile
    from compress.walk import walk

    profiler = SearchProfile(space, "obs", orders=orders)
    walk(model, tokens, [profiler], device=device, batch_size=batch_size)
    return profiler.compensation()


def profiling_tokens(model, tokenizer, c):
    """The profiling walk's tokens with OBS candidates: ``obs_samples`` × ``obs_seqlen`` of the search's
    source and seed (the search's own calibration when that is not fewer tokens)."""
    from compress.data import calibration_tokens

    if c.obs_samples * c.obs_seqlen <= c.samples * c.seqlen:
        return calibration_tokens(model, tokenizer, c.data, c.samples, c.seqlen, c.seed)
    return calibration_tokens(model, tokenizer, c.data, c.obs_samples, c.obs_seqlen, c.seed)
