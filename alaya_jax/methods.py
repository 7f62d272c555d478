"""Attention methods behind one interface, and the attention function the model calls.

The model (``models.Llama``) gets its attention as a function argument::

    attention_fn(layer, q [B,T,Hq,D], k [B,T,Hkv,D], v [B,T,Hkv,D], cache: KVStore, positions [B,T])
        -> (out [B,T,Hq,D], new_cache, aux)

:func:`make_attention_fn` builds it for an :class:`AttentionConfig`: it appends
the new keys/values to the layer's store, then attends. Prefill chunks (T > 1)
always run dense causal attention; decode steps (T == 1) run the configured
method. ``aux`` is a dict of per-layer statistics (or ``{}``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from alaya_jax import attention_methods, kv_store
from alaya_jax.kv_store import KVStore
from alaya_jax.masked_attention import full_softmax, group_size, raw_scores

# The registered methods a user picks by name, plus "auto" (resolved per context length).
METHODS = attention_methods.names() + ("auto",)
IMPLEMENTATIONS = ("reference", "pallas")
PREFILL_ATTENTIONS = ("reference", "xla", "cudnn")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """How decode steps attend. Sink and window are added to every sparse method alike.

    ``budget``: keys selected by ``topk``; ``quest``/``infllm`` select
    ``ceil(budget / block_size)`` blocks. ``dense_layers``: layers that always run
    full attention. ``auto``: full attention while the context is shorter than
    ``auto_min_context``, else DIPR with ``auto_dense_layers`` dense.

    Self-calibrated DIPR (method "dipr" with one of), from the prompt's last ``n_cal``
    queries: ``dipr_mass`` M — per (layer, head) the smallest β whose attended keys (DIPR ∪
    sink ∪ window) hold mass M of the softmax (mean over the queries); ``dipr_keys`` F — a
    total budget of a fraction F of the keys (sink and window included, mean over heads and
    layers) water-filled over (layer, head) on the absolute softmax mass. The βs are a
    [layers, Hq] array (``KVStore.dipr_beta``); the allocation is
    ``calibration.DEFAULT_ALLOCATION`` (see :mod:`alaya_jax.calibration` for the others).
    """

    method: str = "full"
    beta: float = 32.0
    budget: int = 256
    top_p: float = 0.9
    sink: int = 4
    window: int = 64
    dense_layers: tuple[int, ...] = ()
    # ``auto``: full attention below ``auto_min_context`` tokens, DIPR above (see the README's speed
    # table for where the filter–refine DIPR path beats dense attention on real-key-proxy data).
    auto_min_context: int = 131072
    auto_dense_layers: tuple[int, ...] = ()
    # DIPR kernel knobs (``dipr_store_attention``): splits of each sequence (None: enough to fill
    # the GPU) and candidate slots per split as a fraction of its keys (1.0: no overflow possible and
    # no lax.cond; below 1.0 an overflow re-scans, then takes the exact dense path, and is counted).
    num_splits: Optional[int] = None
    capacity_fraction: float = 1.0
    implementation: str = "reference"
    collect_stats: bool = False
    prefill_attention: str = "reference"
    dipr_mass: Optional[float] = None
    dipr_keys: Optional[float] = None
    n_cal: int = 64
    # Calibrated DIPR during generation: choose the βs again, from the most recent n_cal tokens, each
    # time the context has grown by this factor since the last calibration (None: never). Measured
    # (bench/results/recalibration.md): without it a budget of 8% of the keys fell to 4.1% once the
    # context had doubled, and KL to full attention was 2.6x higher.
    recalibrate_growth: Optional[float] = 2.0

    # ``prefill_attention``: how dense attention runs — chunks of T > 1 rows, and decode
    # steps of method "full". "reference": our jnp code (materialises f32 scores over
    # the whole capacity); "xla" / "cudnn": ``jax.nn.dot_product_attention`` with that
    # implementation (cudnn: fused flash attention on NVIDIA GPUs; it still visits
    # every key up to the capacity, masked).

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown attention method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"unknown implementation {self.implementation!r}; choose one of {IMPLEMENTATIONS}")
        if not (self.beta >= 0):
            raise ValueError(f"beta must be >= 0 (inf allowed), got {self.beta}")
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1, got {self.budget}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.sink < 0 or self.window < 0:
            raise ValueError(f"sink and window must be >= 0, got sink={self.sink}, window={self.window}")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits must be >= 1 or None, got {self.num_splits}")
        if not (0.0 < self.capacity_fraction <= 1.0):
            raise ValueError(f"capacity_fraction must be in (0, 1], got {self.capacity_fraction}")
        if self.prefill_attention not in PREFILL_ATTENTIONS:
            raise ValueError(f"unknown prefill_attention {self.prefill_attention!r}; choose one of {PREFILL_ATTENTIONS}")
        for name in ("dipr_mass", "dipr_keys"):
            val = getattr(self, name)
            if val is not None and not (0.0 < val <= 1.0):
                raise ValueError(f"{name} must be in (0, 1], got {val}")
        if self.dipr_mass is not None and self.dipr_keys is not None:
            raise ValueError("give either dipr_mass (mass target) or dipr_keys (key budget), not both")
        if self.calibrated and self.method not in ("dipr", "auto"):
            raise ValueError(f"dipr_mass / dipr_keys calibrate DIPR; they cannot be used with method "
                             f"{self.method!r} (use method 'dipr')")
        if self.n_cal < 1:
            raise ValueError(f"n_cal must be >= 1, got {self.n_cal}")
        if self.recalibrate_growth is not None and not self.recalibrate_growth > 1.0:
            raise ValueError(f"recalibrate_growth must be > 1 (or None), got {self.recalibrate_growth}")

    @property
    def calibrated(self) -> bool:
        """True when DIPR's β per (layer, head) is chosen by calibration (dipr_mass or dipr_keys)."""
        return self.dipr_mass is not None or self.dipr_keys is not None

    @property
    def registry_name(self) -> str:
        """The name of this config's entry in :mod:`alaya_jax.attention_methods`."""
        if self.method == "auto":
            raise ValueError("resolve 'auto' with AttentionConfig.resolve(context_length) first")
        return "dipr_calibrated" if self.method == "dipr" and self.calibrated else self.method

    def resolve(self, context_length: int) -> "AttentionConfig":
        """Replace ``auto`` by the concrete method for a context of this many tokens."""
        if self.method != "auto":
            return self
        if context_length < self.auto_min_context:
            return dataclasses.replace(self, method="full", dipr_mass=None, dipr_keys=None)
        return dataclasses.replace(self, method="dipr", dense_layers=tuple(self.auto_dense_layers))


def causal_attention(q: jax.Array, store: KVStore, positions: jax.Array) -> jax.Array:
    """Dense causal attention: q [B,T,Hq,D] at absolute ``positions`` [B,T] over the store → [B,T,Hq,D]."""
    b, t, hq, d = q.shape
    k, v = store.dense_keys(), store.dense_values()  # [B,Hkv,S,D]
    hkv, s = k.shape[1], k.shape[2]
    g = group_size(hq, hkv)
    if q.dtype == jnp.float32:
        qg, kk, prec = q.reshape(b, t, hkv, g, d), k.astype(jnp.float32), jax.lax.Precision.HIGHEST
    else:  # 16-bit operands, f32 accumulation: products are exact, only the summation order differs
        qg, kk, prec = q.reshape(b, t, hkv, g, d), k.astype(q.dtype), None
    sc = jnp.einsum("bthgd,bhsd->bhgts", qg, kk, precision=prec, preferred_element_type=jnp.float32)
    kpos = jnp.arange(s)
    mask = (kpos[None, None, :] <= positions[:, :, None]) & (kpos[None, None, :] < store.lengths[:, None, None])
    mask = mask[:, None, None]  # [B,1,1,T,S]
    z = jnp.where(mask, sc / jnp.sqrt(jnp.float32(d)), -jnp.inf)
    p = jax.nn.softmax(z, axis=-1, where=mask)
    p = jnp.where(mask, p, 0.0)
    vv = jnp.where((kpos[None, :] < store.lengths[:, None])[:, None, :, None], v, jnp.zeros((), v.dtype))
    if v.dtype != jnp.float32:
        p = p.astype(v.dtype)
    o = jnp.einsum("bhgts,bhsd->bthgd", p, vv, precision=prec, preferred_element_type=jnp.float32)
    return o.reshape(b, t, hq, d).astype(q.dtype)


def fused_causal_attention(q: jax.Array, store: KVStore, positions: jax.Array, *, implementation: str) -> jax.Array:
    """Same contract as :func:`causal_attention` through ``jax.nn.dot_product_attention``
    (``implementation`` "xla" or "cudnn"); the mask is passed as a boolean [B,1,T,S]."""
    k = jnp.swapaxes(store.dense_keys(), 1, 2).astype(q.dtype)  # [B,S,Hkv,D]
    v = jnp.swapaxes(store.dense_values(), 1, 2).astype(q.dtype)
    s = k.shape[1]
    kpos = jnp.arange(s)
    mask = (kpos[None, None, :] <= positions[:, :, None]) & (kpos[None, None, :] < store.lengths[:, None, None])
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=implementation)


def decode_attention(q: jax.Array, store: KVStore, cfg: AttentionConfig, *, dense: bool = False,
                     beta=None, top_p=None):
    """One decode query per head over a store, through the method registry
    (:mod:`alaya_jax.attention_methods`). q [B,Hq,D] → (out [B,Hq,D], stats dict).

    ``beta`` / ``top_p`` (optional, may be traced; ``beta`` may be a β per query head,
    broadcastable to [B, Hq]) override ``cfg.beta`` / ``cfg.top_p`` so that sweeping them
    does not recompile. Calibrated DIPR takes its β from ``store.dipr_beta``.

    Stats (when ``cfg.collect_stats``): ``keys_attended`` [B,Hq] and ``recall``
    [B,Hq] (share of the full softmax mass on the attended keys); DIPR adds
    ``candidates`` [B,Hkv], ``overflow`` [] and ``refined`` [].
    """
    method = attention_methods.get("full" if dense else cfg.registry_name)
    beta = cfg.beta if beta is None else beta
    top_p = cfg.top_p if top_p is None else top_p
    out, mask, stats = method.attend(q, store, cfg, beta=beta, top_p=top_p, with_mask=cfg.collect_stats)
    if cfg.collect_stats:
        valid = kv_store.positions_valid(store)  # [B,S]
        probs = full_softmax(raw_scores(q, store.dense_keys()), valid, q.shape[-1])
        stats = dict(stats, keys_attended=jnp.sum(mask, axis=-1).astype(jnp.float32),
                     recall=jnp.sum(jnp.where(mask, probs, 0.0), axis=-1))
    return out, stats


def make_attention_fn(cfg: AttentionConfig, num_new: Optional[jax.Array] = None, *, beta=None, top_p=None):
    """The model's attention function for one forward call.

    ``num_new`` [B]: how many of the T new rows of each sequence are real (ragged
    prefill); default all T. ``beta`` / ``top_p``: traced overrides (see
    :func:`decode_attention`).
    """
    if cfg.method == "auto":
        raise ValueError("resolve 'auto' with AttentionConfig.resolve(context_length) first")

    def attention_fn(layer: int, q, k, v, cache: KVStore, positions):
        cache = kv_store.append(cache, k, v, num_new)
        t = q.shape[1]
        if t > 1 or cfg.method == "full":
            if t == 1 and cfg.collect_stats:
                out, stats = decode_attention(q[:, 0], cache, cfg, dense=True)
                return out[:, None], cache, stats
            if cfg.prefill_attention != "reference":
                return fused_causal_attention(q, cache, positions, implementation=cfg.prefill_attention), cache, {}
            return causal_attention(q, cache, positions), cache, {}
        out, stats = decode_attention(q[:, 0], cache, cfg, dense=layer in cfg.dense_layers, beta=beta, top_p=top_p)
        return out[:, None], cache, stats

    return attention_fn


__all__ = [
    "AttentionConfig",
    "METHODS",
    "causal_attention",
    "decode_attention",
    "make_attention_fn",
]
