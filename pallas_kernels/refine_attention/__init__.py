"""Refine and attend: the refine step of exact filter-refine DIPR (the exact scores of the candidates, once
each; the exact max; attention over V of the keys in range ∪ sink ∪ window)."""

from pallas_kernels.refine_attention.api import refine_attention

__all__ = ["refine_attention"]
