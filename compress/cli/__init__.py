"""The ``compress`` command line.

Each verb lives in its own module under ``compress/cli/`` and is listed once in ``COMMANDS``.
Errors a user can fix (:class:`compress.errors.CompressError`) become one line on stderr and exit
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from compress.errors import CompressError

COMMANDS = [
    "compress.cli.adapt_cmd",
    "compress.cli.compare_cmd",
    "compress.cli.distill_cmd",
    "compress.cli.eval_cmd",
    "compress.cli.hybridize_cmd",
    "compress.cli.prune_cmd",
    "compress.cli.quantize_cmd",
    "compress.cli.run_cmd",
    "compress.cli.search_cmd",
    "compress.cli.transfer_cmd",
]


class CompressGroup(click.Group):
    """A click group that turns CompressError into one clear line and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CompressError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        finally:
            _release_outputs()


def _release_outputs() -> None:
    """Let go of the output locks the command took (compress.export), whatever happened."""
    export = sys.modules.get("compress.export")
    if export is not None:
        export.release_all()


@click.group(cls=CompressGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output: -v for progress details (INFO), -vv for debug.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def main(verbose: int, quiet: bool) -> None:
    """Make LLaMA-family models smaller, faster or adapted."""
    level = logging.WARNING - 10 * min(verbose, 2)  # default: warnings only (progress bars say the rest)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "huggingface_hub", "accelerate", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if quiet:
        from compress.progress import set_progress

        set_progress(False)
    _quiet_transformers()


def _quiet_transformers() -> None:
    if "transformers" not in sys.modules:  # not imported yet (a help page may never need it): tell it by env
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass


for _module in COMMANDS:
    importlib.import_module(_module).register(main)
