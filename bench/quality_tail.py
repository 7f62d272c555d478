"""The estimated tail: tail on/off for calibrated DIPR, uniform DIPR, top-k and top-p at 2–4% of the keys.

For every text and context C: one dense prefill of the first C − S − 1 tokens and one full-attention
chain over the next S tokens (the shared reference, :mod:`alaya_jax.runtime.evaluation`), kept under
``--ref-cache`` so that an interrupted run resumes without prefilling again. Every configuration is
scored with ``tail="none"`` (exact sparse attention over the selected keys) and with the tail
(``AttentionConfig.tail``: the code estimates for the keys not selected); rows are written after every
configuration (``--resume`` skips those done).

Texts: ``pydoc`` (``pydoc_data.topics``), ``idle-help`` (the standard library's IDLE help) and
``numpy-license`` (the licence text numpy ships: legal English prose none of the tuning saw).

    python -m bench.quality_tail --texts pydoc idle-help numpy-license --contexts 4096 8192 --resume
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import harness
from bench import quality as q
from bench import quality_calibrated as qc

from alaya_jax.attention.config import AttentionConfig, CalibrationConfig
from alaya_jax.attention.dipr import calibration as cal
from alaya_jax.runtime.corpus import TEXTS
from alaya_jax.runtime.evaluation import Reference, prepare_reference, score_against
from alaya_jax.store import kv_store

REF_FORMAT = 1  # the reference cache: keys, values and lengths of every layer (codes and summaries rebuilt)


def reference(engine, tokens, text, ctx, steps, cache_dir, log):
    """The shared reference of (text, ctx), kept under ``cache_dir`` (if given) by array name, so that it
    survives changes of the store's derived fields: codes and block summaries are rebuilt on load."""
    p = ctx - steps - 1
    path = os.path.join(cache_dir, f"tailref{REF_FORMAT}_{text}_{ctx}_{steps}.npz") if cache_dir else None
    t0 = time.perf_counter()
    if path and os.path.exists(path):
        z = np.load(path)
        caches = []
        for i in range(int(z["num_layers"])):
            k, v = (jnp.asarray(np.swapaxes(z[f"{f}{i}"], 1, 2)) for f in ("k", "v"))  # [B,S,Hkv,D]
            caches.append(kv_store.from_dense(k, v, jnp.asarray(z[f"len{i}"]), block_size=engine.block_size,
                                              capacity=ctx))
        ref = Reference(prefill_tokens=p, caches=tuple(caches), inputs=z["inputs"], targets=z["targets"],
                        logits_full=jnp.asarray(z["logits_full"]), context=z["context"])
        log(f"{text} {ctx}: reference loaded from {path} [{time.perf_counter() - t0:.0f}s]")
        return ref
    ref = prepare_reference(engine, tokens[:ctx], prefill_tokens=p)
    log(f"{text} {ctx}: reference (prefill {p}, {ref.steps} steps) {time.perf_counter() - t0:.0f}s")
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        arrays = {}
        for i, c in enumerate(ref.caches):
            s = int(np.asarray(c.lengths).max())
            arrays[f"k{i}"] = np.asarray(c.dense_keys()[:, :, :s])
            arrays[f"v{i}"] = np.asarray(c.dense_values()[:, :, :s])
            arrays[f"len{i}"] = np.asarray(c.lengths)
        np.savez(path + ".tmp.npz", inputs=ref.inputs, targets=ref.targets, context=ref.context,
                 logits_full=np.asarray(ref.logits_full), num_layers=len(ref.caches), **arrays)
        os.replace(path + ".tmp.npz", path)
    return ref


GRID = (0.02, 0.025, 0.03, 0.035, 0.04)  # key fractions of the targets (2–4%)
#: The tails every selection is scored with (phases 1 and 2): mode → family suffix.
TAILS = {"none": "", "estimate": " + tail", "estimate-rank2": " + tail [rank2]"}
#: Plot styles: one colour per selection, dotted without the tail, solid with it.
_COLOURS = (("calibrated DIPR", "^", "C1"), ("uniform β", "o", "C3"), ("top-k", "s", "C0"), ("top-p", "d", "C5"))
STYLES = {f"{fam}{suffix}": (mk + ls, col) for fam, mk, col in _COLOURS
          for suffix, ls in zip(TAILS.values(), (":", "-", "--"))}
#: Variants of the tail measured on two selections (calibrated DIPR, top-k) at 3% of the keys (phase 3).
VARIANTS = ("estimate-var", "estimate-restmean", "estimate-rank1", "estimate-vweighted", "exact-scores",
            "estimate bf16 means")


def selections(ctx, sink, window):
    """(family, name, config without tail) of every selection, in phases: 1 = calibrated DIPR and top-k at
    2% and 4%, 2 = uniform β, top-p and top-k at 3%. (CPU time goes to compiling: every top-k budget is a
    program of its own, the βs, top-ps and calibrated budgets share one each.)"""
    base = dict(sink=sink, window=window, tail="none")
    sw = sink + window
    one = [("calibrated DIPR", f"dipr-keys {f:g}", AttentionConfig(method="dipr", **base,
                                                                   calibration=CalibrationConfig(dipr_keys=f)))
           for f in (0.02, 0.03, 0.04)]
    topk = {f: ("top-k", f"topk {f:.0%} (k={int(round(f * ctx)) - sw})",
                AttentionConfig(method="topk", budget=int(round(f * ctx)) - sw, **base))
            for f in (0.02, 0.03, 0.04) if int(round(f * ctx)) > sw}
    one += [topk[f] for f in (0.02, 0.04) if f in topk]
    two = [("uniform β", f"dipr β={b:g}", AttentionConfig(method="dipr", beta=b, **base))
           for b in ((16.0, 24.0, 32.0) if ctx < 8192 else (16.0, 24.0, 32.0, 48.0))]
    two += [("top-p", f"topp p={p:g}", AttentionConfig(method="topp", top_p=p, **base))
            for p in ((0.6, 0.7, 0.8) if ctx < 8192 else (0.7, 0.8, 0.9))]
    two += [topk[0.03]] if 0.03 in topk else []
    return one, two


def runs(ctx, sink, window, phase):
    """(family, name, config, variant) of one phase: phases 1 and 2 score every selection with each tail of
    :data:`TAILS`; phase 3 the variants of :data:`VARIANTS` on the 3% points; phase 4 calibrated DIPR with
    the tail-aware allocations of :data:`TAIL_ALLOCATIONS` (βs water-filled on the output error with the
    tail, ``Curves.tail_err``)."""
    one, two = selections(ctx, sink, window)
    if phase == 4:
        return [(f"{fam} [{alloc}] + tail", f"{name} [{alloc}] + tail", dataclasses.replace(cfg, tail="estimate"),
                 f"allocation {alloc}")
                for alloc in TAIL_ALLOCATIONS for fam, name, cfg in one if fam == "calibrated DIPR"]
    if phase in (1, 2):
        return [(fam + suffix, name + suffix, dataclasses.replace(cfg, tail=mode), None)
                for mode, suffix in TAILS.items() for fam, name, cfg in (one if phase == 1 else two)]
    picks = [(fam, name, cfg) for fam, name, cfg in one + two if fam in ("calibrated DIPR", "top-k")
             and ("0.03" in name or "3%" in name)]
    out = []
    for fam, name, cfg in picks:
        for v in VARIANTS:
            mode = "estimate" if v == "estimate bf16 means" else v
            out.append((f"{fam} + tail [{v}]", f"{name} + tail [{v}]", dataclasses.replace(cfg, tail=mode), v))
    return out


#: Allocations of phase 4 (:data:`alaya_jax.attention.dipr.calibration.ALLOCATIONS`).
TAIL_ALLOCATIONS = ("head-tail", "layer-tail", "head-tailrel", "layer-tailrel")


def tail_aware_betas(engine, ref: Reference, cfg, allocation: str):
    """βs [L, B, Hq] for calibrated ``cfg`` water-filled on the output error with ``cfg.tail`` (curves kept
    on the reference, one computation per (n_cal, sink, window, tail))."""
    key = (cfg.calibration.n_cal, cfg.sink, cfg.window, cfg.tail)
    if key not in ref.curves:
        tail_rows = [ref.context[-cfg.calibration.n_cal:].tolist()]
        ref.curves[key] = engine.calibration_curves(ref.caches, tail_rows, sink=cfg.sink, window=cfg.window,
                                                    tail=cfg.tail)
    return cal.choose_betas(ref.curves[key], keys=cfg.calibration.dipr_keys, allocation=allocation)


def with_bf16_means(ref: Reference) -> Reference:
    """The reference with its caches' block value means held in bf16 (appends keep that dtype)."""
    caches = tuple(c.replace(value_means=c.value_means.astype(jnp.bfloat16)) for c in ref.caches)
    return dataclasses.replace(ref, caches=caches)


def evaluate(engine, tokens, text, ctx, phase, args, res, save, log):
    done = {(r["text"], r["context"], r["name"]) for r in res["rows"]}
    todo = [r for r in runs(ctx, args.sink, args.window, phase) if (text, ctx, r[1]) not in done]
    if not todo:
        return
    ref = reference(engine, tokens, text, ctx, args.steps, args.ref_cache, log)
    for family, name, cfg, variant in todo:
        t1 = time.perf_counter()
        if variant and variant.startswith("allocation "):
            r = score_against(engine, ref, cfg, betas=tail_aware_betas(engine, ref, cfg, variant.split()[1]))
        else:
            r = score_against(engine, with_bf16_means(ref) if variant == "estimate bf16 means" else ref, cfg)
        row = {"text": text, "context": ctx, "family": family, "name": name, "tail": cfg.tail, "variant": variant,
               **{k: r[k] for k in ("tokens", "kl_to_full", "kl_to_full_max", "keys_fraction", "ppl", "ppl_full",
                                    "ppl_increase", "top1_agreement", "attention_recall")},
               "per_layer_keys": [x["keys_fraction"] for x in r["per_layer"]],
               **({"calibration": r["calibration"]} if "calibration" in r else {}),
               "seconds": time.perf_counter() - t1}
        res["rows"].append(row)
        save()
        log(f"  {name:44s} keys {row['keys_fraction']:6.2%}  KL {row['kl_to_full']:.4f}  "
            f"ppl {row['ppl_increase']:+.2%}  top1 {row['top1_agreement']:.2f}  [{row['seconds']:.0f}s]")


# ----------------------------------------------------------------------------- report
def curve_rows(rows):
    """The rows that make curves over the key fraction (every tail of :data:`TAILS`, the tail-aware
    allocations), not the variants of phase 3."""
    return [r for r in rows if r.get("variant") is None or r["variant"].startswith("allocation ")]


def _at(head, text, ctx, fam):
    return next((h[3] for h in head if h[:3] == (text, ctx, fam)), {})


def target_lines(rows):
    """The issue's targets per (text, ctx ≥ 4096) and DIPR family with the tail: KL ≤ 0.5× top-k's (no tail)
    and ≤ 0.7× top-k's with the tail at every grid point where the curves are measured."""
    head = qc.headline(rows)
    lines = []
    for text, ctx, fam, kl in head:
        suffix = next((x for x in list(TAILS.values())[1:] if fam.endswith(x)), None)
        if ctx < 4096 or suffix is None or not fam.startswith(("calibrated DIPR", "uniform β")):
            continue
        tk, tkt = _at(head, text, ctx, "top-k"), _at(head, text, ctx, "top-k" + suffix)
        pts = []
        for g in GRID:
            a, b, c = kl.get(g), tk.get(g), tkt.get(g)
            if a is None or b is None or c is None:
                continue
            ok = a <= 0.5 * b and a <= 0.7 * c
            pts.append(f"{g:.1%}: {a:.4f} = {a / b:.2f}× top-k, {a / c:.2f}× top-k{suffix} {'✓' if ok else '✗'}")
        if pts:
            lines.append(f"- {text} {ctx} {fam}: " + "; ".join(pts))
    return lines


def ppl_lines(rows):
    """Perplexity target: within 1% of full attention at ≤ 3% of the keys (rows measured at ≤ 3.05%)."""
    out = []
    for r in rows:
        if r["tail"] != "none" and r in curve_rows([r]) and r["keys_fraction"] <= 0.0305:
            out.append(f"| {r['text']} | {r['context']} | {r['name']} | {r['keys_fraction']:.2%} | "
                       f"{r['ppl_increase']:+.2%} | {'✓' if abs(r['ppl_increase']) <= 0.01 else '✗'} |")
    return out


def write_markdown(res, path):
    m, rows = res["meta"], res["rows"]
    L = ["# The estimated tail: tail on/off at 2–4% of the keys (bench/quality_tail.py)", "",
         "SmolLM2-135M-Instruct (GGUF, f32 on CPU). Texts: " + ", ".join(
             f"`{t}` ({n} tokens)" for t, n in m["text_tokens"].items())
         + f". Context C: C − S − 1 tokens prefilled densely, S = {m['steps']} teacher-forced decode steps scored "
           f"against full attention (shared reference). Sink {m['sink']} + window {m['window']} for every sparse "
           f"method. `+ tail`: `--tail estimate` (the keys not selected weigh e^(ŝ/√d) with ŝ their code estimate, "
           f"their values replaced by their block's mean value); no suffix: `--tail none` (exact sparse attention). "
           f"{m['date']}, commit {m['commit']}, jax {m['jax']}, numpy {m['numpy']}, Python {m['python']}, "
           f"{m['cpu']} ({m['cores']} cores).", "",
         "keys = keys attended exactly / keys in the context (mean over steps, heads, layers; sink and window "
         "included); KL = KL(full ‖ method) of the next-token distribution, nats/token; top1 = greedy token agrees "
         "with full.", "", "![KL](quality_tail_kl.png)", ""]
    notes = os.path.join(os.path.dirname(path), "quality_tail_notes.md")
    if os.path.exists(notes):
        L += [open(notes).read().strip(), ""]
    L += ["## KL at equal key fraction (log-log interpolation along each curve; – outside its range)", "",
          "| text | context | method | " + " | ".join(f"KL @ {g:.1%}" for g in GRID) + " |",
          "|---|---|---|" + "---|" * len(GRID)]
    for text, ctx, fam, kl in qc.headline(curve_rows(rows)):
        L.append(f"| {text} | {ctx} | {fam} | " + " | ".join("–" if kl[g] is None else f"{kl[g]:.4f}" for g in GRID)
                 + " |")
    L += ["", "## Targets: KL ≤ 0.5× top-k's (no tail) and ≤ 0.7× top-k's with the tail, 2–4% of the keys", ""]
    L += target_lines(curve_rows(rows)) or ["(no rows yet)"]
    L += ["", "## Perplexity with the tail at ≤ 3% of the keys (target: within 1% of full attention)", "",
          "| text | context | config | keys | ppl +% | within 1% |", "|---|---|---|---|---|---|"]
    L += ppl_lines(rows)
    var = [r for r in rows if r.get("variant") in VARIANTS]
    if var:
        L += ["", "## Variants of the tail (3% of the keys)", "",
              "| text | context | selection | no tail | " + " | ".join(("estimate",) + VARIANTS) + " |",
              "|---|---|---|---|" + "---|" * (len(VARIANTS) + 1)]
        by = {(r["text"], r["context"], r["name"]): r for r in rows}
        for text, ctx, name in dict.fromkeys((r["text"], r["context"], r["name"].split(" + tail")[0]) for r in var):
            cells = [by.get((text, ctx, name)), by.get((text, ctx, f"{name} + tail"))]
            cells += [by.get((text, ctx, f"{name} + tail [{v}]")) for v in VARIANTS]
            L.append(f"| {text} | {ctx} | {name} | " + " | ".join(
                "" if c is None else f"{c['kl_to_full']:.4f}" for c in cells) + " |")
    L += ["", "## All configurations", "",
          "| text | context | config | keys | KL | KL max | ppl | ppl full | ppl +% | top1 | recall |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['text']} | {r['context']} | {r['name']} | {r['keys_fraction']:.2%} | {r['kl_to_full']:.4f} | "
                 f"{r['kl_to_full_max']:.3f} | {r['ppl']:.3f} | {r['ppl_full']:.3f} | {r['ppl_increase']:+.2%} | "
                 f"{r['top1_agreement']:.2f} | {r['attention_recall']:.3f} |")
    if res.get("needle"):
        L += qc.needle_table(res["needle"], "## Needle (raw completion)")
    harness.write_text(path, "\n".join(L) + "\n")


def needle_methods(sink, window):
    """full, then calibrated DIPR and top-k at 3% (or the least the context allows) and top-p 0.8, each with
    the tail off and on."""
    def methods_for(n):
        f = max(0.03, math.ceil((68 / n + 0.004) * 200) / 200)
        base = dict(sink=sink, window=window)
        sel = [(f"dipr-keys {f:g}", AttentionConfig(method="dipr", **base, calibration=CalibrationConfig(dipr_keys=f))),
               (f"topk {f:.0%}", AttentionConfig(method="topk", budget=int(round(f * n)) - sink - window, **base)),
               ("topp p=0.8", AttentionConfig(method="topp", top_p=0.8, **base))]
        out = [("full", AttentionConfig(method="full"))]
        for name, cfg in sel:
            out += [(name, dataclasses.replace(cfg, tail="none")),
                    (f"{name} + tail", dataclasses.replace(cfg, tail="estimate"))]
        return out

    return methods_for


def main(argv=None):
    ap = harness.parser(__doc__.split("\n")[0], "quality_tail", out_env=False)
    ap.add_argument("--texts", nargs="+", default=list(TEXTS), choices=list(TEXTS))
    ap.add_argument("--contexts", type=int, nargs="*", default=[4096, 8192])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--phases", type=int, nargs="*", default=[1, 4, 2, 3], choices=[1, 2, 3, 4],
                    help="1: calibrated DIPR and top-k, tail off/on; 2: uniform β, top-p, top-k 3%%; 3: the tail's "
                         "variants; 4: calibrated DIPR with the tail-aware allocations")
    ap.add_argument("--variant-contexts", type=int, nargs="*", default=[4096],
                    help="contexts of phase 3 (the variants)")
    ap.add_argument("--ref-cache", default=None, help="directory keeping each context's reference (prefill and "
                                                      "full chain) so that a later --resume run reuses it")
    ap.add_argument("--references-only", action="store_true", help="only build the references (--ref-cache)")
    ap.add_argument("--needle-lengths", type=int, nargs="*", default=[])
    ap.add_argument("--needle-depths", type=float, nargs="*", default=[0.1, 0.5, 0.9])
    ap.add_argument("--name", default="quality_tail", help="output file stem under --out")
    ap.add_argument("--compile-cache", default=None, help="JAX's persistent compilation cache here (the same "
                                                          "decode step serves every text of a context)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--report", action="store_true", help="only rebuild the markdown and plot from the JSON")
    args = ap.parse_args(argv)
    json_path = os.path.join(args.out, args.name + ".json")
    md_path = os.path.join(args.out, args.name + ".md")
    if args.report:
        with open(json_path) as f:
            res = json.load(f)
        write_markdown(res, md_path)
        qc.plot(curve_rows(res["rows"]), args.out, name="quality_tail_kl.png",
                        styles=STYLES)
        return 0
    from models import load_smollm2

    from alaya_jax.runtime.engine import Engine
    from alaya_jax.cli.startup import enable_compile_cache

    enable_compile_cache(args.compile_cache)

    os.makedirs(args.out, exist_ok=True)
    log = q.make_logger(os.path.join(args.out, args.name + ".log"), append=True)
    _, model, tok = load_smollm2(dtype="float32")
    engine = Engine(model, prefill_chunk=512)
    texts = {t: tok.encode(TEXTS[t]()) for t in args.texts}
    for t, v in texts.items():
        if len(v) < max(args.contexts, default=0):
            raise SystemExit(f"text {t} has {len(v)} tokens, fewer than the context {max(args.contexts)}")
    if args.references_only:
        for ctx in args.contexts:
            for text, toks in texts.items():
                reference(engine, toks, text, ctx, args.steps, args.ref_cache, log)
                jax.clear_caches()
        return 0
    meta = harness.run_meta(steps=args.steps, sink=args.sink, window=args.window,
                            text_tokens={t: len(v) for t, v in texts.items()})
    res = {"meta": meta, "rows": [], "needle": []}
    old = qc.resume_into(res, json_path) if args.resume else None
    if old is not None:
        res["meta"]["runs"] = old.get("runs", []) + [{k: old[k] for k in ("date", "commit")}]

    def save():
        harness.write_json(json_path, res)
        write_markdown(res, md_path)

    for phase in args.phases:
        for ctx in args.contexts if phase != 3 else [c for c in args.contexts if c in args.variant_contexts]:
            for text, toks in texts.items():
                evaluate(engine, toks, text, ctx, phase, args, res, save, log)
                qc.plot(curve_rows(res["rows"]), args.out, name="quality_tail_kl.png",
                        styles=STYLES)
                jax.clear_caches()
    if args.needle_lengths:
        q.needle(engine, tok, args.needle_lengths, args.needle_depths, args.sink, args.window, log, res["needle"],
                 save, methods_for=needle_methods(args.sink, args.window))
    log("done")


if __name__ == "__main__":
    sys.exit(main())
