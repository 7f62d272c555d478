"""alaya-jax: long-context LLM inference with an exact DIPR KV store (docs/design.md).

The public API, importable from here (each name is loaded on first use, so importing
``alaya_jax`` stays cheap)::

    from alaya_jax import Engine, AttentionConfig, SamplingConfig, load_smollm2

    config, model, tok = load_smollm2()
    engine = Engine(model)
    [res], caches = engine.generate([tok.encode("Hi")], attention=AttentionConfig(method="dipr"))

Any other JAX model keeps its KV cache in alaya stores through the functional store API
(``alaya_jax.attention.store_api``; jit-compatible, no hidden state)::

    store = alaya_jax.new_store(batch=B, num_kv_heads=Hkv, head_dim=D, capacity=S)   # per layer
    store = alaya_jax.append(store, k, v, layout="bhtd")                        # k, v [B, Hkv, T, D]
    out, stats = alaya_jax.attend(q, store, attention=AttentionConfig(method="dipr"), layout="bhtd")

or a stateful ``Session`` (``update(layer, k, v)``, ``attention(layer, q)``) stored in and
reused from a ``ContextDB``.

- running a model: ``Engine``, ``GenerationResult``, ``SamplingConfig``; loading one:
  ``load_model`` (a GGUF file or a Hugging Face directory), ``load_smollm2``;
- attention: ``AttentionConfig`` (method and range), ``KernelConfig``, ``CalibrationConfig``;
- the KV store: ``KVStore``, ``empty_store``, ``store_from_dense``; the functional store API for any
  model: ``new_store``, ``append``, ``attend`` (filters: ``positions=``), and ``Session``;
- stored contexts: ``ContextDB``, ``open_db`` (the DB of a loaded model);
- errors: ``UserError`` (what the user gave is wrong; the CLI prints it, exit 2).

Subpackages, in dependency order (each imports only those before it; docs/design.md §1):
``errors`` → ``store`` → ``attention`` → ``runtime`` → ``server``, ``cli``.
"""

from __future__ import annotations

import importlib

# public name -> (module, attribute)
_EXPORTS = {
    "Engine": ("alaya_jax.runtime.engine", "Engine"),
    "GenerationResult": ("alaya_jax.runtime.engine", "GenerationResult"),
    "SamplingConfig": ("alaya_jax.runtime.sampling", "SamplingConfig"),
    "AttentionConfig": ("alaya_jax.attention.config", "AttentionConfig"),
    "KernelConfig": ("alaya_jax.attention.config", "KernelConfig"),
    "CalibrationConfig": ("alaya_jax.attention.config", "CalibrationConfig"),
    "KVStore": ("alaya_jax.store.kv_store", "KVStore"),
    "empty_store": ("alaya_jax.store.kv_store", "empty"),
    "store_from_dense": ("alaya_jax.store.kv_store", "from_dense"),
    "new_store": ("alaya_jax.attention.store_api", "new_store"),
    "append": ("alaya_jax.attention.store_api", "append"),
    "attend": ("alaya_jax.attention.store_api", "attend"),
    "Session": ("alaya_jax.runtime.session", "Session"),
    "ContextDB": ("alaya_jax.store.context_db", "ContextDB"),
    "open_db": ("alaya_jax.store.db_for_model", "open_db"),
    "load_model": ("models", "load_model_path"),
    "load_smollm2": ("models", "load_smollm2"),
    "UserError": ("alaya_jax.errors", "UserError"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'alaya_jax' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
