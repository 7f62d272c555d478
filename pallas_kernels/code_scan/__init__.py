"""Code scan: the filter step of exact filter-refine DIPR (candidates from 4-bit key codes)."""

from pallas_kernels.code_scan.api import code_scan

__all__ = ["code_scan"]
