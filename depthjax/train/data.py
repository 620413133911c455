"""Training data: document sources, and a grain pipeline that packs documents
into fixed-length rows with segment ids (document masking).

Sources (each a grain MapDataset of documents, str or bytes):
* ``stdlib``: the embedded default corpus (depthjax.files.corpus), split by file;
* ``files``: local .txt files (one document each) and .jsonl files (one per line, field
  `text_key`), written once to array_record by the `TextFiles` TFDS builder (no
  TensorFlow) and read back with `tfds.data_source`;
* ``tfds``: any installed TFDS dataset by name, read with `tfds.data_source`.

The pipeline of one data shard: its documents -> shuffle (seeded, reshuffled each epoch)
-> tokenize and cut into chunks of at most seq_len + 1 tokens -> window shuffle ->
first-fit packing -> batches. `ShardedBatches` puts shards side by side into the global
batch, so the batch of every step is the same whatever the number of processes (each
builds only its own shards). Everything is deterministic for a given seed, and the
iterator state (`get_state()`, a small JSON-able dict) restores the exact next batch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from absl import flags

if not flags.FLAGS.is_parsed():  # grain reads absl flags; unparsed flags raise inside it
    flags.FLAGS.mark_as_parsed()

import grain  # noqa: E402
import grain.experimental as gx  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from ..files import corpus  # noqa: E402
from ..files.textfiles import DataError, expand_files, read_documents  # noqa: E402,F401
from ..files.tokenizer import ByteTokenizer, JsonTokenizer, TokenizerError, load_tokenizer  # noqa: E402,F401

SPLITS = ("train", "valid")
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions")  # every batch's arrays


# Tokenizers live in depthjax.files.tokenizer and file reading in depthjax.files.textfiles
# (both light to import); re-exported for the pipeline.


# -- document sources --------------------------------------------------------------------
class TextFiles(tfds.core.GeneratorBasedBuilder):
    """Local .txt / .jsonl files as a TFDS dataset {"text": Text} with train/validation
    splits, chosen deterministically by a hash of each document's file name (and line);
    neither split is ever empty (see _split_generators)."""

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
        # Documents go to a split by a hash of their key. When that leaves a split empty
        # (a single book.txt), the largest document is cut at a line: its head trains,
        # its last valid_fraction validates.
        sizes = {
            key: len(text)
            for path in self._files
            for key, text in read_documents(path, self._text_key)
        }
        if not sizes:
            raise DataError("data_files hold no documents")
        in_valid = {key for key in sizes if _fraction(key) < self._valid_fraction}
        donor = None
        if not in_valid or len(in_valid) == len(sizes):
            donor = max(sorted(sizes), key=sizes.get)
            if sizes[donor] < 2:
                raise DataError(
                    f"data_files hold {len(sizes)} document(s), too little text "
                    "for a train and a validation split"
                )
        return {
            "train": self._generate_examples("train", in_valid, donor),
            "validation": self._generate_examples("valid", in_valid, donor),
        }

    def _generate_examples(self, split, in_valid, donor):
        for path in self._files:
            for key, text in read_documents(path, self._text_key):
                if key == donor:
                    cut = _cut(text, 1 - self._valid_fraction)
                    yield (
                        (f"{key}:head", {"text": text[:cut]})
                        if split == "train"
                        else (f"{key}:tail", {"text": text[cut:]})
                    )
                elif (key in in_valid) == (split == "valid"):
                    yield key, {"text": text}


def _fraction(key: str) -> float:
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "little") / 2**32


def _cut(text: str, at: float) -> int:
    """An index near `at` of the text, after a newline where there is one; 0 < cut < len."""
    target = min(max(int(len(text) * at), 1), len(text) - 1)
    line = text.rfind("\n", 0, target) + 1
    return line if 0 < line < len(text) else target


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


def shard_documents(docs, shard: int, n_shards: int):
    """The documents of data shard `shard` of `n_shards`: every n-th from index shard % n,
    n = min(len(docs), n_shards). With fewer documents than shards, shards share them
    (each in its own order), so any corpus fills any number of shards."""
    n = min(len(docs), n_shards)
    if n == 0:
        raise DataError("no documents to read")
    return docs[shard % n :: n]


def shard_seed(seed: int, shard: int, n_shards: int) -> int:
    """The seed of one shard's stream (the run's seed itself when there is one shard)."""
    if n_shards == 1:
        return seed
    return int(np.random.SeedSequence([seed, shard]).generate_state(1)[0] >> 1)


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
    """Batches of packed rows from data shard `shard_index` of `shard_count` (see
    `shard_documents`), each a dict of int32 [batch_size, seq_len]: inputs, targets,
    segment_ids (0 = padding, 1.. = documents in the row), positions."""
    seed = shard_seed(seed, shard_index, shard_count)
    read_log = os.environ.get("DEPTHJAX_TEST_READ_LOG")  # tests: which documents are read

    def read(i):
        if read_log:
            with open(f"{read_log}.{os.getpid()}", "a") as f:
                f.write(f"{i}\n")
        return docs[int(i)]

    ids = shard_documents(grain.MapDataset.range(len(docs)), shard_index, shard_count)
    ds = ids.shuffle(seed=seed).repeat(epochs).map(read)
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


class ShardedBatches:
    """The global batch of a step as `n_shards` independent streams, each filling
    batch_size / n_shards consecutive rows: rows [s*b, (s+1)*b) of every step come from
    shard s. The global batch at step k therefore depends on the seed, k and the data
    keys only -- not on how many processes share the work -- and a process builds (and
    reads the documents of) only the shards its devices hold.

    next() -> {shard: batch dict of [b, seq_len] arrays}; get_state() / set_state() speak
    {str(shard): grain iterator state} and take states of any superset of shards.
    """

    def __init__(
        self,
        docs,
        tokenizer,
        *,
        seq_len: int,
        batch_size: int,
        n_shards: int,
        shards,
        seed: int,
        shuffle_window: int,
    ):
        if batch_size % n_shards:
            raise DataError(f"batch_size={batch_size} is not divisible by data_shards={n_shards}")
        self.rows = batch_size // n_shards
        window = max(1, shuffle_window // n_shards)  # the same buffer in total
        self._its = {
            s: iter(
                pipeline(
                    docs,
                    tokenizer,
                    seq_len=seq_len,
                    batch_size=self.rows,
                    seed=seed,
                    shard_index=s,
                    shard_count=n_shards,
                    shuffle_window=window,
                )
            )
            for s in sorted(shards)
        }

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return {s: next(it) for s, it in self._its.items()}

    def get_state(self) -> dict:
        return {str(s): it.get_state() for s, it in self._its.items()}

    def set_state(self, state: dict) -> None:
        missing = [s for s in self._its if str(s) not in state]
        if missing:
            raise DataError(f"the stored data state lacks shards {missing}")
        for s, it in self._its.items():
            it.set_state(state[str(s)])


class SeedBatches:
    """One `ShardedBatches` per seed of a multi-seed run (seeds seed, seed+1, ...), each the
    stream a run with that seed alone would read. next() -> [per seed {shard: batch}].

    get_state() of one seed is that seed's ShardedBatches state unchanged (so a seeds=1 run
    stores what it always stored); of several, {"SEED/SHARD": grain state}: flat, so the
    processes' shard states merge key by key (hosts.merged_json)."""

    def __init__(self, docs, tokenizer, *, seeds, **kw):
        self.seeds = list(seeds)
        self._its = [ShardedBatches(docs, tokenizer, seed=s, **kw) for s in self.seeds]

    def __iter__(self):
        return self

    def __next__(self) -> list[dict]:
        return [next(it) for it in self._its]

    def get_state(self) -> dict:
        if len(self._its) == 1:
            return self._its[0].get_state()
        return {
            f"{seed}/{shard}": state
            for seed, it in zip(self.seeds, self._its)
            for shard, state in it.get_state().items()
        }

    def set_state(self, state: dict) -> None:
        if len(self._its) == 1:
            return self._its[0].set_state(state)
        for seed, it in zip(self.seeds, self._its):
            prefix = f"{seed}/"
            it.set_state({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})


def _rename(batch):
    return {
        "inputs": batch["inputs"],
        "targets": batch["targets"],
        "segment_ids": batch["inputs_segment_ids"],
        "positions": batch["inputs_positions"],
    }
