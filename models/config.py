"""Model configuration: frozen dataclasses and presets."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Optional

from alaya_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama-3 style scaling of RoPE inverse frequencies."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if not self.factor > 0:
            raise ConfigError(f"RopeScaling.factor must be > 0, got {self.factor}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ConfigError(f"RopeScaling needs 0 < low_freq_factor < high_freq_factor, got "
                             f"{self.low_freq_factor} and {self.high_freq_factor}")
        if self.original_max_position_embeddings < 1:
            raise ConfigError(f"RopeScaling.original_max_position_embeddings must be >= 1, "
                             f"got {self.original_max_position_embeddings}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Llama architecture. ``dtype`` is both the parameter and the compute dtype (logits are always f32)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    rope_scaling: Optional[RopeScaling] = None
    dtype: str = "float32"
    attention_bias: bool = False  # biases on the q/k/v projections (Qwen2); o_proj and the MLP never have one

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ConfigError(f"LlamaConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"rope_scaling must be a RopeScaling or None, got {type(self.rope_scaling).__name__}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")

    def fingerprint(self) -> str:
        """Stable sha256 hex of every architecture field (``dtype`` excluded: snapshots check it separately)."""
        d = dataclasses.asdict(self)
        d.pop("dtype")
        if not d["attention_bias"]:  # added later: bias-free configs keep the fingerprint they always had
            d.pop("attention_bias")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def smollm2_135m(dtype: str = "float32") -> LlamaConfig:
    """SmolLM2-135M(-Instruct): 30 layers, hidden 576, GQA 9/3, head_dim 64, tied embeddings."""
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                       num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=8192, tie_word_embeddings=True, dtype=dtype)


def llama3_8b(dtype: str = "bfloat16", *, num_layers: int = 32, max_position_embeddings: int = 131072) -> LlamaConfig:
    """Llama-3(.1)-8B shapes (GQA 32/8, head_dim 128, Llama-3 RoPE scaling); for random-weight timing."""
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=num_layers,
                       num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
                       rope_scaling=RopeScaling(), dtype=dtype)


def tiny(dtype: str = "float32") -> LlamaConfig:
    """A 2-layer GQA 4/2 model with vocab 97 for fast tests."""
    return LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=512,
                       tie_word_embeddings=True, dtype=dtype)
