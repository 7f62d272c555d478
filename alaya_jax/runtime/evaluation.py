"""Teacher-forced scoring of a sparse attention method against full attention.

The first ``prefill_tokens`` tokens are prefilled densely; every later token is
fed through decode steps twice — once with the method under test, once with full
attention, each chain with its own cache — so the method is what is measured and
the KL to full attention comes from the same run.

For sweeps, the dense prefill and the full-attention chain are shared: build a
:class:`Reference` once with :func:`prepare_reference`, then call
:func:`score_against` for every method configuration (each starts from a copy of
the prefilled caches). :func:`score_sparse` is the one-shot composition of both.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alaya_jax.attention.config import AttentionConfig
from alaya_jax.attention.dipr import calibration
from alaya_jax.errors import InputError
from alaya_jax.runtime.engine import FULL, Engine
from alaya_jax.runtime.sampling import SamplingConfig

_GREEDY = SamplingConfig(max_new_tokens=1)
_KEY = jax.random.PRNGKey(0)

# decode(caches, token int32 [1]) -> (logits f32 [1, V], caches, aux)
DecodeFn = Callable[[tuple, jax.Array], tuple]


@jax.jit
def step_metrics(logits: jax.Array, logits_full: jax.Array, target: jax.Array):
    """logits, logits_full f32 [B,V]; target int32 [B] → (nll, nll_full, kl(full‖method)) each [B]."""
    lp = jax.nn.log_softmax(logits, axis=-1)
    lf = jax.nn.log_softmax(logits_full, axis=-1)
    nll = -jnp.take_along_axis(lp, target[:, None], axis=-1)[:, 0]
    nll_f = -jnp.take_along_axis(lf, target[:, None], axis=-1)[:, 0]
    kl = jnp.sum(jnp.exp(lf) * (lf - lp), axis=-1)
    return nll, nll_f, kl


@dataclasses.dataclass
class Reference:
    """A dense prefill and the full-attention chain after it, shared by many scored methods.

    ``caches``: the prefilled caches (never consumed: every chain starts from a copy).
    ``inputs`` int32 [steps]: the token fed at each decode step; ``targets`` int32
    [steps]: the token it predicts; ``logits_full`` f32 [steps, V]: full attention's
    logits at each step. ``context`` int32 [prefill_tokens]: the prefilled tokens (calibrated
    DIPR calibrates on their last ``n_cal``); ``curves``: calibration curves computed so far,
    by (n_cal, sink, window), shared by every calibrated config scored against this reference.
    """

    prefill_tokens: int
    caches: tuple
    inputs: np.ndarray
    targets: np.ndarray
    logits_full: jax.Array
    context: np.ndarray
    curves: dict = dataclasses.field(default_factory=dict)

    @property
    def steps(self) -> int:
        return int(self.inputs.shape[0])


def copy_caches(caches):
    """New buffers holding the same caches (the engine donates the caches it is given)."""
    return jax.tree.map(jnp.copy, caches)


def _check_window(n: int, p: int) -> None:
    if not (1 <= p <= n - 2):
        raise InputError(f"prefill_tokens must be in [1, {n - 2}] for {n} tokens, got {p}")


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, leave=False)


def engine_decoder(engine: Engine, attention: AttentionConfig) -> DecodeFn:
    """The plain decode function of ``engine`` for a resolved ``attention`` config."""

    def decode(caches, tok):
        _, logits, caches, aux = engine.decode_step(caches, tok, key=_KEY, sampling=_GREEDY, attention=attention)
        return logits, caches, aux

    return decode


def prepare_reference(
    engine: Engine,
    tokens: Sequence[int],
    *,
    prefill_tokens: int,
    caches=None,
    progress: bool = False,
) -> Reference:
    """Prefill ``tokens[:prefill_tokens]`` densely (unless prefilled ``caches`` are given)
    and run the full-attention chain over the rest; every later token is scored."""
    n, p = len(tokens), prefill_tokens
    _check_window(n, p)
    engine.check_fits(n)
    if caches is None:
        caches = engine.new_caches(batch=1, capacity=n)
        caches, _, _ = engine.prefill(caches, [list(tokens[:p])])
    elif int(np.asarray(caches[0].lengths)[0]) != p or caches[0].capacity < n:
        raise ValueError(f"the given caches hold {int(np.asarray(caches[0].lengths)[0])} tokens of capacity "
                         f"{caches[0].capacity}; need {p} tokens and capacity >= {n}")
    inputs = np.asarray(tokens[p : n - 1], np.int32)
    targets = np.asarray(tokens[p + 1 : n], np.int32)
    decode = engine_decoder(engine, FULL)
    c = copy_caches(caches)
    logits = []
    bar = _bar(progress, len(inputs), "eval full")
    for tok in inputs:
        lg, c, _ = decode(c, jnp.asarray([tok], jnp.int32))
        logits.append(lg[0])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return Reference(prefill_tokens=p, caches=caches, inputs=inputs, targets=targets,
                     logits_full=jnp.stack(logits), context=np.asarray(tokens[:p], np.int32))


def calibrated_caches(engine: Engine, ref: Reference, attention: AttentionConfig):
    """The reference's prefilled caches with calibrated βs for ``attention`` (dipr_mass or
    dipr_keys), the curves computed once per (n_cal, sink, window). Returns (caches, curves)."""
    key = (attention.calibration.n_cal, attention.sink, attention.window)
    if key not in ref.curves:
        tail = [ref.context[-attention.calibration.n_cal:].tolist()]
        ref.curves[key] = engine.calibration_curves(ref.caches, tail, sink=attention.sink, window=attention.window)
    curves = ref.curves[key]
    cal = attention.calibration
    betas = calibration.choose_betas(curves, mass=cal.dipr_mass, keys=cal.dipr_keys)
    return calibration.with_betas(ref.caches, betas), curves


def _mean_stat(aux, name) -> np.ndarray:
    """aux: per-layer stats dicts of one step → [L] mean of ``name`` over batch and heads (nan if absent)."""
    return np.array([np.asarray(a[name]).mean() if name in a else np.nan for a in aux], np.float64)


def score_against(
    engine: Engine,
    ref: Reference,
    attention: AttentionConfig,
    *,
    decode: Optional[DecodeFn] = None,
    betas: Optional[np.ndarray] = None,
    progress: bool = False,
) -> dict:
    """Score ``attention`` against a shared :class:`Reference` (see :func:`score_sparse` for the keys).

    ``decode``: an alternative decode function; it must collect stats. Default:
    ``engine.decode_step`` with ``attention`` (stats collected). ``betas`` f32 [L, B, Hq]:
    with calibrated DIPR, use these βs instead of calibrating (e.g. another allocation of
    the same curves).
    """
    p = ref.prefill_tokens
    cfg = dataclasses.replace(attention.resolve(p), collect_stats=True)
    if decode is None:
        decode = engine_decoder(engine, cfg)
    caches, cal = copy_caches(ref.caches), None
    if betas is not None and not (cfg.method == "dipr" and cfg.calibrated):
        raise ValueError("betas are for calibrated DIPR (method 'dipr' with dipr_mass or dipr_keys)")
    if cfg.method == "dipr" and cfg.calibrated:
        caches, curves = calibrated_caches(engine, ref, cfg)
        caches = copy_caches(caches if betas is None else calibration.with_betas(ref.caches, np.asarray(betas)))
        betas = np.stack([np.asarray(c.dipr_beta) for c in caches])
        cal = {"n_cal": int(curves.rows[0]),
               "calibration_keys_fraction": float(calibration.spent_fraction(curves, betas)[0]),
               "calibration_mass": float(calibration.held_mass(curves, betas).mean())}
    logits, auxes = [], []
    bar = _bar(progress, ref.steps, f"eval {cfg.method}")
    for tok in ref.inputs:
        lg, caches, aux = decode(caches, jnp.asarray([tok], jnp.int32))
        logits.append(lg[0])
        auxes.append(jax.device_get(aux))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    nll, nll_f, kl = (np.asarray(x, np.float64) for x in
                      step_metrics(jnp.stack(logits), ref.logits_full, jnp.asarray(ref.targets)))
    ctx = np.arange(p + 1, p + ref.steps + 1, dtype=np.float64)[:, None]  # keys visible at each step
    lk = np.stack([_mean_stat(a, "keys_attended") for a in auxes])  # [steps, L]
    lr = np.stack([_mean_stat(a, "recall") for a in auxes])
    lf = lk / ctx
    lb = np.stack([_mean_stat(a, "candidates") for a in auxes]) / ctx
    dipr_layers = np.isfinite(lb[0])
    m, mf = float(nll.mean()), float(nll_f.mean())
    return {
        "tokens": ref.steps,
        "prefill_tokens": p,
        "attention": cfg.method,
        "tail": cfg.effective_tail,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
        "nll": m,
        "ppl": math.exp(m),
        "nll_full": mf,
        "ppl_full": math.exp(mf),
        "ppl_increase": math.exp(m - mf) - 1.0,
        "kl_to_full": float(kl.mean()),
        "kl_to_full_max": float(kl.max()),
        "top1_agreement": float(np.mean(np.argmax(np.stack([np.asarray(x) for x in logits]), -1)
                                        == np.argmax(np.asarray(ref.logits_full), -1))),
        "mean_keys_attended": float(lk.mean()),
        "keys_fraction": float(lf.mean()),
        "attention_recall": float(lr.mean()),
        "candidates_fraction": float(lb[:, dipr_layers].mean()) if dipr_layers.any() else None,
        **({"calibration": cal, "dipr_beta_per_layer": calibration.beta_summary(caches)} if cal is not None else {}),
        "per_layer": [
            {"layer": i, "mean_keys_attended": float(lk[:, i].mean()), "keys_fraction": float(lf[:, i].mean()),
             "attention_recall": float(lr[:, i].mean())}
            for i in range(lk.shape[1])
        ],
    }


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
    keys), ``candidates_fraction`` (keys refined exactly, DIPR), and ``per_layer``.
    """
    n = len(tokens)
    p = prefill_tokens if prefill_tokens is not None else max(1, n - 256)
    _check_window(n, p)
    ref = prepare_reference(engine, tokens, prefill_tokens=p, progress=progress)
    return score_against(engine, ref, attention, progress=progress)


__all__ = ["Reference", "prepare_reference", "calibrated_caches", "score_against", "score_sparse", "step_metrics",
           "engine_decoder"]
