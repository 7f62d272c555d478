"""The registry of decode attention methods: one entry per method, one signature.

Every method is an :class:`AttentionMethod` registered by name with :func:`register`.
Its ``attend`` function has the signature::

    attend(q [B,Hq,D], store: KVStore, cfg: AttentionConfig, *, beta, top_p, with_mask: bool, key_mask)
        -> (out [B,Hq,D], mask bool [B,Hq,S] or None, stats dict)

``beta`` / ``top_p`` are the (possibly traced) values to use in place of
``cfg.beta`` / ``cfg.top_p``; ``mask`` is the set of keys attended (sink and window
included) and must be returned when ``with_mask`` (statistics), else may be None.
``key_mask`` bool [B,S] or None: a filter over the stored positions — the method sees only the
valid keys in it or among the sink and window positions (:func:`visible_keys`), as if the
others were padding.
``store_api.decode_attention`` dispatches through :func:`get`; the CLI, the engine, the
evaluation and the benchmarks list methods with :func:`names`. A new method touches
this file only.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp

from alaya_jax.attention import baselines, tail
from alaya_jax.attention.dipr.brute_force import range_mask_from_scores
from alaya_jax.attention.dipr.filter_refine import dipr_store_attention
from alaya_jax.attention.masked import masked_attention, raw_scores, sink_window_mask
from alaya_jax.store import kv_store


@dataclasses.dataclass(frozen=True)
class AttentionMethod:
    name: str
    attend: Callable
    help: str
    # True: the method reads per-head state chosen at the end of prefill (``KVStore.dipr_beta``);
    # the engine calibrates before the first decode step (``alaya_jax.attention.dipr.calibration``).
    needs_calibration: bool = False
    # False: chosen by other options (e.g. ``--attention dipr --dipr-mass M``), not a CLI choice.
    user_facing: bool = True


_REGISTRY: dict[str, AttentionMethod] = {}


def register(method: AttentionMethod) -> AttentionMethod:
    if method.name in _REGISTRY:
        raise ValueError(f"attention method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def get(name: str) -> AttentionMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown attention method {name!r}; choose one of {', '.join(names())}") from None


def names(*, user_facing_only: bool = True) -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(n for n, m in _REGISTRY.items() if m.user_facing or not user_facing_only)


# ----------------------------------------------------------------------------- helpers
def _sw(store, cfg):
    """bool [B,1,S]: the sink and window positions of every sequence."""
    return sink_window_mask(store.lengths, store.capacity, sink=cfg.sink, window=cfg.window)[:, None, :]


def visible_keys(store, cfg, key_mask):
    """bool [B,S]: the valid positions a query sees under the filter ``key_mask`` [B,S] (None: all
    valid positions) — those in the filter and the sink and window positions of ``cfg``."""
    valid = kv_store.positions_valid(store)
    return valid if key_mask is None else valid & (key_mask | _sw(store, cfg)[:, 0])


def _masked(select, *, with_tail: bool = True):
    """A method that builds a token mask from the exact scores, then attends densely-masked, plus the
    estimated tail of ``cfg.tail`` over the visible keys outside the mask (``with_tail``: the method has one)."""

    def attend(q, store, cfg, *, beta, top_p, with_mask, key_mask, mesh=None):
        del mesh  # plain jnp over the global arrays: on a sharded store XLA partitions it (not by hand)
        k, v = store.dense_keys(), store.dense_values()
        scores = raw_scores(q, k)
        valid = visible_keys(store, cfg, key_mask)  # [B,S]
        mask = select(q, store, cfg, scores=scores, valid=valid, top_p=top_p) & valid[:, None, :]
        if cfg.tail == "none" or not with_tail:
            out, _ = masked_attention(q, k, v, mask, scores=scores)
        else:
            out = tail.attend_with_tail(q, store, mask, mode=cfg.tail, scores=scores, visible=valid)
        return out, mask, {}

    return attend


def _dipr(q, store, cfg, *, beta, with_mask, key_mask, mesh):
    kernel_tail = cfg.tail == "estimate" and cfg.kernel.implementation == "pallas" and key_mask is None
    if cfg.tail != "none" and not kernel_tail:  # jnp over the global arrays (a sharded store: XLA partitions it)
        return _dipr_with_tail(q, store, cfg, beta=beta, key_mask=key_mask)
    out, st, dmask = dipr_store_attention(  # the kernels' tail with a mesh: refused there
        q, store, beta=beta, sink=cfg.sink, window=cfg.window, with_mask=with_mask,
        implementation=cfg.kernel.implementation, num_splits=cfg.kernel.num_splits,
        key_mask=key_mask, mesh=mesh, tail=cfg.tail,
    )
    stats = {"candidates": st.candidates}
    return out, (dmask | _sw(store, cfg)) if with_mask else None, stats


def _dipr_with_tail(q, store, cfg, *, beta, key_mask):
    """The jnp reference of DIPR with the estimated tail (implementation "reference", the study modes, a
    filter): the DIPR set from the exact scores (brute force: the set filter–refine finds) ∪ sink ∪ window
    attended exactly, plus the tail over every other visible key, ŝ from ``tail.code_estimates`` (the
    Pallas path's ŝ is the scan's int8-plane estimate of the same code: they differ by the query split,
    ≤ 2^-14 relative, and its DIPR set by the refine's rounding slack)."""
    scores = raw_scores(q, store.dense_keys())
    beta = jnp.broadcast_to(jnp.asarray(beta, jnp.float32), q.shape[:2])
    visible = visible_keys(store, cfg, key_mask)
    mask = range_mask_from_scores(scores, visible, beta[..., None]) | _sw(store, cfg)
    return tail.attend_with_tail(q, store, mask, mode=cfg.tail, scores=scores, visible=visible), mask, {}


def _dipr_uniform(q, store, cfg, *, beta, top_p, with_mask, key_mask, mesh=None):
    return _dipr(q, store, cfg, beta=beta, with_mask=with_mask, key_mask=key_mask, mesh=mesh)


def _dipr_calibrated(q, store, cfg, *, beta, top_p, with_mask, key_mask, mesh=None):
    if store.dipr_beta is None:
        raise ValueError("calibrated DIPR (dipr_mass / dipr_keys) needs the βs chosen at the end of prefill: "
                         "run alaya_jax.attention.dipr.calibration.calibrate_caches (Engine.calibrate) on the "
                         "caches first")
    return _dipr(q, store, cfg, beta=store.dipr_beta, with_mask=with_mask, key_mask=key_mask, mesh=mesh)


register(AttentionMethod("full", _masked(lambda q, s, c, *, scores, valid, top_p:
                                         jnp.broadcast_to(valid[:, None, :], scores.shape), with_tail=False),
                         "dense attention over every key"))
register(AttentionMethod("dipr", _dipr_uniform,
                         "exact DIPR range query ∪ sink ∪ window: keys with q·k ≥ max − β (one β, or a β per "
                         "head with --dipr-mass / --dipr-keys)"))
register(AttentionMethod("dipr_calibrated", _dipr_calibrated,
                         "DIPR with a β per (layer, query head) chosen at the end of prefill",
                         needs_calibration=True, user_facing=False))
register(AttentionMethod("topk", _masked(lambda q, s, c, *, scores, valid, top_p:
                                         baselines.topk_mask(scores, valid, k=c.budget) | _sw(s, c)),
                         "the budget keys of largest q·k per head ∪ sink ∪ window"))
register(AttentionMethod("topp", _masked(lambda q, s, c, *, scores, valid, top_p:
                                         baselines.topp_mask(scores, valid, p=top_p, head_dim=q.shape[-1])
                                         | _sw(s, c)),
                         "the fewest keys holding top_p of the softmax mass per head ∪ sink ∪ window"))
register(AttentionMethod("quest", _masked(lambda q, s, c, *, scores, valid, top_p:
                                          baselines.quest_mask(q, *kv_store.block_summaries(s.blocked_keys(),
                                                                                            s.lengths),
                                                               valid, num_blocks=-(-c.budget // s.block_size))
                                          | _sw(s, c)),
                         "Quest: blocks ranked by the min/max bound, ceil(budget / block) blocks"))
register(AttentionMethod("infllm", _masked(lambda q, s, c, *, scores, valid, top_p:
                                           baselines.infllm_mask(q, s.blocked_keys(), valid,
                                                                 num_blocks=-(-c.budget // s.block_size))
                                           | _sw(s, c)),
                         "InfLLM-style: blocks ranked by representative keys, ceil(budget / block) blocks"))
register(AttentionMethod("streaming", _masked(lambda q, s, c, *, scores, valid, top_p:
                                              jnp.broadcast_to(_sw(s, c), scores.shape)),
                         "sink ∪ window only (StreamingLLM)"))


__all__ = ["AttentionMethod", "register", "get", "names", "visible_keys"]
