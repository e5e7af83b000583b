"""Conventions every `qvlsearch` command follows, applied in one place: `-v/--verbose` works after the command
name too, and a flag's help shows neither a type (`<bool>`) nor a default (a flag is off unless given)."""

from __future__ import annotations

import copy
import logging

import click
from typer.core import TyperGroup


def set_verbose(verbose: bool) -> None:
    """Log progress details to stderr (and libraries' warnings), or only warnings and errors."""
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("py.warnings").setLevel(logging.WARNING if verbose else logging.ERROR)


def verbose_after_command(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        set_verbose(True)


class Group(TyperGroup):
    """The top-level group: its `--verbose` is also each command's, and flags are shown as flags."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        verbose = next(p for p in self.params if p.name == "verbose")
        for command in [self, *self.commands.values()]:
            if command is not self:
                own = copy.copy(verbose)
                own.expose_value, own.callback = False, verbose_after_command
                command.params.append(own)
            help_option = command.get_help_option(click.Context(command))  # made once, then cached by Click
            for param in [*command.params, help_option]:
                if getattr(param, "is_flag", False):
                    param.metavar, param.show_default = "", False
