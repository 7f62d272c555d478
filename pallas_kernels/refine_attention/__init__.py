"""Refine and attend: the refine step of exact filter-refine DIPR (exact scores of the candidates,
attention over V of the keys in range ∪ sink ∪ window, split partials merged by log-sum-exp)."""

from pallas_kernels.refine_attention.api import refine_attention, refine_mask, refine_max

__all__ = ["refine_attention", "refine_mask", "refine_max"]
