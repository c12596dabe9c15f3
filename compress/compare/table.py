"""Putting outputs side by side: one perplexity and one fidelity per output, under the protocol most share."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from compress.compare.records import Fidelity, Output, Perplexity, Protocol

FLAG = "!"  # marks a protocol cell that differs from the one the other folders share


@dataclass
class Row:
    """What the table and the plot show of one output: one perplexity and one fidelity, each under the
    protocol chosen for the comparison (or flagged as another)."""

    output: Output
    perplexity: Perplexity | None
    fidelity: Fidelity | None
    perplexity_flagged: bool
    fidelity_flagged: bool

    def as_dict(self) -> dict:
        o = self.output
        out = {"output": o.name, "folder": str(o.folder), "method": o.method, "options": o.options,
               "source": o.source, "format": o.format, "parameters": o.parameters, "bytes_on_disk": o.bytes_on_disk,
               "measured_by_compare": o.measured, "perplexity": None, "fidelity": None}
        if self.perplexity is not None:
            out["perplexity"] = {"value": self.perplexity.value, "protocol": self.perplexity.protocol.as_dict(),
                                 "flagged": self.perplexity_flagged}
        if self.fidelity is not None:
            f = self.fidelity
            out["fidelity"] = {"kl_divergence": f.kl_divergence, "top1_agreement": f.top1_agreement,
                               "protocol": f.protocol.as_dict(), "flagged": self.fidelity_flagged}
        return out


@dataclass
class Comparison:
    rows: list[Row]
    perplexity_protocol: Protocol | None  # the one most outputs share (None: no output has a perplexity)
    fidelity_protocol: Protocol | None
    warnings: list[str]

    HEADERS = ("output", "method", "options", "parameters", "MB on disk", "perplexity", "ppl protocol", "KL",
               "top-1", "fidelity protocol")

    def table(self) -> list[tuple]:
        """One tuple per output, in the order of :attr:`HEADERS` (missing values as "-")."""
        rows = []
        for row in self.rows:
            o, p, f = row.output, row.perplexity, row.fidelity
            flag_p, flag_f = (FLAG + " " if row.perplexity_flagged else ""), (FLAG + " " if row.fidelity_flagged else "")
            rows.append((o.name, o.method, o.options or "-", "-" if o.parameters is None else o.parameters,
                         round(o.bytes_on_disk / 1e6, 2),
                         "-" if p is None else p.value, "-" if p is None else flag_p + p.protocol.label(),
                         "-" if f is None else f.kl_divergence, "-" if f is None else f.top1_agreement,
                         "-" if f is None else flag_f + f.protocol.label()))
        return rows

    def as_dict(self) -> dict:
        return {"rows": [r.as_dict() for r in self.rows],
                "perplexity_protocol": None if self.perplexity_protocol is None else self.perplexity_protocol.as_dict(),
                "fidelity_protocol": None if self.fidelity_protocol is None else self.fidelity_protocol.as_dict(),
                "warnings": list(self.warnings)}


def compare(outputs: list[Output]) -> Comparison:
    """Choose, for perplexity and for fidelity, the protocol that most outputs share; flag the others."""
    warnings = []
    p_protocol, p_choice = _choose([[m.protocol for m in o.perplexities] for o in outputs])
    f_protocol, f_choice = _choose([[m.protocol for m in o.fidelities] for o in outputs])
    rows = []
    for o, p_index, f_index in zip(outputs, p_choice, f_choice):
        p = None if p_index is None else o.perplexities[p_index]
        f = None if f_index is None else o.fidelities[f_index]
        rows.append(Row(o, p, f, p is not None and p.protocol != p_protocol, f is not None and f.protocol != f_protocol))
    for kind, chosen, attr, flag in (("perplexity", p_protocol, "perplexity", "perplexity_flagged"),
                                     ("fidelity", f_protocol, "fidelity", "fidelity_flagged")):
        flagged = [r for r in rows if getattr(r, flag)]
        if flagged:
            others = "; ".join(f"{r.output.name}: {getattr(r, attr).protocol.label()}" for r in flagged)
            warnings.append(f"{kind} protocols differ: {chosen.label()} for most outputs, but {others}; "
                            f"these values are not comparable (marked {FLAG}); measure every output on one protocol "
                            f"with --eval DATA --seqlen N --windows K")
    missing = [r.output.name for r in rows if r.perplexity is None]
    if missing and len(missing) < len(rows):
        warnings.append(f"no perplexity recorded for {', '.join(missing)} (measure it with --eval)")
    return Comparison(rows, p_protocol, f_protocol, warnings)


def _choose(protocols: list[list[Protocol]]) -> tuple[Protocol | None, list[int | None]]:
    """The protocol held by most outputs (ties: the earliest seen), and each output's index of it, else
    of its first protocol, else None."""
    counts = Counter(p for ps in protocols for p in set(ps))
    if not counts:
        return None, [None] * len(protocols)
    order = list(dict.fromkeys(p for ps in protocols for p in ps))
    best = max(order, key=lambda p: (counts[p], -order.index(p)))
    return best, [ps.index(best) if best in ps else (0 if ps else None) for ps in protocols]
