"""``alaya models inspect PATH``: what a GGUF file or Hugging Face directory holds, what it would need in
memory, and every reason it would be refused — from metadata and tensor headers only (no weights read)."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    m = sub.add_parser("models", help="inspect model files")
    msub = m.add_subparsers(dest="models_command", required=True)
    i = msub.add_parser("inspect", help="architecture, shapes, dtypes, parameters, memory, refusals of a model")
    i.add_argument("path", help="a .gguf file or a Hugging Face checkpoint directory")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    import dataclasses

    from alaya_jax.cli.common import context_limit
    from alaya_jax.runtime.memory_estimate import estimate_memory
    from models import describe_model_path, read_config

    info = describe_model_path(args.path)
    if "layers" in info:  # the config itself is readable: estimate even if some tensor is refused
        config = read_config(args.path)
        ctx = context_limit(args, config)
        info["memory_estimate"] = {
            dt: {"context": ctx, "weights_bytes": e.weights_bytes, "kv_bytes": e.kv_bytes, "total_bytes": e.total_bytes}
            for dt in ("bfloat16", "float32")
            for e in [estimate_memory(dataclasses.replace(config, dtype=dt), context=ctx)]}
    if args.json:
        print(json.dumps(info))
        return 0
    for k, v in info.items():
        if k not in ("refused", "memory_estimate"):
            print(f"{k}: {v}")
    for dt, e in info.get("memory_estimate", {}).items():
        print(f"memory ({dt}, {e['context']} tokens): {e['weights_bytes'] / 2**30:.2f} GiB weights + "
              f"{e['kv_bytes'] / 2**30:.2f} GiB KV = {e['total_bytes'] / 2**30:.2f} GiB")
    for r in info["refused"]:
        print(f"refused: {r}")
    return 0
