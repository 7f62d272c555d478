"""Per-block upper bounds of q·k from element-wise key min/max (DESIGN.md §2)."""

from pallas_kernels.block_bounds.api import block_bounds

__all__ = ["block_bounds"]
