"""The ``xnai`` command line on click, read and refused as the argparse one was.

Words are sorted out as argparse sorted them (words.py), unknown options and surplus arguments are reported
together after every other error, and each usage error is one line, ``PROG: MESSAGE``, in argparse's words:
scripts that read them keep working.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from xnai_tasks.cli.words import CommandLineError, argument_error, classify, option_table, scan_words

PROG = "xnai"
HELP_OPTIONS = ("-h", "--help")
# Unknown options before the command name, kept in the context's meta (shared with the command's) until the
# command has read its own: argparse names them all in one error, and only when there is no other.
_UNRECOGNIZED = "xnai.unrecognized"

if TYPE_CHECKING:
    _ParamType = click.ParamType[Any]
else:
    _ParamType = click.ParamType  # click 8.1, which celery allows, has no type parameters


class Number(_ParamType):
    """An ``int`` or ``float`` value; with a bound, a finite one at least ``low`` or more than ``above``."""

    def __init__(self, kind: type[int] | type[float], *, low: int | None = None, above: int | None = None) -> None:
        self.kind = kind
        self.name = kind.__name__
        self.low = low
        self.above = above

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | float:
        try:
            number = self.kind(value)
        except (TypeError, ValueError):
            self.fail(f"invalid {self.name} value: {value!r}", param, ctx)
        if self.low is None and self.above is None:
            return number
        if not math.isfinite(number):
            self.fail(f"must be a finite number, not {value!r}", param, ctx)
        if self.low is not None and number < self.low:
            self.fail(f"must be at least {self.low}, not {value!r}", param, ctx)
        if self.above is not None and number <= self.above:
            self.fail(f"must be more than {self.above}, not {value!r}", param, ctx)
        return number


class Choice(_ParamType):
    """One of a few words."""

    name = "choice"

    def __init__(self, *choices: str) -> None:
        self.choices = choices

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if value not in self.choices:
            self.fail(f"invalid choice: {value!r} (choose from {', '.join(map(repr, self.choices))})", param, ctx)
        return str(value)


class Group(click.Group):
    """Lists its commands in the order they were added."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


class Command(click.Command):
    """A command whose options and usage errors behave as the argparse ones did."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Sort the words as argparse would, hand them to click (options, ``--``, positionals), report the rest."""
        prog = ctx.command_path
        scan = scan_words(option_table(self, ctx), args, prog)
        ctx.allow_extra_args = True  # surplus arguments are reported below, with the unknown options
        try:
            left = super().parse_args(ctx, [*scan.options, "--", *(word for _, word in scan.positionals)])
        except click.MissingParameter:
            # argparse stops at a misused option, before it checks for missing arguments
            if scan.error is not None:
                raise scan.error from None
            missing = ", ".join(self._missing(len(scan.positionals)))
            raise CommandLineError(prog, f"the following arguments are required: {missing}") from None
        except click.BadParameter as exc:
            raise argument_error(prog, exc.param, exc.message) from None
        except click.UsageError as exc:
            raise CommandLineError(prog, exc.message) from None
        if scan.error is not None:
            raise scan.error
        unrecognized = [*ctx.meta.get(_UNRECOGNIZED, ()), *scan.extras(len(scan.positionals) - len(left))]
        if unrecognized:
            raise CommandLineError(PROG, f"unrecognized arguments: {' '.join(unrecognized)}")
        ctx.args = []
        return []

    def _missing(self, given: int) -> list[str]:
        missing: list[str] = []
        for param in self.params:
            if not isinstance(param, click.Argument):
                continue
            if param.nargs == -1:
                # argparse names ARGS... too when an argument before it is missing; else it may be empty
                if missing:
                    missing.append(param.name or "")
                given = 0
            elif given:
                given -= 1
            elif param.required:
                missing.append(param.name or "")
        return missing


def parse_command_line(group: click.Group, argv: Sequence[str]) -> click.Context:
    """The context of the command ``argv`` names, parsed and ready to invoke; raises :class:`CommandLineError`."""
    args = list(argv)
    root = click.Context(group, info_name=PROG, help_option_names=list(HELP_OPTIONS))
    table = option_table(group, root)
    unknown: list[str] = []
    at = 0
    while at < len(args) and args[at] != "--":
        option = classify(args[at], table, PROG)
        if option is None:
            break
        if option.name is None:
            unknown.append(args[at])
        elif option.value is not None:
            raise argument_error(PROG, table[option.name], f"ignored explicit argument {option.value!r}")
        else:  # the group's only option is help
            click.echo(root.get_help())
            root.exit(0)
        at += 1
    # argparse takes the word after the options, even "--", for the command, unless it is the last one
    if args[at:] in ([], ["--"]):
        raise CommandLineError(PROG, "the following arguments are required: command")
    command = group.get_command(root, args[at])
    if command is None:
        choices = ", ".join(map(repr, group.list_commands(root)))
        raise CommandLineError(PROG, f"argument command: invalid choice: {args[at]!r} (choose from {choices})")
    root.meta[_UNRECOGNIZED] = unknown
    return command.make_context(args[at], list(args[at + 1 :]), parent=root)
