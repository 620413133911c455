"""Hugging Face checkpoints: local directories of config.json + safetensors.

    model = dj.hf.load("path/to/llama")            # any model_type in config.MODEL_TYPES
    dj.hf.save(model, "out/")                      # transformers loads it to the same logits
    tok = dj.hf.load_tokenizer("path/to/llama")    # tokenizers.Tokenizer from tokenizer.json

Model types: llama (2, 3.x), mistral, qwen2, qwen3, gemma2, gemma3_text, olmo2, phi3, gpt2,
bert (and sentence-transformers directories). Nothing is downloaded. Unsupported config
options and unknown tensors raise HFError.
"""

from .config import HFError, from_hf as config_from_hf, to_hf as config_to_hf
from .exporting import save
from .importing import load
from .pooling import mean_pool, pool, sentence_pooling
from .tokenizer import load_tokenizer

__all__ = [
    "HFError",
    "config_from_hf",
    "config_to_hf",
    "load",
    "load_tokenizer",
    "mean_pool",
    "pool",
    "save",
    "sentence_pooling",
]
