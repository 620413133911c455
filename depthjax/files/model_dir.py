"""`ModelDir`: a model directory (native checkpoint or local Hugging Face one) read once.

    md = ModelDir.read("path/to/model")      # config and weights read here, once
    md.model, md.tokenizer, md.files         # the DepthModel, its tokenizer, files to carry
    dj.save(pruned, out, files=md.files)     # the tokenizer travels with the new weights

Every command that takes a model directory reads it through this, so a folder is read once
per command and its extra files are carried over without listing the folder again.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

from ..core.model import DepthModel
from . import checkpoint
from .checkpoint import CheckpointError
from .tokenizer import tokenizer_for

KINDS = ("depthjax", "hf")


def kind_of(path) -> str:
    """The kind of a model directory: "depthjax" for a native checkpoint (manifest.json),
    "hf" for a Hugging Face one (config.json, or a sentence-transformers modules.json);
    CheckpointError for anything else."""
    p = Path(path)
    if (p / "manifest.json").is_file():
        return "depthjax"
    if (p / "config.json").is_file() or (p / "modules.json").is_file():
        return "hf"
    raise CheckpointError(
        f"{p} is neither a depthjax checkpoint (no manifest.json) nor a "
        "Hugging Face directory (no config.json)"
    )


@dataclasses.dataclass(frozen=True, eq=False)
class ModelDir:
    """A model directory, read once by `ModelDir.read`.

    path: the directory given; kind: "depthjax" (dj.save) or "hf"; model: its DepthModel;
    files: the tokenizer and generation files beside the weights (paths), to pass on as
    `save(..., files=)`; hf_config: a Hugging Face directory's config.json (None for a
    native checkpoint); tokenizer_spec: a tokenizer that overrides the directory's ('byte'
    or a tokenizer.json). `tokenizer` and `pooling` are read on first use, once, so a
    directory without a tokenizer still converts.
    """

    path: Path
    kind: str
    model: DepthModel
    files: tuple[str, ...] = ()
    hf_config: dict[str, Any] | None = None
    tokenizer_spec: str | None = None

    @classmethod
    def read(cls, path, *, kind: str | None = None, tokenizer: str | None = None, **options):
        """Read `path` once. kind: "depthjax" or "hf" to require one (None: whichever it
        is); tokenizer: overrides the directory's; options go to the loader (`dj.load`'s
        verify, mesh; `dj.hf.load`'s ignore_keys, progress, mesh, shardings, dtype, ...). Raises
        CheckpointError / HFError for folders that are not models."""
        from ..hf.tokenizer import tokenizer_files

        p = Path(path)
        kind = kind or kind_of(p)
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
        hf_config = None
        if kind == "depthjax":
            weights, model = p, checkpoint.load(p, **options)
            if not isinstance(model, DepthModel):
                raise CheckpointError(
                    f"{p} holds a stitched model (dj.depth.stitch: two models joined by a "
                    "map); this needs a single model. Load it in Python with dj.load"
                )
        else:
            from ..hf.importing import load, model_directory, read_config

            weights = Path(model_directory(str(p)))  # a sentence-transformers Transformer
            hf_config = read_config(str(weights))
            model = load(str(weights), config=hf_config, **options)
        return cls(p, kind, model, tuple(tokenizer_files(weights)), hf_config, tokenizer)

    @functools.cached_property
    def tokenizer(self):
        """`tokenizer_spec`, else the tokenizer.json among `files`, else bytes for a
        256-token vocabulary (TokenizerError otherwise, or when it does not fit)."""
        own = next((f for f in self.files if os.path.basename(f) == "tokenizer.json"), None)
        return tokenizer_for(self.path, self.model.config.vocab_size, self.tokenizer_spec or own)

    @functools.cached_property
    def pooling(self) -> dict | None:
        """A sentence-transformers directory's pooling (`dj.hf.sentence_pooling`), else None."""
        from ..hf import sentence_pooling

        return sentence_pooling(str(self.path)) if self.kind == "hf" else None

    def special_token(self, *names: str) -> int | None:
        """The first of `names` (e.g. "bos_token_id") set in a Hugging Face config.json."""
        for name in names:
            value = (self.hf_config or {}).get(name)
            value = value[0] if isinstance(value, list) and value else value
            if isinstance(value, int):
                return value
        return None
