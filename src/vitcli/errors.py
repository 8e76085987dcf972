"""The one error type users see: the CLI prints its message and exits with code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VitError(Exception):
    """A user mistake (bad recipe, unknown model, missing file, offline hub, ...).

    The message must say what is wrong and what to do; the CLI prints it without a traceback.
    """

    exit_code = 2


def closest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Up to n choices that look like word, best first (for 'did you mean' hints)."""
    choices = list(choices)
    by_lower = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(word.lower(), list(by_lower), n=n, cutoff=0.5)
    return [by_lower[h] for h in hits]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' Did you mean: a, b?' or '' when nothing is close."""
    hits = closest(word, choices)
    return f" Did you mean: {', '.join(hits)}?" if hits else ""
