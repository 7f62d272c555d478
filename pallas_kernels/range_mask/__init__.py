"""DIPR range mask over a list of kept blocks (DESIGN.md §1-2)."""

from pallas_kernels.range_mask.api import dipr_range_mask

__all__ = ["dipr_range_mask"]
