"""ModelDir: a model directory read once, and every command reading its --model once."""

import builtins
import collections
import io
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import depthjax as dj
from depthjax import cli
from depthjax.files import ModelDir
from depthjax.files.checkpoint import CheckpointError
from depthjax.files.tokenizer import JsonTokenizer, TokenizerError


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny model as a Hugging Face directory and as a native checkpoint, each with a
    character-level tokenizer.json (and the HF one with an eos id)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    tmp = tmp_path_factory.mktemp("model_dir")
    model = dj.init(dj.configs.get("llama-tiny", n_layers=2, d_model=32), jax.random.key(0))
    dj.hf.save(model, str(tmp / "hf"))
    config = json.loads((tmp / "hf" / "config.json").read_text())
    (tmp / "hf" / "config.json").write_text(json.dumps({**config, "eos_token_id": [7]}))
    tok = Tokenizer(
        models.WordLevel({chr(i): i for i in range(255)} | {"[UNK]": 255}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.save(str(tmp / "hf" / "tokenizer.json"))
    dj.save(model, tmp / "native", files=[tmp / "hf" / "tokenizer.json"])
    return tmp


def test_read_gives_model_tokenizer_files_and_hf_config(dirs):
    hf, native = ModelDir.read(dirs / "hf"), ModelDir.read(dirs / "native")
    assert (hf.kind, native.kind) == ("hf", "depthjax")
    for md in (hf, native):
        assert [Path(f).name for f in md.files] == ["tokenizer.json"]
        assert isinstance(md.tokenizer, JsonTokenizer) and md.tokenizer is md.tokenizer
        assert md.model.depth == 2
    assert hf.special_token("bos_token_id", "eos_token_id") == 7
    assert native.hf_config is None and native.special_token("eos_token_id") is None
    assert type(ModelDir.read(dirs / "native", tokenizer="byte").tokenizer).__name__ == (
        "ByteTokenizer"
    )


def test_bad_folders_raise_the_loaders_errors(dirs, tmp_path):
    with pytest.raises(CheckpointError, match="neither a depthjax checkpoint"):
        ModelDir.read(tmp_path)
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        ModelDir.read(dirs / "hf", kind="depthjax")
    # The tokenizer is read on first use: weights without one still read (and convert).
    cfg = dj.configs.get("llama-tiny", n_layers=1, vocab_size=300)
    shapes = jax.eval_shape(lambda k: dj.init(cfg, k).params, jax.random.key(0))
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)  # no init compile
    dj.save(dj.DepthModel(cfg, zeros, dj.Program.sequential(1)), tmp_path / "ck")
    md = ModelDir.read(tmp_path / "ck")
    assert md.files == () and md.model.config.vocab_size == 300
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        _ = md.tokenizer


def _why() -> str:
    """What the open() being counted is for: copying a file on save, hashing it, or reading."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name in ("copyfile", "sha256_file"):
            return {"copyfile": "copy", "sha256_file": "verify"}[frame.f_code.co_name]
        frame = frame.f_back
    return "read"


def _count_reads(monkeypatch, root: Path) -> collections.Counter:
    """{(directory, file, why): times} for every file read below `root` from now on: Python
    opens (safetensors files too: depthjax reads them with its own reader) and tokenizers'
    own reads of tokenizer.json."""
    import tokenizers

    counts = collections.Counter()
    root = os.path.realpath(root)

    def note(file, why):
        path = os.path.realpath(file)
        if path.startswith(root + os.sep):
            counts[(*Path(os.path.relpath(path, root)).parts, why)] += 1

    real_open, real_tokenizer = io.open, tokenizers.Tokenizer

    def counting_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and not set(mode) & set("wax+"):
            note(file, _why())
        return real_open(file, mode, *args, **kwargs)

    class Tokenizer:
        @staticmethod
        def from_file(file):
            note(file, "read")
            return real_tokenizer.from_file(file)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    monkeypatch.setattr(tokenizers, "Tokenizer", Tokenizer)
    return counts


def _once(kind: str, *names: str, why: str = "read") -> dict:
    return {(kind, name, why): 1 for name in names}


NATIVE = ("manifest.json", "config.json", "params.safetensors", "program.json")
HF = ("config.json", "model.safetensors")
COMMANDS = {
    "prune-native": (
        "prune --model {d}/native --n 1 --random-subsets 0 --out {out} "
        "--batches 1 --batch-size 2 --seq-len 16",
        # tokenizer.json: hashed against the manifest, parsed, copied into the pruned model
        _once("native", *NATIVE, "tokenizer.json")
        | _once("native", "tokenizer.json", why="verify")
        | _once("native", "tokenizer.json", why="copy"),
    ),
    "generate-hf": (
        "generate --model {d}/hf --prompt ab --max-new-tokens 2",
        _once("hf", *HF, "tokenizer.json"),  # the eos id comes from the config read once
    ),
    "convert-hf": (
        "convert --from hf {d}/hf --to {out}",
        _once("hf", *HF) | _once("hf", "tokenizer.json", why="copy"),
    ),
}


# Before ModelDir (and checkpoint.load reading each file once), `prune` on the native
# checkpoint read its manifest, config, program and weights twice each, and `generate` and
# `convert` on the HF directory read its config.json twice.
@pytest.mark.parametrize("name", COMMANDS)
def test_a_command_reads_each_file_of_its_model_directory_once(
    name, dirs, monkeypatch, tmp_path, capsys
):
    argv, expected = COMMANDS[name]
    reads = _count_reads(monkeypatch, dirs)
    assert cli.main(argv.format(d=dirs, out=tmp_path / "out").split()) == 0
    assert dict(reads) == expected
    capsys.readouterr()
