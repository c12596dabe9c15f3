"""Run a study notebook top to bottom with parameters, in a fresh kernel (what the tests do).

    .venv/bin/python notebooks/run_notebook.py --list
    .venv/bin/python notebooks/run_notebook.py quantization_tradeoffs -p bits '[4, 8]' -p eval_windows 2

The source of a notebook is its jupytext percent-format ``NAME.py`` (``NAME.ipynb`` is the same cells,
paired and stored without outputs). It is executed with papermill in the notebooks folder, in a new
``python3`` kernel of the interpreter running this (ipykernel installed with ``pip install -e
".[notebooks]"`` or ``".[test]"``), the given values injected after its parameters cell. A value is
YAML (``4``, ``[2, 4]``, ``null``, ``smollm2-135m``). A name the parameters cell does not declare and
a value of the wrong type are one error line, before any kernel starts; so is a
:class:`compress.errors.CompressError` the notebook raises.
"""

from __future__ import annotations

import argparse
import ast
import logging
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the notebooks import study.py from this folder
    sys.path.insert(0, str(HERE))

from compress.errors import CompressError  # noqa: E402
from study import ANNOTATION_NAMES, matches, type_name  # noqa: E402

KERNEL = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
USER_ERRORS = ("CompressError", "ConfigError")  # what a notebook raises for a bad parameter or input


def names() -> list[str]:
    """The study notebooks: every ``NAME.py`` of this folder with its paired ``NAME.ipynb``."""
    return sorted(p.stem for p in HERE.glob("*.ipynb") if p.with_suffix(".py").is_file())


def source(name: str) -> Path:
    if name not in names():
        raise CompressError(f"no notebook '{name}' (notebooks: {', '.join(names())})")
    return HERE / f"{name}.py"


def read(name: str):
    """The notebook (an nbformat node) read from its jupytext source, with the python3 kernel."""
    import jupytext

    nb = jupytext.read(source(name))
    nb.metadata["kernelspec"] = dict(KERNEL)
    return nb


def declared_parameters(nb, name: str = "notebook") -> dict[str, tuple]:
    """Name → (annotation, default) of the annotated assignments in the cell tagged ``parameters``."""
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise CompressError(f"notebook {name} must have exactly one cell tagged 'parameters', has {len(cells)}")
    declared = {}
    for node in ast.parse(cells[0].source).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            hint = eval(compile(ast.Expression(node.annotation), "<annotation>", "eval"),  # noqa: S307
                        {"__builtins__": {}}, dict(ANNOTATION_NAMES))
            declared[node.target.id] = (hint, ast.literal_eval(node.value))
    return declared


def check(name: str, parameters: dict, nb=None) -> None:
    """Every given parameter is declared by the notebook and of its declared type."""
    declared = declared_parameters(nb if nb is not None else read(name), name)
    for key, value in parameters.items():
        if key not in declared:
            raise CompressError(f"notebook {name} has no parameter '{key}' (parameters: {', '.join(declared)})")
        hint = declared[key][0]
        if not matches(value, hint):
            raise CompressError(f"notebook {name}: parameter '{key}' must be {type_name(hint)}, got "
                                f"{type(value).__name__} {value!r}")


def execute(name: str, parameters: dict | None = None, output: str | Path | None = None, timeout: int = 3600,
            log_output: bool = False):
    """Check the parameters, run the notebook in a fresh kernel, return the executed notebook node
    (and write it to ``output``). A CompressError raised in the notebook comes back as a CompressError."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    parameters = dict(parameters or {})
    nb = read(name)
    check(name, parameters, nb)
    try:
        return papermill.execute_notebook(nb, None if output is None else str(output), parameters=parameters,
                                          kernel_name=KERNEL["name"], cwd=str(HERE), progress_bar=False,
                                          log_output=log_output, execution_timeout=timeout)
    except PapermillExecutionError as exc:
        if exc.ename in USER_ERRORS:
            raise CompressError(f"notebook {name}: {exc.evalue}") from None
        raise


def _value(text: str, hint):
    """A -p value: YAML, except that a float parameter takes ``1e-3`` (a string in YAML 1.1) as a float."""
    import yaml

    value = yaml.safe_load(text)
    if isinstance(value, str) and hint is not None and matches(1.5, hint) and not matches("", hint):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", nargs="?", help="notebook name (see --list)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a parameter and its value (YAML); repeatable")
    parser.add_argument("--output", help="write the executed notebook (with its outputs) here")
    parser.add_argument("--list", action="store_true", help="list the notebooks and their parameters")
    args = parser.parse_args(argv)
    try:
        if args.list or not args.name:
            for n in names():
                declared = declared_parameters(read(n), n)
                print(f"{n}: " + ", ".join(f"{k}: {type_name(h)} = {d!r}" for k, (h, d) in declared.items()))
            return 0
        declared = declared_parameters(read(args.name), args.name)
        given = {key: _value(value, declared.get(key, (None,))[0]) for key, value in args.parameter}
        logging.basicConfig(level=logging.INFO, format="%(message)s")  # the cells' output, as they run
        execute(args.name, given, args.output, log_output=True)
    except CompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
