"""Exact log-sum-exp merge of partial attentions."""

from pallas_kernels.lse_merge.api import merge_attention

__all__ = ["merge_attention"]
