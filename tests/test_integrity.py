"""Nothing lost, nothing silent: every byte of a native checkpoint is checksummed, saves
write beside and swap (a failure or kill at any moment leaves the old copy whole), and
leftovers of killed saves are cleaned up or moved back."""

import importlib
import json
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest

import depthjax as dj
from depthjax.files import atomic, integrity
from depthjax.files.checkpoint import CheckpointError
from depthjax.hf.config import HFError


@pytest.fixture(scope="module")
def small():
    return dj.init(dj.configs.get("llama-tiny", n_layers=2, d_model=32), jax.random.key(0))


def _tokenizer_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def _flip(path, bit):
    raw = bytearray(path.read_bytes())
    raw[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(raw))


def test_every_random_bit_flip_in_a_native_checkpoint_is_detected(small, tmp_path):
    ck = dj.save(small, tmp_path / "ck", files=[_tokenizer_file(tmp_path)])
    files = sorted(p for p in ck.iterdir())
    assert [p.name for p in files] == [
        "config.json",
        "manifest.json",
        "params.safetensors",
        "program.json",
        "tokenizer.json",
    ]
    rng = np.random.default_rng(0)
    for trial in range(60):
        # Every file gets flips; the small JSON files would rarely be hit by size-weighting.
        path = files[trial % len(files)]
        bit = int(rng.integers(path.stat().st_size * 8))
        _flip(path, bit)
        with pytest.raises(CheckpointError, match="corrupt|not a depthjax|version"):
            dj.load(ck)
        _flip(path, bit)
    dj.load(ck)  # every flip was undone: the checkpoint is whole again


def test_edited_config_program_or_tokenizer_is_detected(small, tmp_path):
    ck = dj.save(small, tmp_path / "ck", files=[_tokenizer_file(tmp_path)])
    for name, edit in [
        ("config.json", lambda d: {**d, "rope_theta": 500000.0}),
        ("program.json", lambda d: {**d, "mlp": [1.0, 0.0]}),
        ("manifest.json", lambda d: {**d, "version": 2, "extra": 1}),
    ]:
        original = (ck / name).read_bytes()
        (ck / name).write_text(json.dumps(edit(json.loads(original))))
        with pytest.raises(CheckpointError, match=f"corrupt: {name}"):
            dj.load(ck)
        (ck / name).write_bytes(original)
    # The same value spelled differently is still a change to the file.
    manifest = (ck / "manifest.json").read_bytes()
    (ck / "manifest.json").write_bytes(manifest.replace(b'"format"', b'"format" '))
    with pytest.raises(CheckpointError, match="modified after it was written"):
        dj.load(ck)
    (ck / "manifest.json").write_bytes(manifest)
    (ck / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tokenizer.json does not match"):
        dj.load(ck)


def test_manifest_paths_are_confined_to_the_checkpoint(small, tmp_path):
    ck = dj.save(small, tmp_path / "ck")
    (tmp_path / "outside.txt").write_text("x")
    record = integrity.load_sealed(ck / "manifest.json")
    record["files"]["../outside.txt"] = integrity.sha256_file(tmp_path / "outside.txt")
    integrity.write_sealed(ck / "manifest.json", record)
    with pytest.raises(CheckpointError, match="outside"):
        dj.load(ck)


def test_version_1_checkpoints_still_load(small, tmp_path):
    """A checkpoint written before manifests covered every file (CRC of the weights)."""
    import zlib

    ck = dj.save(small, tmp_path / "ck")
    manifest = json.loads((ck / "manifest.json").read_text())
    crc = zlib.crc32((ck / "params.safetensors").read_bytes())
    (ck / "manifest.json").write_text(
        json.dumps(
            {
                "format": manifest["format"],
                "version": 1,
                "params": manifest["params"],
                "params_crc32": crc,
            }
        )
    )
    np.testing.assert_array_equal(
        dj.load(ck).params["embed"]["tok"]["embedding"], small.params["embed"]["tok"]["embedding"]
    )


def test_version_2_checkpoints_still_load_and_are_checked(small, tmp_path):
    """Version 2 recorded the plain SHA-256 of params.safetensors."""
    ck = dj.save(small, tmp_path / "ck")
    record = integrity.load_sealed(ck / "manifest.json")
    del record["piece_bytes"]
    record["version"] = 2
    record["files"]["params.safetensors"] = integrity.sha256_file(ck / "params.safetensors")
    integrity.write_sealed(ck / "manifest.json", record)
    np.testing.assert_array_equal(
        dj.load(ck).params["embed"]["tok"]["embedding"], small.params["embed"]["tok"]["embedding"]
    )
    _flip(ck / "params.safetensors", 8 * (ck / "params.safetensors").stat().st_size - 1)
    with pytest.raises(CheckpointError, match="params.safetensors does not match"):
        dj.load(ck)


@pytest.mark.parametrize("piece", [None, 0, -4, 2.5, True])
def test_manifest_without_a_valid_piece_size_is_refused(small, tmp_path, piece):
    ck = dj.save(small, tmp_path / "ck")
    record = integrity.load_sealed(ck / "manifest.json")
    record["piece_bytes"] = piece
    integrity.write_sealed(ck / "manifest.json", record)
    with pytest.raises(CheckpointError, match="piece_bytes"):
        dj.load(ck)


def test_save_keeps_unrelated_files_and_its_directory_mode(small, tmp_path):
    ck = dj.save(small, tmp_path / "ck", files=[_tokenizer_file(tmp_path)])
    os.chmod(ck, 0o750)
    (ck / "NOTES.md").write_text("mine")
    dj.save(small, ck)  # no tokenizer this time: the old one was part of the checkpoint
    assert sorted(p.name for p in ck.iterdir()) == [
        "NOTES.md",
        "config.json",
        "manifest.json",
        "params.safetensors",
        "program.json",
    ]
    assert (ck / "NOTES.md").read_text() == "mine" and (ck.stat().st_mode & 0o777) == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "tokenizer.json"]


def _dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_saves_are_cleaned_or_moved_back(small, tmp_path):
    import socket

    host, pid = socket.gethostname(), _dead_pid()
    ck = dj.save(small, tmp_path / "model")
    # A save killed while writing: its staging directory is removed by the next save.
    stale = tmp_path / f".model.tmp-{host}-{pid}-abc"
    stale.mkdir()
    (stale / "params.safetensors").write_bytes(b"half")
    # A live process's staging directory is left alone.
    live = tmp_path / f".model.tmp-{host}-{os.getpid()}-xyz"
    live.mkdir()
    dj.save(small, ck)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "model"]
    # A swap killed between its two renames: the old directory is the only copy; it is
    # moved back into place instead of being removed.
    shutil.rmtree(live)
    os.replace(ck, tmp_path / f".model.old-{host}-{pid}-q1")
    atomic.clean_stale(ck)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    dj.load(ck)


def _hf_dir(model, path):
    dj.hf.save(model, str(path))
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return path


def test_hf_save_overwrite_never_deletes_before_the_new_copy_is_in(small, tmp_path, monkeypatch):
    hf_save = importlib.import_module("depthjax.hf.exporting")  # the module, not dj.hf.save
    hf = _hf_dir(small, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    other = small.replace(params=jax.tree.map(lambda x: x + 1, small.params))

    def dies_half_way(directory, items, **kw):
        with open(os.path.join(directory, "model.safetensors"), "wb") as f:
            f.write(b"half a shard")
        raise KeyboardInterrupt("interrupted while writing shards")

    monkeypatch.setattr(hf_save, "write", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        dj.hf.save(other, str(hf), overwrite=True)
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    monkeypatch.undo()
    with pytest.raises(HFError, match="already holds a checkpoint"):
        dj.hf.save(other, str(hf))
    dj.hf.save(other, str(hf), overwrite=True, max_shard_size="20KB")
    names = sorted(p.name for p in hf.iterdir())
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    assert (hf / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
    np.testing.assert_array_equal(
        dj.hf.load(str(hf)).params["embed"]["tok"]["embedding"],
        other.params["embed"]["tok"]["embedding"],
    )


def test_convert_reshards_in_place_and_tokenizers_travel(small, tmp_path):
    from depthjax import cli

    hf = _hf_dir(small, tmp_path / "hf")
    shutil.copyfile(_tokenizer_file(tmp_path), hf / "tokenizer.json")
    assert (
        cli.main(
            [
                "convert",
                "--from",
                "hf",
                str(hf),
                "--to",
                str(hf),
                "--to-format",
                "hf",
                "--overwrite",
                "--max-shard-size",
                "20KB",
            ]
        )
        == 0
    )
    assert (hf / "model.safetensors.index.json").exists()
    assert cli.main(["convert", "--from", "hf", str(hf), "--to", str(tmp_path / "native")]) == 0
    native = tmp_path / "native"
    assert (native / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    listed = integrity.load_sealed(native / "manifest.json")["files"]
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(listed)
    back = dj.load(native)
    np.testing.assert_array_equal(
        back.params["blocks"]["attn"]["q"]["kernel"], small.params["blocks"]["attn"]["q"]["kernel"]
    )
