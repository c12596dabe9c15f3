"""Command-line flags made from method Config fields, so a new method gets its flags without CLI code.

A verb (``compress prune``, ``compress quantize``) is a :class:`MethodCommand`: besides the flags it
declares itself, it offers one flag per Config field of every registered method of that verb
(``Method.verb``), with the field's help text. ``--damping`` comes from SlimGPTConfig.damping,
``--clip-grid`` from QuantizeConfig.clip_grid, and a third-party method of the verb adds its own.
The registry is loaded only when the verb itself runs or shows its help: ``compress --help`` stays
light, and a verb's help page reads the flags from :mod:`compress.cli.help_cache` when the sources
and plugins are unchanged since the last one. A flag the user gives reaches the method as an option; a flag the chosen method has no field
for is an error naming both.
"""

from __future__ import annotations

import dataclasses
import typing

import click

from compress.errors import CompressError

GENERATED = "_method_options"  # the callback receives every generated flag's value in this dict


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _option_for(field: dataclasses.Field, hint, owners: list[str], all_methods: int) -> dict:
    """The spec (JSON) of one click option for a Config field (default None: the method's default applies)."""
    help_text = field.metadata.get("help", "")
    default = field.default if field.default is not dataclasses.MISSING else (
        field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
    suffix = f" [default: {default}]" if default is not None else ""
    if len(owners) < all_methods:
        suffix += f" ({', '.join(owners)})"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, __import__("types").UnionType):
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    spec: dict = {"decls": [_flag(field.name), field.name], "help": help_text + suffix, "type": None,
                  "choices": None, "multiple": False}
    name = field.name
    if hint is bool:
        spec["decls"][0] = f"{_flag(name)}/--no-{name.replace('_', '-')}"
    elif origin is typing.Literal:
        spec["choices"] = [str(a) for a in args]
    elif origin in (list, tuple):
        inner = args[0] if args else str
        spec.update(type=inner.__name__ if inner in (int, float) else "str", multiple=True)
    else:
        spec["type"] = hint.__name__ if hint in (int, float, str) else "str"
    return spec


def _build_option(spec: dict) -> click.Option:
    kind = click.Choice(spec["choices"]) if spec["choices"] else {"int": int, "float": float, "str": str}.get(
        spec["type"])
    return click.Option(spec["decls"], type=kind, multiple=spec["multiple"], default=() if spec["multiple"] else None,
                        help=spec["help"], expose_value=True)


def method_fields(verb: str) -> dict[str, tuple[dataclasses.Field, typing.Any, list[str]]]:
    """Field name → (field, type hint, methods that have it), over the verb's registered methods."""
    from compress.plugin import available_methods

    fields: dict = {}
    for name, cls in available_methods(verb).items():
        hints = typing.get_type_hints(cls.Config)
        for f in dataclasses.fields(cls.Config):
            if f.name in fields:
                fields[f.name][2].append(name)
            else:
                fields[f.name] = (f, hints[f.name], [name])
    return fields


class MethodCommand(click.Command):
    """A verb whose flags include its methods' Config fields (added when the verb is parsed)."""

    def __init__(self, *args, verb: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.verb = verb
        self._generated: set[str] | None = None
        self._help_only = False

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # a help page may take the flags from the help cache instead of importing every method
        self._help_only = any(arg in ctx.help_option_names for arg in args)
        return super().parse_args(ctx, args)

    def generated_specs(self, taken: set[str]) -> dict:
        """The --method help text and the specs of the flags the verb's methods add (from the registry)."""
        from compress.plugin import available_methods

        count = len(available_methods(self.verb))
        specs = [_option_for(field, hint, owners, count) for name, (field, hint, owners)
                 in method_fields(self.verb).items() if name not in taken]  # else the verb declares it itself
        return {"method_help": method_choices_help(self.verb, ""), "specs": specs}

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if self._generated is None:
            flags = [n for p in self.params for n in (*getattr(p, "opts", []), *getattr(p, "secondary_opts", []))]
            taken = {p.name for p in self.params} | {n.lstrip("-").replace("-", "_") for n in flags}
            taken |= {n[len("--no-"):].replace("-", "_") for n in flags if n.startswith("--no-")}  # --no-X covers X
            if self._help_only:
                from compress.cli.help_cache import cached

                generated = cached(f"verb:{self.verb}:{','.join(sorted(taken))}", lambda: self.generated_specs(taken))
            else:
                generated = self.generated_specs(taken)
            for param in self.params:  # --method lists what is registered for this verb
                if "--method" in getattr(param, "opts", []) and param.help:
                    param.help = f"{param.help}{generated['method_help']}"
            self._generated = set()
            for spec in generated["specs"]:
                self.params.append(_build_option(spec))
                self._generated.add(spec["decls"][1])
        return super().get_params(ctx)

    def invoke(self, ctx: click.Context):
        generated = self._generated or set()
        values = {k: ctx.params.pop(k) for k in list(ctx.params) if k in generated}
        ctx.params[GENERATED] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()
                                 if v is not None and v != ()}
        return super().invoke(ctx)


def method_options(verb: str, method: str, given: dict) -> dict:
    """``given`` (flag values the user set) checked against ``method``'s Config fields."""
    from compress.plugin import get_method

    cls = get_method(method, verb)
    names = {f.name for f in dataclasses.fields(cls.Config)}
    for name in given:
        if name not in names:
            raise CompressError(f"option {_flag(name)} does not apply to method {method}")
    return dict(given)


def method_choices_help(verb: str, text: str) -> str:
    """``text`` plus the verb's registered methods (for --method's help)."""
    from compress.plugin import available_methods

    return f"{text} One of: {', '.join(available_methods(verb))}."
