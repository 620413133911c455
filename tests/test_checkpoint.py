"""dj.save / dj.load: bit-exact round trips, atomic replacement, clear errors."""

import hashlib
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import depthjax as dj
from depthjax.files import integrity
from depthjax.files.checkpoint import CheckpointError


def _leaves_equal_bits(a, b):
    """Compare raw bytes, so -0.0 vs 0.0 or NaN payloads would also be caught."""
    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert x.tobytes() == y.tobytes(), path


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny", "bert-tiny", "qwen3-tiny"])
def test_round_trip_is_bit_exact(tmp_path, preset):
    cfg = dj.configs.get(preset, n_layers=3)
    model = dj.init(cfg, jax.random.key(1))
    # A non-trivial program: looped row, gated sublayer, a parallel pair.
    model = model.with_program(
        dj.Program.create(
            [0, 1, 1, 2],
            attn=[1, 0.5, 1, 1],
            mlp=[1, 1, 0, 1],
            parallel=[False, False, False, True],
        )
    )
    # Values that float round-trips through text would lose.
    model = model.replace(
        params=jax.tree.map(lambda x: x * np.float32(1 / 3) + 1e-30, model.params)
    )
    dj.save(model, tmp_path / "ck")
    back = dj.load(tmp_path / "ck")
    assert back.config == model.config
    assert back.program.to_dict() == model.program.to_dict()
    _leaves_equal_bits(back.params, model.params)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 8)), jnp.int32)
    np.testing.assert_array_equal(dj.apply(back, tokens), dj.apply(model, tokens))


def test_bfloat16_and_extra_subtrees_round_trip(tmp_path):
    model = dj.init(dj.configs.get("llama-tiny"), jax.random.key(0))
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.params)
    params["adapters"] = {"lora_a": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "empty": {}}
    model = model.replace(params=params)
    back = dj.load(dj.save(model, tmp_path / "ck"))
    _leaves_equal_bits(back.params, model.params)
    assert back.params["adapters"]["empty"] == {}
    assert back.params["blocks"]["attn"]["q"]["kernel"].dtype == ml_dtypes.bfloat16


def _piecewise_sha256(data: bytes, piece: int) -> str:
    """The naive definition of integrity.PieceDigest: SHA-256 of the pieces' SHA-256s."""
    pieces = [data[i : i + piece] for i in range(0, len(data), piece)] or [b""]
    return hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in pieces)).hexdigest()


def test_manifest_digests_are_those_of_the_files_on_disk(tmp_path, monkeypatch):
    """The params digest is taken from the bytes as they are written (no read-back): it
    must equal the piecewise SHA-256 of the file as it lies on disk, and every other
    file's its plain SHA-256."""
    monkeypatch.setattr(integrity, "PIECE_BYTES", 4096)  # pieces spanning tensors
    model = dj.init(dj.configs.get("llama-tiny", param_dtype="bfloat16"), jax.random.key(0))
    dj.save(model, tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"config.json", "program.json", "params.safetensors"}
    for name, digest in manifest["files"].items():
        data = (tmp_path / "ck" / name).read_bytes()
        if name == "params.safetensors":
            assert manifest["piece_bytes"] == 4096 and len(data) > 100 * 4096
            assert _piecewise_sha256(data, manifest["piece_bytes"]) == digest
        else:
            assert hashlib.sha256(data).hexdigest() == digest, name
    monkeypatch.undo()  # the loader hashes with the manifest's piece size, not the default
    _leaves_equal_bits(dj.load(tmp_path / "ck").params, model.params)


@pytest.mark.parametrize("piece", [1, 7, 64, 1000])
def test_piece_digest_is_the_sha256_of_its_pieces_digests(piece):
    """However the stream is split into update() calls (pieces spanning calls, empty
    calls, a stream that ends on a piece boundary or is empty), the digest is the naive
    definition's."""
    rng = np.random.default_rng(piece)
    for size in (0, piece, 3 * piece, 1000):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        cuts = np.sort(rng.integers(0, size + 1, 5))
        digest = integrity.PieceDigest(piece, workers=2)
        for a, b in zip([0, *cuts], [*cuts, size]):
            digest.update(np.frombuffer(data[a:b], np.uint8))
        assert digest.hexdigest() == _piecewise_sha256(data, piece), (piece, size)
        assert digest.hexdigest() == _piecewise_sha256(data, piece)  # idempotent


def test_tied_table_keeps_its_row_count(tmp_path):
    # Two table rows walked four times: n_blocks != config.n_layers is allowed.
    cfg = dj.configs.get("llama-tiny", n_layers=2)
    model = dj.init(cfg, jax.random.key(0), dj.Program.create([0, 1, 0, 1]))
    back = dj.load(dj.save(model, tmp_path / "ck"))
    assert back.n_blocks == 2 and back.depth == 4


def test_save_replaces_existing_checkpoint_atomically(tmp_path):
    a = dj.init(dj.configs.get("llama-tiny"), jax.random.key(0))
    b = dj.init(dj.configs.get("llama-tiny"), jax.random.key(1))
    dj.save(a, tmp_path / "ck")
    dj.save(b, tmp_path / "ck")
    _leaves_equal_bits(dj.load(tmp_path / "ck").params, b.params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp dirs left


def test_save_refuses_to_overwrite_other_files(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    model = dj.init(dj.configs.get("llama-tiny"), jax.random.key(0))
    with pytest.raises(FileExistsError, match="not a depthjax checkpoint"):
        dj.save(model, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_failed_save_leaves_no_partial_directory(tmp_path):
    model = dj.init(dj.configs.get("llama-tiny"), jax.random.key(0))
    bad = model.replace(params={**model.params, "x": {"a/b": jnp.zeros(2)}})
    with pytest.raises(CheckpointError, match="without '/'"):
        dj.save(bad, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_missing_and_corrupt_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        dj.load(tmp_path / "nothing")
    model = dj.init(dj.configs.get("llama-tiny"), jax.random.key(0))
    ck = dj.save(model, tmp_path / "ck")
    # Flip one byte inside the tensor data: the checksum catches it.
    raw = bytearray((ck / "params.safetensors").read_bytes())
    raw[-5] ^= 0xFF
    (ck / "params.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="params.safetensors does not match its SHA-256"):
        dj.load(ck)
    # Truncated: the checksum catches it, and without verification the reader does.
    (ck / "params.safetensors").write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(CheckpointError, match="corrupt"):
        dj.load(ck)
    with pytest.raises(CheckpointError, match="corrupt"):
        dj.load(ck, verify=False)
    (ck / "params.safetensors").unlink()
    with pytest.raises(CheckpointError, match="params.safetensors is missing"):
        dj.load(ck)
    (ck / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json is corrupt"):
        dj.load(ck)


def test_config_params_mismatch_is_named(tmp_path):
    model = dj.init(dj.configs.get("llama-tiny"), jax.random.key(0))
    ck = dj.save(model, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["d_ff"] = 64
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json does not match its SHA-256"):
        dj.load(ck)
    # Past the checksums (verify=False), the parameters are still checked against the config.
    with pytest.raises(
        CheckpointError,
        match=r"blocks/mlp/up/kernel has shape \[4,64,176\], "
        r"config needs \[4,64,64\]",
    ):
        dj.load(ck, verify=False)
    cfg["d_ff"], cfg["d_mdoel"] = None, 64
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="did you mean 'd_model'"):
        dj.load(ck, verify=False)


def test_program_out_of_range_is_rejected(tmp_path):
    model = dj.init(dj.configs.get("llama-tiny"), jax.random.key(0))
    ck = dj.save(model, tmp_path / "ck")
    (ck / "program.json").write_text(json.dumps(dj.Program.create([0, 9]).to_dict()))
    with pytest.raises(dj.ProgramError, match="out of range"):
        dj.load(ck, verify=False)
