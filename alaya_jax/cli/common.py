"""What every ``alaya`` subcommand shares: the usage error, argument types, reading a
text file, the attention arguments and loading the model."""

from __future__ import annotations

import argparse
import os
import sys

from alaya_jax.methods import METHODS


class UsageError(ValueError):
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
    g.add_argument("--implementation", choices=("reference", "pallas"), default="reference",
                   help="kernel implementation for DIPR (pallas: interpret mode on CPU)")
    g.add_argument("--dipr-mass", type=unit_float, default=None, metavar="M",
                   help="calibrated DIPR: per (layer, head) the smallest β whose attended keys (DIPR ∪ sink ∪ window) "
                        "hold mass M of the softmax, averaged over the prompt's last --n-cal queries")
    g.add_argument("--dipr-keys", type=unit_float, default=None, metavar="F",
                   help="calibrated DIPR: a budget of a fraction F of the keys (sink and window included, mean over "
                        "heads and layers) shared among heads by water-filling on the prompt's last --n-cal queries "
                        "(each extra key goes where it buys the most softmax mass)")
    g.add_argument("--n-cal", type=positive_int, default=64, help="calibration queries (default 64)")


def attention_config(args, **extra):
    from alaya_jax.methods import AttentionConfig

    if args.dipr_mass is not None and args.dipr_keys is not None:
        raise UsageError("give either --dipr-mass or --dipr-keys, not both")
    if (args.dipr_mass is not None or args.dipr_keys is not None) and args.attention not in ("dipr", "auto"):
        raise UsageError(f"--dipr-mass / --dipr-keys calibrate DIPR; use them with --attention dipr "
                         f"(got --attention {args.attention})")
    return AttentionConfig(method=args.attention, beta=args.beta, budget=args.budget, top_p=args.attn_top_p,
                           sink=args.sink, window=args.window, implementation=args.implementation,
                           dipr_mass=args.dipr_mass, dipr_keys=args.dipr_keys, n_cal=args.n_cal, **extra)


def progress_bar(enabled: bool, total: int, desc: str):
    """A tqdm bar on a terminal (stderr), else None."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, leave=False)


def load_model(args):
    import jax.numpy as jnp  # noqa: F401  (import jax before models for a clear backend message)

    from models import load_gguf, load_smollm2

    if args.gguf:
        if not os.path.isfile(args.gguf):
            raise UsageError(f"GGUF file {args.gguf!r} does not exist")
        return load_gguf(args.gguf, dtype=args.dtype)
    return load_smollm2(dtype=args.dtype)
