"""argparse `type=` converters shared by the command lines (light: no torch). A bad value becomes argparse's
one-line usage error (exit 2), never a traceback."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
    return value


def int_list(text: str, *, what: str, example: str, minimum: int | None = None, distinct: bool = False) -> list[int]:
    """'1,8,32' -> [1, 8, 32]: at least one integer (`what`: its name in messages), each >= `minimum` when given,
    none repeated when `distinct`."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. {example}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: no {what} given")
    if minimum is not None and min(values) < minimum:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more {what}s >= {minimum}")
    if distinct and len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: a {what} is given twice")
    return values
