"""Filtered queries over a stored multi-document context, with real weights (SmolLM2-135M-Instruct, CPU).

One context holds K short reports that contradict each other (each gives the door code of its
office); it is prefilled once and stored in a ContextDB. Then, for each report k, the question
"what is the door code?" is asked of a fresh copy of the stored context twice: without a filter
(the model sees all K codes) and with ``positions`` = report k ∪ the question and the answer (the
public ``attend``'s filter; sink 4, window 0). An answer is right when it contains report k's code.
Rows: full attention and DIPR, each with and without the filter — the share of reports whose code
came back, and which report's code each answer gave.

    python -m bench.filtered_context            # K = 6 reports (about two minutes on 2 CPU cores)
    python -m bench.filtered_context --smoke    # K = 2
"""

from __future__ import annotations

import functools
import re
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from alaya_jax import AttentionConfig, load_smollm2, open_db
from alaya_jax.attention.attention_fn import make_attention_fn
from alaya_jax.runtime.engine import Engine
from bench import harness

OFFICES = ("north", "south", "harbour", "river", "airport", "station", "castle", "market")
CODES = ("4821", "7390", "1564", "9037", "2648", "5173", "8206", "3915")
QUESTION = "What is the door code? Answer with the number only."
MAX_NEW = 16
ALL = 1 << 30


def report(i: int) -> str:
    return (f"Report {i + 1}, from the {OFFICES[i]} office. The staff meeting moved to Thursday. "
            f"The door code of the office is {CODES[i]}. Visitors sign in at the front desk.\n\n")


def build_prompt(tok, k: int):
    """(context ids, question ids, [(start, end)] token range of each report): the chat prompt of
    the reports and the question, encoded piece by piece so that each report's tokens are known."""
    head, tail = tok.chat_prompt("\x00").split("\x00")
    ids, spans = tok.encode(head), []
    for i in range(k):
        piece = tok.encode(report(i))
        spans.append((len(ids), len(ids) + len(piece)))
        ids += piece
    return ids, tok.encode(QUESTION + tail), spans


def answer_code(text: str):
    """The index of the report whose code the answer holds (None: no report's code)."""
    found = [i for i, c in enumerate(CODES) if re.search(rf"\b{c}\b", text)]
    return found[0] if len(found) == 1 else None


def main():
    ap = harness.parser(__doc__, "filtered_context", smoke="K = 2 reports")
    ap.add_argument("--reports", type=int, default=6)
    ap.add_argument("--beta", type=float, default=32.0, help="DIPR's β")
    args = ap.parse_args()
    k = 2 if args.smoke else args.reports
    if not 2 <= k <= len(CODES):
        raise SystemExit(f"--reports must be in [2, {len(CODES)}]")
    t0 = time.perf_counter()
    config, model, tok = load_smollm2()
    engine = Engine(model)
    context, question, spans = build_prompt(tok, k)
    capacity = len(context) + len(question) + MAX_NEW
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnames=("cfg",))
    def forward(state, tokens, start, caches, positions, cfg):
        pos = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        attn = make_attention_fn(cfg, positions=positions)
        return nnx.merge(graphdef, state)(tokens, pos, caches, attention=attn, last_only=True)

    with tempfile.TemporaryDirectory() as path:
        db = open_db(path, config, tok, engine)
        caches, _, _ = engine.prefill(engine.new_caches(batch=1, capacity=len(context)), [context])
        sid = db.import_(context, caches)
        stored, _, _ = db.load(sid, capacity=capacity)  # the stored context, as every question gets it

    def ask(cfg, positions):
        caches = jax.tree.map(jnp.copy, stored)
        positions = jnp.asarray(positions, jnp.int32)
        logits, caches, _ = forward(state, jnp.asarray([question]), jnp.int32(len(context)), caches, positions,
                                    cfg=cfg)
        out = []
        for _ in range(MAX_NEW):
            nxt = int(jnp.argmax(logits[0, -1]))
            if nxt in tok.stop_ids:
                break
            out.append(nxt)
            at = jnp.int32(len(context) + len(question) + len(out) - 1)
            logits, caches, _ = forward(state, jnp.asarray([[nxt]]), at, caches, positions, cfg=cfg)
        return tok.decode(out)

    q0 = len(context)
    methods = {"full": AttentionConfig(method="full", sink=4, window=0),
               f"dipr β={args.beta:g}": AttentionConfig(method="dipr", beta=args.beta, sink=4, window=0)}
    rows = []
    for name, cfg in methods.items():
        for filtered in (False, True):
            answers = []
            for i in range(k):
                # the same [R=2, 2] shape either way: one compilation serves both
                positions = [spans[i], (q0, ALL)] if filtered else [(0, ALL), (0, 0)]
                text = ask(cfg, positions)
                answers.append({"report": i, "answer": text, "gave": answer_code(text)})
            right = sum(a["gave"] == a["report"] for a in answers)
            rows.append({"method": name, "filter": "report k" if filtered else "none", "reports": k,
                         "right": right, "share": right / k, "gave": [a["gave"] for a in answers],
                         "answers": answers})
    meta = harness.run_meta(model="SmolLM2-135M-Instruct", context_tokens=len(context),
                            question_tokens=len(question), report_spans=spans, wall_s=time.perf_counter() - t0)
    lines = [f"# Filtered queries over a stored {k}-report context ({len(context)} tokens, SmolLM2-135M-Instruct, "
             f"{meta['device']})", "",
             "Each report gives a different door code; the question is asked once per report k, with no filter "
             "and with the filter report k ∪ question ∪ answer (sink 4, window 0). right = answers holding "
             "report k's code; gave = whose code each answer held (report index, - = none or several).", "",
             "| method | filter | right | gave (k = 0..K-1) |", "|---|---|---|---|"]
    for r in rows:
        gave = " ".join("-" if g is None else str(g) for g in r["gave"])
        lines.append(f"| {r['method']} | {r['filter']} | {r['right']}/{r['reports']} | {gave} |")
    lines += ["", f"jax {meta['jax']}, {meta['date']}, commit {meta['commit']}, {meta['wall_s']:.0f} s wall."]
    harness.write_results(args.out, "filtered_context", {"meta": meta, "rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
