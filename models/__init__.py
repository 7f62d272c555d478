"""Flax nnx Llama (and Qwen2), configs, strict GGUF and Hugging Face loading and the tokenizer."""
from models.config import LlamaConfig, RopeScaling, llama3_8b, smollm2_135m, tiny
from models.gguf_loader import find_smollm2_gguf, load_gguf, load_smollm2, permute_qk, unpermute_qk
from models.hf_loader import load_hf
from models.llama import Llama
from models.model_path import describe_model_path, load_model_path, read_config
from models.rope import apply_rope, inv_frequencies
from models.tokenizer import Tokenizer

__all__ = ["LlamaConfig", "RopeScaling", "llama3_8b", "smollm2_135m", "tiny", "find_smollm2_gguf", "load_gguf",
           "load_smollm2", "permute_qk", "unpermute_qk", "load_hf", "Llama", "describe_model_path",
           "load_model_path", "read_config", "apply_rope", "inv_frequencies", "Tokenizer"]
