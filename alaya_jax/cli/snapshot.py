"""``alaya snapshot save|list|show|delete|gc``: the context DB from the command line.

``list``, ``show``, ``delete`` and ``gc`` read the catalogue only (no model is loaded);
``save`` loads the model, prefills the context (reusing any stored prefix of
it) and stores it. Opening a DB removes what killed saves left (``list`` and ``gc`` say
how many bytes that was). Errors from the store (``checkpoints.SnapshotError``, a
``ValueError``, a ``StorageError``) reach ``cli.main`` and print one ``alaya: error:``
line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from alaya_jax.cli.common import (UsageError, add_random_weights_arg, context_limit, context_limit_text, load_model,
                                  nonneg_float, progress_bar, read_text)
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
    t0 = time.perf_counter()
    reused = 0
    res = db.stored(ids, name=args.name)
    if res is None:
        # Prefill only what no stored snapshot already holds.
        session, todo = db.create_session(ids, capacity=len(ids))
        reused = session.reused_tokens
        caches = session.caches if session.caches is not None else engine.new_caches(batch=1, capacity=len(ids))
        bar = progress_bar(not args.json, len(todo), "prefill")
        caches, _, _ = engine.prefill(caches, [todo], progress=(bar.update if bar else None))
        if bar is not None:
            bar.close()
        t1 = time.perf_counter()
        res = db.save(ids, caches, name=args.name)
        t2 = time.perf_counter()
    else:
        t1 = t2 = t0
    out = {"id": res.snapshot_id, "name": res.name, "aliases": list(res.aliases), "name_applied": res.name_applied,
           "num_tokens": len(ids), "already_stored": res.already_stored, "reused_tokens": reused,
           "prefill_s": t1 - t0, "save_s": t2 - t1}
    if res.already_stored:
        what = "already stored" + {"alias": f"; {args.name!r} added as an alias", "name": f"; named {args.name!r}",
                                   None: "", "present": ""}[res.name_applied]
    else:
        what = f"prefilled {len(ids) - reused} tokens in {t1 - t0:.2f} s ({reused} reused), saved in {t2 - t1:.2f} s"
    aliases = f"  aliases={','.join(res.aliases)}" if res.aliases else ""
    _print(args, out, f"{res.snapshot_id}  {len(ids)} tokens  name={res.name or '-'}{aliases}  ({what})")
    return 0


def _catalog(args):
    from alaya_jax.store.context_db import ContextDB

    if not os.path.isdir(args.db):
        raise UsageError(f"context DB {args.db!r} does not exist")
    return ContextDB(args.db)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _leftover_lines(removed, kept) -> list[str]:
    """What opening the DB removed and what temporary directories are left, as lines."""
    lines = []
    if removed:
        lines.append(f"removed {len(removed)} leftover(s) of killed saves or deletes "
                     f"({_size(sum(x.bytes for x in removed))}): {', '.join(x.name for x in removed)}")
    for x in kept:
        why = "a save in progress" if x.state == "in_progress" else (
            "its writer is gone" if x.state == "orphaned" else f"no writer lock, {x.age_s:.0f} s old")
        lines.append(f"left {x.name} ({_size(x.bytes)}): {why}")
    return lines


def cmd_list(args) -> int:
    db = _catalog(args)
    metas = db.list()
    problems = db.problems()
    rows = [_meta_json(m) for m in metas] + [{"id": sid, "problem": why} for sid, why in problems.items()]
    notes = _leftover_lines(db.cleaned, db.leftovers())
    if args.json:
        print(json.dumps(rows))
        for line in notes:  # the rows stay snapshots only
            print(f"alaya: {line}", file=sys.stderr)
        return 0
    if not rows:
        print(f"no snapshots in {args.db}")
    for m in metas:
        names = " ".join(x for x in (m.name, *m.aliases) if x)
        print(f"{m.snapshot_id}  {m.num_tokens:>7} tokens  {m.dtype:<8} Bk={m.block_size:<4} "
              f"model={m.model_fingerprint}  {m.created}  {names}")
    for sid, why in problems.items():
        print(f"{sid}  UNUSABLE: {why}")
    for line in notes:
        print(line)
    return 0


def cmd_gc(args) -> int:
    if not os.path.isdir(args.db):
        raise UsageError(f"context DB {args.db!r} does not exist")
    from alaya_jax.store.context_db import ContextDB

    db = ContextDB(args.db, stale_tmp_s=args.min_age)
    removed, kept = db.cleaned, db.leftovers()
    if args.json:
        def rows(xs):
            return [{"name": x.name, "bytes": x.bytes, "state": x.state} for x in xs]

        print(json.dumps({"removed": rows(removed), "removed_bytes": sum(x.bytes for x in removed),
                          "kept": rows(kept)}))
        return 0
    for line in _leftover_lines(removed, kept) or [f"nothing to remove in {args.db}"]:
        print(line)
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
    """Add ``snapshot save|list|show|delete|gc`` to the ``alaya`` sub-command parsers."""
    sp = subparsers.add_parser("snapshot", help="the context DB: save, list, show, delete prefilled contexts, gc")
    ssub = sp.add_subparsers(dest="snapshot_command", required=True)

    def common(p):
        p.add_argument("--db", required=True, help="context DB directory")
        p.add_argument("--json", action="store_true", help="print JSON")

    s = ssub.add_parser("save", help="prefill a context file and store its KV cache")
    common(s)
    s.add_argument("--context-file", default=None, help="the context text (as given to generate --context-file)")
    s.add_argument("--demo-context", action="store_true", help="the bundled long context")
    s.add_argument("--raw", action="store_true", help="for generate --raw (no chat template)")
    s.add_argument("--name", default=None, help="a name to find the snapshot by (a context already stored under "
                                                "another name keeps both: this one as an alias)")
    add_random_weights_arg(s)
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

    g = ssub.add_parser("gc", help="remove the temporary directories of killed saves (and say how many bytes)")
    common(g)
    g.add_argument("--min-age", type=nonneg_float, default=600.0, metavar="SECONDS",
                   help="also remove temporary directories without a writer lock (left by an older alaya-jax) "
                        "once this old (default 600); those of saves in progress are never removed")
    g.set_defaults(func=cmd_gc)
