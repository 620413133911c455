"""GGUF export (dj.gguf.save, `depthjax convert --to OUT.gguf`): the written metadata read
back with gguf's reader, refusals, and llama.cpp itself (llama-cpp-python) as the client:
its logits and greedy continuations against depthjax's.

llama-cpp-python is installed by ./dj test (tests/llama_cpp/requirements.txt); without it
the client tests skip, and under CI=true (or DEPTHJAX_REQUIRE_LLAMA_CPP=1) they fail.
"""

from __future__ import annotations

import contextlib
import json
import os

import gguf
import jax
import numpy as np
import pytest

import depthjax as dj
from depthjax.cli import main as cli_main
from depthjax.files.tokenizer import ByteTokenizer
from depthjax.gguf import GGUFError, layout
from depthjax.gguf.vocab import byte_unicode
from tests.conftest import import_reference

# llama.cpp's f32 CPU kernels (f32 KV cache) against jax at highest precision: measured
# <= 2.7e-7 on logits spanning about +-0.6; without the q/k permutation the error is 4.5e-3
F32_ATOL = 2e-6
PROMPT = "The depth of a model "
N_NEW = 8
RNG = np.random.default_rng(0)
CALIB = [RNG.integers(0, 256, (4, 32)).astype(np.int32) for _ in range(3)]


def _llama_cpp():
    required = os.environ.get("CI") == "true" or bool(os.environ.get("DEPTHJAX_REQUIRE_LLAMA_CPP"))
    return import_reference("llama_cpp", required=required, hint="./dj test installs it")


@pytest.fixture(scope="module")
def tiny():
    return dj.init(dj.configs.get("llama-tiny"), jax.random.key(0))


def _fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    fields["tensors"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return fields


def _save(model, path, **kwargs):
    return dj.gguf.save(model, path, overwrite=True, **kwargs)


# -- what the file says ---------------------------------------------------------------------


def test_plain_program_is_llama_with_byte_tokenizer(tiny, tmp_path):
    info = _save(tiny, tmp_path / "m.gguf")
    f = _fields(tmp_path / "m.gguf")
    assert info["architecture"] == f["general.architecture"] == "llama"
    assert f["llama.block_count"] == 4 and f["llama.attention.head_count"] == 4
    assert f["llama.attention.head_count_kv"] == 2 and f["llama.feed_forward_length"] == 176
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.tokens"] == byte_unicode()
    assert f["tensors"]["blk.3.attn_q.weight"] == "F32"
    q = np.asarray(tiny.params["blocks"]["attn"]["q"]["kernel"][0]).reshape(64, -1).T
    stored = next(
        t
        for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors
        if t.name == "blk.0.attn_q.weight"
    )
    # llama.cpp's RoPE pairs dims (2j, 2j+1) of a head; depthjax's pairs (j, j + Dh/2)
    np.testing.assert_array_equal(np.asarray(stored.data)[1::16], q[8::16])


def test_gated_off_sublayers_are_zero_in_the_deci_arrays(tiny, tmp_path):
    """attention off at step 1, MLP off at step 2, step 3 fully off (left out)."""
    model = dj.depth.drop_sublayers(tiny, attn=[1, 3], mlp=[2, 3])
    info = _save(model, tmp_path / "m.gguf")
    f = _fields(tmp_path / "m.gguf")
    assert f["general.architecture"] == "deci" and info["steps"] == [0, 1, 2]
    assert f["deci.attention.head_count"] == [4, 0, 4]
    assert f["deci.attention.head_count_kv"] == [2, 0, 2]
    # llama.cpp's deci graph drops the attention of a layer whose feed-forward length is 0,
    # so an attention-only layer keeps a 1-wide zero feed-forward (layout.ZERO_FF)
    assert f["deci.feed_forward_length"] == [176, 176, layout.ZERO_FF]
    names = f["tensors"]
    assert not {"blk.1.attn_q.weight", "blk.1.attn_output.weight"} & set(names)
    assert "blk.2.attn_q.weight" in names and "blk.3.attn_norm.weight" not in names


def test_step_zero_without_attention_keeps_the_head_size(tiny, tmp_path):
    """llama.cpp derives the head size from layer 0's head count: layer 0 becomes a zero
    "linear attention" (head_count n_heads, head_count_kv 0: no KV cache, adds 0)."""
    _save(dj.depth.drop_sublayers(tiny, attn=[0, 2]), tmp_path / "m.gguf")
    f = _fields(tmp_path / "m.gguf")
    assert f["deci.attention.head_count"] == [4, 4, 0, 4]
    assert f["deci.attention.head_count_kv"] == [0, 2, 0, 2]
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    wo = next(t for t in reader.tensors if t.name == "blk.0.attn_output.weight")
    assert not np.asarray(wo.data).any() and "blk.0.attn_q.weight" not in f["tensors"]


def test_quantized_types(tiny, tmp_path):
    _save(tiny, tmp_path / "h.gguf", dtype="f16")
    f16 = _fields(tmp_path / "h.gguf")
    _save(tiny, tmp_path / "q.gguf", dtype="q8_0")
    q8 = _fields(tmp_path / "q.gguf")
    assert f16["tensors"]["blk.0.attn_q.weight"] == "F16"
    assert f16["tensors"]["blk.0.attn_norm.weight"] == "F32"
    assert q8["tensors"]["blk.0.attn_q.weight"] == "Q8_0"
    assert q8["tensors"]["blk.0.ffn_down.weight"] == "F16"  # rows of 176: not whole blocks


def _bpe_tokenizer(vocab_size=300):
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["the depth of a model is data " * 20, "pruning heals"], trainer)
    return tok


def test_tokenizer_json_travels(tmp_path):
    tok = _bpe_tokenizer()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    model = dj.init(dj.configs.get("llama-tiny", vocab_size=320), jax.random.key(0))
    _save(model, tmp_path / "m.gguf", tokenizer=str(path), eos_token_id=0)
    f = _fields(tmp_path / "m.gguf")
    n = tok.get_vocab_size()
    assert f["tokenizer.ggml.pre"] == "gpt-2" and len(f["tokenizer.ggml.tokens"]) == 320
    assert f["tokenizer.ggml.tokens"][:n] == [tok.id_to_token(i) for i in range(n)]
    assert f["tokenizer.ggml.token_type"][0] == 3  # <|end|>: a control token
    assert f["tokenizer.ggml.tokens"][n] == f"[PAD{n}]" and f["tokenizer.ggml.eos_token_id"] == 0
    assert f["tokenizer.ggml.merges"][0] == " ".join(json.loads(tok.to_str())["model"]["merges"][0])


def _abstract(preset, **changes):
    """A model of `preset` with shapes only (the config is refused before any weight)."""
    cfg = dj.configs.get(preset, **changes)
    return jax.eval_shape(lambda: dj.init(cfg, jax.random.key(0)))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda m: _abstract("gpt2-tiny"), "family 'gpt2'"),
        (lambda m: _abstract("mistral-tiny"), "sliding-window"),
        (lambda m: _abstract("qwen3-tiny"), "qk_norm"),
        (lambda m: _abstract("gemma2-tiny"), "norm_placement"),
        (lambda m: _abstract("llama-tiny", attn_softcap=30.0), "soft-capping"),
        (lambda m: dj.depth.parallelize(m, [[1, 2]]), "parallel groups"),
        (
            lambda m: dj.recover(dj.depth.drop(m, [2]), m, CALIB, method="linear", rank=4),
            r"step 2 .*linear part.*drop_adapters=True",
        ),
    ],
    ids=["gpt2", "window", "qk_norm", "gemma", "softcap", "parallel", "linear-adapter"],
)
def test_what_llama_cpp_cannot_express_is_refused_by_name(tiny, tmp_path, make, match):
    with pytest.raises(GGUFError, match=match):
        dj.gguf.save(make(tiny), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_bad_settings_are_refused(tiny, tmp_path):
    with pytest.raises(GGUFError, match="dtype='q4'"):
        dj.gguf.save(tiny, tmp_path / "a.gguf", dtype="q4")
    wide = dj.init(dj.configs.get("llama-tiny", vocab_size=300), jax.random.key(0))
    with pytest.raises(GGUFError, match="pass the tokenizer"):
        dj.gguf.save(wide, tmp_path / "b.gguf")
    (tmp_path / "c.gguf").write_text("")
    with pytest.raises(GGUFError, match="overwrite=True"):
        dj.gguf.save(tiny, tmp_path / "c.gguf")


def test_convert_command_writes_gguf(tiny, tmp_path, capsys):
    dj.save(dj.depth.drop_sublayers(tiny, attn=[1]), str(tmp_path / "native"))
    out = tmp_path / "m.gguf"
    args = ["convert", "--from", "native", str(tmp_path / "native"), "--to", str(out)]
    assert cli_main(args + ["--dtype", "f16"]) == 0
    assert "deci graph" in capsys.readouterr().out
    assert _fields(out)["deci.attention.head_count_kv"] == [2, 0, 2, 2]
    assert cli_main(args) == 2  # exists: needs --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_convert_from_hf_takes_its_tokenizer_json(tmp_path):
    tok = _bpe_tokenizer()
    model = dj.init(dj.configs.get("llama-tiny", vocab_size=320), jax.random.key(0))
    dj.hf.save(model, str(tmp_path / "hf"), tokenizer=tok)
    out = tmp_path / "m.gguf"
    assert cli_main(["convert", "--from", "hf", str(tmp_path / "hf"), "--to", str(out)]) == 0
    tokens = _fields(out)["tokenizer.ggml.tokens"]
    n = tok.get_vocab_size()
    assert tokens[:n] == [tok.id_to_token(i) for i in range(n)] and len(tokens) == 320


# -- llama.cpp as the client ----------------------------------------------------------------


def _run_llama(path, prompt_ids, n_new, **options):
    """llama.cpp's logits over the prompt, its greedy continuation (one token at a time
    through its KV cache) and the logits of each decoding step."""
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(
        **options,
        model_path=str(path),
        n_ctx=64,
        n_batch=64,
        n_threads=1,
        logits_all=True,
        verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32,  # llama.cpp's default KV cache is f16
        type_v=llama_cpp.GGML_TYPE_F32,
    )
    llm.eval(list(prompt_ids))
    prompt_logits = np.array(llm.scores[: len(prompt_ids)])
    out, steps = [], [prompt_logits[-1]]
    for _ in range(n_new):
        out.append(int(np.argmax(steps[-1])))
        llm.eval([out[-1]])
        steps.append(np.array(llm.scores[llm.n_tokens - 1]))
    return llm, prompt_logits, out, np.asarray(steps[:-1])


_apply = jax.jit(dj.apply)


def _variants():
    def recovered(m):  # drop step 0: the linear adapter folds into the embeddings
        return dj.recover(dj.depth.drop(m, [0]), m, CALIB, method="linear", rank=8)

    return {
        "plain": lambda m: m,
        "attn-25%": lambda m: dj.depth.drop_sublayers(m, attn=[2]),
        "block-dropped+linear": recovered,
        "looped": lambda m: dj.depth.repeat(m, [1, 2], 2),
        "step0-attn+mlp-off": lambda m: dj.depth.drop_sublayers(m, attn=[0], mlp=[2]),
        # step 1 gated off whole; the bias adapter at step 2 folds into step 1's MLP bias,
        # so step 1 stays as a zero feed-forward layer carrying it
        "block-gated+bias": lambda m: dj.recover(
            dj.depth.drop_sublayers(m, attn=[1], mlp=[1]), m, CALIB, method="bias"
        ),
    }


@pytest.mark.parametrize("variant", list(_variants()))
def test_llama_cpp_logits_and_greedy_equal_depthjax_f32(tiny, tmp_path, variant):
    model = _variants()[variant](tiny)
    _llama_cpp()
    materialized = pytest.warns(UserWarning, match="materializes")
    with materialized if variant == "looped" else contextlib.nullcontext():
        _save(model, tmp_path / "m.gguf")
    _check_client(model, tmp_path / "m.gguf")


_LLAMA3 = dict(
    type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_seq_len=16,  # most of head_dim 16's frequencies are scaled at 16 positions
)


@pytest.mark.parametrize(
    "preset, changes",
    [
        ("qwen2-tiny", {}),  # q/k/v biases, tied head, rope_theta 1e6
        ("llama-tiny", dict(rope_scaling=dict(type="linear", factor=4.0))),
        ("llama-tiny", dict(rope_scaling=_LLAMA3)),  # written as the rope_freqs tensor
    ],
    ids=["qwen2", "rope-linear", "rope-llama3"],
)
def test_llama_cpp_runs_the_families_and_rope_scalings(tmp_path, preset, changes):
    model = dj.init(dj.configs.get(preset, **changes), jax.random.key(1))
    model = dj.depth.drop_sublayers(model, attn=[3])
    _llama_cpp()
    _save(model, tmp_path / "m.gguf")
    _check_client(model, tmp_path / "m.gguf")


def _check_client(model, path, atol=F32_ATOL):
    prompt = ByteTokenizer().encode(PROMPT)
    llm, prompt_logits, greedy, step_logits = _run_llama(path, prompt, N_NEW)
    assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == prompt.tolist()
    assert llm.detokenize(greedy) == bytes(greedy)
    full = np.asarray(_apply(model, np.asarray([*prompt, *greedy], np.int32)[None]))[0]
    T = len(prompt)
    np.testing.assert_allclose(prompt_logits, full[:T], atol=atol, rtol=0)
    np.testing.assert_allclose(step_logits, full[T - 1 : T - 1 + N_NEW], atol=atol, rtol=0)
    # greedy continuations equal: depthjax's argmax after each prefix is llama.cpp's token
    assert np.argmax(full[T - 1 : T - 1 + N_NEW], -1).tolist() == greedy


def test_llama_cpp_tokenizes_like_the_tokenizer_json(tmp_path):
    tok = _bpe_tokenizer()
    model = dj.init(dj.configs.get("llama-tiny", vocab_size=320), jax.random.key(0))
    _save(model, tmp_path / "m.gguf", tokenizer=tok)
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=32, verbose=False)
    for text in ("the depth of a model is data", "pruning heals, 42 times!\nok", "ünïcode"):
        ids = tok.encode(text, add_special_tokens=False).ids
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text
        assert llm.detokenize(ids).decode() == text


def test_llama_cpp_flash_attention_runs_deci(tiny, tmp_path):
    """Serving setting (flash attention: then layers with 0 KV heads hold no V cache
    either): llama.cpp's CPU flash attention rounds through f16 (measured 3.3e-4)."""
    model = dj.depth.drop_sublayers(tiny, attn=[0, 2])
    _llama_cpp()
    _save(model, tmp_path / "m.gguf")
    prompt = ByteTokenizer().encode(PROMPT)
    _, logits, _, _ = _run_llama(tmp_path / "m.gguf", prompt, 0, flash_attn=True)
    full = np.asarray(_apply(model, np.asarray(prompt, np.int32)[None]))[0]
    assert np.abs(logits - full).max() < 2e-3
    assert (np.argmax(logits, -1) == np.argmax(full, -1)).all()


@pytest.mark.parametrize("dtype, max_error", [("f16", 2e-3), ("q8_0", 3e-2)])  # 3.5e-4, 1.0e-2
def test_llama_cpp_quantized_agrees(tiny, tmp_path, dtype, max_error):
    """f16 / q8_0 files: argmax agreement over the prompt positions (measured: all 21 agree
    for both), and the largest logit error within the stated bound (measured 3.5e-4 for
    f16 and 1.0e-2 for q8_0; logits span about +-0.55)."""
    _llama_cpp()
    _save(tiny, tmp_path / "m.gguf", dtype=dtype)
    prompt = ByteTokenizer().encode(PROMPT)
    _, logits, _, _ = _run_llama(tmp_path / "m.gguf", prompt, 0)
    full = np.asarray(_apply(tiny, np.asarray(prompt, np.int32)[None]))[0]
    assert np.abs(logits - full).max() < max_error
    assert (np.argmax(logits, -1) == np.argmax(full, -1)).mean() >= 0.9
