"""Bad programs, configs and inputs are rejected before compute, with a message naming
the problem."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import depthjax as dj
from depthjax.core.program import Program, ProgramError


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Program.create([0, 4, 1], n_blocks=4), r"out of range at steps \[1\].*4 rows"),
        (lambda: Program.create([0, -1], n_blocks=4), r"negative block ids at steps \[1\]"),
        (lambda: Program.create([]), "empty program"),
        (lambda: Program.create([0.5, 1.0]), "must be integers"),
        (lambda: Program.create([0, 1], attn=[1, 1, 1]), "equal lengths.*attn=3"),
        (lambda: Program.create([0, 1], parallel=[1, 0]), r"parallel\[0\]"),
        (lambda: Program.create([0, 1], mlp=[1, np.nan]), "finite"),
        (lambda: Program.create([[0, 1]]), "1-d"),
    ],
)
def test_invalid_programs_are_rejected(make, message):
    with pytest.raises(ProgramError, match=message):
        make()


def test_apply_rejects_program_built_without_checks(llama, tokens):
    bad = Program(
        block=jnp.array([0, 9], jnp.int32),
        attn=jnp.ones(2),
        mlp=jnp.ones(2),
        parallel=jnp.zeros(2, bool),
    )
    with pytest.raises(ProgramError, match=r"out of range at steps \[1\]"):
        dj.apply(llama.replace(program=bad), tokens)
    with pytest.raises(ProgramError, match="out of range"):
        llama.with_program(bad)
    uneven = bad.replace(block=jnp.array([0, 1, 2], jnp.int32))
    with pytest.raises(ProgramError, match="equal lengths"):
        dj.apply(llama.replace(program=uneven), tokens)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(family="mamba"), "family='mamba' is not one of"),
        (dict(n_heads=4, n_kv_heads=3), "multiple of n_kv_heads=3"),
        (dict(d_model=66, n_heads=4), "not divisible by n_heads=4"),
        (dict(norm_placement="sandwich"), "norm_placement='sandwich'"),
        (dict(parallel_block=True, norm_placement="post"), "parallel_block"),
        (dict(remat="sometimes"), "remat='sometimes'"),
        (dict(n_layers=0), "n_layers must be a positive integer"),
        (dict(attention_impl="magic"), "attention_impl='magic'"),
        (dict(attention_chunk=-1), "attention_chunk must be >= 0"),
    ],
)
def test_invalid_configs_are_rejected(kwargs, message):
    with pytest.raises(dj.ConfigError, match=message):
        dj.ModelConfig(**kwargs)


def test_unknown_keys_and_presets_get_suggestions():
    with pytest.raises(dj.ConfigError, match="unknown ModelConfig key 'n_layer'.*'n_layers'"):
        dj.configs.get("llama-tiny", n_layer=3)
    with pytest.raises(dj.ConfigError, match="unknown preset 'lama-tiny'.*'llama-tiny'"):
        dj.configs.get("lama-tiny")


def test_family_defaults_and_explicit_head_dim():
    gpt2 = dj.ModelConfig(family="gpt2", d_model=64, n_heads=4)
    assert (gpt2.norm, gpt2.position, gpt2.mlp, gpt2.tie_embeddings) == (
        "layer",
        "learned",
        "gelu_tanh",
        True,
    )
    bert = dj.ModelConfig(family="bert")
    assert not bert.causal and bert.norm_placement == "post" and bert.type_vocab_size == 2
    qwen3 = dj.configs.get("qwen3-tiny")
    assert qwen3.head_dim == 32 and qwen3.head_dim * qwen3.n_heads != qwen3.d_model
    assert dj.ModelConfig.from_dict(qwen3.to_dict()) == qwen3


def test_bad_inputs(llama):
    with pytest.raises(ValueError, match="tokens must be"):
        dj.apply(llama, jnp.zeros((2, 3, 4), jnp.int32))
    with pytest.raises(ValueError, match="integers"):
        dj.apply(llama, jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="mask shape"):
        dj.apply(llama, jnp.zeros((2, 3), jnp.int32), mask=jnp.ones((2, 4)))
    gpt2 = dj.init(dj.configs.get("gpt2-tiny", max_seq_len=8), jax.random.key(0))
    with pytest.raises(ValueError, match="exceeds max_seq_len=8"):
        dj.apply(gpt2, jnp.zeros((1, 9), jnp.int32))


def test_scalar_gates_apply_to_every_step():
    prog = Program.create([0, 1, 1], attn=0.5, mlp=0)
    assert np.asarray(prog.attn).tolist() == [0.5] * 3 and np.asarray(prog.mlp).tolist() == [0] * 3


def test_program_round_trip_and_repr():
    prog = Program.create([0, 2, 2], attn=[1, 0, 1], parallel=[0, 0, 1])
    again = Program.from_dict(prog.to_dict(), n_blocks=3)
    chex.assert_trees_all_equal(prog, again, strict=True)
    text = repr(prog)
    assert "depth=3" in text and text.count("\n") == 4 and "||" in text
    with pytest.raises(ProgramError, match="unknown program fields"):
        Program.from_dict({"block": [0], "gates": [1]})


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    from depthjax import cli

    assert cli.main(["score", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("depthjax score: error:") and "Traceback" not in err
    (tmp_path / "spec.yaml").write_text("slices: []\n")
    dj.save(dj.init(dj.configs.get("llama-tiny"), jax.random.key(0)), tmp_path / "ck")
    assert (
        cli.main(
            [
                "depth",
                "--in",
                str(tmp_path / "ck"),
                "--spec",
                str(tmp_path / "spec.yaml"),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    assert "non-empty 'slices'" in capsys.readouterr().err
