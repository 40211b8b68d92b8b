"""How benchmark numbers read in text (the goals' explanations and the Markdown report): fixed decimals, scaled
units, percentages, and the precision ``amp=auto`` chose. ``None`` (not measured) reads ``-``."""
from __future__ import annotations


def fixed(x, digits: int = 2) -> str:
    """``x`` with ``digits`` decimals."""
    return '-' if x is None else f'{x:.{digits}f}'


def scaled(x, scale: float = 1e9, digits: int = 1) -> str:
    """``x / scale`` with ``digits`` decimals (default: giga)."""
    return '-' if x is None else f'{x / scale:.{digits}f}'


def percent(x) -> str:
    """A share as a whole percentage."""
    return '-' if x is None else f'{100 * x:.0f}%'


def chosen_precision(entry: dict) -> str:
    """``auto chose <precision> (<reason>)`` of a measured entry."""
    used, reason = entry.get('precision', '?'), entry.get('precision_reason')
    return f'auto chose {used}' + (f' ({reason})' if reason else '')
