"""Subprocess for the context-DB crash and concurrency tests (not a test module).

    python tests/support/crash_helper.py save DB SEED NUM_TOKENS STAGE
        Save a random context into the DB. STAGE names a step of
        ``checkpoints.snapshot.save_snapshot`` ("after_arrays", "after_tokens",
        "before_meta", "before_rename", "after_rename") at which the process
        SIGKILLs itself, or "none". Prints "SAVING" just before the save starts
        (for kills after a delay) and "SAVED <id>" when it returns.
    python tests/support/crash_helper.py load DB SEED NUM_TOKENS
        Load the snapshot of that context through create_session and print
        "LOADED <reused_tokens> <fingerprint of the caches>".
"""

import os
import signal
import sys

import numpy as np

LAYERS, HKV, D, BK = 6, 2, 64, 16
DB_KW = dict(model_fingerprint="model-A", tokenizer_fingerprint="tok-A", dtype="bfloat16", block_size=BK)


def make_context(seed: int, n: int):
    import jax.numpy as jnp

    from alaya_jax.store import kv_store

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 50_000, size=n).tolist()
    caches = []
    for _ in range(LAYERS):
        k = jnp.asarray(rng.standard_normal((1, n, HKV, D), np.float32), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((1, n, HKV, D), np.float32), jnp.bfloat16)
        caches.append(kv_store.from_dense(k, v, block_size=BK))
    return tokens, tuple(caches)


def caches_fingerprint(caches, n: int) -> str:
    from checkpoints import fingerprint

    return fingerprint([(np.asarray(c.dense_keys()[:, :, :n]).view(np.uint16),
                         np.asarray(c.dense_values()[:, :, :n]).view(np.uint16),
                         *(np.asarray(x[:, :, :n]) for x in c.dense_codes()), np.asarray(c.lengths)) for c in caches])


def main(argv):
    mode, db_path, seed, n = argv[0], argv[1], int(argv[2]), int(argv[3])
    from alaya_jax.store.context_db import ContextDB

    db = ContextDB(db_path, **DB_KW)
    tokens, caches = make_context(seed, n)
    if mode == "save":
        stage = argv[4]
        import checkpoints.snapshot as snap

        def kill_at(name):
            if name == stage:
                os.kill(os.getpid(), signal.SIGKILL)

        snap._stage = kill_at
        print("SAVING", flush=True)
        sid = db.import_(tokens, caches, name=f"seed{seed}")
        print("SAVED", sid, flush=True)
    elif mode == "load":
        session, rest = db.create_session(tokens + [1], capacity=n + 8, strict=True)
        print("LOADED", session.reused_tokens, caches_fingerprint(session.caches, session.reused_tokens), flush=True)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv[1:])
