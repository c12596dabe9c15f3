"""The search space of LLaMA-NAS: which sub-networks of a pretrained LLaMA a search may pick.

A sub-network keeps, for each parent decoder layer, a prefix of its attention units and a prefix of its
FFN channels, both in the importance order fixed once before the search (:mod:`compress.search.profile`):

* attention units follow SlimGPT's unit choice under grouped-query attention: ``query`` keeps the first
  ``a`` query heads of every KV group (a = 0 … heads/kv_heads), ``kv`` keeps the first ``a`` whole KV
  groups (a = 0 … kv_heads); without GQA a unit is one head with its key and value;
* FFN widths are multiples of ``ffn_step`` (f = 0 … ceil(ffn / step); the last option is the full width);
* a layer with neither attention nor FFN is dropped (depth).

``llama-nas`` is the paper's space: per layer either dropped or kept with its whole attention and an FFN
width of at least one step (one gene per layer: 0 = dropped, g ≥ 1 = FFN option g). ``full`` adds the
attention width (two genes per layer: a, f), down to no attention at all. Every sub-network keeps at
least ``min_depth`` layers.

Costs are exact and additive over layers: decoder parameters (projection weights plus the two norms of
each kept layer), KV-cache bytes per token (keys and values of the kept KV heads, 2 bytes each: a
16-bit cache) and, when measured, latency (:mod:`compress.search.latency`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from compress.arch import Layout, projection_parameters
from compress.errors import CompressError

SPACES = ("llama-nas", "full")
UNITS = ("query", "kv")
KV_BYTES = 2  # bytes per cached key / value element (a 16-bit cache)


class Option(NamedTuple):
    """One layer's choice: attention units ``a`` and FFN steps ``f`` (both 0: the layer is dropped)."""

    a: int
    f: int


@dataclass(frozen=True)
class SearchSpace:
    kind: str  # llama-nas | full
    unit: str  # query | kv (the attention unit; kv when the parent has no GQA)
    hidden: int
    head_dim: int
    heads: int  # parent widths (every parent layer has the same)
    kv_heads: int
    ffn: int
    depth: int
    ffn_step: int
    min_depth: int

    @classmethod
    def from_layout(cls, lay: Layout, kind: str = "full", unit: str = "query", ffn_step: int | None = None,
                    min_depth: int | None = None) -> "SearchSpace":
        if kind not in SPACES:
            raise CompressError(f"unknown search space '{kind}' (choose {' or '.join(SPACES)})")
        if unit not in UNITS:
            raise CompressError(f"unknown attention unit '{unit}' (choose query or kv)")
        if not lay.uniform or lay.dropped:
            raise CompressError("the search needs an unpruned parent (every layer of the same widths); "
                                "this model is already pruned")
        heads, kv, ffn = lay.layers[0]
        step = ffn_step if ffn_step is not None else default_ffn_step(ffn)
        if not 1 <= step <= ffn:
            raise CompressError(f"--ffn-step must be in 1..{ffn} (the FFN width), got {step}")
        depth = lay.depth
        min_depth = math.ceil(depth / 2) if min_depth is None else min_depth
        if not 1 <= min_depth <= depth:
            raise CompressError(f"--min-depth must be in 1..{depth}, got {min_depth}")
        if heads == kv:
            unit = "kv"  # no GQA: a head goes with its own key and value
        return cls(kind, unit, lay.hidden, lay.head_dim, heads, kv, ffn, depth, step, min_depth)

    # --- per-layer options -------------------------------------------------------------------------
    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    @property
    def attention_units(self) -> int:
        """A: the most attention units a layer has (all of them)."""
        return self.groups if self.unit == "query" else self.kv_heads

    @property
    def ffn_options(self) -> int:
        """F: the most FFN steps (the full width)."""
        return math.ceil(self.ffn / self.ffn_step)

    def ffn_width(self, f: int) -> int:
        return min(f * self.ffn_step, self.ffn)

    def attention_width(self, a: int) -> tuple[int, int]:
        """(query heads, KV heads) of ``a`` units."""
        if a == 0:
            return 0, 0
        if self.unit == "query":
            return a * self.kv_heads, self.kv_heads
        return a * self.groups, a

    def widths(self, option: Option) -> tuple[int, int, int]:
        """(heads, kv_heads, ffn) of a layer option."""
        return (*self.attention_width(option.a), self.ffn_width(option.f))

    def options(self) -> list[Option]:
        """Every option of one layer, the drop option (0, 0) first."""
        A, F = self.attention_units, self.ffn_options
        if self.kind == "llama-nas":
            return [Option(0, 0)] + [Option(A, f) for f in range(1, F + 1)]
        return [Option(a, f) for a in range(A + 1) for f in range(F + 1)]

    # --- genomes -----------------------------------------------------------------------------------
    @property
    def genes_per_layer(self) -> int:
        return 1 if self.kind == "llama-nas" else 2

    @property
    def n_var(self) -> int:
        return self.depth * self.genes_per_layer

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "llama-nas":
            return np.zeros(self.n_var, dtype=int), np.full(self.n_var, self.ffn_options, dtype=int)
        upper = np.tile([self.attention_units, self.ffn_options], self.depth)
        return np.zeros(self.n_var, dtype=int), upper.astype(int)

    def decode(self, genome) -> list[Option]:
        """Per parent layer: its option (a genome is a vector of ints)."""
        g = [int(round(float(v))) for v in genome]
        if len(g) != self.n_var:
            raise CompressError(f"a genome of this space has {self.n_var} genes, got {len(g)}")
        if self.kind == "llama-nas":
            return [Option(self.attention_units, f) if f else Option(0, 0) for f in g]
        return [Option(g[2 * i], g[2 * i + 1]) for i in range(self.depth)]

    def encode(self, choice: list[Option]) -> list[int]:
        if self.kind == "llama-nas":
            return [o.f for o in choice]
        return [v for o in choice for v in (o.a, o.f)]

    def full_choice(self) -> list[Option]:
        return [Option(self.attention_units, self.ffn_options)] * self.depth

    def kept_depth(self, choice: list[Option]) -> int:
        return sum(1 for o in choice if o != (0, 0))

    def repair(self, genome) -> list[int]:
        """The nearest valid genome: at least ``min_depth`` layers kept (the dropped layers whose index is
        most central are restored first, deterministically)."""
        choice = self.decode(genome)
        dropped = [i for i, o in enumerate(choice) if o == (0, 0)]
        missing = self.min_depth - (self.depth - len(dropped))
        if missing > 0:
            restore = sorted(dropped, key=lambda i: (abs(i - (self.depth - 1) / 2), i))[:missing]
            smallest = min((o for o in self.options() if o != (0, 0)), key=lambda o: self.option_parameters(o))
            for i in restore:
                choice[i] = smallest
        return self.encode(choice)

    # --- costs -------------------------------------------------------------------------------------
    def option_parameters(self, option: Option) -> int:
        """Decoder parameters of one layer with this option (0 when dropped): projections + 2 norms."""
        if option == (0, 0):
            return 0
        heads, kv, ffn = self.widths(option)
        return projection_parameters(self.hidden, self.head_dim, heads, kv, ffn) + 2 * self.hidden

    def option_kv_bytes(self, option: Option) -> int:
        """KV-cache bytes per token of one layer with this option."""
        return 2 * self.attention_width(option.a)[1] * self.head_dim * KV_BYTES

    @property
    def parent_parameters(self) -> int:
        return self.depth * self.option_parameters(Option(self.attention_units, self.ffn_options))

    @property
    def parent_kv_bytes(self) -> int:
        return self.depth * self.option_kv_bytes(Option(self.attention_units, self.ffn_options))

    def parameters(self, choice: list[Option]) -> int:
        return sum(self.option_parameters(o) for o in choice)

    def kv_bytes(self, choice: list[Option]) -> int:
        return sum(self.option_kv_bytes(o) for o in choice)

    def layer_widths(self, choice: list[Option]) -> list[tuple[int, int, int] | None]:
        """Per parent layer: (heads, kv_heads, ffn), or None when dropped."""
        return [None if o == (0, 0) else self.widths(o) for o in choice]

    def as_dict(self) -> dict:
        return asdict(self)


def default_ffn_step(ffn: int) -> int:
    """64 channels for small models (the default model's 1536), 256 for 8B-class widths (≥ 8192)."""
    return 256 if ffn >= 8192 else 64 if ffn >= 512 else max(ffn // 8, 1)
