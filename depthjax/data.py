"""Training data: document sources, and a grain pipeline that packs documents
into fixed-length rows with segment ids (document masking).

Sources (each a grain MapDataset of documents, str or bytes):
* ``stdlib``: the embedded default corpus (depthjax.corpus), split by file;
* ``files``: local .txt files (one document each) and .jsonl files (one per line, field
  `text_key`), written once to array_record by the `TextFiles` TFDS builder (no
  TensorFlow) and read back with `tfds.data_source`;
* ``tfds``: any installed TFDS dataset by name, read with `tfds.data_source`.

The pipeline: shard documents by process -> shuffle (seeded, reshuffled each epoch) ->
tokenize and cut into chunks of at most seq_len + 1 tokens -> window shuffle -> first-fit
packing -> batches. Everything is deterministic for a given seed, and the iterator
state (`it.get_state()`, a small JSON-able dict) restores the exact next batch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from absl import flags

if not flags.FLAGS.is_parsed():  # grain reads absl flags; unparsed flags raise inside it
    flags.FLAGS.mark_as_parsed()

import grain  # noqa: E402
import grain.experimental as gx  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from . import corpus  # noqa: E402
from .textfiles import DataError, expand_files, read_documents  # noqa: E402,F401
from .tokenizer import ByteTokenizer, JsonTokenizer, TokenizerError, load_tokenizer  # noqa: E402,F401

SPLITS = ("train", "valid")


# Tokenizers live in depthjax.tokenizer and file reading in depthjax.textfiles (both light to
# import); re-exported for the pipeline.


# -- document sources --------------------------------------------------------------------
class TextFiles(tfds.core.GeneratorBasedBuilder):
    """Local .txt / .jsonl files as a TFDS dataset {"text": Text} with train/validation
    splits, chosen deterministically by a hash of each document's file name (and line)."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, files=(), text_key: str = "text", valid_fraction: float = 0.05, **kwargs):
        self._files = [Path(f) for f in files]
        self._text_key = text_key
        self._valid_fraction = valid_fraction
        super().__init__(**kwargs)

    def _info(self):
        features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples("train"),
            "validation": self._generate_examples("valid"),
        }

    def _generate_examples(self, split):
        for path in self._files:
            for key, text in read_documents(path, self._text_key):
                h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "little") / 2**32
                if (h < self._valid_fraction) == (split == "valid"):
                    yield key, {"text": text}


def prepare_files(patterns, data_dir, *, text_key: str = "text") -> Path:
    """Write the files to array_record under data_dir/<content hash> once; return that dir."""
    files = expand_files(patterns)
    sig = hashlib.sha1(
        json.dumps(
            [text_key] + [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        ).encode()
    ).hexdigest()[:12]
    out = Path(data_dir) / sig
    builder = TextFiles(files=files, text_key=text_key, data_dir=str(out))
    if not builder.is_prepared():
        builder.download_and_prepare(file_format="array_record")
    return out


def documents(
    source: str,
    split: str,
    *,
    data_files=(),
    data_dir=None,
    tfds_name=None,
    text_key: str = "text",
    train_split: str = "train",
    valid_split: str = "validation",
) -> grain.MapDataset:
    """A MapDataset of documents (str or bytes) from `source` in {stdlib, files, tfds}."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    if source == "stdlib":
        return grain.MapDataset.source([str(p) for p in corpus.stdlib_files(split)]).map(
            lambda p: Path(p).read_bytes()
        )
    if source == "files":
        if not data_files:
            raise DataError("data=files needs data_files (paths or globs of .txt/.jsonl)")
        if data_dir is None:
            raise DataError("data=files needs a data_dir for the array_record copy")
        src = tfds.data_source(
            "text_files",
            data_dir=str(prepare_files(data_files, data_dir, text_key=text_key)),
            split="train" if split == "train" else "validation",
        )
        return grain.MapDataset.source(src).map(lambda r: r["text"])
    if source == "tfds":
        if not tfds_name:
            raise DataError("data=tfds needs tfds_name (an installed/prepared TFDS dataset)")
        try:
            src = tfds.data_source(
                tfds_name, data_dir=data_dir, split=train_split if split == "train" else valid_split
            )
        except Exception as e:
            raise DataError(
                f"cannot open TFDS dataset {tfds_name!r} split "
                f"{train_split if split == 'train' else valid_split!r}: {e}"
            ) from None

        def text(record):
            if text_key not in record:
                raise DataError(
                    f"TFDS {tfds_name!r} records have no {text_key!r} field "
                    f"(fields: {sorted(record)}); set text_key"
                )
            return record[text_key]

        return grain.MapDataset.source(src).map(text)
    raise DataError(f"data={source!r} is not one of ('stdlib', 'files', 'tfds')")


# -- packing pipeline --------------------------------------------------------------------
class _Chunk(gx.FlatMapTransform):
    """One document -> examples {"inputs", "targets"} of at most seq_len tokens each, so
    every token of the document is a target exactly once (except the first)."""

    max_fan_out = 1 << 20

    def __init__(self, tokenizer, seq_len: int):
        self.tokenizer, self.seq_len = tokenizer, seq_len

    def flat_map(self, document):
        ids = self.tokenizer.encode(document)
        T = self.seq_len
        out = []
        for s in range(0, len(ids) - 1, T):
            targets = ids[s + 1 : s + T + 1]
            out.append({"inputs": ids[s : s + len(targets)], "targets": targets})
        return out


def pipeline(
    docs: grain.MapDataset,
    tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    shuffle_window: int = 1024,
    epochs: int | None = None,
) -> grain.IterDataset:
    """Batches (per process) of packed rows, each a dict of int32 [batch_size, seq_len]:
    inputs, targets, segment_ids (0 = padding, 1.. = documents in the row), positions."""
    if len(docs) < shard_count:
        raise DataError(f"{len(docs)} documents cannot be sharded over {shard_count} processes")
    ds = docs[shard_index::shard_count].shuffle(seed=seed).repeat(epochs)
    ds = gx.FlatMapIterDataset(ds.to_iter_dataset(), _Chunk(tokenizer, seq_len))
    if shuffle_window > 1:
        ds = gx.WindowShuffleIterDataset(ds, window_size=shuffle_window, seed=seed + 1)
    ds = gx.FirstFitPackIterDataset(
        ds,
        length_struct={"inputs": seq_len, "targets": seq_len},
        num_packing_bins=batch_size,
        seed=seed + 2,
    )
    return ds.batch(batch_size, drop_remainder=True).map(_rename)


def _rename(batch):
    return {
        "inputs": batch["inputs"],
        "targets": batch["targets"],
        "segment_ids": batch["inputs_segment_ids"],
        "positions": batch["inputs_positions"],
    }
