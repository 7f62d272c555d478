"""Does the real-key proxy for 8B shapes reproduce the CPU measurement? (issue 14 item 6; CPU, NumPy)

Reference: the committed capture (``bench/real_keys/smollm2_pydoc_8k.npz``: real
SmolLM2 keys and queries, d=64, 3 KV heads × 3 query heads a layer), the decode query at
real position P = 8191 − o for each query offset o, keys [0, P]: DIPR keys (mean over
query heads) and rotated-int4 candidates (group union) at β (d=64), sink 4 + window 64.

Proxy: ``real_key_proxy.build_proxy(context=N, layer=l, query_offset=o, construction=c)``
(8 KV heads, group 4, the same real keys and queries) for each case ``c:d:N`` (default:
the ``embed`` construction at d=128 and N = 32K, 128K; the ``pair`` construction at 32K;
``embed`` at d=64, i.e. the real keys only tiled, as a check of the tiling) with the
same filter–refine reference (``filter_refine_ref.py``: a d-dimensional rotation per
proxy KV head) at β·beta_scale. Shares are ratios of sums over the captured layers,
heads and offsets; the proxy passes where proxy / reference lies in [0.8, 1.2]. Every
case is brute force (all keys of every proxy KV head); zero false negatives are
checked on both sides.

Diagnostic: for ``embed`` the proxy's scores are √2 × the real ones token by token, so
the int4 bound widths compare directly: the median over keys of δ₁₂₈ / (√2·δ₆₄) says how
much looser, relative to the scores, the d=128 code is on the same keys.

    python -m bench.proxy_check
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from bench import harness
from bench.filter_refine_ref import CODES, Coded, CodeSpec, evaluate, rotation
from bench.real_key_proxy import build_proxy, load_capture

INT4 = next(c for c in CODES if c.name == "int4 rotated")
INT4_G64 = CodeSpec("int4 rotated, scale per 64 dims", "scalar", 4, group=64)  # = INT4 at d=64
SINK, WINDOW = 4, 64


def _ceiling(tot: dict, i: int, d: int, cand: str, code_bytes: float) -> float:
    """Dense bf16 K+V bytes over: codes of the searched keys + bf16 K of the candidates + bf16 V of the
    keys in range (group union) + K+V of sink/window (the byte model of code_choice.py)."""
    sr, vis = tot["searched"][i], tot["visible"][i]
    used = sr * code_bytes + tot[cand][i] * 2 * d + tot["in_range_union"][i] * 2 * d + (vis - sr) * 4 * d
    return float(vis * 4 * d / used)


def _counts(res: dict, codes) -> dict:
    """Totals over queries (arrays [nβ]) of one evaluate() output."""
    c = res[codes[0].name]
    g = res[codes[-1].name]
    return {"searched": res["searched"].sum(1), "in_range_head": res["in_range_head"].sum(1),
            "in_range_union": res["in_range_union"].sum(1), "visible": res["visible"],
            "cand": c["cand"].sum(1), "cand_sw": c["cand_sw"].sum(1), "cand_g64": g["cand"].sum(1),
            "fn": sum(x[k].sum(1) for x in (c, g) for k in ("fn", "fn_sw"))}


def reference(cap: dict, li: int, h: int, o: int, group: int, betas, seed: int, memo: dict) -> dict:
    """Real d=64 KV head h of captured layer li, query at 8191 − o with query heads j mod 3 (j < group)."""
    key = (li, h, o, group)
    if key not in memo:
        keys, qs = cap["keys"], cap["queries"]
        _, hkv, s, d = keys.shape
        gq = qs.shape[2] // hkv
        k = keys[li, h, : s - o].astype(np.float64)
        q = qs[li, qs.shape[1] - 1 - o, [h * gq + j % gq for j in range(group)]].astype(np.float64)[None]
        rot = rotation(d, [seed, int(cap["layers"][li]), h])
        res = evaluate(k, q, np.asarray([s - 1 - o]), [Coded(INT4, k, rot)], betas, sink=SINK, window=WINDOW)
        res["visible"] = np.full(len(betas), float(s - o))
        memo[key] = _counts(res, [INT4])
    return memo[key]


def check_case(cap: dict, construction: str, head_dim: int, context: int, offsets, betas, seed: int, *,
               num_kv_heads: int, group: int, memo: dict) -> tuple[dict, dict, float]:
    """Totals (arrays [nβ]) of the proxy and of its paired reference (the same real heads, queries and
    offsets, at d=64), over every captured layer and offset; and beta_scale."""
    px, ref, scale = {}, {}, None
    codes = [INT4, INT4_G64]
    for li, l in enumerate(cap["layers"]):
        for o in offsets:
            t = time.perf_counter()
            p = build_proxy(context=context, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim,
                            layer=int(l), query_offset=o, window=WINDOW, construction=construction, seed=seed,
                            capture=cap, values=False)
            scale = p["beta_scale"]
            pos = np.asarray([context - 1])
            for h, src in enumerate(p["source"]):
                k = p["keys"][0, h].astype(np.float64)
                q = p["q"][0, h * group:(h + 1) * group].astype(np.float64)[None]
                rot = rotation(head_dim, [seed, int(l), h, head_dim])
                res = evaluate(k, q, pos, [Coded(c, k, rot) for c in codes], np.asarray(betas) * scale,
                               sink=SINK, window=WINDOW)
                res["visible"] = np.full(len(betas), float(context))
                for key, val in _counts(res, codes).items():
                    px[key] = px.get(key, 0) + val
                for rh in src["real_kv_heads"]:
                    for key, val in reference(cap, li, rh, o, group, betas, seed, memo).items():
                        if key == "cand_g64":  # at d=64 the per-64-dims scale is the one scale
                            val = reference(cap, li, rh, o, group, betas, seed, memo)["cand"]
                        ref[key] = ref.get(key, 0) + val
            print(f"proxy {construction} d={head_dim} {context} layer {l} offset {o}: {time.perf_counter() - t:.0f}s",
                  flush=True)
    return px, ref, scale


def bound_width_ratio(cap: dict, seed: int) -> float:
    """Median over keys, mean over (captured layer, real KV head, query head), of δ at d=128 on
    the embed proxy (8K, last query) over √2·δ at d=64 on the real key of the same token."""
    out = []
    for li, l in enumerate(cap["layers"]):
        p = build_proxy(context=cap["keys"].shape[2], num_kv_heads=3, group=3, layer=int(l), seed=seed,
                        capture=cap, values=False)
        for h, src in enumerate(p["source"]):
            a = src["real_kv_heads"][0]
            k64 = cap["keys"][li, a].astype(np.float64)
            q64 = cap["queries"][li, -1, 3 * a:3 * a + 3].astype(np.float64)
            _, d64 = Coded(INT4, k64, rotation(64, [seed, int(l), a])).bound(q64)
            _, d128 = Coded(INT4, p["keys"][0, h].astype(np.float64), rotation(128, [seed, int(l), h, 128])).bound(
                p["q"][0, 3 * h:3 * h + 3].astype(np.float64))
            out.append(np.median(d128 / (np.sqrt(2) * d64[:, p["token_index"]]), axis=1))
    return float(np.mean(out))


def _span(rows, key, **sel) -> str:
    v = [r[key] for r in rows if all(r[k] == x for k, x in sel.items())]
    return f"{min(v):.2f}–{max(v):.2f}" if v else "n/a"


def render(res: dict) -> str:
    m, rows = res["meta"], res["rows"]
    md = ["# Real-key proxy vs the CPU measurement on the same keys (bench/proxy_check.py)", "",
          f"Reference: real SmolLM2 d=64 heads of `{m['capture']}` (layers {m['capture_layers']}, 3 KV × 3 query "
          f"heads, text offset {m['text_offset_tokens']}), 8K-token contexts ending at the query offsets "
          f"{m['query_offsets']} before the last position. Proxy: `real_key_proxy.build_proxy` ({m['num_kv_heads']} "
          "KV heads, group "
          f"{m['group']}) for each captured layer and the same offsets, at β·√(d/64) (d=128: β·1.414). "
          f"Filter–refine reference `filter_refine_ref.py`, code {INT4.name}, sink {SINK} + window {WINDOW}; brute "
          f"force over all keys of every head, false negatives checked (0 on both sides unless marked). Shares of "
          f"the searched keys (ratios of sums). Pass: proxy / reference within ±{m['tolerance']:.0%} for DIPR and "
          f"candidates, with the store's d-dimensional code (one f16 scale a key) and with one scale per 64 dims "
          f"(at d=64 both are the CPU's rotated int4). NumPy {m['numpy']} on CPU, commit {m['commit']}, {m['date']}, "
          f"{m['seconds']:.0f} s.", "",
          "Each proxy KV head is compared with the real head(s) it is made of (same real queries, query heads "
          "j mod 3, same offsets): the reference is paired, head by head.", "",
          "| construction | d | context | β d=64 → proxy | DIPR keys ref / proxy (ratio) | int4 candidates ref / proxy "
          "(ratio) | vs M_sw−β ref / proxy (ratio) | int4, scale per 64 dims: proxy (ratio) | pass: int4 / "
          "scale per 64 dims | byte ceiling: ref / proxy / proxy, scale per 64 dims |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fn = "" if not (r["ref_false_negatives"] or r["proxy_false_negatives"]) else \
            f" FAILURE: {r['ref_false_negatives']}/{r['proxy_false_negatives']} missed"
        md.append(f"| {r['construction']} | {r['head_dim']} | {r['context']} | {r['beta_d64']:g} → "
                  f"{r['beta_proxy']:.1f} "
                  f"| {r['ref_dipr']:.3%} / {r['proxy_dipr']:.3%} ({r['ratio_dipr']:.2f}) | {r['ref_cand']:.2%} / "
                  f"{r['proxy_cand']:.2%} ({r['ratio_cand']:.2f}) | {r['ref_cand_sw']:.2%} / "
                  f"{r['proxy_cand_sw']:.2%} ({r['ratio_cand_sw']:.2f}) | {r['proxy_cand_g64']:.2%} "
                  f"({r['ratio_cand_g64']:.2f}) | {'yes' if r['pass_cand'] else 'NO'} / "
                  f"{'yes' if r['pass_cand_g64'] else 'NO'}{fn} | {r['ref_ceiling']:.2f}× / "
                  f"{r['proxy_ceiling']:.2f}× / "
                  f"{r['proxy_ceiling_g64']:.2f}× |")
    md += ["", f"Bound width: on the same tokens the d=128 int4 bound δ is "
               f"{m['int4_bound_width_ratio_d128_over_d64']:.3f}× √2·δ at d=64 (median over "
           "keys, mean over captured layers, KV and query heads): the per-key scale is the largest of 128 rotated "
           "coordinates instead of 64, so the d=128 code is looser relative to the scores, and candidates grow."]
    md += ["", "## Reading", "",
           f"* **The construction is faithful where it can be checked.** With the real keys only tiled (embed, d=64) "
           f"the DIPR share is {_span(rows, 'ratio_dipr', construction='embed', head_dim=64)}× and the int4 candidate "
           f"share {_span(rows, 'ratio_cand', construction='embed', head_dim=64)}× the paired 8K measurement; at d=128 "
           f"(embed) the DIPR share is {_span(rows, 'ratio_dipr', construction='embed', head_dim=128)}× — the scores "
           "are "
           "√2 × the real ones token by token, so the small excess comes from the tiling (probably the partial body "
           "copy after "
           "the sink drops the earliest tokens; it shrinks from 32K to 128K).",
           f"* **The store's one-scale int4 code at d=128 leaves more candidates** than at d=64 on the same keys: "
           f"{_span(rows, 'ratio_cand', construction='embed', head_dim=128)}× — outside ±{m['tolerance']:.0%}. "
           "So with the store's code as specified the proxy FAILS the issue's 20% test on candidates. Most of the "
           "excess is the code, not the construction: on the same tokens the d=128 bound is wider relative to the "
           "scores (bound width above; the per-key scale is the largest of 128 rotated coordinates instead of 64), "
           "and the tiling alone accounts for up to the d=64 row's excess at 32K. With one f16 scale per 64 dims (2 "
           "more bytes a key) the proxy's candidates "
           f"are {_span(rows, 'ratio_cand_g64', construction='embed', head_dim=128)}× the d=64 measurement. Expect "
           "the same on real d=128 keys (the effect is the maximum over more coordinates), but only real 8B keys "
           "can confirm it; the embed construction's rotated coordinates are not those of a real d=128 head.",
           f"* **Two distinct real heads side by side (pair) do not work**: a sum of two heads' scores singles out "
           f"fewer keys than either head (DIPR {_span(rows, 'ratio_dipr', construction='pair')}×, candidates "
           f"{_span(rows, 'ratio_cand', construction='pair')}× at β·√2), so it would flatter DIPR.",
           "* The proxy repeats the real 8K body, so its shares are those of 8K tokens at every context: real "
           "128K–512K contexts would likely leave fewer candidates (`code_choice.md`: the share falls with length) "
           "— the proxy is conservative for the scan's work."]
    return "\n".join(md) + "\n"


def main(argv=None):
    ap = harness.parser(__doc__.split("\n")[0], "proxy_check", out_env=False)
    ap.add_argument("--capture", default=None)
    ap.add_argument("--cases", nargs="+", default=["embed:128:32768", "embed:128:131072", "pair:128:32768",
                                                   "embed:64:32768"],
                    help="construction:head_dim:context of each proxy measured")
    ap.add_argument("--offsets", type=int, nargs="+", default=[0, 32],
                    help="query offsets (positions before the last) of reference and proxy alike")
    ap.add_argument("--betas", type=float, nargs="+", default=[16, 24, 32])
    ap.add_argument("--num-kv-heads", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=0.2)
    ap.add_argument("--render", default="", help="only rewrite the markdown of this proxy_check.json")
    a = ap.parse_args(argv)
    if a.render:
        with open(a.render) as f:
            md = render(json.load(f))
        harness.write_text(os.path.join(a.out, "proxy_check.md"), md)
        print(md)
        return
    t0 = time.perf_counter()
    cap = load_capture(a.capture)
    width = bound_width_ratio(cap, a.seed)
    memo, rows = {}, []
    for case in a.cases:
        try:
            cons, hd, n = case.split(":")
            hd, n = int(hd), int(n)
        except ValueError:
            raise SystemExit(f"--cases entry {case!r} is not construction:head_dim:context")
        px, ref, scale = check_case(cap, cons, hd, n, a.offsets, a.betas, a.seed, num_kv_heads=a.num_kv_heads,
                                    group=a.group, memo=memo)
        for i, b in enumerate(a.betas):
            row = {"construction": cons, "head_dim": hd, "context": n, "beta_d64": b, "beta_proxy": b * scale}
            for name, tot in (("ref", ref), ("proxy", px)):
                row[f"{name}_dipr"] = float(tot["in_range_head"][i] / tot["searched"][i])
                for key in ("cand", "cand_sw", "cand_g64"):
                    row[f"{name}_{key}"] = float(tot[key][i] / tot["searched"][i])
                row[f"{name}_false_negatives"] = int(tot["fn"][i])
            for key in ("dipr", "cand", "cand_sw", "cand_g64"):
                row[f"ratio_{key}"] = row[f"proxy_{key}"] / row[f"ref_{key}"]
            row["ref_ceiling"] = _ceiling(ref, i, 64, "cand", INT4.bytes_per_key(64))
            row["proxy_ceiling"] = _ceiling(px, i, hd, "cand", INT4.bytes_per_key(hd))
            row["proxy_ceiling_g64"] = _ceiling(px, i, hd, "cand_g64", INT4_G64.bytes_per_key(hd))
            ok = not row["ref_false_negatives"] and not row["proxy_false_negatives"]
            for key in ("cand", "cand_g64"):
                row[f"pass_{key}"] = bool(ok and all(abs(row[f"ratio_{k}"] - 1) <= a.tolerance for k in ("dipr", key)))
            rows.append(row)
            print(row, flush=True)
    meta = harness.run_meta(
        capture=os.path.relpath(a.capture or "bench/real_keys/smollm2_pydoc_8k.npz"),
        capture_layers=[int(x) for x in cap["layers"]], model_fingerprint=str(cap["model_fingerprint"]),
        text_offset_tokens=int(cap["text_offset_tokens"]), query_offsets=a.offsets, num_kv_heads=a.num_kv_heads,
        group=a.group, cases=a.cases, int4_bound_width_ratio_d128_over_d64=width, sink=SINK, window=WINDOW,
        tolerance=a.tolerance, seed=a.seed, code=INT4.name, seconds=round(time.perf_counter() - t0, 1))
    md = render({"meta": meta, "rows": rows})
    harness.write_results(a.out, "proxy_check", {"meta": meta, "rows": rows}, md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
