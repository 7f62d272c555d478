"""What every ``alaya`` subcommand shares: the usage error, argument types, reading a
text file, the attention arguments and loading the model."""

from __future__ import annotations

import argparse
import os
import sys

from alaya_jax.attention.config import DIPR_IMPLEMENTATIONS, KV_PLACEMENTS, METHODS
from alaya_jax.attention.tail import DEFAULT_TAIL, TAIL_MODES
from alaya_jax.errors import InputError


class UsageError(InputError):
    """A problem with what the user asked for; printed without a traceback."""


def _number(kind: type, *, minimum, inclusive: bool = True, maximum=None):
    """An argparse type: ``kind`` (int or float) >= ``minimum`` (> if not inclusive), <= ``maximum``."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        low_ok = v >= minimum if inclusive else v > minimum
        if not low_ok or (maximum is not None and not v <= maximum):
            rng = f"{'>=' if inclusive else '>'} {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
            raise argparse.ArgumentTypeError(f"expected a number {rng}, got {text}")
        return v

    return parse


positive_int = _number(int, minimum=1)
nonneg_int = _number(int, minimum=0)
nonneg_float = _number(float, minimum=0.0)
unit_float = _number(float, minimum=0.0, inclusive=False, maximum=1.0)


def read_text(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UsageError(f"{what} {path!r} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path!r} is a directory") from None
    except (PermissionError, OSError) as e:
        raise UsageError(f"cannot read {what} {path!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise UsageError(f"{what} {path!r} is empty")
    return text


def add_attention_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("attention")
    g.add_argument("--attention", choices=METHODS, default="full", help="attention method for decode steps")
    g.add_argument("--beta", type=nonneg_float, default=32.0, help="DIPR range β in raw q·k units (default 32)")
    g.add_argument("--budget", type=positive_int, default=256, help="keys selected by topk/quest/infllm")
    g.add_argument("--top-p", type=unit_float, default=0.9, dest="attn_top_p", help="mass kept by topp")
    g.add_argument("--sink", type=nonneg_int, default=4, help="initial tokens always attended")
    g.add_argument("--window", type=nonneg_int, default=64, help="recent tokens always attended")
    g.add_argument("--tail", choices=TAIL_MODES, default=DEFAULT_TAIL,
                   help="what the keys a sparse method leaves out contribute: 'estimate' — the weight of their "
                        "4-bit code estimates, with their block's mean value; 'none' — nothing (exact sparse "
                        f"attention over the selected keys) (default {DEFAULT_TAIL})")
    g.add_argument("--implementation", choices=DIPR_IMPLEMENTATIONS, default="reference",
                   help="kernel implementation for DIPR (pallas: interpret mode on CPU)")
    g.add_argument("--kv-placement", choices=KV_PLACEMENTS, default="device",
                   help="where the exact values (and keys) of the context live: device memory, or pinned host "
                        "memory for contexts larger than the GPU holds (the codes stay on the GPU; outputs are "
                        "the same; with --attention dipr --implementation pallas on a GPU a decode step reads "
                        "only the host rows it needs). The memory estimate printed at start-up splits device and "
                        "host bytes")
    g.add_argument("--dipr-mass", type=unit_float, default=None, metavar="M",
                   help="calibrated DIPR: per (layer, head) the smallest β whose attended keys (DIPR ∪ sink ∪ window) "
                        "hold mass M of the softmax, averaged over the prompt's last --n-cal queries")
    g.add_argument("--dipr-keys", type=unit_float, default=None, metavar="F",
                   help="calibrated DIPR: a budget of a fraction F of the keys (sink and window included, mean over "
                        "heads and layers) shared among heads by water-filling on the prompt's last --n-cal queries "
                        "(each extra key goes where it buys the most softmax mass)")
    g.add_argument("--n-cal", type=positive_int, default=64, help="calibration queries (default 64)")
    g.add_argument("--recalibrate-growth", type=nonneg_float, default=2.0, metavar="X",
                   help="calibrated DIPR while generating: choose the βs again from the latest --n-cal tokens "
                        "each time the context has grown X-fold (default 2; 0: never)")


def add_devices_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=positive_int, default=1, metavar="N",
                   help="shard the KV caches along the sequence over N devices of one host (default 1: unsharded)")


def devices_arg(args) -> int:
    """``--devices``, checked against the devices the backend has (a UsageError naming both)."""
    import jax

    have = jax.devices()
    if args.devices > len(have):
        raise UsageError(f"--devices {args.devices}: the {jax.default_backend()} backend has {len(have)} device(s)")
    kernel_tail = (getattr(args, "tail", "none") != "none" and getattr(args, "implementation", None) == "pallas"
                   and getattr(args, "attention", None) in ("dipr", "auto"))
    if args.devices > 1 and kernel_tail:
        raise UsageError(f"--tail {args.tail} with --implementation pallas over --devices {args.devices}: the "
                         "estimated tail is not supported on a sharded store yet (use --tail none, or one device)")
    return args.devices


def attention_config(args, *, prefill_attention: str = "reference"):
    """The ``AttentionConfig`` of the attention arguments (``add_attention_args``)."""
    from alaya_jax.attention.config import AttentionConfig, CalibrationConfig, KernelConfig

    if args.dipr_mass is not None and args.dipr_keys is not None:
        raise UsageError("give either --dipr-mass or --dipr-keys, not both")
    if (args.dipr_mass is not None or args.dipr_keys is not None) and args.attention not in ("dipr", "auto"):
        raise UsageError(f"--dipr-mass / --dipr-keys calibrate DIPR; use them with --attention dipr "
                         f"(got --attention {args.attention})")
    return AttentionConfig(method=args.attention, beta=args.beta, budget=args.budget, top_p=args.attn_top_p,
                           sink=args.sink, window=args.window, tail=args.tail,
                           kernel=KernelConfig(implementation=args.implementation, prefill_attention=prefill_attention,
                                               kv_placement=args.kv_placement),
                           calibration=CalibrationConfig(dipr_mass=args.dipr_mass, dipr_keys=args.dipr_keys,
                                                         n_cal=args.n_cal,
                                                         recalibrate_growth=args.recalibrate_growth or None))


def progress_bar(enabled: bool, total: int, desc: str):
    """A tqdm bar on a terminal (stderr), else None."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, leave=False)


def add_model_args(p: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """``--model/--gguf``, ``--dtype``, ``--max-context`` and ``--cache-dir``; ``suppress``: given only
    when typed (subcommands)."""
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    p.add_argument("--model", "--gguf", dest="model", default=d(None),
                   help="a GGUF file or a Hugging Face checkpoint directory (default: the bundled SmolLM2-135M-"
                        "Instruct)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default=d("auto"),
                   help="weights and compute dtype (auto: bfloat16 on a GPU/TPU, float32 on the CPU)")
    p.add_argument("--max-context", type=positive_int, default=d(None),
                   help="tokens of context to budget KV memory for (default: the model's context length)")
    p.add_argument("--cache-dir", default=d(None),
                   help="compiled programs and parsed GGUF weights are cached here (default: $ALAYA_CACHE_DIR, else "
                        "$XDG_CACHE_HOME/alaya-jax; 'off': no caching)")


def resolve_dtype(name: str) -> str:
    import jax

    if name == "auto":
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return name


def context_limit(args, config) -> int:
    """The most tokens a request may hold: the model's context, or less with ``--max-context``."""
    return min(getattr(args, "max_context", None) or config.max_position_embeddings, config.max_position_embeddings)


def context_limit_text(args, config) -> str:
    """``"the model's context of N tokens"`` or ``"--max-context N"``, for messages."""
    n = context_limit(args, config)
    return f"the model's context of {n} tokens" if n == config.max_position_embeddings else f"--max-context {n}"


def add_random_weights_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--random-weights", default=None, metavar="PRESET",
                   help="a random-weight model of a preset (tiny, smollm2, llama3-8b) with a byte tokenizer "
                        "instead of --model: for tests and benchmarks")


def load_model(args):
    """``(config, model, tokenizer)`` of ``--model`` (default SmolLM2), after printing the memory estimate
    (weights + KV for ``--max-context`` or the model's context) and refusing a model that will not fit;
    of ``--random-weights PRESET`` where the subcommand has that option and it is given."""
    import jax.numpy as jnp  # noqa: F401  (import jax before models for a clear backend message)

    if getattr(args, "random_weights", None):
        if args.model:
            raise UsageError("give either --model or --random-weights, not both")
        from models.random_model import random_model

        return random_model(args.random_weights, dtype=resolve_dtype(args.dtype),
                            max_context=getattr(args, "max_context", None))

    from alaya_jax.cli.startup import weights_dir
    from alaya_jax.runtime.memory_estimate import check_fits, estimate_memory
    from models import find_smollm2_gguf, load_model_path, load_smollm2, read_config

    dtype = resolve_dtype(args.dtype)
    path = args.model
    if path is not None and not os.path.exists(path):
        raise UsageError(f"model {path!r} does not exist (give a .gguf file or a Hugging Face checkpoint directory)")
    cache = weights_dir(getattr(args, "cache_root", None))
    src = path if path is not None else find_smollm2_gguf()
    gguf_cache = cache if cache is not None and os.path.isfile(src) and str(src).endswith(".gguf") else None
    config = None
    if gguf_cache is not None:
        from models.weight_cache import cached_config

        config = cached_config(src, dtype=dtype, cache_dir=gguf_cache)  # no GGUF parse when cached
    config = config or read_config(src, dtype=dtype)
    estimate = estimate_memory(config, context=context_limit(args, config),
                               placement=getattr(args, "kv_placement", "device"))
    print(f"alaya: {check_fits(estimate)}", file=sys.stderr)
    if path is None:
        return load_smollm2(dtype=dtype, cache_dir=cache)
    if gguf_cache is not None:
        from models.weight_cache import load_gguf_cached

        return load_gguf_cached(path, dtype=dtype, cache_dir=gguf_cache)
    return load_model_path(path, dtype=dtype)
