"""Real-key proxy for Llama-3-8B attention shapes, built from captured SmolLM2 keys and queries (NumPy only).

The capture (``bench/real_keys/smollm2_pydoc_8k.npz``, made by ``capture_real_keys.py``)
holds, for a few SmolLM2-135M layers, the post-RoPE keys of 8192 tokens of prose as
the KV cache holds them ([Lc, 3, 8192, 64], float16) and the post-RoPE queries of the
last 128 positions ([Lc, 128, 9, 64]). ``build_proxy`` turns them into 8B shapes
(8 KV heads, 4 query heads a group, head dim 128, 32K–512K tokens):

* **head dim** (``construction``):

  - ``"embed"`` (default): one real d=64 KV head is repeated ``r = head_dim // 64``
    times side by side and scaled by 1/√r (``[k, k]/√2``: the key's norm is kept), the
    query is its real query head repeated (``[q, q]``), so every proxy score is exactly
    ``√r`` times the real score of the same token: the ranges at β·√r are the real
    ranges at β, and the softmax weights at 1/√128 are the real ones at 1/√64. Only
    the key code sees a new dimension (the store's d=128 rotation and 4-bit code).
  - ``"pair"`` (the issue's first idea, kept to show why it is not the default):
    ``r`` distinct real KV heads of one layer side by side (same token), queries side
    by side, so a proxy score is a *sum* of real scores ``q_a·k_a + q_b·k_b``; two
    heads that each single out a few keys single out fewer together, so its ranges
    are sparser than either head's (``results/proxy_check/proxy_check.md``).
* **group**: query head j of a proxy KV head is real query head ``j mod 3`` of its
  real KV head(s) (the 4th of a group of 4 repeats the 1st), so the group union is the
  real 3-head union the CPU measures; a 4th distinct query (e.g. the previous
  position's) would make the union a different quantity.
* **context**: the real sequence ending at the query's position P (``query_offset``
  positions before the last, 8191) keeps its real sink (tokens 0–3) and its real last
  ``window`` tokens (P−window, P], so the recent window is the real one of a decode
  query at P; between them the real body (tokens 4..P−window, the keys a DIPR search
  scans) is repeated end to end, cut so that it ends with real token P−window. Every
  key is a real key (RoPE included); long contexts repeat each body key about
  ``context / P`` times, so the shares of keys in range and of candidates among the
  searched keys are those of the real 8K context (they do not fall with length as a
  real long context's might: a conservative proxy for the scan's work). The window
  is not repeated: copies of the most recent tokens in the middle of the context
  would look recent to the query (RoPE) and inflate the range.
* **heads / batch**: each (batch row, proxy KV head) draws a real source — (captured
  layer, real KV head) for ``embed``, (captured layer, ordered pair of distinct real KV
  heads) for ``pair`` — without repetition until the sources run out (then again);
  ``layer`` restricts the draws to one captured layer.
* **values**: not captured (the file holds keys and queries only, ≤ 16 MB). Values are
  seeded Gaussian vectors with one vector per real token, laid out by the same
  index map; they do not affect which keys are in range or candidates.
* **β**: β at d=128 = ``beta_scale`` · β at d=64 with ``beta_scale = sqrt(head_dim /
  64)`` (√2), the scaling that keeps the softmax ratio ``exp(−β/√d)`` of the range:
  the CPU's β=16 / 24 / 32 at d=64 are β≈22.6 / 33.9 / 45.3 on the proxy. For
  ``embed`` this is exact (scores are √2 × the real ones).
"""

from __future__ import annotations

import os

import numpy as np

DEFAULT_CAPTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "real_keys", "smollm2_pydoc_8k.npz")
REAL_D = 64
SINK = 4


def load_capture(path: str | None = None) -> dict:
    """The committed capture: ``keys`` f16 [Lc, Hkv=3, S=8192, 64], ``queries`` f16 [Lc, 128, Hq=9, 64]
    (the last 128 positions), ``layers`` [Lc] (model layers), ``query_positions`` [128] and metadata."""
    path = DEFAULT_CAPTURE if path is None else path
    if not os.path.exists(path):
        raise FileNotFoundError(f"real-key capture {path} not found (make it with bench/capture_real_keys.py)")
    z = np.load(path)
    out = {k: z[k] for k in z.files}
    k, q = out["keys"], out["queries"]
    if k.ndim != 4 or q.ndim != 4 or k.shape[0] != q.shape[0] or k.shape[3] != REAL_D or q.shape[3] != REAL_D \
            or q.shape[2] % k.shape[1]:
        raise ValueError(f"{path}: unexpected shapes keys {k.shape}, queries {q.shape}")
    return out


def token_index(*, context: int, last: int, window: int = 64) -> np.ndarray:
    """Real token index [context] of each proxy position: sink 0..3, the body 4..last−window
    repeated end to end (ending with real token last−window), then the real window
    (last−window, last], so that position context−1 is real token ``last``."""
    if context < SINK + window + 1:
        raise ValueError(f"context {context} must exceed sink {SINK} + window {window}")
    body = last + 1 - window - SINK
    if body < 1:
        raise ValueError(f"query position {last} leaves no body between sink {SINK} and window {window}")
    n = context - SINK - window
    t = np.arange(n, dtype=np.int64)
    return np.concatenate([np.arange(SINK), SINK + (t - n + body) % body, np.arange(last + 1 - window, last + 1)])


CONSTRUCTIONS = ("embed", "pair")


def build_proxy(*, context: int, batch: int = 1, num_kv_heads: int = 8, group: int = 4, head_dim: int = 128,
                layer: int | None = None, query_offset: int = 0, window: int = 64, construction: str = "embed",
                seed: int = 0, capture: dict | None = None, values: bool = True, by_token: bool = False) -> dict:
    """Llama-3-8B-shaped attention inputs made of real SmolLM2 keys and queries (see the module doc).

    ``layer``: a model layer held in the capture (its ``layers``), or None for all of them.
    ``query_offset``: the query is that of real position 8191 − query_offset (0: the last).
    ``window``: the real last tokens kept once at the end (match the DIPR window you run).
    ``construction``: "embed" (default) or "pair" (see the module doc).
    ``by_token``: return ``keys`` (and ``values``) per real token, [B, Hkv, 8192, D], instead of per position:
    the proxy is then ``keys[:, :, token_index]``, which a device builds in one gather (long contexts
    without a host array of the whole context).

    Returns ``q`` f32 [B, Hq=num_kv_heads·group, D] (query head j belongs to KV head j // group),
    ``keys`` f16 [B, Hkv, S=context, D], ``values`` f16 [B, Hkv, S, D] (None if not ``values``),
    ``beta_scale`` (β at this D = beta_scale · β at d=64), ``source`` (per (b, h): captured layer,
    real KV heads, real query heads), ``token_index`` [S] (real token of each position) and
    ``query_position`` (the real position P of the query).
    """
    cap = load_capture() if capture is None else capture
    if construction not in CONSTRUCTIONS:
        raise ValueError(f"construction {construction!r} not in {CONSTRUCTIONS}")
    if head_dim % REAL_D or head_dim < REAL_D:
        raise ValueError(f"head_dim {head_dim} must be a positive multiple of the captured {REAL_D}")
    r = head_dim // REAL_D
    keys_c, q_c = cap["keys"], cap["queries"]
    lc, hkv_c, s_c, _ = keys_c.shape
    if construction == "pair" and r > hkv_c:
        raise ValueError(f"head_dim {head_dim} needs {r} real KV heads side by side; a layer has {hkv_c}")
    nq = q_c.shape[1]
    if not 0 <= query_offset < nq:
        raise ValueError(f"query_offset {query_offset} outside [0, {nq})")
    if min(context, batch, num_kv_heads, group) < 1:
        raise ValueError(f"context/batch/num_kv_heads/group must be positive: {context}/{batch}/{num_kv_heads}/{group}")
    layers = [int(x) for x in cap["layers"]]
    if layer is None:
        lsel = list(range(lc))
    elif layer in layers:
        lsel = [layers.index(layer)]
    else:
        raise ValueError(f"layer {layer} not captured; captured layers: {layers}")
    rng = np.random.default_rng(seed)
    srcs = [(h,) * r for h in range(hkv_c)] if construction == "embed" else _ordered_tuples(hkv_c, r)
    combos = [(li, p) for li in lsel for p in srcs]
    draws = []
    while len(draws) < batch * num_kv_heads:
        draws += [combos[i] for i in rng.permutation(len(combos))]
    last = s_c - 1 - query_offset
    idx = token_index(context=context, last=last, window=window)
    rows = np.arange(s_c) if by_token else idx  # the real token of each row of ``keys``
    qrow = nq - 1 - query_offset
    gq = q_c.shape[2] // hkv_c
    kscale = np.float32(1 / np.sqrt(r)) if construction == "embed" else np.float32(1)
    keys = np.empty((batch, num_kv_heads, len(rows), head_dim), np.float16)
    q = np.empty((batch, num_kv_heads * group, head_dim), np.float32)
    source = []
    for b in range(batch):
        for h in range(num_kv_heads):
            li, heads = draws[b * num_kv_heads + h]
            real = keys_c[li]
            for i, kh in enumerate(heads):
                part = slice(i * REAL_D, (i + 1) * REAL_D)
                if i and heads[i] == heads[0]:
                    keys[b, h, :, part] = keys[b, h, :, :REAL_D]
                else:
                    keys[b, h, :, part] = (real[kh, rows].astype(np.float32) * kscale).astype(np.float16)
                for j in range(group):
                    q[b, h * group + j, part] = q_c[li, qrow, kh * gq + j % gq]
            source.append({"batch": b, "kv_head": h, "layer": layers[li], "real_kv_heads": list(heads),
                           "real_query_heads": [[kh * gq + j % gq for kh in heads] for j in range(group)]})
    vals = None
    if values:
        vrng = np.random.default_rng([seed, 1])
        base = vrng.standard_normal((batch, num_kv_heads, s_c, head_dim), np.float32).astype(np.float16)
        vals = base[:, :, rows]
    return {"q": q, "keys": keys, "values": vals, "beta_scale": float(np.sqrt(r)), "source": source,
            "token_index": idx, "query_position": last}


def _ordered_tuples(n: int, r: int) -> list[tuple[int, ...]]:
    """Ordered r-tuples of distinct indices in range(n)."""
    return [t for t in np.ndindex(*(n,) * r) if len(set(t)) == r]


__all__ = ["CONSTRUCTIONS", "DEFAULT_CAPTURE", "build_proxy", "load_capture", "token_index"]
