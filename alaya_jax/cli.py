"""The ``alaya`` command line: generate, eval and snapshot.

Errors in what the user gave (an empty prompt, a missing file, a bad value, a
prompt longer than the context, a refused snapshot) print one ``error:`` line
and exit with status 2 — no traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional

from alaya_jax.methods import METHODS


class UsageError(ValueError):
    """A problem with what the user asked for; printed without a traceback."""


def _number(kind: type, *, minimum, inclusive: bool = True, maximum=None):
    """An argparse type: ``kind`` (int or float) >= ``minimum`` (> if not inclusive), <= ``maximum``."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        low_ok = v >= minimum if inclusive else v > minimum
        if not low_ok or (maximum is not None and not v <= maximum):
            rng = f"{'>=' if inclusive else '>'} {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
            raise argparse.ArgumentTypeError(f"expected a number {rng}, got {text}")
        return v

    return parse


_positive_int = _number(int, minimum=1)
_nonneg_int = _number(int, minimum=0)
_nonneg_float = _number(float, minimum=0.0)
_unit_float = _number(float, minimum=0.0, inclusive=False, maximum=1.0)


def _read_text(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UsageError(f"{what} {path!r} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path!r} is a directory") from None
    except (PermissionError, OSError) as e:
        raise UsageError(f"cannot read {what} {path!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise UsageError(f"{what} {path!r} is empty")
    return text


def _add_attention_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("attention")
    g.add_argument("--attention", choices=METHODS, default="full", help="attention method for decode steps")
    g.add_argument("--beta", type=_nonneg_float, default=32.0, help="DIPR range β in raw q·k units (default 32)")
    g.add_argument("--budget", type=_positive_int, default=256, help="keys selected by topk/quest/infllm")
    g.add_argument("--top-p", type=_unit_float, default=0.9, dest="attn_top_p", help="mass kept by topp")
    g.add_argument("--sink", type=_nonneg_int, default=4, help="initial tokens always attended")
    g.add_argument("--window", type=_nonneg_int, default=64, help="recent tokens always attended")
    g.add_argument("--implementation", choices=("reference", "pallas"), default="reference",
                   help="kernel implementation for DIPR (pallas: interpret mode on CPU)")


def _attention_config(args, **extra):
    from alaya_jax.methods import AttentionConfig

    return AttentionConfig(method=args.attention, beta=args.beta, budget=args.budget, top_p=args.attn_top_p,
                           sink=args.sink, window=args.window, implementation=args.implementation, **extra)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alaya", description="Long-context inference with an exact DIPR KV store.")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model dtype")
    p.add_argument("--gguf", default=None, help="GGUF model file (default: the bundled SmolLM2-135M-Instruct)")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer a prompt, optionally about a long context file")
    g.add_argument("--prompt", default=None, help="the question or instruction (required unless --demo-context)")
    g.add_argument("--context-file", default=None, help="text placed before the question in the chat prompt")
    g.add_argument("--demo-context", action="store_true",
                   help="use the bundled long context (Python's pydoc topics on simple statements, ~5.6K "
                        "tokens); --prompt defaults to a question about it")
    g.add_argument("--raw", action="store_true", help="plain completion: no chat template")
    g.add_argument("--max-new-tokens", type=_positive_int, default=128)
    g.add_argument("--temperature", type=_nonneg_float, default=0.0, help="0 = greedy")
    g.add_argument("--sample-top-p", type=_unit_float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--db", default=None,
                   help="context DB directory: reuse the longest stored prefix of the prompt, and afterwards "
                        "store the context's KV (--context-file/--demo-context) if the DB lacks it")
    g.add_argument("--no-store", action="store_true", help="with --db: only read the DB, never write to it")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    _add_attention_args(g)

    e = sub.add_parser("eval", help="teacher-forced perplexity of a text")
    e.add_argument("--text-file", required=True)
    e.add_argument("--max-tokens", type=_positive_int, default=None,
                   help="score the first N tokens (default: all that fit the context)")
    e.add_argument("--prefill-tokens", type=_positive_int, default=None,
                   help="with a sparse --attention: tokens prefilled densely before decode-step scoring")
    e.add_argument("--json", action="store_true")
    _add_attention_args(e)

    try:
        from alaya_jax.cli_snapshot import add_snapshot_commands
    except ImportError:
        add_snapshot_commands = None
    if add_snapshot_commands is not None:
        add_snapshot_commands(sub)
    return p


def _progress(enabled: bool, total: int, desc: str):
    """A tqdm bar on a terminal (stderr), else None."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, leave=False)


def load_model(args):
    import jax.numpy as jnp  # noqa: F401  (import jax before models for a clear backend message)

    from models import load_gguf, load_smollm2

    if args.gguf:
        if not os.path.isfile(args.gguf):
            raise UsageError(f"GGUF file {args.gguf!r} does not exist")
        return load_gguf(args.gguf, dtype=args.dtype)
    return load_smollm2(dtype=args.dtype)


def cmd_generate(args) -> int:
    from alaya_jax.corpus import DEMO_QUESTION, demo_context
    from alaya_jax.engine import Engine
    from alaya_jax.sampling import SamplingConfig

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
        context = _read_text(args.context_file, "context file")
    elif args.demo_context:
        context = demo_context()
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.sample_top_p, seed=args.seed)
    attention = _attention_config(args)
    config, model, tok = load_model(args)
    if args.raw:
        text = (context + "\n\n" if context else "") + args.prompt
        ids = tok.encode(text)
    else:
        user = (context.strip() + "\n\n" + args.prompt) if context else args.prompt
        ids = tok.encode(tok.chat_prompt(user))
    total = len(ids) + args.max_new_tokens
    if total > config.max_position_embeddings:
        raise UsageError(
            f"the prompt has {len(ids)} tokens; with --max-new-tokens {args.max_new_tokens} that is {total}, "
            f"more than the model's context of {config.max_position_embeddings} tokens"
        )
    engine = Engine(model)
    caches, todo, db, session = None, ids, None, None
    t0 = time.perf_counter()
    if args.db:
        from alaya_jax.cli_snapshot import open_db

        db = open_db(args.db, config, tok, engine)  # hashes the weights once: set-up, not part of TTFT
        t0 = time.perf_counter()  # TTFT counts from here: snapshot restore + tail prefill + first token
        session, todo = db.create_session(ids, capacity=total)
        caches = session.caches
    t_restored = time.perf_counter()
    bar = _progress(not args.json, len(todo), "prefill")
    printed = [""]
    streamed = []

    def on_token(_, t):
        if args.json:
            return
        streamed.append(t)
        s = tok.decode(streamed)
        if not s.endswith("\ufffd"):
            sys.stdout.write(s[len(printed[0]):])
            sys.stdout.flush()
            printed[0] = s

    def progress(n):
        if bar is not None:
            bar.update(n)
            if bar.n >= bar.total:
                bar.close()

    t_gen = time.perf_counter()
    results, final_caches = engine.generate([todo], sampling=sampling, attention=attention,
                                            stop_ids=sorted(tok.stop_ids), on_token=on_token, caches=caches,
                                            capacity=total, progress=progress)
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
        "stopped": r.stopped,
    }
    if db is not None:
        out["restore_s"] = t_restored - t0
        out["snapshot_id"] = session.snapshot_id
        out["stored_snapshot"] = stored
        if session.skipped:
            out["skipped_snapshots"] = [{"id": i, "reason": why} for i, why in session.skipped]
    if args.json:
        print(json.dumps(out))
    else:
        sys.stdout.write(text[len(printed[0]):] + "\n")
        tp = f", {out['decode_tokens_per_s']:.1f} tok/s decode" if out["decode_tokens_per_s"] else ""
        reused = f", {r.reused_tokens} reused" if args.db else ""
        st = f"; stored context snapshot {stored}" if stored else ""
        print(f"[{len(ids)} prompt tokens{reused}, {len(r.tokens)} new; time to first token "
              f"{ttft:.2f} s{tp}; attention={attention.method}{st}]", file=sys.stderr)
    return 0


def _store_context_prefix(db, tok, context, raw, ids, caches):
    """After ``generate --db``: store the context's own tokens (the prefix every question
    about it shares, as ``alaya snapshot save`` stores it) unless the DB already covers
    all of its full blocks. ``caches`` hold ``ids`` (+ generated tokens). Returns the new
    snapshot's id, or None when nothing was written."""
    from alaya_jax.cli_snapshot import context_prefix_ids
    from checkpoints import truncate_store

    prefix = context_prefix_ids(tok, context, raw=raw)
    n = len(prefix)
    if n < db.block_size or ids[:n] != prefix:
        return None
    _, covered = db.longest_prefix(prefix)
    if covered >= (n // db.block_size) * db.block_size:
        return None
    kv = tuple(truncate_store(c, n) for c in caches)
    return db.import_(prefix, kv)


def cmd_eval(args) -> int:
    from alaya_jax.engine import Engine

    text = _read_text(args.text_file, "text file")
    attention = _attention_config(args)
    config, model, tok = load_model(args)
    ids = tok.encode(text)
    limit = config.max_position_embeddings
    n = min(len(ids), args.max_tokens or limit)
    if n > limit:
        raise UsageError(f"--max-tokens {n} exceeds the model's context of {limit} tokens")
    if n < 2:
        raise UsageError(f"the text has {len(ids)} token(s); scoring needs at least 2")
    ids = ids[:n]
    engine = Engine(model)
    if attention.method == "full" and args.prefill_tokens is None:
        bar = _progress(not args.json, n, "eval")
        res = engine.score(ids, progress=(bar.update if bar else None))
        if bar is not None:
            bar.close()
        out = {"tokens": res.tokens, "nll": res.nll, "ppl": res.ppl, "attention": "full"}
    else:
        from alaya_jax.evaluation import score_sparse

        out = score_sparse(engine, ids, attention=attention, prefill_tokens=args.prefill_tokens,
                           progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps(out))
    else:
        print(f"tokens {out['tokens']}  nll {out['nll']:.4f}  ppl {out['ppl']:.3f}  attention {out['attention']}")
        for k in ("kl_to_full", "keys_fraction", "mean_keys_attended", "attention_recall"):
            if k in out:
                print(f"{k} {out[k]:.4g}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "eval":
            return cmd_eval(args)
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"alaya: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("alaya: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
