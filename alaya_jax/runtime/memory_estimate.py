"""How much memory a model needs before it is loaded: weights + the KV store for a context, against what
the device has free."""
from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp

from alaya_jax.errors import ConfigError
from alaya_jax.store import kv_store

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Bytes of the weights and of the KV stores (all layers) for ``context`` tokens × ``batch`` at ``dtype``.
    Activations and compiled temporaries are not counted."""

    dtype: str
    context: int
    batch: int
    weights_bytes: int
    kv_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes

    def describe(self) -> str:
        return (f"{self.weights_bytes / GIB:.2f} GiB weights + {self.kv_bytes / GIB:.2f} GiB KV for "
                f"{self.context} tokens x {self.batch} ({self.dtype}) = {self.total_bytes / GIB:.2f} GiB")


def estimate_memory(config, *, context: int, batch: int = 1, block_size: int = 64) -> MemoryEstimate:
    """Weights from the parameter count at ``config.dtype``; KV from the exact shapes of
    :func:`alaya_jax.store.kv_store.empty` (keys, values, block summaries) per layer."""
    from models.weights import parameter_count

    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be >= 1, got {context=}, {batch=}")
    store = jax.eval_shape(lambda: kv_store.empty(batch=batch, num_kv_heads=config.num_kv_heads,
                                                  head_dim=config.head_dim, capacity=context,
                                                  block_size=block_size, dtype=jnp.dtype(config.dtype)))
    per_layer = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(store))
    return MemoryEstimate(dtype=config.dtype, context=context, batch=batch,
                          weights_bytes=parameter_count(config) * jnp.dtype(config.dtype).itemsize,
                          kv_bytes=per_layer * config.num_layers)


def available_memory(device=None) -> tuple[int, str]:
    """``(free bytes, where the number comes from)`` on ``device`` (default: the first): the accelerator's
    ``memory_stats()`` limit minus what is in use, or on a CPU the host's available RAM."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"{device.device_kind} memory_stats"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "host MemAvailable"
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host available pages"


class DoesNotFit(ConfigError):
    """The estimated memory exceeds what the device has free."""


def check_fits(estimate: MemoryEstimate, *, device=None) -> str:
    """A one-line report of ``estimate`` against the free memory; :class:`DoesNotFit` when it does not fit."""
    free, source = available_memory(device)
    line = f"memory estimate: {estimate.describe()}; {free / GIB:.2f} GiB free ({source})"
    if estimate.total_bytes > free:
        raise DoesNotFit(f"the model will not fit: {line}. Use --dtype bfloat16, a smaller --max-context, "
                          f"or a smaller model")
    return line
