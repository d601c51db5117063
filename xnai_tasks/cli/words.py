"""The words of a command line sorted out the way argparse sorts them.

Long options may be shortened to any unique prefix, a word that looks like an option is never taken for an
option's value, and a misused option is an error in argparse's words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

import click

_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


class CommandLineError(click.UsageError):
    """A usage error, printed as the one line ``PROG: MESSAGE``."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class OptionWord(NamedTuple):
    """A word that names an option."""

    name: str | None  # None: no such option
    value: str | None  # given in the same word: --name=value, -cVALUE


@dataclass
class Scan:
    """One command's words sorted out: options with their values, positional words, unknown options."""

    options: list[str] = field(default_factory=list)
    positionals: list[tuple[int, str]] = field(default_factory=list)
    unknown: list[tuple[int, str]] = field(default_factory=list)
    double_dash: int | None = None
    #: a misused option: argparse reports it once the words before it are read
    error: CommandLineError | None = None

    def extras(self, used: int) -> list[str]:
        """Unknown options and the positional words no argument took, in command-line order."""
        taken = {at for at, _ in self.positionals[:used]}
        extras = [*self.unknown, *self.positionals[used:]]
        # argparse lets an argument swallow a "--" next to it; any other "--" is surplus
        if self.double_dash is not None and not {self.double_dash - 1, self.double_dash + 1} & taken:
            extras.append((self.double_dash, "--"))
        return [word for _, word in sorted(extras)]


def scan_words(table: dict[str, click.Option], args: list[str], prog: str) -> Scan:
    """``args`` sorted out for a command with the options ``table``, up to the first misused option."""
    end = args.index("--") if "--" in args else len(args)
    # Every word is classified before any is read, so an ambiguous option is the first error reported.
    kinds = [classify(word, table, prog) for word in args[:end]]
    scan = Scan(double_dash=end if end < len(args) else None)
    at = 0
    while at < end:
        kind = kinds[at]
        if kind is None:
            scan.positionals.append((at, args[at]))
        elif kind.name is None:
            scan.unknown.append((at, args[at]))
        elif table[kind.name].is_flag:
            if kind.value is not None:
                scan.error = argument_error(prog, table[kind.name], f"ignored explicit argument {kind.value!r}")
                return scan
            scan.options.append(kind.name)
        elif kind.value is not None:
            scan.options += [kind.name, kind.value]
        elif at + 1 < end and kinds[at + 1] is None:
            scan.options += [kind.name, args[at + 1]]
            at += 1
        else:
            scan.error = argument_error(prog, table[kind.name], "expected one argument")
            return scan
        at += 1
    scan.positionals += [(at, args[at]) for at in range(end + 1, len(args))]
    return scan


def classify(word: str, table: dict[str, click.Option], prog: str) -> OptionWord | None:
    """The option ``word`` names (``None`` when it is a positional word), as argparse tells them apart."""
    if not word.startswith("-"):
        return None
    if word in table:
        return OptionWord(word, None)
    if len(word) == 1:
        return None
    name, equals, value = word.partition("=")
    if equals and name in table:
        return OptionWord(name, value)
    matches = _prefix_matches(word, table)
    if len(matches) > 1:
        names = ", ".join(match.name or "" for match in matches)
        raise CommandLineError(prog, f"ambiguous option: {word} could match {names}")
    if matches:
        return matches[0]
    if _NEGATIVE_NUMBER.match(word) or " " in word:
        return None
    return OptionWord(None, None)


def _prefix_matches(word: str, table: dict[str, click.Option]) -> list[OptionWord]:
    if word.startswith("--"):
        prefix, equals, value = word.partition("=")
        return [OptionWord(name, value if equals else None) for name in table if name.startswith(prefix)]
    # a one-letter option may carry its value in the same word: -c4
    return [
        OptionWord(name, word[2:] if name == word[:2] else None)
        for name in table
        if name == word[:2] or name.startswith(word)
    ]


def option_table(command: click.Command, ctx: click.Context) -> dict[str, click.Option]:
    """Every option name of ``command``, help first then as declared (argparse's order, for its messages)."""
    params = [command.get_help_option(ctx), *command.params]
    return {name: param for param in params if isinstance(param, click.Option) for name in param.opts}


def argument_error(prog: str, param: click.Parameter | None, message: str) -> CommandLineError:
    """argparse's ``argument NAME: MESSAGE``: an option by all its names, an argument by its own."""
    if isinstance(param, click.Option):
        return CommandLineError(prog, f"argument {'/'.join(param.opts)}: {message}")
    if param is not None and param.name:
        return CommandLineError(prog, f"argument {param.name}: {message}")
    return CommandLineError(prog, message)
