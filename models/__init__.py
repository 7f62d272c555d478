"""Flax nnx Llama, configs, strict GGUF loading and the tokenizer."""
from models.config import LlamaConfig, RopeScaling, llama3_8b, smollm2_135m, tiny
from models.gguf_loader import find_smollm2_gguf, load_gguf, load_smollm2, permute_qk, unpermute_qk
from models.llama import Llama
from models.rope import apply_rope, inv_frequencies
from models.tokenizer import Tokenizer

__all__ = ["LlamaConfig", "RopeScaling", "llama3_8b", "smollm2_135m", "tiny", "find_smollm2_gguf", "load_gguf",
           "load_smollm2", "permute_qk", "unpermute_qk", "Llama", "apply_rope", "inv_frequencies", "Tokenizer"]
