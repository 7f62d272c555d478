"""``alaya serve``: a long-lived OpenAI-compatible HTTP server over the context DB.

The model is loaded once; requests share decode steps (continuous batching, see
:mod:`alaya_jax.server.scheduler`); stored contexts are served from the DB's memory
tier. SIGTERM / Ctrl-C: stop accepting, let in-flight requests finish (up to
``--shutdown-timeout`` seconds, then cut them short cleanly), exit 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys

from alaya_jax.attention.config import PREFILL_ATTENTIONS
from alaya_jax.cli.common import (UsageError, add_attention_args, add_devices_arg, add_random_weights_arg,
                                  attention_config, context_limit, devices_arg, load_model, positive_int)

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def byte_size(text: str) -> int:
    """``"20GiB"``, ``"512MB"``, ``"1e9"``, ``"0"`` → bytes (an argparse type)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 512MiB, 20GB or 0, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, contexts)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    s.add_argument("--port", type=int, default=8000)
    add_random_weights_arg(s)
    s.add_argument("--db", default=None, help="context DB directory: stored contexts are reused by every request "
                                              "whose prompt starts with one, and kept on disk (default: kept in "
                                              "memory only, lost at exit)")
    s.add_argument("--memory-budget", type=byte_size, default=byte_size("2GiB"),
                   help="bytes of stored contexts kept resident (the DB's memory tier; without --db the only place "
                        "they are kept; 0: off; default 2GiB)")
    s.add_argument("--decode-chunk", type=positive_int, default=16,
                   help="decode steps per device dispatch (a request arriving meanwhile waits for the chunk)")
    s.add_argument("--memory-kind", choices=("device", "pinned_host"), default="device")
    s.add_argument("--api-key", default=os.environ.get("ALAYA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every path but /health (default: env "
                        "ALAYA_API_KEY; none: open, which only a loopback --host allows)")
    s.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve a non-loopback --host without an API key (refused otherwise)")
    s.add_argument("--max-batch", type=positive_int, default=8, help="sequences decoded together")
    s.add_argument("--max-prompt-tokens", type=positive_int, default=None, help="default: the context")
    s.add_argument("--max-tokens-limit", type=positive_int, default=4096, help="largest max_tokens accepted")
    s.add_argument("--default-max-tokens", type=positive_int, default=256, help="chat's max_tokens when not given")
    s.add_argument("--max-body-bytes", type=byte_size, default=byte_size("4MiB"))
    s.add_argument("--prefill-attention", choices=PREFILL_ATTENTIONS, default="reference",
                   help="dense attention of prefill chunks and of 'full' decode steps")
    s.add_argument("--prefill-chunk", type=positive_int, default=512, help="largest prompt chunk per prefill call")
    s.add_argument("--served-model-name", default=None, help="the model id of /v1/models (default: from the file)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM")
    s.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    add_attention_args(s)
    add_devices_arg(s)
    s.set_defaults(func=cmd_serve)


def build_state(args):
    """Load the model and build the server's shared state (engine loop not started)."""

    from alaya_jax.runtime.engine import Engine
    from alaya_jax.server.app import ServerState
    from alaya_jax.server.metrics import Metrics
    from alaya_jax.server.protocol import RequestLimits
    from alaya_jax.server.scheduler import BatchLimits, Scheduler

    devices = devices_arg(args)  # before the model is loaded
    if args.kv_placement != "device":
        raise UsageError(f"alaya serve keeps the KV on the device for now (--kv-placement {args.kv_placement} is "
                         "supported by alaya generate and the Python API)")
    config, model, tok = load_model(args)
    if args.random_weights:
        name = f"random-{args.random_weights}"
    elif args.model:
        name = os.path.splitext(os.path.basename(os.path.normpath(args.model)))[0]
    else:
        from models import find_smollm2_gguf

        name = find_smollm2_gguf().stem
    context = context_limit(args, config)
    engine = Engine(model, prefill_attention=args.prefill_attention, prefill_chunk=args.prefill_chunk,
                    max_chunk=max(args.decode_chunk, 1), devices=devices)
    db = None
    if args.db:
        from alaya_jax.store.db_for_model import open_db

        db = open_db(args.db, config, tok, engine, memory_budget_bytes=args.memory_budget,
                     memory_kind=args.memory_kind)
    elif args.memory_budget > 0:  # no --db: stored contexts live in memory only (lost at exit)
        from alaya_jax.store.db_for_model import open_memory_db

        db = open_memory_db(config, tok, engine, budget_bytes=args.memory_budget, memory_kind=args.memory_kind)
    attention = attention_config(args, prefill_attention=args.prefill_attention)
    limits = RequestLimits(max_context=context, max_prompt_tokens=min(args.max_prompt_tokens or context, context),
                           max_tokens=args.max_tokens_limit, default_max_tokens=args.default_max_tokens,
                           max_body_bytes=args.max_body_bytes)
    metrics = Metrics()
    scheduler = Scheduler(engine, tok, limits=BatchLimits(max_batch=args.max_batch, max_context=context,
                                                          decode_chunk=args.decode_chunk), db=db, observer=metrics)
    return ServerState(scheduler=scheduler, tok=tok, model_name=args.served_model_name or name, limits=limits,
                       attention=attention, metrics=metrics, api_key=args.api_key or None,
                       shutdown_timeout_s=args.shutdown_timeout, device=_device())


def cmd_serve(args) -> int:
    import uvicorn

    from alaya_jax.server.app import create_app

    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.shutdown_timeout < 0:
        raise UsageError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    check_bind(args.host, api_key=args.api_key, allow_unauthenticated=args.allow_unauthenticated)
    logging.basicConfig(level=args.log_level.upper(), format="%(message)s", stream=sys.stderr)
    if not args.api_key and not is_loopback(args.host):
        logging.getLogger("alaya.serve").warning(
            "alaya serve: listening on %s without an API key (--allow-unauthenticated): anyone who can reach it "
            "can use it", args.host)
    state = build_state(args)
    config = uvicorn.Config(create_app(state), host=args.host, port=args.port, log_level=args.log_level,
                            access_log=False, lifespan="on", timeout_graceful_shutdown=args.shutdown_timeout)
    # uvicorn re-raises the SIGTERM it caught once it has shut down; with this handler in place
    # that re-raise is a no-op, so a clean shutdown exits 0 (not "killed by SIGTERM").
    signal.signal(signal.SIGTERM, lambda *_: None)
    _make_server(config, state).run()
    if state.scheduler.error is not None:
        print(f"alaya: error: the engine loop failed: {state.scheduler.error!r}", file=sys.stderr)
        return 1
    return 0


def is_loopback(host: str) -> bool:
    """``host`` (an address or a name) reaches this machine only: 127.0.0.0/8 or ::1 (also
    IPv4-mapped), or a name all of whose addresses are. ``0.0.0.0``, ``::`` and anything
    that does not resolve are not."""
    import ipaddress
    import socket

    h = host.strip().strip("[]")
    try:
        addrs = [ipaddress.ip_address(h.split("%")[0])]
    except ValueError:
        try:
            addrs = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in socket.getaddrinfo(h, None)]
        except (OSError, UnicodeError, ValueError):
            return False

    def loop(a):
        mapped = getattr(a, "ipv4_mapped", None)
        return (mapped or a).is_loopback

    return bool(addrs) and all(loop(a) for a in addrs)


def check_bind(host: str, *, api_key, allow_unauthenticated: bool) -> None:
    """Refuse (``UsageError``) to serve a non-loopback ``host`` without an API key, unless
    ``allow_unauthenticated`` says that is meant."""
    if api_key or allow_unauthenticated or is_loopback(host):
        return
    raise UsageError(f"refusing to serve {host!r} without an API key: anyone who can reach it could use the "
                     f"server. Give --api-key KEY (or set ALAYA_API_KEY), bind a loopback address (127.0.0.1, "
                     f"::1), or pass --allow-unauthenticated to serve it open on purpose")


def _make_server(config, state):
    """uvicorn's server that, on SIGTERM / SIGINT, also tells the engine loop to cut what is
    still running short (cleanly) just before uvicorn's own graceful-shutdown timeout."""
    import uvicorn

    class Server(uvicorn.Server):
        def __init__(self, config, state):
            super().__init__(config)
            self.alaya = state

        def handle_exit(self, sig, frame):
            self.alaya.scheduler.drain(max(0.0, self.alaya.shutdown_timeout_s - 1.0))
            super().handle_exit(sig, frame)

    return Server(config, state)


def _device() -> str:
    import jax

    d = jax.devices()[0]
    return f"{jax.default_backend()}: {getattr(d, 'device_kind', d)} x{jax.device_count()}"
