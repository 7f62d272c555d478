"""Per-key 4-bit codes of rotated keys with a rigorous error bound (filter-refine DIPR).

``rotate`` (random signs times a Hadamard matrix, per KV head), ``encode`` / ``decode``
(two signed 4-bit codes a byte, an f16 scale rounded up, the quantization error norm
rounded up) and ``bound`` (the ONE definition of the estimate's error interval, used by
the jnp references and the kernels). Plain jnp: runs at prefill and at each decode append.
"""

from pallas_kernels.key_codes.int4 import (
    CODE_MAX, bound, bound_from_norms, decode, encode, eps_for_dim, estimate, estimate_operand, query_norms,
    unpack_nibbles,
)
from pallas_kernels.key_codes.rotation import hadamard, rotate, rotation_signs

__all__ = [
    "CODE_MAX",
    "bound",
    "bound_from_norms",
    "decode",
    "encode",
    "eps_for_dim",
    "estimate",
    "estimate_operand",
    "hadamard",
    "query_norms",
    "rotate",
    "rotation_signs",
    "unpack_nibbles",
]
