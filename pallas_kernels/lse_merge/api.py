"""Public wrapper: merge_attention(outs, lses)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Optional

import jax

from pallas_kernels.common import check_implementation, resolve_interpret
from pallas_kernels.lse_merge.reference import merge_attention_reference


def merge_attention(
    outs: jax.Array,
    lses: jax.Array,
    *,
    implementation: str = "reference",
    interpret: Optional[bool] = None,
):
    """Combine P partial attentions exactly by log-sum-exp.

    Args:
      outs: [P, B, Hq, D] (any leading shape after P), each partial normalised.
      lses: f32 [P, B, Hq] natural-log log-sum-exp of each partial's scaled scores.
    Returns:
      (out [B, Hq, D] in outs.dtype, lse f32 [B, Hq]); partials with lse=-inf add
      nothing; all -inf gives out 0, lse -inf.
    """
    check_implementation(implementation, "merge_attention", IMPLEMENTATIONS)
    if outs.ndim < 2 or tuple(lses.shape) != tuple(outs.shape[:-1]):
        raise ValueError(
            f"merge_attention: expected outs [P, ..., D] and lses [P, ...]; got "
            f"outs{tuple(outs.shape)}, lses{tuple(lses.shape)}"
        )
    return IMPLEMENTATIONS[implementation](outs, lses, interpret=interpret)


def _merge_reference(outs, lses, *, interpret):
    del interpret
    return merge_attention_reference(outs, lses)


def _merge_pallas(outs, lses, *, interpret):
    interpret = resolve_interpret(interpret, "merge_attention")
    from pallas_kernels.lse_merge.kernel import merge_attention_pallas

    return merge_attention_pallas(outs, lses, interpret=interpret)


#: The backends of ``merge_attention`` by name.
IMPLEMENTATIONS = MappingProxyType({"reference": _merge_reference, "pallas": _merge_pallas})
