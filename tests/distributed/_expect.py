"""Assertions shared by the distributed test modules, on what the ranks wrote."""

from __future__ import annotations

from typing import Any


def as_reads(rows: list[list[Any]]) -> list[tuple[str, Any]]:
    """JSON turned ``(key, bounds)`` pairs into lists; back to comparable tuples."""
    return [(key, bounds) for key, bounds in rows]


def assert_reads_exactly_its_share(rank: int, result: dict[str, Any]) -> None:
    """The rank read each of its tensors' own region once, each FP8 scale whole, and nothing else."""
    reads, expected = as_reads(result["reads"]), as_reads(result["expected_reads"])
    extra = [r for r in reads if r not in expected]
    missing = [r for r in expected if r not in reads]
    assert reads == expected, (
        f"rank {rank}: read but not its share: {extra[:5]}; its share, not read: {missing[:5]}"
    )
    assert result["bytes_read"] == result["expected_bytes"], f"rank {rank}"


def fp8_weight_regions(result: dict[str, Any]) -> dict[str, Any]:
    """Region read of each FP8 weight (a key with a ``weight_scale_inv`` beside it)."""
    weights = {
        key.removesuffix("_scale_inv") for key, _ in result["reads"] if key.endswith("weight_scale_inv")
    }
    return {key: bounds for key, bounds in result["reads"] if key in weights}
