"""One error family for everything a user can fix: each message names the problem and the fix.

Entry points run through :func:`epas.cli.run`, which turns any :class:`EpasError` into one line on
stderr and a non-zero exit status instead of a traceback.
"""

from __future__ import annotations


class EpasError(Exception):
    """A problem with the user's run (input, state, or numbers), not a bug in the recipe."""

    label = "error"
    exit_code = 1
    every_rank = False  # True: a problem some ranks see alone (reported by each, not by rank 0 only)


class ConfigError(EpasError, ValueError):
    """A configuration key or value is wrong, or does not fit the world it runs in."""

    label = "config error"
    exit_code = 2


class InputError(EpasError, ValueError):
    """A file, folder or command-line value given by the user cannot be used as it is."""

    exit_code = 2
