"""Quality of sparse attention methods against full attention on real weights and text (CPU).

For each context length: one dense prefill of ``pydoc_data.topics`` text, one
teacher-forced full-attention decode chain (its logits kept), then for every
method configuration a teacher-forced decode chain of its own from a copy of the
prefilled cache. Reported per configuration: perplexity over the scored tokens,
KL(full ‖ method) of the next-token distribution, keys attended as a fraction of
the context, and the share of the full softmax mass on the attended keys — mean
over scored steps, heads and layers, plus per layer.

Also: a needle test (raw completion of a planted sentence at several depths and
lengths) and long-context questions answered by DIPR and full side by side.

    python bench/quality.py --contexts 2048 4096 8000 --steps 32 --out bench/results
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from alaya_jax.corpus import pydoc_topics
from alaya_jax.engine import FULL, Engine
from alaya_jax.evaluation import step_metrics
from alaya_jax.methods import AttentionConfig
from alaya_jax.sampling import SamplingConfig

GREEDY = SamplingConfig(max_new_tokens=1)
KEY = jax.random.PRNGKey(0)


def configs(ctx: int, sink: int, window: int) -> list[tuple[str, AttentionConfig]]:
    base = dict(sink=sink, window=window)
    out = []
    for beta in (8.0, 16.0, 24.0, 32.0, 48.0, 64.0):
        out.append((f"dipr β={beta:g}", AttentionConfig(method="dipr", beta=beta, **base)))
    for beta in (16.0, 32.0, 48.0):
        out.append((f"dipr+dense0 β={beta:g}", AttentionConfig(method="dipr", beta=beta, dense_layers=(0,), **base)))
    for frac in (0.01, 0.02, 0.04, 0.08, 0.16):
        k = max(1, int(round(frac * ctx)))
        for m in ("topk", "quest", "infllm"):
            out.append((f"{m} {frac:.0%}", AttentionConfig(method=m, budget=k, **base)))
    for p in (0.8, 0.9, 0.95):
        out.append((f"topp p={p:g}", AttentionConfig(method="topp", top_p=p, **base)))
    out.append(("streaming", AttentionConfig(method="streaming", **base)))
    return out


def chain(engine, caches, tokens, start, steps, cfg):
    """Teacher-forced decode steps t = start .. start+steps-1 → (logits [steps, V], per-step aux)."""
    logits_all, aux_all = [], []
    for t in range(start, start + steps):
        _, lg, caches, aux = engine.decode_step(caches, jnp.asarray([tokens[t]], jnp.int32), key=KEY,
                                                sampling=GREEDY, attention=cfg)
        logits_all.append(lg)
        aux_all.append(aux)
    return logits_all, aux_all


def evaluate_context(engine, tokens, ctx, steps, sink, window, log):
    p = ctx - steps - 1
    toks = tokens[: ctx]
    t0 = time.perf_counter()
    caches = engine.new_caches(batch=1, capacity=ctx)
    caches, _, _ = engine.prefill(caches, [toks[:p]])
    jax.block_until_ready(caches)
    log(f"ctx {ctx}: prefill {p} tokens in {time.perf_counter() - t0:.1f}s")
    full_logits, _ = chain(engine, jax.tree.map(jnp.copy, caches), toks, p, steps, FULL)
    targets = [jnp.asarray([toks[t + 1]], jnp.int32) for t in range(p, p + steps)]
    rows = []
    for name, cfg in configs(ctx, sink, window):
        t1 = time.perf_counter()
        cfg = dataclasses.replace(cfg, collect_stats=True)
        logits, aux = chain(engine, jax.tree.map(jnp.copy, caches), toks, p, steps, cfg)
        nll, nll_f, kl = [], [], []
        for lg, lf, tg in zip(logits, full_logits, targets):
            a, b, c = step_metrics(lg, lf, tg)
            nll.append(float(a[0])); nll_f.append(float(b[0])); kl.append(float(c[0]))
        ctx_len = np.arange(p + 1, p + steps + 1)[:, None]
        keys = np.array([[float(np.asarray(l["keys_attended"]).mean()) for l in a] for a in aux])  # [steps, L]
        recall = np.array([[float(np.asarray(l["recall"]).mean()) for l in a] for a in aux])
        frac = keys / ctx_len
        overflow = int(sum(int(l.get("overflow", 0)) for a in aux for l in a))
        row = {
            "context": ctx, "name": name, "method": cfg.method, "beta": cfg.beta if cfg.method == "dipr" else None,
            "budget": cfg.budget if cfg.method in ("topk", "quest", "infllm") else None,
            "top_p": cfg.top_p if cfg.method == "topp" else None, "dense_layers": list(cfg.dense_layers),
            "sink": sink, "window": window, "scored_tokens": steps, "prefill_tokens": p,
            "ppl": math.exp(np.mean(nll)), "ppl_full": math.exp(np.mean(nll_f)),
            "ppl_increase": math.exp(np.mean(nll) - np.mean(nll_f)) - 1.0,
            "kl_to_full": float(np.mean(kl)), "keys_fraction": float(frac.mean()),
            "mean_keys_attended": float(keys.mean()), "attention_recall": float(recall.mean()),
            "per_layer_keys_fraction": frac.mean(0).round(5).tolist(),
            "per_layer_recall": recall.mean(0).round(5).tolist(), "overflow_steps": overflow,
        }
        rows.append(row)
        log(f"  {name:22s} keys {row['keys_fraction']:7.2%}  KL {row['kl_to_full']:.4f}  "
            f"ppl {row['ppl']:.3f} (full {row['ppl_full']:.3f})  recall {row['attention_recall']:.3f}  "
            f"[{time.perf_counter() - t1:.0f}s]")
    return rows


def needle(engine, tok, lengths, depths, log):
    filler_ids = tok.encode(pydoc_topics())
    sentence = "\nThe secret code of the blue house is 68142.\n"
    query = "\nThe secret code of the blue house is"
    methods = [("full", FULL), ("dipr β=32", AttentionConfig(method="dipr", beta=32.0)),
               ("topk 4%", None), ("quest 4%", None)]
    rows = []
    for n in lengths:
        for depth in depths:
            body = tok.decode(filler_ids[: n])
            cut = int(len(body) * depth)
            ids = tok.encode(body[:cut] + sentence + body[cut:] + query)
            caches = engine.new_caches(batch=1, capacity=len(ids) + 10)
            caches, _, _ = engine.prefill(caches, [ids[:-1]])
            for name, cfg in methods:
                if cfg is None:
                    m = name.split()[0]
                    cfg = AttentionConfig(method=m, budget=max(1, int(0.04 * len(ids))))
                res, _ = engine.generate([ids[-1:]], sampling=SamplingConfig(max_new_tokens=7), attention=cfg,
                                         caches=jax.tree.map(jnp.copy, caches))
                text = tok.decode(res[0].tokens)
                rows.append({"tokens": len(ids), "depth": depth, "method": name, "output": text,
                             "found": "68142" in text})
                log(f"needle {len(ids)} tokens depth {depth:.0%} {name:10s} -> {text!r}")
    return rows


QUESTIONS = [
    (["for", "while", "if"], 'What does the "while" statement do?'),
    (["assert", "pass", "del", "return", "break", "continue"], 'What does the "assert" statement do?'),
    (["import", "global"], 'What does the "global" statement do?'),
]


def questions(engine, tok, log):
    rows = []
    for topics, q in QUESTIONS:
        ids = tok.encode(tok.chat_prompt(pydoc_topics(topics).strip() + "\n\n" + q))
        row = {"topics": topics, "question": q, "prompt_tokens": len(ids)}
        for name, cfg in (("full", FULL), ("dipr", AttentionConfig(method="dipr", beta=32.0))):
            res, _ = engine.generate([ids], sampling=SamplingConfig(max_new_tokens=40), attention=cfg,
                                     stop_ids=sorted(tok.stop_ids))
            row[name] = tok.decode(res[0].tokens)
        log(f"Q ({len(ids)} tok) {q}\n  full: {row['full']!r}\n  dipr: {row['dipr']!r}")
        rows.append(row)
    return rows


def plot(rows, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctxs = sorted({r["context"] for r in rows})
    groups = {}
    for r in rows:
        fam = r["name"].split()[0]
        groups.setdefault(fam, []).append(r)
    style = {"dipr": "o-", "dipr+dense0": "o--", "topk": "s-", "quest": "^-", "infllm": "v-", "topp": "d-",
             "streaming": "x"}
    for metric, fname, ylab in (("kl_to_full", "quality_kl.png", "KL(full ‖ method), nats"),
                                ("ppl_increase", "quality_ppl.png", "perplexity increase over full")):
        fig, axes = plt.subplots(1, len(ctxs), figsize=(5 * len(ctxs), 4), squeeze=False)
        for ax, c in zip(axes[0], ctxs):
            for fam, rs in groups.items():
                rs = sorted((r for r in rs if r["context"] == c), key=lambda r: r["keys_fraction"])
                if not rs:
                    continue
                ys = [max(r[metric], 1e-5) for r in rs]
                ax.plot([r["keys_fraction"] for r in rs], ys, style.get(fam, "o-"), label=fam)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("fraction of keys attended")
            ax.set_title(f"SmolLM2-135M, {c} tokens")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].set_ylabel(ylab)
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, fname), dpi=110)
        plt.close(fig)


def write_markdown(res, path):
    lines = ["# Quality of sparse attention vs full attention (bench/quality.py)", ""]
    m = res["meta"]
    lines.append(f"SmolLM2-135M-Instruct (Q4_1 GGUF, f32 on CPU), text: `pydoc_data.topics`; {m['steps']} "
                 f"teacher-forced decode steps scored per context after a dense prefill; sink {m['sink']}, "
                 f"window {m['window']} for every method. {m['date']}, jax {m['jax']}, {m['cpu']}. "
                 "keys = keys attended / context (mean over steps, heads, layers); recall = share of the full "
                 "softmax mass on the attended keys; KL = KL(full ‖ method) of the next-token distribution.")
    lines.append("")
    lines.append("| context | config | keys | KL to full | ppl | ppl full | ppl increase | recall |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        lines.append(f"| {r['context']} | {r['name']} | {r['keys_fraction']:.2%} | {r['kl_to_full']:.4f} | "
                     f"{r['ppl']:.3f} | {r['ppl_full']:.3f} | {r['ppl_increase']:+.2%} | {r['attention_recall']:.3f} |")
    if res.get("needle"):
        lines += ["", "## Needle (raw completion, planted sentence)", "",
                  "| tokens | depth | method | found | output |", "|---|---|---|---|---|"]
        for r in res["needle"]:
            lines.append(f"| {r['tokens']} | {r['depth']:.0%} | {r['method']} | {'yes' if r['found'] else 'no'} | "
                         f"`{r['output'].strip()}` |")
    if res.get("questions"):
        lines += ["", "## Questions about long contexts (greedy, chat template)", ""]
        for r in res["questions"]:
            lines += [f"**{r['question']}** ({r['prompt_tokens']} prompt tokens; topics {', '.join(r['topics'])})",
                      "", f"- full: {r['full']!r}", f"- dipr β=32: {r['dipr']!r}", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8000])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--needle-lengths", type=int, nargs="*", default=[2048, 4096, 7800])
    ap.add_argument("--needle-depths", type=float, nargs="*", default=[0.1, 0.5, 0.9])
    ap.add_argument("--no-questions", action="store_true")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    from models import load_smollm2

    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "quality.log"), "w")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    _, model, tok = load_smollm2(dtype="float32")
    engine = Engine(model, prefill_chunk=512)
    tokens = tok.encode(pydoc_topics())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    res = {"meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "jax": jax.__version__, "python": platform.python_version(), "cpu": platform.processor() or
                    platform.machine(), "cores": os.cpu_count(), "commit": commit, "steps": args.steps,
                    "sink": args.sink, "window": args.window, "text_tokens": len(tokens)}, "rows": []}
    json_path = os.path.join(args.out, "quality.json")

    def save():
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)
        write_markdown(res, os.path.join(args.out, "quality.md"))

    for ctx in args.contexts:
        res["rows"] += evaluate_context(engine, tokens, ctx, args.steps, args.sink, args.window, log)
        save()
        plot(res["rows"], args.out)
    if args.needle_lengths:
        res["needle"] = needle(engine, tok, args.needle_lengths, args.needle_depths, log)
        save()
    if not args.no_questions:
        res["questions"] = questions(engine, tok, log)
        save()
    log("done")


if __name__ == "__main__":
    sys.exit(main())
