"""``compress compare``: several output folders in one table, and perplexity against size in one plot.

Each folder's ``compress.json`` says what was done (the methods of its stages and their options), the
parameter count and what the run measured, with the protocol of each measurement:

* perplexity: the text, the window length, the stride and the number of windows;
* fidelity (KL divergence and top-1 agreement): the reference model, the text, the window length and
  the number of positions compared.

Bytes on disk are read from the folder (its ``*.safetensors`` files). Two numbers are comparable only
when their protocols are equal: for each metric the protocol that most folders share is chosen, each
folder shows its value under that protocol when it has one, and a folder that only has another
protocol is flagged (its protocol cell starts with ``!``, and a warning names it), never silently put
beside the others. :func:`measure` instead measures every folder on one protocol (``compress compare
--eval``), so the table and the plot compare like with like.

Reading the records imports neither torch nor the models; only :func:`measure` loads them. The steps:
:mod:`~compress.compare.records` (reading), :mod:`~compress.compare.table` (choosing protocols,
flagging), :mod:`~compress.compare.measure` (``--eval``) and :mod:`~compress.compare.plot`.
"""

from __future__ import annotations

import os

from compress.compare.measure import check_measure_options, measure
from compress.compare.plot import check_plot_path, plot
from compress.compare.records import Fidelity, Output, Perplexity, Protocol, read_output, read_outputs
from compress.compare.table import FLAG, Comparison, Row, compare
from compress.errors import CompressError

__all__ = ["FLAG", "Comparison", "Fidelity", "Output", "Perplexity", "Protocol", "Row", "check_measure_options",
           "check_plot_path", "compare", "compare_outputs", "measure", "plot", "read_output", "read_outputs"]


def compare_outputs(folders: list, *, eval_data: str | None = None, seqlen: int = 2048, windows: int | None = None,
                    reference: str | None = None, plot_path: str | os.PathLike | None = None, device: str = "auto",
                    batch_size: int = 1) -> Comparison:
    """``compress compare`` as a function: read every folder's record (and with ``eval_data`` measure
    every folder on one protocol), compare, and with ``plot_path`` write the plot. Every input is
    checked before any model is loaded or any file is written."""
    outputs = read_outputs(folders)
    if eval_data is None and reference is not None:
        raise CompressError("--reference is used with --eval DATA (it measures KL and top-1 on that text)")
    if plot_path is not None:
        check_plot_path(plot_path)
        if eval_data is None and not any(o.perplexities for o in outputs):
            raise CompressError("nothing to plot: no output has a perplexity in its compress.json "
                                "(measure them with --eval DATA)")
    if eval_data is not None:
        measure(outputs, eval_data, seqlen, windows, reference, device, batch_size)
    comparison = compare(outputs)
    if plot_path is not None:
        plot(comparison, plot_path)
    return comparison
