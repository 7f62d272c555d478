"""A stateful session over the functional store API, for a model that is not ours.

:class:`Session` holds one :class:`~alaya_jax.store.kv_store.KVStore` per layer for one sequence
and the token ids they hold, so that the context can be stored in and reused from a
:class:`~alaya_jax.store.context_db.ContextDB` like the engine's contexts::

    db = ContextDB(path, model_fingerprint=..., tokenizer_fingerprint=..., dtype="float32", block_size=64)
    session, todo = Session.from_db(db, prompt_ids, num_layers=L, num_kv_heads=H, head_dim=D,
                                    capacity=4096, layout="bhtd", attention=AttentionConfig(method="dipr"))
    # the model's forward over the ids still to process, chunk by chunk:
    session.feed(todo)                        # the ids whose keys/values the layers append next
    ...  in layer l:  session.update(l, k, v);  out = session.attention(l, q)
    db.store(session)                         # or session.save(): the context, for the next prompt

``update`` and ``attention`` are :func:`alaya_jax.attention.store_api.append` and
:func:`~alaya_jax.attention.store_api.attend` under ``jax.jit`` (one compilation per shape and
config), with the shapes and layouts documented there; a jitted model uses those functions
directly instead. One sequence (B = 1), as the context DB stores them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alaya_jax.attention import store_api
from alaya_jax.attention.config import AttentionConfig
from alaya_jax.store.kv_store import KVStore

_append = jax.jit(store_api.append, static_argnames=("layout",))
_attend = jax.jit(store_api.attend, static_argnames=("attention", "layout", "layer"))


class Session:
    """One sequence's KV stores (one per layer), grown by :meth:`update`, read by :meth:`attention`.

    ``tokens``: the ids fed so far (:meth:`feed`); after a whole forward pass every layer holds
    exactly their keys and values, which is when the session can be stored
    (``ContextDB.store(session)`` or :meth:`save`). ``reused_tokens`` / ``snapshot_id``: the
    prefix that came from the DB (0 / None: none). ``last_stats[layer]``: the statistics of that
    layer's last :meth:`attention` (see ``store_api.decode_attention``).
    """

    def __init__(self, caches: Sequence[KVStore], tokens: Sequence[int] = (), *,
                 attention: AttentionConfig = store_api.FULL, layout: str = "bthd", db=None,
                 reused_tokens: int = 0, snapshot_id: Optional[str] = None):
        caches = tuple(caches)
        if not caches or not all(isinstance(c, KVStore) for c in caches):
            raise TypeError("a Session needs one KVStore per layer")
        if any(c.batch != 1 for c in caches):
            raise ValueError(f"a Session holds one sequence (batch 1); got batch {caches[0].batch} "
                             f"(use alaya_jax.new_store / append / attend for batches)")
        store_api.check_layout(layout)
        if attention.method == "auto":
            raise ValueError("resolve method 'auto' with AttentionConfig.resolve(context_length) first")
        self._caches = list(caches)
        self._lengths = [int(np.asarray(c.lengths)[0]) for c in caches]
        self._tokens = [int(t) for t in tokens]
        if any(n != len(self._tokens) for n in self._lengths):
            raise ValueError(f"the stores hold {self._lengths} positions, {len(self._tokens)} token ids given")
        self.attention_config = attention
        self.layout = layout
        self.db = db
        self.reused_tokens = int(reused_tokens)
        self.snapshot_id = snapshot_id
        self.last_stats: dict[int, dict] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def new(cls, *, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, block_size: int = 64,
            dtype=jnp.float32, attention: AttentionConfig = store_api.FULL, layout: str = "bthd",
            db=None) -> "Session":
        """An empty session of ``num_layers`` stores (see :func:`alaya_jax.attention.store_api.new_store`)."""
        one = store_api.new_store(batch=1, num_kv_heads=num_kv_heads, head_dim=head_dim, capacity=capacity,
                                  block_size=block_size, dtype=dtype)
        return cls([jax.tree.map(jnp.copy, one) for _ in range(int(num_layers))], attention=attention,
                   layout=layout, db=db)

    @classmethod
    def from_db(cls, db, tokens: Sequence[int], *, num_layers: int, num_kv_heads: int, head_dim: int,
                capacity: int, attention: AttentionConfig = store_api.FULL, layout: str = "bthd",
                strict: bool = False) -> tuple["Session", list[int]]:
        """A session for the prompt ``tokens`` that starts from the longest stored prefix in ``db``
        (a :class:`~alaya_jax.store.context_db.ContextDB` opened with this model's fingerprints,
        dtype and block size): ``(session, ids still to feed)`` — at least one id is left, so that
        the model gets logits. The stores hold ``capacity`` positions."""
        record, todo = db.create_session(tokens, capacity=capacity, strict=strict)
        if record.caches is None:
            session = cls.new(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, capacity=capacity,
                              block_size=db.block_size, dtype=jnp.dtype(db.dtype), attention=attention,
                              layout=layout, db=db)
            return session, todo
        c = record.caches[0]
        if (len(record.caches), c.num_kv_heads, c.head_dim) != (num_layers, num_kv_heads, head_dim):
            raise ValueError(f"snapshot {record.snapshot_id} holds {len(record.caches)} layers of {c.num_kv_heads} KV "
                             f"heads of {c.head_dim}, not {num_layers} x {num_kv_heads} x {head_dim}")
        return cls(record.caches, record.tokens, attention=attention, layout=layout, db=db,
                   reused_tokens=record.reused_tokens, snapshot_id=record.snapshot_id), todo

    # ------------------------------------------------------------------ state
    @property
    def tokens(self) -> list[int]:
        """The token ids fed so far (a copy)."""
        return list(self._tokens)

    @property
    def caches(self) -> tuple[KVStore, ...]:
        """The stores, one per layer (what ``ContextDB.store`` saves)."""
        return tuple(self._caches)

    @property
    def num_layers(self) -> int:
        return len(self._caches)

    @property
    def capacity(self) -> int:
        return self._caches[0].capacity

    def layer_length(self, layer: int) -> int:
        """Positions layer ``layer``'s store holds."""
        return self._lengths[self._layer(layer)]

    def _layer(self, layer: int) -> int:
        if not isinstance(layer, (int, np.integer)) or not 0 <= int(layer) < len(self._caches):
            raise ValueError(f"layer must be an int in [0, {len(self._caches)}), got {layer!r}")
        return int(layer)

    # ------------------------------------------------------------------ the model's calls
    def feed(self, tokens: Sequence[int]) -> None:
        """Declare the ids of the next positions; every layer's :meth:`update` then appends their
        keys and values (in one or several chunks)."""
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError(f"feed takes a flat sequence of token ids, got shape {ids.shape}")
        if len(self._tokens) + len(ids) > self.capacity:
            raise ValueError(f"{len(self._tokens)} + {len(ids)} tokens exceed the session's capacity {self.capacity}")
        self._tokens.extend(ids.tolist())

    def update(self, layer: int, k: jax.Array, v: jax.Array) -> None:
        """Append the keys and values of the next T fed tokens to layer ``layer``: k, v
        [1, T, Hkv, D] ("bthd") or [1, Hkv, T, D] ("bhtd", the session's ``layout``)."""
        i = self._layer(layer)
        t = store_api.num_tokens(k, self.layout, "k")
        if self._lengths[i] + t > len(self._tokens):
            raise ValueError(f"layer {i}: {t} new positions after {self._lengths[i]} would pass the "
                             f"{len(self._tokens)} token ids fed (call feed(ids) first)")
        self._caches[i] = _append(self._caches[i], k, v, layout=self.layout)
        self._lengths[i] += t

    def attention(self, layer: int, q: jax.Array, *, positions=None) -> jax.Array:
        """Attention of layer ``layer``'s last T positions (q [1, T, Hq, D] or [1, Hq, T, D]) over its
        store, after their :meth:`update`; ``positions``: a filter (``store_api.filter_mask``).
        Returns the output in q's layout; the statistics go to ``last_stats[layer]``."""
        i = self._layer(layer)
        cfg = self.attention_config
        if positions is not None:
            positions = jnp.asarray(positions)
        out, stats = _attend(q, self._caches[i], attention=cfg, layout=self.layout,
                             layer=i if i in cfg.dense_layers else None, positions=positions)
        self.last_stats[i] = stats
        return out

    # ------------------------------------------------------------------ the context DB
    def save(self, *, name: Optional[str] = None) -> str:
        """Store the context in the session's DB (``ContextDB.store``): its id."""
        if self.db is None:
            raise ValueError("this session has no ContextDB: pass db= when creating it, or call db.store(session)")
        self.check_complete()
        return self.db.store(self, name=name)

    def check_complete(self) -> None:
        """Raise ``ValueError`` unless every layer holds exactly the fed tokens."""
        behind = [i for i, n in enumerate(self._lengths) if n != len(self._tokens)]
        if behind:
            raise ValueError(f"layers {behind} hold {[self._lengths[i] for i in behind]} positions, "
                             f"{len(self._tokens)} tokens were fed")


__all__ = ["Session"]
