"""Files on disk.

model_dir    `ModelDir`: a model directory (native or Hugging Face) read once -- its model,
             tokenizer and the files that travel with it -- what every command takes
checkpoint   native checkpoints: `dj.save` / `dj.load`, CheckpointError
atomic       writes swapped into place whole (a reader sees the old or the new, never half)
integrity    sealed manifests and SHA-256 digests of a directory's files
tokenizer    byte and tokenizer.json tokenizers, `tokenizer_for` a model directory
textfiles    user text: .txt and .jsonl documents (light to import)
corpus       the embedded corpus (Python standard library sources) and its windows
"""

from .model_dir import ModelDir

__all__ = ["ModelDir"]
