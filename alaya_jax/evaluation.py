"""Teacher-forced scoring of a sparse attention method against full attention.

The first ``prefill_tokens`` tokens are prefilled densely; every later token is
fed through decode steps twice — once with the method under test, once with full
attention, each chain with its own cache — so the method is what is measured and
the KL to full attention comes from the same run.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alaya_jax.engine import FULL, Engine
from alaya_jax.methods import AttentionConfig
from alaya_jax.sampling import SamplingConfig

_GREEDY = SamplingConfig(max_new_tokens=1)


@jax.jit
def step_metrics(logits: jax.Array, logits_full: jax.Array, target: jax.Array):
    """logits, logits_full f32 [B,V]; target int32 [B] → (nll, nll_full, kl(full‖method)) each [B]."""
    lp = jax.nn.log_softmax(logits, axis=-1)
    lf = jax.nn.log_softmax(logits_full, axis=-1)
    nll = -jnp.take_along_axis(lp, target[:, None], axis=-1)[:, 0]
    nll_f = -jnp.take_along_axis(lf, target[:, None], axis=-1)[:, 0]
    kl = jnp.sum(jnp.exp(lf) * (lf - lp), axis=-1)
    return nll, nll_f, kl


def score_sparse(
    engine: Engine,
    tokens: Sequence[int],
    *,
    attention: AttentionConfig,
    prefill_tokens: Optional[int] = None,
    progress: bool = False,
) -> dict:
    """Score ``tokens`` with decode steps of ``attention`` and of full attention.

    Returns a JSON-ready dict: ``tokens`` (predictions scored), ``nll``/``ppl``
    (method), ``nll_full``/``ppl_full``, ``kl_to_full`` (mean KL of the next-token
    distribution of full attention to the method's), ``mean_keys_attended``,
    ``keys_fraction`` (keys attended / context length, mean over steps, heads and
    layers), ``attention_recall`` (share of the full softmax mass on the attended
    keys), ``blocks_kept_fraction`` and ``overflow_steps`` (DIPR), and ``per_layer``.
    """
    n = len(tokens)
    p = prefill_tokens if prefill_tokens is not None else max(1, n - 256)
    if not (1 <= p <= n - 2):
        raise ValueError(f"prefill_tokens must be in [1, {n - 2}] for {n} tokens, got {p}")
    engine.check_fits(n)
    cfg = dataclasses.replace(attention.resolve(p), collect_stats=True)
    caches = engine.new_caches(batch=1, capacity=n)
    caches, _, _ = engine.prefill(caches, [list(tokens[:p])])
    caches_full = jax.tree.map(jnp.copy, caches)
    key = jax.random.PRNGKey(0)
    nlls, nlls_f, kls = [], [], []
    layer_keys, layer_recall, layer_frac, layer_blocks = [], [], [], []
    overflow = 0
    steps = range(p, n - 1)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(steps), desc=f"eval {cfg.method}", unit="tok", file=sys.stderr, leave=False)
    nb_total = caches[0].num_blocks
    for t in steps:
        tok = jnp.asarray([tokens[t]], jnp.int32)
        _, logits, caches, aux = engine.decode_step(caches, tok, key=key, sampling=_GREEDY, attention=cfg)
        _, logits_f, caches_full, _ = engine.decode_step(caches_full, tok, key=key, sampling=_GREEDY, attention=FULL)
        nll, nll_f, kl = step_metrics(logits, logits_f, jnp.asarray([tokens[t + 1]], jnp.int32))
        nlls.append(float(nll[0]))
        nlls_f.append(float(nll_f[0]))
        kls.append(float(kl[0]))
        ctx = t + 1  # keys visible to this step
        keys = np.array([np.asarray(a["keys_attended"]).mean() for a in aux])
        layer_keys.append(keys)
        layer_frac.append(keys / ctx)
        layer_recall.append(np.array([np.asarray(a["recall"]).mean() for a in aux]))
        blocks = [np.asarray(a["blocks_kept"]).mean() / -(-ctx // caches[0].block_size) if "blocks_kept" in a
                  else np.nan for a in aux]
        layer_blocks.append(np.array(blocks))
        overflow += int(sum(int(a.get("overflow", 0)) for a in aux))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    del nb_total
    lk, lf, lr, lb = (np.stack(x) for x in (layer_keys, layer_frac, layer_recall, layer_blocks))
    nll, nll_f = float(np.mean(nlls)), float(np.mean(nlls_f))
    bk = lb[:, np.isfinite(lb[0])] if np.isfinite(lb).any() else None
    return {
        "tokens": len(nlls),
        "prefill_tokens": p,
        "attention": cfg.method,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
        "nll": nll,
        "ppl": math.exp(nll),
        "nll_full": nll_f,
        "ppl_full": math.exp(nll_f),
        "ppl_increase": math.exp(nll - nll_f) - 1.0,
        "kl_to_full": float(np.mean(kls)),
        "mean_keys_attended": float(lk.mean()),
        "keys_fraction": float(lf.mean()),
        "attention_recall": float(lr.mean()),
        "blocks_kept_fraction": None if bk is None else float(bk.mean()),
        "overflow_steps": overflow,
        "per_layer": [
            {"layer": i, "mean_keys_attended": float(lk[:, i].mean()), "keys_fraction": float(lf[:, i].mean()),
             "attention_recall": float(lr[:, i].mean())}
            for i in range(lk.shape[1])
        ],
    }
