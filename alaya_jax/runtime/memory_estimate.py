"""How much memory a model needs before it is loaded: weights + the KV store for a context, against what
the device (and, for a KV placement with fields on the host, the host) has free."""
from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp

from alaya_jax.errors import ConfigError
from alaya_jax.store import kv_store
from alaya_jax.store.placement import DEFAULT_PLACEMENT, host_fields

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Bytes of the weights and of the KV stores (all layers) for ``context`` tokens × ``batch`` at ``dtype``,
    the KV split by ``placement`` into device and pinned host bytes. Activations and compiled temporaries
    are not counted."""

    dtype: str
    context: int
    batch: int
    weights_bytes: int
    kv_device_bytes: int
    kv_host_bytes: int = 0
    placement: str = DEFAULT_PLACEMENT

    @property
    def kv_bytes(self) -> int:
        return self.kv_device_bytes + self.kv_host_bytes

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes

    @property
    def device_bytes(self) -> int:
        """What the accelerator holds: the weights and the device part of the KV."""
        return self.weights_bytes + self.kv_device_bytes

    def describe(self) -> str:
        line = (f"{self.weights_bytes / GIB:.2f} GiB weights + {self.kv_bytes / GIB:.2f} GiB KV for "
                f"{self.context} tokens x {self.batch} ({self.dtype})")
        if not self.kv_host_bytes:
            return f"{line} = {self.total_bytes / GIB:.2f} GiB"
        return (f"{line}, KV placement {self.placement}: {self.device_bytes / GIB:.2f} GiB on the device "
                f"({self.kv_device_bytes / GIB:.2f} GiB KV), {self.kv_host_bytes / GIB:.2f} GiB in pinned host memory")


def estimate_memory(config, *, context: int, batch: int = 1, block_size: int = 64,
                    placement: str = DEFAULT_PLACEMENT) -> MemoryEstimate:
    """Weights from the parameter count at ``config.dtype``; KV from the exact shapes of
    :func:`alaya_jax.store.kv_store.empty` (keys, values, codes, scales, error norms) per layer, the
    fields ``placement`` keeps on the host (:mod:`alaya_jax.store.placement`) counted as host bytes."""
    from models.weights import parameter_count

    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be >= 1, got {context=}, {batch=}")
    store = jax.eval_shape(lambda: kv_store.empty(batch=batch, num_kv_heads=config.num_kv_heads,
                                                  head_dim=config.head_dim, capacity=context,
                                                  block_size=block_size, dtype=jnp.dtype(config.dtype)))
    host = host_fields(placement)

    def nbytes(x):
        return math.prod(x.shape) * x.dtype.itemsize

    on_host = sum(nbytes(getattr(store, f)) for f in host)
    per_layer = sum(nbytes(x) for x in jax.tree_util.tree_leaves(store))
    return MemoryEstimate(dtype=config.dtype, context=context, batch=batch,
                          weights_bytes=parameter_count(config) * jnp.dtype(config.dtype).itemsize,
                          kv_device_bytes=(per_layer - on_host) * config.num_layers,
                          kv_host_bytes=on_host * config.num_layers, placement=placement)


def available_memory(device=None) -> tuple[int, str]:
    """``(free bytes, where the number comes from)`` on ``device`` (default: the first): the accelerator's
    ``memory_stats()`` limit minus what is in use, or on a CPU the host's available RAM."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"{device.device_kind} memory_stats"
    return host_available_memory(), "host available RAM"


class DoesNotFit(ConfigError):
    """The estimated memory exceeds what the device has free."""


def host_available_memory() -> int:
    """The host's available RAM in bytes (``MemAvailable``, else the available pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(estimate: MemoryEstimate, *, device=None) -> str:
    """A one-line report of ``estimate`` against the free memory; :class:`DoesNotFit` when it does not fit
    (the device part against the device, the pinned host part against the host's available RAM)."""
    free, source = available_memory(device)
    line = f"memory estimate: {estimate.describe()}; {free / GIB:.2f} GiB free ({source})"
    on_cpu = (device or jax.devices()[0]).platform == "cpu"  # device and host are the same RAM
    need = estimate.total_bytes if on_cpu else estimate.device_bytes
    if need > free:
        raise DoesNotFit(f"the model will not fit: {line}. Use --dtype bfloat16, a smaller --max-context, "
                         f"--kv-placement values-on-host or keys-and-values-on-host, or a smaller model")
    if estimate.kv_host_bytes and not on_cpu:
        host = host_available_memory()
        line += f"; {host / GIB:.2f} GiB host RAM available"
        if estimate.kv_host_bytes > host:
            raise DoesNotFit(f"the KV's host part will not fit: {line}. Use a smaller --max-context")
    return line
