"""The tensors a Llama/Qwen2 checkpoint must hold, checked strictly, and placed one by one on the device.

Both loaders (GGUF, Hugging Face safetensors) describe a checkpoint by its tensor names and shapes
before reading any data, check them against :func:`expected_tensors` (every problem named), and then
fill an abstract :class:`~models.llama.Llama` tensor by tensor with :func:`fill_model`, so that the
host never holds more than one tensor at a time.

Names here are Hugging Face's (``model.layers.3.self_attn.q_proj.weight``); matrices are in the
checkpoints' ``[out, in]`` layout (``nnx.Linear`` kernels are ``[in, out]``: transposed on the device).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alaya_jax.errors import UnsupportedModelError
from models.config import LlamaConfig
from models.llama import Llama

Shape = tuple[int, ...]


def expected_tensors(c: LlamaConfig) -> dict[str, tuple[Shape, str]]:
    """``{hf_name: (checkpoint shape, our parameter path)}`` for config ``c``; kernels end in ``.kernel``."""
    hq, hkv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    out = {"model.embed_tokens.weight": ((c.vocab_size, c.hidden_size), "embed.embedding"),
           "model.norm.weight": ((c.hidden_size,), "norm.weight")}
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = ((c.vocab_size, c.hidden_size), "lm_head.kernel")
    for i in range(c.num_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        out.update({
            p + "input_layernorm.weight": ((c.hidden_size,), q + "attn_norm.weight"),
            p + "post_attention_layernorm.weight": ((c.hidden_size,), q + "mlp_norm.weight"),
            p + "self_attn.q_proj.weight": ((hq, c.hidden_size), q + "q_proj.kernel"),
            p + "self_attn.k_proj.weight": ((hkv, c.hidden_size), q + "k_proj.kernel"),
            p + "self_attn.v_proj.weight": ((hkv, c.hidden_size), q + "v_proj.kernel"),
            p + "self_attn.o_proj.weight": ((c.hidden_size, hq), q + "o_proj.kernel"),
            p + "mlp.gate_proj.weight": ((c.intermediate_size, c.hidden_size), q + "gate_proj.kernel"),
            p + "mlp.up_proj.weight": ((c.intermediate_size, c.hidden_size), q + "up_proj.kernel"),
            p + "mlp.down_proj.weight": ((c.hidden_size, c.intermediate_size), q + "down_proj.kernel"),
        })
        if c.attention_bias:
            out.update({p + "self_attn.q_proj.bias": ((hq,), q + "q_proj.bias"),
                        p + "self_attn.k_proj.bias": ((hkv,), q + "k_proj.bias"),
                        p + "self_attn.v_proj.bias": ((hkv,), q + "v_proj.bias")})
    return out


def tensor_problems(expected: dict[str, Shape], present: dict[str, Shape], *, what: str,
                    rename: Callable[[str], str] = lambda n: n) -> list[str]:
    """Every missing, unknown and wrong-shaped tensor, one sentence each (empty: all good).

    ``expected`` and ``present`` map names (as the file spells them) to shapes; ``rename`` maps
    expected names to the file's spelling (e.g. GGUF's ``blk.0.attn_q.weight``)."""
    want = {rename(k): tuple(v) for k, v in expected.items()}
    problems = [f"{what} is missing tensor {n!r}" for n in want if n not in present]
    problems += [f"{what} has unknown tensor {n!r}" for n in sorted(present) if n not in want]
    problems += [f"{what} tensor {n!r} has shape {tuple(present[n])}, expected {s}"
                 for n, s in want.items() if n in present and tuple(present[n]) != s]
    return problems


def raise_problems(problems: list[str]) -> None:
    """``ValueError`` with the first problems (all of them counted)."""
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UnsupportedModelError("; ".join(problems[:3]) + more)


def _param(model, path: str):
    obj = model
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


@jax.jit
def _transpose(w):
    return w.T


_SKELETON_FORMAT = 1


def _skeleton_key(config: LlamaConfig) -> str:
    """What an abstract model depends on: the config, flax and jax, and the model's source."""
    import hashlib
    import pathlib

    import flax

    h = hashlib.sha256(f"alaya-skeleton-v{_SKELETON_FORMAT}|{config!r}|{flax.__version__}|{jax.__version__}".encode())
    for mod in ("llama.py", "config.py", "rope.py"):
        h.update((pathlib.Path(__file__).parent / mod).read_bytes())
    return h.hexdigest()[:24]


def abstract_model(config: LlamaConfig, *, cache_dir=None) -> Llama:
    """A :class:`Llama` of ``config`` whose parameters are ``jax.ShapeDtypeStruct`` (nothing allocated).

    Building it traces every parameter's random initialiser (~0.7-2 s for SmolLM2 on a CPU); with
    ``cache_dir`` its graph definition and abstract state are pickled there once (keyed by the
    config, the flax and jax versions and the model's source files; written atomically) and
    later processes unpickle them in a few milliseconds. An unreadable entry is rebuilt."""
    import os
    import pickle
    import tempfile

    path = None if cache_dir is None else os.path.join(os.fspath(cache_dir), f"skeleton-{_skeleton_key(config)}.pkl")
    if path is not None and os.path.isfile(path):
        try:
            with open(path, "rb") as f:
                graphdef, state = pickle.load(f)
            return nnx.merge(graphdef, state)
        except Exception:  # a stale or broken entry (e.g. written by another flax): rebuild it below
            pass
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    if path is not None:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pkl", dir=os.path.dirname(path))
            with os.fdopen(fd, "wb") as f:
                pickle.dump(nnx.split(model), f)
            os.replace(tmp, path)
        except OSError:
            pass  # the cache is an optimisation only
    return model


def fill_model(config: LlamaConfig, read: Callable[[str], np.ndarray | jax.Array], *, device=None,
               kernels_transposed: bool = False, cache_dir=None) -> Llama:
    """A :class:`Llama` whose every parameter comes from ``read(hf_name)`` (checkpoint layout, any float dtype;
    ``kernels_transposed``: matrices already in the model's ``[in, out]`` layout, as the weight cache keeps them).

    Each tensor goes to ``device`` (default: the first device) on its own, is cast to ``config.dtype``
    and transposed there; the host keeps no copy. Call only after the names and shapes were checked.
    ``cache_dir``: where :func:`abstract_model` keeps the model's skeleton.
    """
    device = device or jax.devices()[0]
    dt = jnp.dtype(config.dtype)
    model = abstract_model(config, cache_dir=cache_dir)
    for name, (shape, path) in expected_tensors(config).items():
        w = read(name)
        kernel = path.endswith(".kernel")
        want = shape[::-1] if kernel and kernels_transposed else shape
        if tuple(w.shape) != want:  # the caller checked the header; the data must agree with it
            raise UnsupportedModelError(f"tensor {name!r} reads as shape {tuple(w.shape)}, expected {want}")
        w = jax.device_put(w, device).astype(dt)
        if kernel and not kernels_transposed:
            w = _transpose(w)
        param = _param(model, path)
        if hasattr(param, "set_value"):  # flax >= 0.12
            param.set_value(w)
        else:
            param.value = w
    unset = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
             if not isinstance(v, jax.Array)]
    if unset:  # a parameter of our model that no tensor filled: a bug in expected_tensors, never ignore it
        raise AssertionError(f"parameters left unset: {unset[:5]}")
    return model


def parameter_count(config: LlamaConfig) -> int:
    """Parameters of the model built from ``config`` (tied heads counted once)."""
    return sum(int(np.prod(s)) for s, _ in expected_tensors(config).values())
