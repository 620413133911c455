"""Data: tokenizers, sources (stdlib, files via the TFDS builder), packing, exact resume,
process sharding; and TrainConfig parsing."""

import json

import numpy as np
import pytest

from depthjax.core.sharding import logical_to_spec, param_logical_axes
from depthjax.train import config as train_config, data


def _take(it, n):
    return [next(it) for _ in range(n)]


def _docs(texts):
    import grain

    return grain.MapDataset.source(list(texts))


def test_byte_tokenizer_round_trip():
    tok = data.ByteTokenizer()
    text = "déf f(x):\n    return x  # ünïcode"
    ids = tok.encode(text)
    assert ids.tolist() == list(text.encode("utf-8")) and tok.decode(ids) == text


def test_json_tokenizer_matches_vocabulary(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "def": 1, "f": 2, "return": 3, "x": 4}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = data.load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert loaded.vocab_size == 5
    assert loaded.encode("def f return x y").tolist() == [1, 2, 3, 4, 0]
    with pytest.raises(data.TokenizerError, match="expected 'byte' or an existing tokenizer.json"):
        data.load_tokenizer(str(tmp_path / "missing.json"))


def test_packing_covers_every_document_token_once():
    """Naive reference: every packed segment must be a contiguous slice of one document,
    targets = the next tokens, positions restart, and all targets together are exactly
    each document's tokens after its first."""
    rng = np.random.default_rng(0)
    docs = [bytes(rng.integers(97, 123, rng.integers(2, 40)).astype(np.uint8)) for _ in range(30)]
    ds = data.pipeline(
        _docs(docs),
        data.ByteTokenizer(),
        seq_len=16,
        batch_size=4,
        seed=1,
        epochs=1,
        shuffle_window=8,
    )
    seen_targets = []
    for batch in ds:
        for row in range(4):
            seg, pos = batch["segment_ids"][row], batch["positions"][row]
            for s in set(seg.tolist()) - {0}:
                where = seg == s
                inp, tgt = batch["inputs"][row][where], batch["targets"][row][where]
                np.testing.assert_array_equal(pos[where], np.arange(where.sum()))
                seq = np.concatenate([inp[:1], tgt]).astype(np.uint8)
                assert any(seq.tobytes().decode() in d.decode() for d in docs)
                seen_targets.append(tgt)
            assert (batch["targets"][row][seg == 0] == 0).all()
    total = sum(len(t) for t in seen_targets)
    # Batches drop the remainder, so at most 3 incomplete rows' worth may be missing.
    expected = sum(len(d) - 1 for d in docs)
    assert expected - 3 * 16 <= total <= expected


def test_resume_gives_exact_next_batches():
    ds = data.pipeline(
        data.documents("stdlib", "train"),
        data.ByteTokenizer(),
        seq_len=32,
        batch_size=2,
        seed=5,
        shuffle_window=64,
    )
    it = iter(ds)
    _take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # survives a JSON round trip
    expected = _take(it, 4)
    it2 = iter(ds)
    it2.set_state(state)
    for a, b in zip(expected, _take(it2, 4)):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # A different seed gives a different order (the seed is really used).
    other = next(
        iter(
            data.pipeline(
                data.documents("stdlib", "train"),
                data.ByteTokenizer(),
                seq_len=32,
                batch_size=2,
                seed=6,
                shuffle_window=64,
            )
        )
    )
    first = next(iter(ds))
    assert not np.array_equal(first["inputs"], other["inputs"])


def test_process_shards_are_disjoint_and_complete():
    docs = [f"doc{i:03d}-".encode() * 3 for i in range(12)]
    seen = []
    for shard in range(3):
        ds = data.pipeline(
            _docs(docs),
            data.ByteTokenizer(),
            seq_len=20,
            batch_size=1,
            seed=0,
            shard_index=shard,
            shard_count=3,
            epochs=1,
            shuffle_window=1,
        )
        names = {bytes(b["inputs"][0][:6].astype(np.uint8)).decode() for b in ds}
        seen.append(names)
    assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1 :])
    assert set.union(*seen) == {f"doc{i:03d}" for i in range(12)}


def test_stdlib_splits_are_disjoint():
    train = data.documents("stdlib", "train")
    valid = data.documents("stdlib", "valid")
    assert len(valid) > 0 and len(train) > 10 * len(valid)
    assert not {train[i] for i in range(5)} & {valid[i] for i in range(len(valid))}


def test_text_and_jsonl_files_through_tfds_builder(tmp_path):
    (tmp_path / "a.txt").write_text("plain text document")
    lines = [{"text": f"line {i} ünï"} for i in range(40)]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    kw = dict(
        data_files=[str(tmp_path / "*.txt"), str(tmp_path / "b.jsonl")],
        data_dir=str(tmp_path / "cache"),
    )
    train = data.documents("files", "train", **kw)
    valid = data.documents("files", "valid", **kw)
    got = sorted(
        d.decode()
        for d in [train[i] for i in range(len(train))] + [valid[i] for i in range(len(valid))]
    )
    assert got == sorted(["plain text document"] + [line["text"] for line in lines])
    assert len(valid) >= 1
    assert list((tmp_path / "cache").rglob("*.array_record*"))  # really array_record
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(data.DataError, match="bad.jsonl:1: expected an object"):
        data.documents(
            "files",
            "train",
            data_files=[str(tmp_path / "bad.jsonl")],
            data_dir=str(tmp_path / "cache"),
        )


def test_a_single_text_file_gives_a_train_and_a_validation_split(tmp_path):
    """One book.txt: its only document used to land in one split (a TFDS assertion)."""
    lines = [f"line {i}: some text of the book\n" for i in range(200)]
    (tmp_path / "book.txt").write_text("".join(lines))
    kw = dict(data_files=[str(tmp_path / "book.txt")], data_dir=str(tmp_path / "cache"))
    train = data.documents("files", "train", **kw)
    valid = data.documents("files", "valid", **kw)
    assert len(train) == 1 and len(valid) == 1
    head, tail = train[0].decode(), valid[0].decode()
    assert head + tail == "".join(lines) and head.endswith("\n")
    assert 0.9 < len(head) / (len(head) + len(tail)) < 0.99  # the last ~5% validates


@pytest.mark.slow
def test_global_batch_does_not_depend_on_how_shards_are_split_over_processes():
    """Four data shards built by one process, or two each by two processes (with their
    states saved and restored across the split), give the same global batches."""
    docs = _docs([bytes([65 + i]) * (20 + 7 * i) for i in range(23)])  # doc i: one letter
    kw = dict(seq_len=16, batch_size=8, n_shards=4, seed=5, shuffle_window=8)
    one = data.ShardedBatches(docs, data.ByteTokenizer(), shards=range(4), **kw)
    two = [
        data.ShardedBatches(docs, data.ByteTokenizer(), shards=s, **kw) for s in ([0, 1], [2, 3])
    ]

    def rows(parts):
        merged = {k: v for p in parts for k, v in p.items()}
        return np.concatenate([merged[s]["inputs"] for s in range(4)])

    for _ in range(3):
        np.testing.assert_array_equal(rows([next(one)]), rows([next(t) for t in two]))
    # Resume on another number of processes: the states of all shards, merged.
    state = {**two[0].get_state(), **two[1].get_state()}
    resumed = data.ShardedBatches(docs, data.ByteTokenizer(), shards=range(4), **kw)
    resumed.set_state(state)
    for _ in range(2):
        np.testing.assert_array_equal(rows([next(resumed)]), rows([next(one)]))
    # Each shard reads only its own documents (i % 4 == shard).
    shard2 = data.ShardedBatches(docs, data.ByteTokenizer(), shards=[2], **kw)
    seen = np.unique(np.concatenate([next(shard2)[2]["inputs"].ravel() for _ in range(3)]))
    seen = seen[seen > 0] - 65  # 0 is padding
    assert seen.size and all(i % 4 == 2 for i in seen)


def test_train_config_parsing(tmp_path):
    (tmp_path / "c.yaml").write_text("steps: 7\nmesh: {fsdp: 2}\nmodel: {n_layers: 3}\n")
    tc = train_config.parse(
        ["steps=9", "lr=3e-3", "mesh.tensor=2", "model.dtype=bfloat16", "data_files=a.txt,b.jsonl"],
        tmp_path / "c.yaml",
    )
    assert (tc.steps, tc.lr, tc.mesh.fsdp, tc.mesh.tensor) == (9, 3e-3, 2, 2)
    assert tc.model_overrides == {"n_layers": 3, "dtype": "bfloat16"}
    assert tc.model_config().n_layers == 3 and tc.data_files == ["a.txt", "b.jsonl"]
    with pytest.raises(train_config.TrainConfigError, match="did you mean 'batch_size'"):
        train_config.parse(["batch_sise=3"])
    with pytest.raises(train_config.TrainConfigError, match="did you mean 'n_heads'"):
        train_config.parse(["model.n_head=3"])
    with pytest.raises(train_config.TrainConfigError, match="steps='many': expected int"):
        train_config.parse(["steps=many"])
    with pytest.raises(train_config.TrainConfigError, match="not divisible by grad_accum"):
        train_config.parse(["batch_size=6", "grad_accum=4"])
    help_text = train_config.help_text()
    for key in ("mesh.fsdp", "checkpoint_every", "nan_policy", "model.FIELD", "trainable"):
        assert key in help_text


def test_sharding_rules_for_llama_parameters():
    import jax

    import depthjax as dj

    params = jax.eval_shape(
        lambda k: dj.init(dj.configs.get("llama-tiny"), k).params, jax.random.key(0)
    )
    axes = param_logical_axes(params)
    assert axes["blocks"]["attn"]["q"]["kernel"] == ("layers", "embed", "heads", "head_dim")
    assert axes["blocks"]["mlp"]["down"]["kernel"] == ("layers", "mlp", "embed")
    assert axes["embed"]["tok"]["embedding"] == ("vocab", "embed")
    assert axes["blocks"]["attn_norm"]["scale"] == ("layers", "norm")

    class FakeMesh:  # logical_to_spec only reads mesh.shape
        shape = {"data": 2, "fsdp": 2, "tensor": 2}

    spec = logical_to_spec(("layers", "embed", "heads", "head_dim"), (4, 64, 4, 16), FakeMesh)
    assert tuple(spec) == (None, "fsdp", "tensor", None)
    # Not divisible -> replicated along that axis rather than an error.
    assert tuple(logical_to_spec(("embed", "mlp"), (63, 3), FakeMesh)) == (None, None)


def test_corpus_digest_names_the_files_it_read(tmp_path, monkeypatch):
    """corpus.describe's SHA-256 equals one computed by hand over (split, path, content
    digest) in path order, and changes when one file's bytes change."""
    import hashlib
    import sysconfig

    from depthjax.files import corpus

    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "site-packages").mkdir()
    files = {"a.py": b"x = 1\n", "pkg/b.py": b"y = 2\n", "pkg/c.py": b"z = 3\n"}
    for rel, text in files.items():
        (root / rel).write_bytes(text)
    (root / "site-packages" / "skip.py").write_bytes(b"ignored")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(root)})

    def by_hand():
        h = hashlib.sha256()
        for rel in sorted(files):
            split = "valid" if root / rel in corpus.stdlib_files("valid") else "train"
            digest = hashlib.sha256((root / rel).read_bytes()).hexdigest()
            h.update(f"{split}\0{rel}\0{digest}\n".encode())
        return h.hexdigest()

    d = corpus.describe()
    assert d["sha256"] == by_hand() and d["bytes"] == sum(map(len, files.values()))
    assert sum(d["files"].values()) == 3
    (root / "pkg" / "b.py").write_bytes(b"y = 3\n")
    changed = corpus.describe()["sha256"]
    assert changed != d["sha256"] and changed == by_hand()
