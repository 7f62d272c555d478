"""Which per-key code should filter–refine DIPR scan? Measured on real SmolLM2 keys (CPU, NumPy).

Reads the all-layer f32 capture of ``capture_real_keys.py`` (8192 tokens of unseen
pydoc prose; the model is causal, so the last ``--queries`` queries before 2K, 4K and
8K are the decode queries of 2K, 4K and 8K contexts) and runs the reference of
``filter_refine_ref.py`` for every code, layer, KV head and query: DIPR keys,
candidates (group union over the 3 query heads of a KV head), brute-force false
negatives, and the byte ceiling:

    bytes = codes of the searched keys (+ the residual plane of the int4 candidates)
          + bf16 K of the candidates + bf16 V of the keys in range (group union)
          + bf16 K+V of sink and window,  against bf16 K+V of all keys;

ceiling = dense bytes / bytes (ratios of sums over layers, heads and queries).

    python -m bench.capture_real_keys   # once: /tmp/alaya_real_keys_full.npz
    python -m bench.code_choice
"""

from __future__ import annotations

import os
import pickle
import sys
import time

import numpy as np

from bench import harness
from bench.capture_real_keys import FULL_CACHE, load_full
from bench.filter_refine_ref import CODES, RESIDUAL_BYTES, Coded, evaluate, rotation

DEFAULT = "int4 rotated"


def summarise(per: list[dict], betas, d: int, *, sink_window_bytes: bool = True) -> list[dict]:
    """Aggregate evaluate() outputs (one per layer, KV head) into one row per (β, code)."""
    rows = []
    cat = lambda key, sub=None: np.concatenate(  # noqa: E731
        [(p[key] if sub is None else p[key][sub]) for p in per], axis=1).astype(np.float64)
    searched, visible = cat("searched"), cat("visible")
    head, union = cat("in_range_head"), cat("in_range_union")
    kv = 4 * d  # bf16 K+V bytes a key
    dense = (visible * kv).sum(1)
    names = [c.name for c in CODES if c.name in per[0]]
    for i, b in enumerate(betas):
        for name in names:
            spec = next(c for c in CODES if c.name == name)
            row = {"beta": float(b), "code": name, "bits": spec.bits, "code_bytes_per_key": spec.bytes_per_key(d),
                   "dipr_head_fraction": float(head[i].sum() / searched[i].sum()),
                   "dipr_union_fraction": float(union[i].sum() / searched[i].sum())}
            for sfx in ("", "_sw"):
                cand, fn = cat(name, "cand" + sfx)[i], cat(name, "fn" + sfx)[i]
                byt = searched[i] * spec.bytes_per_key(d) + cand * 2 * d + union[i] * 2 * d
                if sink_window_bytes:
                    byt = byt + (visible[i] - searched[i]) * kv
                if spec.kind == "residual":
                    c1 = cat(name, "cand1" + sfx)[i]
                    byt = byt + c1 * RESIDUAL_BYTES(d)
                    row["stage1_candidate_fraction" + sfx] = float(c1.sum() / searched[i].sum())
                row["candidate_fraction" + sfx] = float(cand.sum() / searched[i].sum())
                row["false_negatives" + sfx] = int(fn.sum())
                row["byte_ceiling" + sfx] = float(dense[i] / byt.sum())
            rows.append(row)
    return rows


def run_length(full: dict, n: int, *, n_q: int, betas, codes, seed: int, cache_dir: str, layers) -> list[dict]:
    """evaluate() for every (layer, KV head) of a context of n tokens; cached per layer under cache_dir."""
    e = list(full["ends"]).index(n)
    keys_all, q_all = full["keys"], full["queries"][e]  # [L,Hkv,S,D], [L,nq_cap,Hq,D]
    _, hkv, _, d = keys_all.shape
    g = q_all.shape[2] // hkv
    pos = np.arange(n - n_q, n)
    per = []
    for l in layers:
        path = os.path.join(cache_dir, f"n{n}_l{l}_q{n_q}_s{seed}_{'-'.join(map(str, betas))}.pkl")
        got = None
        if os.path.exists(path):
            with open(path, "rb") as f:
                got = pickle.load(f)
        missing = [c for c in codes if got is None or c.name not in got[0]]
        if missing:  # evaluate only the codes not cached yet (the shared counts come out the same)
            t = time.perf_counter()
            new = []
            for h in range(hkv):
                k = keys_all[l, h, :n].astype(np.float64)
                q = q_all[l, -n_q:, h * g:(h + 1) * g].astype(np.float64)  # [J, G, D]
                rot = rotation(d, [seed, l, h])
                res = evaluate(k, q, pos, [Coded(c, k, rot) for c in missing], betas)
                res["visible"] = np.broadcast_to(pos + 1, res["searched"].shape)
                res["layer"] = l
                new.append(res if got is None else {**got[h], **{c.name: res[c.name] for c in missing}})
            got = new
            with open(path + ".tmp", "wb") as f:
                pickle.dump(got, f)
            os.replace(path + ".tmp", path)
            print(f"n={n} layer {l}: {[c.name for c in missing]} {time.perf_counter() - t:.1f}s", flush=True)
        per += got
    return per


def main(argv=None):
    ap = harness.parser(__doc__.split("\n")[0], "code_choice", out_env=False)
    ap.add_argument("--capture", default=FULL_CACHE)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--betas", type=float, nargs="+", default=[16, 24, 32])
    ap.add_argument("--layers", type=int, nargs="*", default=None, help="default: all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default="/tmp/alaya_code_choice")
    a = ap.parse_args(argv)
    full = load_full(a.capture)
    L, hkv, S, d = full["keys"].shape
    layers = list(range(L)) if a.layers is None else a.layers
    os.makedirs(a.cache_dir, exist_ok=True)
    t0 = time.perf_counter()
    rows, per_layer = [], {}
    for n in a.lengths:
        per = run_length(full, n, n_q=a.queries, betas=a.betas, codes=CODES, seed=a.seed,
                         cache_dir=a.cache_dir, layers=layers)
        for r in summarise(per, a.betas, d):
            rows.append({"tokens": n, **r})
        deep = [p for p in per if p["layer"] != 0]
        for r in summarise(deep, a.betas, d):
            rows.append({"tokens": n, "layers": "1-%d" % (L - 1), **r})
        for l in layers:  # per-layer shares of the default code, for the proxy check and the reader
            for r in summarise([p for p in per if p["layer"] == l], a.betas, d):
                if r["code"] == DEFAULT:
                    per_layer.setdefault(str(n), {}).setdefault(str(l), []).append(
                        {k: r[k] for k in ("beta", "dipr_head_fraction", "dipr_union_fraction",
                                           "candidate_fraction", "candidate_fraction_sw")})
    meta = harness.run_meta(
        model=str(full["model"]), model_fingerprint=str(full["model_fingerprint"]), text=str(full["text"]),
        text_offset_tokens=int(full["text_offset_tokens"]), layers=layers, kv_heads=hkv,
        group=full["queries"].shape[3] // hkv, head_dim=d, queries_per_context=a.queries, sink=4, window=64,
        betas=a.betas, rotation_seed=a.seed, seconds=round(time.perf_counter() - t0, 1))
    res = {"meta": meta, "rows": rows, "per_layer_default": per_layer}
    md = render(res)
    harness.write_results(a.out, "code_choice", res, md)
    print(md)
    fails = [r for r in rows if r["false_negatives"] or r["false_negatives_sw"]]
    if fails:
        raise SystemExit(f"FAILURE: false negatives in {len(fails)} rows")


def _cell(r, sfx=""):
    fn = r["false_negatives" + sfx]
    s = f"{r['candidate_fraction' + sfx]:.2%} / {r['byte_ceiling' + sfx]:.1f}×"
    return s + (f" **FAILURE: {fn} missed**" if fn else "")


def render(res: dict) -> str:
    m = res["meta"]
    rows = [r for r in res["rows"] if "layers" not in r]
    codes = list(dict.fromkeys(r["code"] for r in rows))
    out = ["# Which key code? Filter–refine DIPR on real SmolLM2 keys (bench/code_choice.py)", "",
           f"{m['model']}, {m['text']} from token {m['text_offset_tokens']} (unseen prose); the last "
           f"{m['queries_per_context']} decode queries of 2K / 4K / 8K contexts (one causal prefill), layers "
           f"{m['layers'][0]}–{m['layers'][-1]} ({len(m['layers'])}) × {m['kv_heads']} KV heads, group "
           f"{m['group']}, d={m['head_dim']}, sink {m['sink']} + window {m['window']} exact. NumPy float64 on CPU "
           f"({m['cpu']}), numpy {m['numpy']}, commit {m['commit']}, {m['date']}; {m['seconds']:.0f} s this run "
           "(per-layer results cached under /tmp; the full computation took ~25 min on 2 shared cores).", "",
           "Fractions are of the searched keys (outside sink and window). **DIPR keys**: mean over query heads "
           "(union over the group in brackets). Each cell: **candidates** (group union) / **byte ceiling** (dense "
           "bf16 K+V bytes over: codes of the searched keys + bf16 K of candidates + bf16 V of in-range keys + "
           "K+V of sink/window; for the residual code + the second plane of the int4 candidates). False negatives "
           "are checked by brute force for every (query, head, key); any miss is printed as FAILURE.", "",
           "## Candidates against M_lb = max(exact sink/window, max(ŝ − δ))", ""]
    for sfx, title in (("", None), ("_sw", "## Candidates against M_sw − β only (exact sink/window max; "
                                            "what a one-pass scan can use)")):
        if title:
            out += ["", title, ""]
        out += ["| tokens | β (d=64) | DIPR keys | " + " | ".join(codes) + " |", "|---" * (3 + len(codes)) + "|"]
        for n in dict.fromkeys(r["tokens"] for r in rows):
            for b in m["betas"]:
                rr = {r["code"]: r for r in rows if r["tokens"] == n and r["beta"] == b}
                r0 = rr[codes[0]]
                out.append(f"| {n} | {b:g} | {r0['dipr_head_fraction']:.2%} ({r0['dipr_union_fraction']:.2%}) | "
                           + " | ".join(_cell(rr[c], sfx) for c in codes) + " |")
    res_rows = [r for r in rows if "stage1_candidate_fraction" in r]
    if res_rows:
        out += ["", "Residual code, first stage (int4 candidates whose second plane is read): "
                + ", ".join(f"{r['tokens']}/β={r['beta']:g}: {r['stage1_candidate_fraction']:.2%} "
                            f"(sw {r['stage1_candidate_fraction_sw']:.2%})" for r in res_rows), ""]
    out += ["Code bytes per key at d=64: " + ", ".join(
        f"{c} {next(r['code_bytes_per_key'] for r in rows if r['code'] == c):g}" for c in codes)
        + " (dense bf16 K+V: 256; so 7.1× is the ceiling of any 36-byte scan at d=64, 7.5× at d=128).", ""]
    out += _choice(res)
    return "\n".join(out) + "\n"


def _choice(res: dict) -> list[str]:
    """The length trend and the default, with the numbers read from the rows."""
    rows = [r for r in res["rows"] if "layers" not in r]
    deep = [r for r in res["rows"] if "layers" in r]
    get = lambda rs, n, b, c: next(r for r in rs if r["tokens"] == n and r["beta"] == b and r["code"] == c)  # noqa
    ns, betas = sorted({r["tokens"] for r in rows}), res["meta"]["betas"]
    bm = betas[len(betas) // 2]
    trend = " → ".join(f"{get(rows, n, bm, DEFAULT)['candidate_fraction']:.2%}" for n in ns)
    dtrend = " → ".join(f"{get(rows, n, bm, DEFAULT)['dipr_head_fraction']:.2%}" for n in ns)
    ceil = " → ".join(f"{get(rows, n, bm, DEFAULT)['byte_ceiling']:.1f}×" for n in ns)
    n1 = ns[-1]
    r4, rr = get(rows, n1, bm, DEFAULT), get(rows, n1, bm, "int4 rotated + 4-bit residual")
    rg = get(rows, n1, bm, "int4 rotated, scale per 32 dims")
    one = [c for c in dict.fromkeys(r["code"] for r in rows) if "residual" not in c]
    lost = []
    for n in ns:
        for b in betas:
            best = max(one, key=lambda c: get(rows, n, b, c)["byte_ceiling"])
            if best != DEFAULT:
                gap = get(rows, n, b, best)["byte_ceiling"] / get(rows, n, b, DEFAULT)["byte_ceiling"] - 1
                lost.append(f"{n}/β={b:g}: {best} by {gap:.1%}")
    beaten = ", except " + "; ".join(lost) if lost else " at every length and β"
    out = ["## Does the candidate share fall with length?", "",
           f"Yes. Rotated int4 at β={bm:g}, {' / '.join(map(str, ns))} tokens: candidates {trend} (DIPR keys "
           f"{dtrend}); byte ceiling {ceil}. The candidate share falls with length for every code with a useful "
           "bound, somewhat faster than the share of keys in range. Layers 1–29 only (layer 0 is the least "
           "sparse), rotated int4:", "",
           "| tokens | β | DIPR keys | candidates | vs M_sw − β | ceiling |", "|---|---|---|---|---|---|"]
    for n in ns:
        for b in betas:
            r = get(deep, n, b, DEFAULT)
            out.append(f"| {n} | {b:g} | {r['dipr_head_fraction']:.2%} | {r['candidate_fraction']:.2%} | "
                       f"{r['candidate_fraction_sw']:.2%} | {r['byte_ceiling']:.1f}× |")
    out += ["", "## Default: rotated int4 (one f16 scale and one f16 error norm a key), candidates against "
            "M_sw − β", "",
            f"* **Rotated int4** has the best ceiling of the one-plane codes ({r4['byte_ceiling']:.1f}× at {n1} "
            "tokens, "
            f"β={bm:g}){beaten}. Without the rotation int4 leaves ~3× the candidates; int8 bounds are nearly "
            "tight but its 68-byte scan caps it at 3.8×; int3 and below leave too many candidates (int2 and the 1-bit "
            "sign code with a rigorous cone bound bound nothing: ~100% candidates).",
            f"* **The 4-bit residual plane** (two-stage) cuts candidates to about the int8 level "
            f"({rr['candidate_fraction']:.2%} "
            f"vs {r4['candidate_fraction']:.2%}) but gains only {rr['byte_ceiling'] / r4['byte_ceiling'] - 1:.0%} of "
            f"ceiling here ({rr['byte_ceiling']:.1f}× vs {r4['byte_ceiling']:.1f}×), less as the context grows, at the "
            "price of a second gather stage between scan and refine. Not the default; worth it only where the "
            "candidate capacity or the refine gather is the bottleneck (short contexts, large β).",
            f"* **A scale per 32 dims** cuts candidates by "
            f"~{1 - rg['candidate_fraction'] / r4['candidate_fraction']:.0%} "
            f"({rg['candidate_fraction']:.2%}) but its extra 2 bytes a key cost more than that saves at d=64 "
            f"({rg['byte_ceiling']:.1f}×). At d=128 (`proxy_check.md`, the real-key proxy) the one-scale code's bound "
            "is "
            "~14% wider relative to the scores than at d=64 on the same keys and leaves 1.3–1.5× the candidates; "
            "one scale per 64 dims brings them back to the d=64 share at about the same byte ceiling: the choice "
            "at d=128 is between fewer candidates (smaller capacity, fewer gathers) and a 2-byte-smaller scan.",
            "* **M_sw − β** (exact sink/window max, no lower bounds from the codes) costs little: "
            f"{r4['candidate_fraction_sw']:.2%} vs {r4['candidate_fraction']:.2%} candidates at {n1} tokens, β={bm:g} "
            f"({ns[0]} tokens: {get(rows, ns[0], bm, DEFAULT)['candidate_fraction_sw']:.2%} vs "
            f"{get(rows, ns[0], bm, DEFAULT)['candidate_fraction']:.2%}; second table), so a one-pass scan with the "
            "threshold fixed before it starts loses a few percent of candidates at short contexts and almost "
            "nothing at 8K; no second pass over the codes is needed for M_lb.", ""]
    return out


if __name__ == "__main__":
    sys.exit(main())
