"""Self-calibrated DIPR against uniform β, global top-k, top-p and a per-layer β fitted on the scored steps.

For every text and context C: one dense prefill of the first C − S − 1 tokens, one full-attention chain
over the next S tokens (shared reference, :mod:`alaya_jax.runtime.evaluation`); calibrated DIPR calibrates on the
``n_cal`` prompt tokens *before* the scored span (it never sees the scored steps) and is scored at several
key budgets (``--dipr-keys``) and mass targets (``--dipr-mass``), for each allocation of
:data:`alaya_jax.attention.dipr.calibration.ALLOCATIONS` asked for. Rows are written after every configuration
(``--resume`` skips those done), so an interrupted run keeps what it measured.

Texts: ``pydoc`` (``pydoc_data.topics``) and ``idle-help`` (the standard library's
``idlelib/help.html``, tags stripped; :func:`alaya_jax.runtime.corpus.idle_help`).

    python -m bench.quality_calibrated --texts pydoc idle-help --contexts 2048 4096 8192
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time

import jax
import numpy as np

from bench import harness
from bench import quality as q  # interpolation, per-layer fit, needle

from alaya_jax.attention.config import AttentionConfig, CalibrationConfig
from alaya_jax.attention.dipr import calibration as cal
from alaya_jax.runtime.corpus import TEXTS
from alaya_jax.runtime.engine import FULL, Engine
from alaya_jax.runtime.evaluation import Reference, calibrated_caches, prepare_reference, score_against

GRID = (0.02, 0.025, 0.03, 0.035, 0.04)  # key fractions of the targets (2–4%)
FAMILY_STYLE = {"uniform β": ("o-", "C3"), "topk": ("s-", "C0"), "topp": ("d-", "C5"),
                "per-layer β fit on scored steps": ("*:", "C6")}


def budgets(ctx: int, floor_margin: float = 0.003) -> list[float]:
    """Key budgets to score: 2–5% where the context allows (sink + window alone are 68 / ctx)."""
    floor = 68 / ctx
    return [f for f in (0.02, 0.03, 0.04, 0.05, 0.06, 0.08) if f >= floor + floor_margin][:3]


def configs(ctx, sink, window, allocations, masses):
    """(family, name, config, allocation or None), in the order they run: calibrated DIPR's budgets for
    the first allocation, top-k, top-p, uniform β, then the other allocations and the mass targets."""
    base = dict(sink=sink, window=window)
    cal_keys = [(f"calibrated keys [{alloc}]", f"dipr-keys {f:g} [{alloc}]",
                 AttentionConfig(method="dipr", **base, calibration=CalibrationConfig(dipr_keys=f)), alloc)
                for alloc in allocations for f in budgets(ctx)]
    cal_mass = [(f"calibrated mass [{alloc}]", f"dipr-mass {m:g} [{alloc}]",
                 AttentionConfig(method="dipr", **base, calibration=CalibrationConfig(dipr_mass=m)), alloc)
                for alloc in allocations for m in masses]
    n_first = len(budgets(ctx)) if allocations else 0
    out = cal_keys[:n_first]
    sw = sink + window
    for frac in (0.02, 0.04) if ctx >= 4096 else (0.04, 0.06):  # total keys fraction incl. sink + window
        k = int(round(frac * ctx)) - sw
        if k >= 1:
            out.append(("topk", f"topk {frac:.0%} (k={k})", AttentionConfig(method="topk", budget=k, **base), None))
    out += [("topp", f"topp p={p:g}", AttentionConfig(method="topp", top_p=p, **base), None)
            for p in ((0.8, 0.9) if ctx >= 8192 else (0.7, 0.8))]
    out += [("uniform β", f"dipr β={b:g}", AttentionConfig(method="dipr", beta=b, **base), None)
            for b in (24.0, 32.0, 48.0)]
    return out + cal_keys[n_first:] + cal_mass


def reference(engine, tokens, text, ctx, steps, cache_dir, log):
    """The shared reference, kept under ``cache_dir`` (if given) so a later run reuses the prefill."""
    p = ctx - steps - 1
    path = os.path.join(cache_dir, f"ref_{text}_{ctx}_{steps}.npz") if cache_dir else None
    t0 = time.perf_counter()
    if path and os.path.exists(path):
        z = np.load(path)
        template = engine.new_caches(batch=1, capacity=ctx)
        leaves, treedef = jax.tree.flatten(template)
        caches = jax.tree.unflatten(treedef, [jax.numpy.asarray(z[f"c{i}"]) for i in range(len(leaves))])
        ref = Reference(prefill_tokens=p, caches=caches, inputs=z["inputs"], targets=z["targets"],
                        logits_full=jax.numpy.asarray(z["logits_full"]), context=z["context"])
        log(f"{text} {ctx}: reference loaded from {path}")
        return ref
    ref = prepare_reference(engine, tokens[:ctx], prefill_tokens=p)
    log(f"{text} {ctx}: reference (prefill {p}, {ref.steps} steps) {time.perf_counter() - t0:.0f}s")
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        leaves = jax.tree.leaves(ref.caches)
        np.savez(path + ".tmp.npz", inputs=ref.inputs, targets=ref.targets, context=ref.context,
                 logits_full=np.asarray(ref.logits_full), **{f"c{i}": np.asarray(x) for i, x in enumerate(leaves)})
        os.replace(path + ".tmp.npz", path)
    return ref


def evaluate(engine, tokens, text, ctx, steps, args, res, save, log):
    done = {(r["text"], r["context"], r["name"]) for r in res["rows"]}
    todo = [c for c in configs(ctx, args.sink, args.window, args.allocations, args.masses)
            if (text, ctx, c[1]) not in done]
    if not todo and all((text, ctx, f"per-layer β fit on scored @ {f:g}") in done for f in budgets(ctx)[:2]):
        return
    ref = reference(engine, tokens, text, ctx, steps, args.ref_cache, log)

    def record(family, name, r, t1, extra=None):
        row = {"text": text, "context": ctx, "family": family, "name": name,
               **{k: r[k] for k in ("tokens", "kl_to_full", "kl_to_full_max", "keys_fraction", "ppl", "ppl_full",
                                    "ppl_increase", "top1_agreement", "attention_recall")},
               "per_layer_keys": [x["keys_fraction"] for x in r["per_layer"]],
               "per_layer_recall": [x["attention_recall"] for x in r["per_layer"]],
               **({"calibration": r["calibration"], "dipr_beta_per_layer": r["dipr_beta_per_layer"]}
                  if "calibration" in r else {}), **(extra or {})}
        res["rows"].append(row)
        save()
        log(f"  {name:34s} keys {row['keys_fraction']:6.2%}  KL {row['kl_to_full']:.4f}  ppl {row['ppl_increase']:+.2%}"
            f"  top1 {row['top1_agreement']:.2f}  [{time.perf_counter() - t1:.0f}s]")

    def run(family, name, cfg, alloc):
        t1 = time.perf_counter()
        betas = None
        if alloc is not None:
            _, curves = calibrated_caches(engine, ref, cfg)
            betas = cal.choose_betas(curves, mass=cfg.calibration.dipr_mass, keys=cfg.calibration.dipr_keys,
                                     allocation=alloc)
        record(family, name, score_against(engine, ref, cfg, betas=betas), t1, {"allocation": alloc} if alloc else None)

    fit_after = max([i for i, c in enumerate(todo) if c[0] == "uniform β"], default=-1)
    for c in todo[: fit_after + 1]:
        run(*c)
    # Upper reference: per-layer β fitted on the scored steps' own per-layer recall (uniform sweep).
    uni = [dict(r, config={"beta": float(r["name"].split("=")[1])},
                per_layer=[{"keys_fraction": k, "attention_recall": c}
                           for k, c in zip(r["per_layer_keys"], r["per_layer_recall"])])
           for r in res["rows"] if r["text"] == text and r["context"] == ctx and r["family"] == "uniform β"]
    hq = engine.config.num_heads
    for f in budgets(ctx)[:2]:
        name = f"per-layer β fit on scored @ {f:g}"
        if (text, ctx, name) in done or len(uni) < 3:
            continue
        betas, pred_k, _ = q.allocate_betas(uni, f)
        t1 = time.perf_counter()
        b = cal.broadcast_heads(np.asarray(betas, np.float32)[:, None, None], hq)
        fitted = AttentionConfig(method="dipr", sink=args.sink, window=args.window,
                                 calibration=CalibrationConfig(dipr_keys=f))
        r = score_against(engine, ref, fitted, betas=b)
        record("per-layer β fit on scored steps", name, r, t1,
               {"per_layer_beta": [None if math.isinf(x) else x for x in betas], "predicted_keys_fraction": pred_k})
    for c in todo[fit_after + 1:]:
        run(*c)
    ref = None  # frees the reference caches (the closures above are done with it)


def from_explore(part: dict) -> dict:
    """Rows of a bench/calibration_explore.py run in this script's format (same reference, same metrics)."""
    text = "pydoc" if "pydoc" in part["text"] else part["text"]
    rows = []
    for r in part["rows"]:
        fam = r["family"]
        if fam in cal.ALLOCATIONS:
            family = f"calibrated keys [{fam}]"
        elif fam.startswith("oracle "):
            family = f"calibrated on the scored steps [{fam.split()[1]}]"
        elif fam.endswith(" mass-mode"):
            family = f"calibrated mass [{fam.split()[0]}]"
        else:
            family = {"uniform": "uniform β"}.get(fam, fam)
        rows.append(dict(r, text=text, context=part["context"], family=family, tokens=part["steps"],
                         source="calibration_explore"))
    meta = dict(part.get("meta", {}))
    return {"meta": {"date": meta.get("date", "?"), "commit": meta.get("commit", "?"), "text_tokens": {}},
            "rows": rows}


# ----------------------------------------------------------------------------- report
def family_rows(rows, text, ctx, fam):
    return sorted((r for r in rows if r["text"] == text and r["context"] == ctx and r["family"] == fam),
                  key=lambda r: r["keys_fraction"])


def headline(rows):
    """(text, ctx, family, {grid point: KL}) for every curve."""
    out = []
    for text in dict.fromkeys(r["text"] for r in rows):
        for ctx in sorted({r["context"] for r in rows if r["text"] == text}):
            for fam in dict.fromkeys(r["family"] for r in rows if r["text"] == text and r["context"] == ctx):
                rs = family_rows(rows, text, ctx, fam)
                if len(rs) >= 2:
                    out.append((text, ctx, fam, {g: q.interp_at(rs, "kl_to_full", g) for g in GRID}))
    return out


def targets(rows):
    """The issue's KL target per (text, ctx ≥ 4096, calibrated family): KL ≤ 0.5× top-k's and ≤ top-p's at
    every grid point where all three curves are measured."""
    lines = []
    head = headline(rows)
    for text, ctx, fam, kl in head:
        if not fam.startswith("calibrated") or ctx < 4096:
            continue
        tk = next((h[3] for h in head if h[:3] == (text, ctx, "topk")), {})
        tp = next((h[3] for h in head if h[:3] == (text, ctx, "topp")), {})
        pts = []
        for g in GRID:
            a, b, c = kl.get(g), tk.get(g), tp.get(g)
            if a is None or b is None:
                continue
            ok_k = a <= 0.5 * b
            ok_p = c is None or a <= c
            pts.append(f"{g:.1%}: {a:.4f} vs top-k {b:.4f} ({a / b:.2f}×){'' if c is None else f', top-p {c:.4f}'}"
                       f" {'✓' if ok_k and ok_p else '✗'}")
        if pts:
            lines.append(f"- {text} {ctx} {fam}: " + "; ".join(pts))
    return lines


def plot(rows, out_dir, *, name="quality_calibrated_kl.png", styles=None):
    """KL against keys attended, one panel per (text, context), one curve per family; ``styles``: family →
    (matplotlib format, colour), the others get one from a cycle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = list(dict.fromkeys(r["text"] for r in rows))
    ctxs = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(len(texts), len(ctxs), figsize=(5.0 * len(ctxs), 4.0 * len(texts)), squeeze=False)
    cal_colors = itertools.cycle(["C1", "C2", "C4", "C8", "C9", "k", "C7", "C3", "C0"])
    styles = dict(FAMILY_STYLE if styles is None else styles)
    for ti, text in enumerate(texts):
        for ci, ctx in enumerate(ctxs):
            ax = axes[ti][ci]
            for fam in dict.fromkeys(r["family"] for r in rows):
                rs = family_rows(rows, text, ctx, fam)
                if not rs:
                    continue
                if fam not in styles:
                    styles[fam] = ("^-" if "keys" in fam else "v--", next(cal_colors))
                mk, col = styles[fam]
                ax.plot([r["keys_fraction"] for r in rs], [max(r["kl_to_full"], 1e-5) for r in rs], mk, color=col,
                        label=fam, ms=5)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.axvspan(0.02, 0.04, color="0.92", zorder=0)
            rs = [r for r in rows if r["text"] == text and r["context"] == ctx]
            if rs:
                ax.set_title(f"{text}, {ctx} tokens (ppl full {rs[0]['ppl_full']:.2f})", fontsize=9)
            ax.set_xlabel("fraction of keys attended (sink 4 + window 64 included)")
            ax.set_ylabel("KL(full ‖ method), nats/token")
            ax.grid(True, which="both", alpha=0.3)
    seen = {}
    for ax in axes.ravel():
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen.keys()), loc="lower center", ncol=4, fontsize=7)
    fig.tight_layout(rect=(0, 0.03 + 0.02 * math.ceil(len(seen) / 4), 1, 1))
    fig.savefig(os.path.join(out_dir, name), dpi=100)
    plt.close(fig)


def write_markdown(res, path):
    m, rows = res["meta"], res["rows"]
    L = ["# Self-calibrated DIPR vs uniform β, top-k, top-p (bench/quality_calibrated.py)", "",
         "SmolLM2-135M-Instruct (GGUF, f32 on CPU). Texts: " + ", ".join(
             f"`{t}` ({n} tokens)" for t, n in m["text_tokens"].items())
         + f". Context C: C − S − 1 tokens prefilled densely, S = {m['steps']} teacher-forced decode steps scored "
           f"against full attention (shared reference). Calibrated DIPR calibrates on the {m['n_cal']} prompt tokens "
           f"before the scored span (it never sees them). Sink {m['sink']} + window {m['window']} for every sparse "
           f"method. {m['date']}, commit {m['commit']}, jax {m['jax']}, numpy {m['numpy']}, Python {m['python']}, "
           f"{m['cpu']} ({m['cores']} cores).", "",
         "keys = keys attended / keys in the context (mean over steps, heads, layers; sink and window included); "
         "KL = KL(full ‖ method) of the next-token distribution, nats/token; top1 = greedy token agrees with full.",
         "", "![KL](quality_calibrated_kl.png)", ""]
    notes = os.path.join(os.path.dirname(path), "quality_calibrated_notes.md")
    if os.path.exists(notes):
        L += [open(notes).read().strip(), ""]
    L += ["## KL at equal key fraction (log-log interpolation along each curve; – outside its range)", "",
          "| text | context | method | " + " | ".join(f"KL @ {g:.1%}" for g in GRID) + " |",
          "|---|---|---|" + "---|" * len(GRID)]
    for text, ctx, fam, kl in headline(rows):
        L.append(f"| {text} | {ctx} | {fam} | " + " | ".join("–" if kl[g] is None else f"{kl[g]:.4f}" for g in GRID)
                 + " |")
    L += ["", "## Target: KL ≤ 0.5× top-k's and ≤ top-p's at every key fraction in 2–4% (4K, 8K)", ""]
    L += targets(rows) or ["(no 4K/8K rows yet)"]
    L += ["", "## All configurations", "",
          "| text | context | config | keys | KL | KL max | ppl | ppl full | ppl +% | top1 | recall | cal. keys | "
          "cal. mass |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r.get("calibration") or {}
        L.append(f"| {r['text']} | {r['context']} | {r['name']} | {r['keys_fraction']:.2%} | {r['kl_to_full']:.4f} | "
                 f"{r.get('kl_to_full_max', float('nan')):.3f} | {r['ppl']:.3f} | {r['ppl_full']:.3f} | "
                 f"{r['ppl_increase']:+.2%} | "
                 f"{r['top1_agreement']:.2f} | {r['attention_recall']:.3f} | "
                 + (f"{c['calibration_keys_fraction']:.2%} | {c['calibration_mass']:.3f} |" if c else "– | – |"))
    cr = [r for r in rows if r.get("dipr_beta_per_layer") and "keys 0.03" in r["name"]]
    if cr:
        L += ["", "## Calibrated β per layer (median over heads), budget 3%", "",
              "| text | context | config | β median per layer (L0..) |", "|---|---|---|---|"]
        for r in cr:
            L.append(f"| {r['text']} | {r['context']} | {r['name']} | " + " ".join(
                "∞" if x["median"] is None else f"{x['median']:g}" for x in r["dipr_beta_per_layer"]) + " |")
    if res.get("needle"):
        L += needle_table(res["needle"], "## Needle (raw completion; 3% of keys where the context allows)")
    harness.write_text(path, "\n".join(L) + "\n")


def resume_into(res: dict, json_path: str):
    """--resume: the rows, needle rows and text sizes of an earlier run's JSON into ``res`` (its meta
    returned; None when there is none)."""
    if not os.path.exists(json_path):
        return None
    with open(json_path) as f:
        old = json.load(f)
    res["rows"], res["needle"] = old.get("rows", []), old.get("needle", [])
    res["meta"]["text_tokens"] = {**old["meta"].get("text_tokens", {}), **res["meta"]["text_tokens"]}
    return old["meta"]


def needle_table(needles, heading: str) -> list:
    """Markdown lines of the needle rows (method × (tokens, depth), ✓ or the output, found per method)."""
    L = ["", heading, "",
         f"\"{q.NEEDLE}\" planted at a line boundary at the given depth of `pydoc_data.topics` filler; greedy, "
         "8 new tokens; found = output contains 68142.", ""]
    names = list(dict.fromkeys(r["method"] for r in needles))
    L += ["| tokens | depth | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    cells = {}
    for r in needles:
        cells.setdefault((r["tokens"], r["depth"]), {})[r["method"]] = r
    for (n, d), cs in cells.items():
        L.append(f"| {n} | {d:.0%} | " + " | ".join(
            ("✓" if cs[k]["found"] else "✗ `" + cs[k]["output"].strip().replace("\n", " ").replace("|", "\\|")
             + "`") if k in cs else "" for k in names) + " |")
    tot = [(sum(cells[c][k]["found"] for c in cells if k in cells[c]), sum(k in cells[c] for c in cells))
           for k in names]
    L.append("| **found** | | " + " | ".join(f"**{a}/{b}**" for a, b in tot) + " |")
    return L


def needle_methods(sink, window):
    def methods_for(n):
        f = max(0.03, math.ceil((68 / n + 0.004) * 200) / 200)  # 3%, or the least the context allows
        k = int(round(f * n)) - sink - window
        base = dict(sink=sink, window=window)
        return [("full", FULL),
                (f"dipr-keys {f:g}",
                 AttentionConfig(method="dipr", **base, calibration=CalibrationConfig(dipr_keys=f))),
                (f"topk {f:.0%}", AttentionConfig(method="topk", budget=k, **base)),
                ("dipr-mass 0.9", AttentionConfig(method="dipr", **base, calibration=CalibrationConfig(dipr_mass=0.9))),
                ("topp p=0.8", AttentionConfig(method="topp", top_p=0.8, **base))]

    return methods_for


def main(argv=None):
    ap = harness.parser(__doc__.split("\n")[0], "quality_calibrated", out_env=False)
    ap.add_argument("--texts", nargs="+", default=list(TEXTS), choices=list(TEXTS))
    ap.add_argument("--contexts", type=int, nargs="*", default=[2048, 4096, 8192])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--n-cal", type=int, default=64)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--allocations", nargs="*", default=[cal.DEFAULT_ALLOCATION], choices=cal.ALLOCATIONS)
    ap.add_argument("--ref-cache", default=None, help="directory keeping each context's reference (prefill and full "
                                                      "chain) so that a later --resume run reuses it")
    ap.add_argument("--masses", type=float, nargs="*", default=[0.85, 0.9, 0.95])
    ap.add_argument("--needle-lengths", type=int, nargs="*", default=[])
    ap.add_argument("--needle-depths", type=float, nargs="*", default=[0.1, 0.5, 0.9])
    ap.add_argument("--name", default="quality_calibrated", help="output file stem under --out")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--report", action="store_true", help="only rebuild the markdown and plot from the JSON")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="combine the rows of these result files (runs split over processes) into --name")
    args = ap.parse_args(argv)
    json_path = os.path.join(args.out, args.name + ".json")
    md_path = os.path.join(args.out, args.name + ".md")
    if args.merge:
        res = {"rows": [], "needle": []}
        for path in args.merge:
            with open(path) as f:
                part = json.load(f)
            if "curves" in part:
                part = from_explore(part)
            res.setdefault("meta", dict(part["meta"], runs=[]))
            res["meta"]["text_tokens"] = {**res["meta"]["text_tokens"], **part["meta"]["text_tokens"]}
            res["meta"]["runs"].append({k: part["meta"][k] for k in ("date", "commit")}
                                       | {"file": os.path.basename(path)})
            res["rows"] += part["rows"]
            res["needle"] += part.get("needle", [])
        harness.write_json(json_path, res)
    if args.report or args.merge:
        with open(json_path) as f:
            res = json.load(f)
        write_markdown(res, md_path)
        plot(res["rows"], args.out)
        return 0
    from models import load_smollm2

    os.makedirs(args.out, exist_ok=True)
    log = q.make_logger(os.path.join(args.out, args.name + ".log"), append=True)

    _, model, tok = load_smollm2(dtype="float32")
    engine = Engine(model, prefill_chunk=512)
    texts = {t: tok.encode(TEXTS[t]()) for t in args.texts}
    meta = harness.run_meta(steps=args.steps, n_cal=args.n_cal, sink=args.sink, window=args.window,
                            text_tokens={t: len(v) for t, v in texts.items()})
    res = {"meta": meta, "rows": [], "needle": []}
    if args.resume:
        resume_into(res, json_path)

    def save():
        harness.write_json(json_path, res)
        write_markdown(res, md_path)

    for ctx in args.contexts:
        for text, toks in texts.items():
            if len(toks) < ctx:
                raise SystemExit(f"text {text} has {len(toks)} tokens, fewer than the context {ctx}")
            evaluate(engine, toks, text, ctx, args.steps, args, res, save, log)
            plot(res["rows"], args.out)
            jax.clear_caches()
    if args.needle_lengths:
        q.needle(engine, tok, args.needle_lengths, args.needle_depths, args.sink, args.window, log, res["needle"],
                 save, methods_for=needle_methods(args.sink, args.window))
    log("done")


if __name__ == "__main__":
    sys.exit(main())
