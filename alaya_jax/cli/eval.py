"""``alaya eval``: teacher-forced perplexity of a text, and with a sparse attention its KL to
full attention, keys attended and attention mass recalled."""

from __future__ import annotations

import json
import sys

from alaya_jax.cli.common import (UsageError, add_attention_args, attention_config, context_limit, context_limit_text,
                                  load_model, positive_int, progress_bar, read_text)


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="teacher-forced perplexity of a text")
    e.add_argument("--text-file", required=True)
    e.add_argument("--max-tokens", type=positive_int, default=None,
                   help="score the first N tokens (default: all that fit the context)")
    e.add_argument("--prefill-tokens", type=positive_int, default=None,
                   help="with a sparse --attention: tokens prefilled densely before decode-step scoring")
    e.add_argument("--json", action="store_true")
    add_attention_args(e)
    e.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from alaya_jax.runtime.engine import Engine

    text = read_text(args.text_file, "text file")
    attention = attention_config(args)
    config, model, tok = load_model(args)
    ids = tok.encode(text)
    limit = context_limit(args, config)
    n = min(len(ids), args.max_tokens or limit)
    if n > limit:
        raise UsageError(f"--max-tokens {n} exceeds {context_limit_text(args, config)}")
    if n < 2:
        raise UsageError(f"the text has {len(ids)} token(s); scoring needs at least 2")
    ids = ids[:n]
    engine = Engine(model)
    if attention.method == "full" and args.prefill_tokens is None:
        bar = progress_bar(not args.json, n, "eval")
        res = engine.score(ids, progress=(bar.update if bar else None))
        if bar is not None:
            bar.close()
        out = {"tokens": res.tokens, "nll": res.nll, "ppl": res.ppl, "attention": "full", "tail": "none"}
    else:
        from alaya_jax.runtime.evaluation import score_sparse

        out = score_sparse(engine, ids, attention=attention, prefill_tokens=args.prefill_tokens,
                           progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps(out))
    else:
        print(f"tokens {out['tokens']}  nll {out['nll']:.4f}  ppl {out['ppl']:.3f}  attention {out['attention']}"
              f"  tail {out['tail']}")
        for k in ("kl_to_full", "keys_fraction", "mean_keys_attended", "attention_recall"):
            if k in out:
                print(f"{k} {out[k]:.4g}")
        if "dipr_beta_per_layer" in out:
            fmt = lambda x: "inf" if x is None else f"{x:g}"
            print("calibrated β per layer (min/median/max): " + "  ".join(
                f"L{r['layer']} {fmt(r['min'])}/{fmt(r['median'])}/{fmt(r['max'])}"
                for r in out["dipr_beta_per_layer"]))
    return 0
