"""Where a KV store's arrays live: all in device memory, or its exact values (and keys) in pinned host
memory (docs/design.md §3).

A placement names the store fields kept in page-locked host RAM (JAX memory kind ``pinned_host``);
every other field — the 4-bit codes, their scales and error norms, the rotation signs, the
lengths, the calibrated βs — stays in device memory::

    "device"                   nothing on the host (the default)
    "values-on-host"           values on the host: the GPU holds keys + codes (256 + 68 bytes a
                               key and KV head at D=128, 63% of the 512 of bf16 K + V)
    "keys-and-values-on-host"  keys and values on the host: the GPU holds the codes (68 bytes, 13%)

On an NVIDIA GPU XLA allocates ``pinned_host`` buffers with ``cuMemHostAlloc`` and maps them into
the device's address space (device pointer = host pointer, measured on the H200:
``/work/notes/gpu1/host_gather.json``), so a Pallas Triton kernel handed a host array reads only the
rows it loads, over PCIe. That is how a DIPR decode step reads the values of the keys in range and
nothing else (:func:`reads_in_place`). Every other reader of a host field — jnp code, Pallas in
interpret mode, the dense prefill attention — gets it through :func:`to_device`: an explicit
whole-array transfer, correct in every placement and priced in PCIe bytes (documented where used).

XLA's GPU client caps its pinned host pool at 64 GiB unless ``XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB`` is
set before the backend starts (one layer's bf16 values at 1M tokens of Llama-3-8B is 2 GiB: 32
layers are exactly 64 GiB).
"""

from __future__ import annotations

from typing import Optional

import jax

from alaya_jax.errors import ConfigError

#: The placements by name, with the store fields each keeps in pinned host memory.
HOST_FIELDS = {"device": (), "values-on-host": ("values",), "keys-and-values-on-host": ("keys", "values")}
PLACEMENTS = tuple(HOST_FIELDS)
DEFAULT_PLACEMENT = "device"
#: The JAX memory kind of the host fields.
HOST_MEMORY_KIND = "pinned_host"
_SPACE = {"device": jax.memory.Space.Device, HOST_MEMORY_KIND: jax.memory.Space.Host}


def check_placement(placement: str) -> str:
    """``placement`` if it is one of :data:`PLACEMENTS`, else :class:`ConfigError`."""
    if placement not in HOST_FIELDS:
        raise ConfigError(f"unknown KV placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
    return placement


def host_fields(placement: str) -> tuple[str, ...]:
    """The store fields ``placement`` keeps in pinned host memory."""
    return HOST_FIELDS[check_placement(placement)]


def memory_kind(placement: str, field: str) -> str:
    """``"pinned_host"`` or ``"device"``: where ``placement`` keeps store field ``field``."""
    return HOST_MEMORY_KIND if field in host_fields(placement) else "device"


def check_host_memory(device: Optional[jax.Device] = None) -> None:
    """:class:`ConfigError` unless ``device`` (default: the first) offers pinned host memory."""
    device = device or jax.devices()[0]
    kinds = sorted(m.kind for m in device.addressable_memories())
    if HOST_MEMORY_KIND not in kinds:
        raise ConfigError(f"placing KV fields on the host needs memory kind {HOST_MEMORY_KIND!r}, which device "
                          f"{device} ({jax.default_backend()} backend) does not offer (it has {kinds})")


def to_memory(x: jax.Array, kind: str) -> jax.Array:
    """``x`` in memory kind ``kind`` ("device" or "pinned_host") of its own device(s); traceable (inside
    ``jit`` an explicit transfer XLA schedules; outside, a copy unless ``x`` is there already)."""
    return jax.device_put(x, _SPACE[kind])


def to_device(x: jax.Array) -> jax.Array:
    """``x`` in device memory (a whole-array host-to-device transfer when it is on the host; free when
    it is on the device already)."""
    return to_memory(x, "device")


def to_host(x: jax.Array) -> jax.Array:
    """``x`` in pinned host memory (a device-to-host transfer when it is on the device)."""
    return to_memory(x, HOST_MEMORY_KIND)


def reads_in_place(implementation: str, interpret: Optional[bool]) -> bool:
    """Whether the DIPR kernels of ``implementation`` read a host-memory operand where it lies: only the
    compiled Pallas kernels on a GPU (Triton loads through unified addressing). The jnp reference and
    Pallas in interpret mode lower row reads to XLA gathers, which refuse operands in another memory
    space; they are given device copies instead."""
    if implementation != "pallas" or jax.default_backend() != "gpu":
        return False
    return not interpret if interpret is not None else True


__all__ = ["DEFAULT_PLACEMENT", "HOST_FIELDS", "HOST_MEMORY_KIND", "PLACEMENTS", "check_host_memory",
           "check_placement", "host_fields", "memory_kind", "reads_in_place", "to_device", "to_host", "to_memory"]
