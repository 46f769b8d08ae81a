"""Plain-text rendering for the CLI: aligned tables and a YAML-like view of nested JSON values."""

from __future__ import annotations

from typing import Any

__all__ = ["block", "table"]


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned columns, two spaces apart; the last column is not padded."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    ]


def block(value: Any, indent: int = 0) -> list[str]:
    """A readable, YAML-like rendering of nested dicts and lists."""
    pad = "  " * indent
    if isinstance(value, dict):
        lines: list[str] = []
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines += [f"{pad}{key}:", *block(item, indent + 1)]
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
        return lines
    if isinstance(value, list):
        return [line for item in value for line in _list_item(item, indent)]
    return [f"{pad}{_scalar(value)}"]


def _list_item(item: Any, indent: int) -> list[str]:
    pad = "  " * indent
    if isinstance(item, (dict, list)) and item:
        return [f"{pad}-", *block(item, indent + 1)]
    return [f"{pad}- {_scalar(item)}"]


def _scalar(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return "{}" if isinstance(value, dict) else "[]"
    return "null" if value is None else str(value)
