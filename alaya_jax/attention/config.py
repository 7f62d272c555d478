"""How decode steps attend: three frozen configs, split by who sets each field.

- :class:`AttentionConfig` — the user's choice: the method and its range (β, budget,
  top-p, sink, window, dense layers, ``auto``'s threshold). It holds the other two.
- :class:`KernelConfig` — how the kernels run, set by whoever deploys: the DIPR kernels'
  backend and splits, and the dense (prefill) attention's backend.
- :class:`CalibrationConfig` — self-calibrated DIPR: a mass target or a key budget from
  which a β per (layer, query head) is chosen at the end of prefill, and when to choose
  again while generating (:mod:`alaya_jax.attention.dipr.calibration`).

Each checks its own fields when built; :class:`AttentionConfig` checks only what
crosses them (calibration needs method ``dipr``). The names a user picks come from
registries, never from tuples written out here: methods from
:mod:`alaya_jax.attention.registry`, DIPR backends from the kernels' ``IMPLEMENTATIONS``
(:data:`DIPR_IMPLEMENTATIONS`), dense backends from :mod:`alaya_jax.attention.dense`.
See docs/design.md §4.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from alaya_jax.attention import registry, tail
from alaya_jax.attention.dense import DENSE_IMPLEMENTATIONS
from alaya_jax.errors import ConfigError
from alaya_jax.store.placement import DEFAULT_PLACEMENT, PLACEMENTS, check_placement
from pallas_kernels.code_scan.api import IMPLEMENTATIONS as SCAN_IMPLEMENTATIONS
from pallas_kernels.refine_attention.api import IMPLEMENTATIONS as REFINE_IMPLEMENTATIONS

#: The registered methods a user picks by name, plus "auto" (resolved per context length).
METHODS = registry.names() + ("auto",)
#: Backends of the DIPR pipeline: those that both of its kernels (scan, refine) have.
DIPR_IMPLEMENTATIONS = tuple(n for n in SCAN_IMPLEMENTATIONS if n in REFINE_IMPLEMENTATIONS)
#: Backends of dense attention (prefill chunks and method ``full``).
PREFILL_ATTENTIONS = tuple(DENSE_IMPLEMENTATIONS)
#: Where a KV store's exact values and keys may live (``KernelConfig.kv_placement``).
KV_PLACEMENTS = PLACEMENTS


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelConfig:
    """How the kernels run (not what they compute).

    ``implementation``: the DIPR kernels' backend (:data:`DIPR_IMPLEMENTATIONS`).
    ``num_splits``: splits of each sequence in the code scan (None: enough to fill the GPU).
    (A split's candidate list holds every key it covers, so there is no capacity to set.)
    ``prefill_attention``: how dense attention runs — chunks of T > 1 rows, and decode steps
    of method ``full`` (:data:`PREFILL_ATTENTIONS`). "reference": our jnp code (materialises
    f32 scores over the whole capacity); "xla" / "cudnn": ``jax.nn.dot_product_attention``
    with that implementation (cudnn: fused flash attention on NVIDIA GPUs; it still visits
    every key up to the capacity, masked).
    ``kv_placement``: where new KV stores keep their exact values and keys (:data:`KV_PLACEMENTS`,
    :mod:`alaya_jax.store.placement`): "device", "values-on-host" or "keys-and-values-on-host"
    (pinned host memory; codes, scales, sink and window bookkeeping stay on the device). Outputs
    are identical in every placement; a DIPR step with the Pallas kernels on a GPU reads only the
    host rows it needs, dense attention moves the host fields to the device whole.
    """

    implementation: str = "reference"
    num_splits: Optional[int] = None
    prefill_attention: str = "reference"
    kv_placement: str = DEFAULT_PLACEMENT

    def __post_init__(self):
        if self.implementation not in DIPR_IMPLEMENTATIONS:
            raise ConfigError(f"unknown implementation {self.implementation!r}; choose one of {DIPR_IMPLEMENTATIONS}")
        if self.num_splits is not None and self.num_splits < 1:
            raise ConfigError(f"num_splits must be >= 1 or None, got {self.num_splits}")
        if self.prefill_attention not in PREFILL_ATTENTIONS:
            raise ConfigError(f"unknown prefill_attention {self.prefill_attention!r}; choose one of "
                              f"{PREFILL_ATTENTIONS}")
        check_placement(self.kv_placement)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    """Self-calibrated DIPR (with method "dipr"), from the prompt's last ``n_cal`` queries.

    ``dipr_mass`` M — per (layer, head) the smallest β whose attended keys (DIPR ∪ sink ∪
    window) hold mass M of the softmax (mean over the queries); ``dipr_keys`` F — a total
    budget of a fraction F of the keys (sink and window included, mean over heads and
    layers) water-filled over (layer, head) on the absolute softmax mass. At most one of
    them; neither: not calibrated (one β for every head). The βs are a [layers, Hq] array
    (``KVStore.dipr_beta``); the allocation is ``calibration.DEFAULT_ALLOCATION``.

    ``recalibrate_growth``: while generating, choose the βs again from the most recent
    ``n_cal`` tokens each time the context has grown by this factor since the last
    calibration (None: never). Measured (bench/results/recalibration/recalibration.md):
    without it a budget of 8% of the keys fell to 4.1% once the context had doubled, and
    KL to full attention was 2.6x higher.
    """

    dipr_mass: Optional[float] = None
    dipr_keys: Optional[float] = None
    n_cal: int = 64
    recalibrate_growth: Optional[float] = 2.0

    def __post_init__(self):
        for name in ("dipr_mass", "dipr_keys"):
            val = getattr(self, name)
            if val is not None and not (0.0 < val <= 1.0):
                raise ConfigError(f"{name} must be in (0, 1], got {val}")
        if self.dipr_mass is not None and self.dipr_keys is not None:
            raise ConfigError("give either dipr_mass (mass target) or dipr_keys (key budget), not both")
        if self.n_cal < 1:
            raise ConfigError(f"n_cal must be >= 1, got {self.n_cal}")
        if self.recalibrate_growth is not None and not self.recalibrate_growth > 1.0:
            raise ConfigError(f"recalibrate_growth must be > 1 (or None), got {self.recalibrate_growth}")

    @property
    def active(self) -> bool:
        """True when a target is set (dipr_mass or dipr_keys): β per (layer, head) is calibrated."""
        return self.dipr_mass is not None or self.dipr_keys is not None


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """How decode steps attend. Sink and window are added to every sparse method alike.

    ``beta``: DIPR's range in raw q·k units. ``budget``: keys selected by ``topk``;
    ``quest``/``infllm`` select ``ceil(budget / block_size)`` blocks. ``top_p``: mass kept
    by ``topp``. ``dense_layers``: layers that always run full attention. ``auto``: full
    attention while the context is shorter than ``auto_min_context``, else DIPR with
    ``auto_dense_layers`` dense (see the README's speed table for where the filter–refine
    DIPR path beats dense attention on real-key-proxy data). ``tail``: what the keys a sparse
    method does not select contribute (:mod:`alaya_jax.attention.tail`): "estimate" — the weight of
    their code estimates, with their block's mean value; "none" — nothing (exact sparse attention
    over the selected keys, renormalised); the modes of ``tail.STUDY_MODES`` are for measurements
    only. Method ``full`` has no tail. ``collect_stats``: decode steps also return per-layer
    statistics (keys attended, recall; for evaluation).
    ``kernel``: how the kernels run; ``calibration``: self-calibrated DIPR.
    """

    method: str = "full"
    beta: float = 32.0
    budget: int = 256
    top_p: float = 0.9
    sink: int = 4
    window: int = 64
    dense_layers: tuple[int, ...] = ()
    # the shortest measured context where DIPR's whole step beats cuDNN's on the H200 (1.13x at 128K,
    # 0.94x at 32K: bench/results/decode_step_real/decode_step_real_16tok.md)
    auto_min_context: int = 131072
    auto_dense_layers: tuple[int, ...] = ()
    tail: str = tail.DEFAULT_TAIL
    collect_stats: bool = False
    kernel: KernelConfig = KernelConfig()
    calibration: CalibrationConfig = CalibrationConfig()

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown attention method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not (self.beta >= 0):
            raise ConfigError(f"beta must be >= 0 (inf allowed), got {self.beta}")
        if self.budget < 1:
            raise ConfigError(f"budget must be >= 1, got {self.budget}")
        if not (0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.sink < 0 or self.window < 0:
            raise ConfigError(f"sink and window must be >= 0, got sink={self.sink}, window={self.window}")
        if not isinstance(self.kernel, KernelConfig) or not isinstance(self.calibration, CalibrationConfig):
            raise TypeError("kernel must be a KernelConfig and calibration a CalibrationConfig")
        if self.tail not in tail.TAIL_MODES + tail.STUDY_MODES:
            raise ConfigError(f"unknown tail {self.tail!r}; choose one of {', '.join(tail.TAIL_MODES)}")
        if (self.tail not in tail.TAIL_MODES and self.method in ("dipr", "auto")
                and self.kernel.implementation != "reference"):
            raise ConfigError(f"the study tail {self.tail!r} runs with DIPR implementation 'reference' only, not "
                              f"{self.kernel.implementation!r}: the kernels take tail 'estimate' or 'none'")
        if self.calibrated and self.method not in ("dipr", "auto"):
            raise ConfigError(f"dipr_mass / dipr_keys calibrate DIPR; they cannot be used with method "
                              f"{self.method!r} (use method 'dipr')")

    @property
    def calibrated(self) -> bool:
        """True when DIPR's β per (layer, head) is chosen by calibration (dipr_mass or dipr_keys)."""
        return self.calibration.active

    @property
    def effective_tail(self) -> str:
        """The tail mode decode steps run: ``tail``, or "none" for method ``full`` (no key is left out)."""
        if self.method == "auto":
            raise ValueError("resolve 'auto' with AttentionConfig.resolve(context_length) first")
        return "none" if self.method == "full" else self.tail

    @property
    def registry_name(self) -> str:
        """The name of this config's entry in :mod:`alaya_jax.attention.registry`."""
        if self.method == "auto":
            raise ValueError("resolve 'auto' with AttentionConfig.resolve(context_length) first")
        return "dipr_calibrated" if self.method == "dipr" and self.calibrated else self.method

    def resolve(self, context_length: int) -> "AttentionConfig":
        """Replace ``auto`` by the concrete method for a context of this many tokens."""
        if self.method != "auto":
            return self
        if context_length < self.auto_min_context:
            return dataclasses.replace(self, method="full", calibration=dataclasses.replace(
                self.calibration, dipr_mass=None, dipr_keys=None))
        return dataclasses.replace(self, method="dipr", dense_layers=tuple(self.auto_dense_layers))


__all__ = ["AttentionConfig", "CalibrationConfig", "KernelConfig", "DIPR_IMPLEMENTATIONS", "KV_PLACEMENTS", "METHODS",
           "PREFILL_ATTENTIONS"]
