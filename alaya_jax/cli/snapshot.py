"""``alaya snapshot save|list|show|delete``: the context DB from the command line.

``list``, ``show`` and ``delete`` read the catalogue only (no model is loaded);
``save`` loads the model, prefills the context (reusing any stored prefix of
it) and stores it. Errors from the store (``checkpoints.SnapshotError``, a
``ValueError``) reach ``cli.main`` and print one ``alaya: error:`` line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from alaya_jax.cli.common import UsageError, context_limit, context_limit_text, load_model, progress_bar, read_text
from alaya_jax.runtime.prompts import context_prefix_ids
from alaya_jax.store.db_for_model import open_db


def _print(args, obj, text: str) -> None:
    if args.json:
        print(json.dumps(obj))
    else:
        print(text)


def _meta_json(meta, problem=None) -> dict:
    d = dataclasses.asdict(meta)
    d["id"] = d.pop("snapshot_id")
    d["num_files"] = len(d.pop("checksums"))
    if problem is not None:
        d["problem"] = problem
    return d


def cmd_save(args) -> int:
    from alaya_jax.runtime.corpus import demo_context
    from alaya_jax.runtime.engine import Engine

    if bool(args.context_file) == bool(args.demo_context):
        raise UsageError("give exactly one of --context-file or --demo-context")
    context = read_text(args.context_file, "context file") if args.context_file else demo_context()
    config, model, tok = load_model(args)
    ids = context_prefix_ids(tok, context, raw=args.raw)
    if len(ids) > context_limit(args, config):
        raise UsageError(f"the context has {len(ids)} tokens, more than "
                         f"{context_limit_text(args, config)}")
    engine = Engine(model)
    db = open_db(args.db, config, tok, engine)
    sid = db.snapshot_id(ids)
    existing = {m.snapshot_id for m in db.list()}
    t0 = time.perf_counter()
    reused = 0
    if sid not in existing:
        # Prefill only what no stored snapshot already holds.
        session, todo = db.create_session(ids, capacity=len(ids))
        reused = session.reused_tokens
        caches = session.caches if session.caches is not None else engine.new_caches(batch=1, capacity=len(ids))
        bar = progress_bar(not args.json, len(todo), "prefill")
        caches, _, _ = engine.prefill(caches, [todo], progress=(bar.update if bar else None))
        if bar is not None:
            bar.close()
        t1 = time.perf_counter()
        sid = db.import_(ids, caches, name=args.name)
        t2 = time.perf_counter()
    else:
        t1 = t2 = t0
    meta = db.show(sid)
    out = {"id": sid, "name": meta.name, "num_tokens": meta.num_tokens, "already_stored": sid in existing,
           "reused_tokens": reused, "prefill_s": t1 - t0, "save_s": t2 - t1}
    what = "already stored" if sid in existing else (
        f"prefilled {len(ids) - reused} tokens in {t1 - t0:.2f} s ({reused} reused), saved in {t2 - t1:.2f} s")
    _print(args, out, f"{sid}  {meta.num_tokens} tokens  name={meta.name or '-'}  ({what})")
    return 0


def _catalog(args):
    from alaya_jax.store.context_db import ContextDB

    if not os.path.isdir(args.db):
        raise UsageError(f"context DB {args.db!r} does not exist")
    return ContextDB(args.db)


def cmd_list(args) -> int:
    db = _catalog(args)
    metas = db.list()
    problems = db.problems()
    rows = [_meta_json(m) for m in metas] + [{"id": sid, "problem": why} for sid, why in problems.items()]
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print(f"no snapshots in {args.db}")
    for m in metas:
        print(f"{m.snapshot_id}  {m.num_tokens:>7} tokens  {m.dtype:<8} Bk={m.block_size:<4} "
              f"model={m.model_fingerprint}  {m.created}  {m.name or ''}")
    for sid, why in problems.items():
        print(f"{sid}  UNUSABLE: {why}")
    return 0


def cmd_show(args) -> int:
    db = _catalog(args)
    meta = db.show(args.id, verify=args.verify)
    d = _meta_json(meta)
    if args.verify:
        d["verified"] = True
    if args.json:
        print(json.dumps(d))
    else:
        for k, v in d.items():
            print(f"{k}: {v}")
    return 0


def cmd_delete(args) -> int:
    db = _catalog(args)
    sid = db.delete(args.id)
    _print(args, {"deleted": sid}, f"deleted {sid}")
    return 0


def add_parser(subparsers) -> None:
    """Add ``snapshot save|list|show|delete`` to the ``alaya`` sub-command parsers."""
    sp = subparsers.add_parser("snapshot", help="the context DB: save, list, show, delete prefilled contexts")
    ssub = sp.add_subparsers(dest="snapshot_command", required=True)

    def common(p):
        p.add_argument("--db", required=True, help="context DB directory")
        p.add_argument("--json", action="store_true", help="print JSON")

    s = ssub.add_parser("save", help="prefill a context file and store its KV cache")
    common(s)
    s.add_argument("--context-file", default=None, help="the context text (as given to generate --context-file)")
    s.add_argument("--demo-context", action="store_true", help="the bundled long context")
    s.add_argument("--raw", action="store_true", help="for generate --raw (no chat template)")
    s.add_argument("--name", default=None, help="a name to find the snapshot by")
    s.set_defaults(func=cmd_save)

    ls = ssub.add_parser("list", help="list stored snapshots (and unusable ones, with the reason)")
    common(ls)
    ls.set_defaults(func=cmd_list)

    sh = ssub.add_parser("show", help="one snapshot's metadata")
    common(sh)
    sh.add_argument("id", help="id, unique id prefix, or name")
    sh.add_argument("--verify", action="store_true", help="also re-check every file's sha256")
    sh.set_defaults(func=cmd_show)

    d = ssub.add_parser("delete", help="delete a snapshot")
    common(d)
    d.add_argument("id", help="id, unique id prefix, or name")
    d.set_defaults(func=cmd_delete)
