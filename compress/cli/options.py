"""Command-line flags made from method Config fields, so a new method gets its flags without CLI code.

A verb (``compress prune``, ``compress quantize``) is a :class:`MethodCommand`: besides the flags it
declares itself, it offers one flag per Config field of every registered method of that verb
(``Method.verb``), with the field's help text. ``--damping`` comes from SlimGPTConfig.damping,
``--clip-grid`` from QuantizeConfig.clip_grid, and a third-party method of the verb adds its own.
The registry is loaded only when the verb itself runs or shows its help: ``compress --help`` stays
light. A flag the user gives reaches the method as an option; a flag the chosen method has no field
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


def _option_for(field: dataclasses.Field, hint, owners: list[str], all_methods: int) -> click.Option:
    """One click option for a Config field (default None: the method's own default applies)."""
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
    kwargs: dict = {"default": None, "help": help_text + suffix, "expose_value": True}
    name = field.name
    if hint is bool:
        return click.Option([f"{_flag(name)}/--no-{name.replace('_', '-')}", name], **kwargs)
    if origin is typing.Literal:
        return click.Option([_flag(name), name], type=click.Choice([str(a) for a in args]), **kwargs)
    if origin in (list, tuple):
        inner = args[0] if args else str
        return click.Option([_flag(name), name], type=inner if inner in (int, float) else str, multiple=True,
                            **{**kwargs, "default": ()})
    return click.Option([_flag(name), name], type=hint if hint in (int, float, str) else str, **kwargs)


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

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if self._generated is None:
            from compress.plugin import available_methods

            flags = [n for p in self.params for n in (*getattr(p, "opts", []), *getattr(p, "secondary_opts", []))]
            taken = {p.name for p in self.params} | {n.lstrip("-").replace("-", "_") for n in flags}
            taken |= {n[len("--no-"):].replace("-", "_") for n in flags if n.startswith("--no-")}  # --no-X covers X
            count = len(available_methods(self.verb))
            for param in self.params:  # --method lists what is registered for this verb
                if "--method" in getattr(param, "opts", []) and param.help:
                    param.help = method_choices_help(self.verb, param.help)
            self._generated = set()
            for name, (field, hint, owners) in method_fields(self.verb).items():
                if name in taken:
                    continue  # the verb declares this one itself (e.g. --ratio, --bits)
                self.params.append(_option_for(field, hint, owners, count))
                self._generated.add(name)
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
