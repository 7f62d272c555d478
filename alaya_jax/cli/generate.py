"""``alaya generate``: answer a prompt, optionally about a long context, optionally reusing
(and then storing) a prefilled context from a context DB."""

from __future__ import annotations

import json
import math
import sys
import time

from alaya_jax.cli.common import (UsageError, add_attention_args, add_devices_arg, attention_config, context_limit,
                                  context_limit_text, devices_arg, load_model, nonneg_float, positive_int,
                                  progress_bar, read_text, unit_float)
from alaya_jax.runtime.prompts import context_prefix_ids
from alaya_jax.store.db_for_model import open_db


#: The smallest KV capacity ``alaya generate`` compiles for (capacities are bucketed).
CLI_MIN_CAPACITY = 512


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="answer a prompt, optionally about a long context file")
    g.add_argument("--prompt", default=None, help="the question or instruction (required unless --demo-context)")
    g.add_argument("--context-file", default=None, help="text placed before the question in the chat prompt")
    g.add_argument("--demo-context", action="store_true",
                   help="use the bundled long context (Python's pydoc topics on simple statements, ~5.6K "
                        "tokens); --prompt defaults to a question about it")
    g.add_argument("--raw", action="store_true", help="plain completion: no chat template")
    g.add_argument("--max-new-tokens", type=positive_int, default=128)
    g.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 = greedy")
    g.add_argument("--sample-top-p", type=unit_float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--db", default=None,
                   help="context DB directory: reuse the longest stored prefix of the prompt, and afterwards "
                        "store the context's KV (--context-file/--demo-context) if the DB lacks it")
    g.add_argument("--no-store", action="store_true", help="with --db: only read the DB, never write to it")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_devices_arg(g)
    add_attention_args(g)
    g.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from alaya_jax.runtime.corpus import DEMO_QUESTION, demo_context
    from alaya_jax.runtime.detokenize import IncrementalDecoder
    from alaya_jax.runtime.engine import Engine, capacity_bucket
    from alaya_jax.runtime.sampling import SamplingConfig

    devices = devices_arg(args)  # before the model is loaded
    if args.prompt is None:
        if not args.demo_context:
            raise UsageError("--prompt is required (or use --demo-context)")
        args.prompt = DEMO_QUESTION
    if not args.prompt.strip():
        raise UsageError("the prompt is empty")
    context = None
    if args.context_file and args.demo_context:
        raise UsageError("give either --context-file or --demo-context, not both")
    if args.context_file:
        context = read_text(args.context_file, "context file")
    elif args.demo_context:
        context = demo_context()
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.sample_top_p, seed=args.seed)
    attention = attention_config(args)
    config, model, tok = load_model(args)
    if args.raw:
        text = (context + "\n\n" if context else "") + args.prompt
        ids = tok.encode(text)
    else:
        user = (context.strip() + "\n\n" + args.prompt) if context else args.prompt
        ids = tok.encode(tok.chat_prompt(user))
    total = len(ids) + args.max_new_tokens
    if total > context_limit(args, config):
        raise UsageError(
            f"the prompt has {len(ids)} tokens; with --max-new-tokens {args.max_new_tokens} that is {total}, "
            f"more than {context_limit_text(args, config)}"
        )
    engine = Engine(model, devices=devices)
    # A capacity bucket, not the exact size: other prompts of a similar length reuse the compiled programs.
    capacity = capacity_bucket(total, block_size=engine.block_size, minimum=CLI_MIN_CAPACITY,
                               maximum=context_limit(args, config))
    caches, todo, db, session = None, ids, None, None
    t0 = time.perf_counter()
    if args.db:
        # hashes the weights once: set-up, not part of TTFT
        db = open_db(args.db, config, tok, engine, kv_placement=attention.kernel.kv_placement)
        t0 = time.perf_counter()  # TTFT counts from here: snapshot restore + tail prefill + first token
        session, todo = db.create_session(ids, capacity=capacity)
        caches = session.caches
    t_restored = time.perf_counter()
    bar = progress_bar(not args.json, len(todo), "prefill")
    stream = IncrementalDecoder(tok)

    def on_token(_, t):
        if args.json:
            return
        delta = stream.add([t])
        if delta:
            sys.stdout.write(delta)
            sys.stdout.flush()

    def progress(n):
        if bar is not None:
            bar.update(n)
            if bar.n >= bar.total:
                bar.close()

    t_gen = time.perf_counter()
    results, final_caches = engine.generate([todo], sampling=sampling, attention=attention,
                                            stop_ids=sorted(tok.stop_ids), on_token=on_token, caches=caches,
                                            capacity=capacity, progress=progress,
                                            context_tokens=[ids[: len(ids) - len(todo)]])
    if bar is not None:
        bar.close()
    r = results[0]
    # engine.generate times from its own start of prefill; add the restore before it.
    ttft = (t_gen - t0) + r.ttft_s
    stored = None
    if db is not None and context is not None and not args.no_store:
        stored = _store_context_prefix(db, tok, context, args.raw, ids, final_caches)
    text = tok.decode(r.tokens)
    out = {
        "text": text,
        "prompt_tokens": len(ids),
        "new_tokens": len(r.tokens),
        "reused_tokens": r.reused_tokens,
        "ttft_s": ttft,
        "tpot_s": None if math.isnan(r.tpot_s) else r.tpot_s,
        "decode_tokens_per_s": None if math.isnan(r.tpot_s) else 1.0 / r.tpot_s,
        "attention": attention.method,
        "tail": attention.resolve(len(ids)).effective_tail,
        "stopped": r.stopped,
    }
    if attention.calibrated:
        from alaya_jax.attention.dipr.calibration import beta_summary

        out["dipr_beta_per_layer"] = beta_summary(final_caches)
    if db is not None:
        out["restore_s"] = t_restored - t0
        out["snapshot_id"] = session.snapshot_id
        out["stored_snapshot"] = stored
        if session.skipped:
            out["skipped_snapshots"] = [{"id": i, "reason": why} for i, why in session.skipped]
    if args.json:
        print(json.dumps(out))
    else:
        sys.stdout.write((text[len(stream.text):] if text.startswith(stream.text) else "") + "\n")
        tp = f", {out['decode_tokens_per_s']:.1f} tok/s decode" if out["decode_tokens_per_s"] else ""
        reused = f", {r.reused_tokens} reused" if args.db else ""
        st = f"; stored context snapshot {stored}" if stored else ""
        print(f"[{len(ids)} prompt tokens{reused}, {len(r.tokens)} new; time to first token "
              f"{ttft:.2f} s{tp}; attention={attention.method} tail={out['tail']}{st}]", file=sys.stderr)
    return 0


def _store_context_prefix(db, tok, context, raw, ids, caches):
    """After ``generate --db``: store the context's own tokens (the prefix every question
    about it shares, as ``alaya snapshot save`` stores it) unless the DB already covers
    all of its full blocks. ``caches`` hold ``ids`` (+ generated tokens). Returns the new
    snapshot's id, or None when nothing was written."""
    from alaya_jax.store import kv_store

    prefix = context_prefix_ids(tok, context, raw=raw)
    n = len(prefix)
    if n < db.block_size or ids[:n] != prefix:
        return None
    _, covered = db.longest_prefix(prefix)
    if covered >= (n // db.block_size) * db.block_size:
        return None
    kv = tuple(kv_store.truncate(c, n) for c in caches)
    return db.import_(prefix, kv)
