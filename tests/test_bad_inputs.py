"""Every anticipated bad input gets a named error (a `dj.DepthjaxError`, a ValueError) with a
message naming the problem -- never a raw traceback, never a silently wrong answer. One table
for the Python API, one for the command line (exit code 2, one line, no traceback)."""

import math

import jax
import numpy as np
import pytest

import depthjax as dj
from depthjax import cli
from depthjax.adaptive.common import AdaptiveError
from depthjax.core.rope import RopeError
from depthjax.files.tokenizer import TokenizerError, load_tokenizer
from depthjax.inference.sampling import GenerationError
from depthjax.metrics import MetricError
from depthjax.train.config import TrainConfigError, parse
from depthjax.train.data import DataError, expand_files
from depthjax.train.step import trainable_mask

CFG = dict(n_layers=2, d_model=32)


@pytest.fixture(scope="module")
def m():
    return dj.init(dj.configs.get("llama-tiny", **CFG), jax.random.key(0))


@pytest.fixture(scope="module")
def bert():
    return dj.init(dj.configs.get("bert-tiny", **CFG), jax.random.key(0))


@pytest.fixture(scope="module")
def files(tmp_path_factory, m):
    d = tmp_path_factory.mktemp("bad")
    dj.save(m, d / "ck")
    dj.save(dj.depth.stitch(m, m, at=1), d / "stitched")
    (d / "a_file").write_text("not a directory")
    (d / "broken.yaml").write_text("steps: [1, 2\nlr: 3\n")
    (d / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (d / "int_key.yaml").write_text("1: 2\n")
    (d / "spec_parallel.yaml").write_text('slices:\n  - layers: [0, 1]\n    parallel: "false"\n')
    (d / "spec_bool_rows.yaml").write_text("slices:\n  - layers: [true, 1]\n")
    (d / "spec_string_gate.yaml").write_text('slices:\n  - layers: [0, 1]\n    mlp: "0.5"\n')
    (d / "spec_bool_repeat.yaml").write_text("slices:\n  - layers: [0]\n    repeat: true\n")
    (d / "spec_range_bool.yaml").write_text("slices:\n  - layer_range: [0, true]\n")
    (d / "spec_list.yaml").write_text("- layers: [0]\n")
    (d / "spec_ok.yaml").write_text("slices:\n  - layers: [1, 0]\n")
    (d / "spec_empty_layers.yaml").write_text("slices:\n  - layers: []\n")
    dj.hf.save(m, str(d / "hf"))
    _bad_checkpoints(d, m)
    return d


def _bad_checkpoints(d, m):
    """Checkpoints whose digests are all consistent but whose content is not a model."""
    import json
    import shutil

    from depthjax.files import integrity

    dj.save(m, d / "ck_no_files")
    manifest = json.loads((d / "ck_no_files" / "manifest.json").read_text())
    del manifest["files"], manifest["sha256"]
    integrity.write_sealed(d / "ck_no_files" / "manifest.json", manifest)
    dj.save(m.replace(params=jax.tree.map(lambda x: x.astype(np.int32), m.params)), d / "ck_int")
    for name, key, value in [
        ("hf_rope_scaling_text", "rope_scaling", "linear"),
        ("hf_rope_parameters_text", "rope_parameters", "linear"),
        ("hf_auto_map", "auto_map", {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}),
        ("hf_minus_layers", "num_hidden_layers", -1),
    ]:
        shutil.copytree(d / "hf", d / name)
        config = json.loads((d / name / "config.json").read_text())
        (d / name / "config.json").write_text(json.dumps({**config, key: value}))


def _ids(m, value):
    return np.full((1, 4), value, np.int64)


def _batches(tokens, **extra):
    return [{"tokens": tokens, **extra}]


OK = np.zeros((2, 8), np.int32)

API = [
    # apply: tokens, masks, token types, positions
    (
        "apply id = vocab",
        lambda m, b: dj.apply(m, _ids(m, 256)),
        dj.InputError,
        r"outside the vocabulary 0\.\.255.*256",
    ),
    (
        "apply negative id",
        lambda m, b: dj.apply(m, _ids(m, -1)),
        dj.InputError,
        r"outside the vocabulary.*-1",
    ),
    ("apply float tokens", lambda m, b: dj.apply(m, OK.astype(float)), dj.InputError, "integers"),
    ("apply 3-d tokens", lambda m, b: dj.apply(m, OK[None]), dj.InputError, r"\[batch, time\]"),
    (
        "apply mask shape",
        lambda m, b: dj.apply(m, OK, mask=np.ones((2, 9))),
        dj.InputError,
        "mask shape",
    ),
    (
        "apply token types on llama",
        lambda m, b: dj.apply(m, OK, token_types=OK),
        dj.InputError,
        "no token types",
    ),
    (
        "apply token type 2 of 2",
        lambda m, b: dj.apply(b, OK, token_types=OK + 2),
        dj.InputError,
        r"token_types.*outside 0\.\.1",
    ),
    (
        "apply output kind",
        lambda m, b: dj.apply(m, OK, output="probs"),
        dj.InputError,
        "output must be",
    ),
    (
        "apply beyond max_seq_len",
        lambda m, b: dj.apply(
            dj.init(dj.configs.get("gpt2-tiny", max_seq_len=8, **CFG), jax.random.key(0)),
            np.zeros((1, 9), np.int32),
        ),
        dj.InputError,
        "exceeds max_seq_len=8",
    ),
    # generate
    (
        "generate id = vocab",
        lambda m, b: dj.generate(m, _ids(m, 300), 2, temperature=0),
        GenerationError,
        "outside the vocabulary",
    ),
    (
        "generate negative id",
        lambda m, b: dj.generate(m, _ids(m, -1), 2, temperature=0),
        GenerationError,
        "outside the vocabulary",
    ),
    (
        "generate temperature nan",
        lambda m, b: dj.generate(m, OK, 2, temperature=math.nan, key=jax.random.key(0)),
        GenerationError,
        "temperature",
    ),
    (
        "generate temperature inf",
        lambda m, b: dj.generate(m, OK, 2, temperature=math.inf, key=jax.random.key(0)),
        GenerationError,
        "temperature",
    ),
    (
        "generate temperature < 0",
        lambda m, b: dj.generate(m, OK, 2, temperature=-1.0, key=jax.random.key(0)),
        GenerationError,
        "temperature",
    ),
    (
        "generate top_p nan",
        lambda m, b: dj.generate(m, OK, 2, temperature=1.0, top_p=math.nan, key=jax.random.key(0)),
        GenerationError,
        "top_p",
    ),
    (
        "generate top_k 2.5",
        lambda m, b: dj.generate(m, OK, 3, temperature=1.0, top_k=2.5, key=jax.random.key(0)),
        GenerationError,
        r"top_k must be an integer >= 1, got 2\.5",
    ),
    (
        "generate top_k 0",
        lambda m, b: dj.generate(m, OK, 2, temperature=1.0, top_k=0, key=jax.random.key(0)),
        GenerationError,
        "top_k",
    ),
    (
        "generate eos outside vocab",
        lambda m, b: dj.generate(m, OK, 2, temperature=0, eos_id=999),
        GenerationError,
        "eos_id=999",
    ),
    (
        "generate 0 tokens",
        lambda m, b: dj.generate(m, OK, 0, temperature=0),
        GenerationError,
        "max_new_tokens",
    ),
    (
        "generate encoder",
        lambda m, b: dj.generate(b, OK, 2, temperature=0),
        GenerationError,
        "causal",
    ),
    # metrics
    (
        "metric id = vocab",
        lambda m, b: dj.metrics.block_influence(m, _ids(m, 256)),
        MetricError,
        "outside the vocabulary",
    ),
    (
        "metric negative id",
        lambda m, b: dj.metrics.ablation(m, _batches(_ids(m, -1))),
        MetricError,
        "outside the vocabulary",
    ),
    (
        "metric token_types dropped",
        lambda m, b: dj.metrics.block_influence(b, _batches(OK, token_types=OK)),
        MetricError,
        "token_types",
    ),
    (
        "metric unknown batch key",
        lambda m, b: dj.metrics.block_influence(m, _batches(OK, maks=OK)),
        MetricError,
        "'maks'",
    ),
    (
        "metric no batches",
        lambda m, b: dj.metrics.block_influence(m, []),
        MetricError,
        "no batches",
    ),
    (
        "metric all-padding mask",
        lambda m, b: dj.metrics.block_influence(m, _batches(OK, mask=OK * 0)),
        MetricError,
        "no real tokens",
    ),
    (
        "shapley 0 permutations",
        lambda m, b: dj.metrics.shapley(m, OK, num_permutations=0),
        MetricError,
        "num_permutations",
    ),
    (
        "shapley -2 permutations",
        lambda m, b: dj.metrics.shapley(m, OK, num_permutations=-2),
        MetricError,
        "num_permutations",
    ),
    (
        "ablation unit",
        lambda m, b: dj.metrics.ablation(m, OK, unit="layer"),
        MetricError,
        "unit must be",
    ),
    (
        "ablation measure",
        lambda m, b: dj.metrics.ablation(m, OK, measure="acc"),
        MetricError,
        "measure must be",
    ),
    (
        "angular span 0",
        lambda m, b: dj.metrics.angular_distance(m, OK, span=0),
        MetricError,
        "span",
    ),
    # prune and recover
    (
        "prune n > steps",
        lambda m, b: dj.prune(m, np.zeros(2), 10, unit="block"),
        dj.PruneError,
        r"n=10.*0\.\.2",
    ),
    (
        "prune every step",
        lambda m, b: dj.prune(m, np.zeros(2), 2, unit="block"),
        dj.PruneError,
        "every step",
    ),
    (
        "prune negative n",
        lambda m, b: dj.prune(m, np.zeros(2), -1, unit="block"),
        dj.PruneError,
        "n=-1",
    ),
    (
        "prune scores length",
        lambda m, b: dj.prune(m, np.zeros(5), 1, unit="block"),
        dj.PruneError,
        "must have 2 values",
    ),
    ("prune unit", lambda m, b: dj.prune(m, np.zeros(2), 1), dj.PruneError, "unit="),
    (
        "recover base of another width",
        lambda m, b: dj.recover(
            dj.depth.drop(m, [1]),
            dj.init(dj.configs.get("llama-tiny", n_layers=2), jax.random.key(1)),
            OK,
        ),
        dj.RecoverError,
        "d_model",
    ),
    (
        "recover method",
        lambda m, b: dj.recover(dj.depth.drop(m, [1]), m, OK, method="quadratic"),
        dj.RecoverError,
        "method",
    ),
    (
        "recover rank > width",
        lambda m, b: dj.recover(dj.depth.drop(m, [1]), m, OK, method="linear", rank=99),
        dj.RecoverError,
        r"rank in 1\.\.32",
    ),
    (
        "recover distill temperature 0",
        lambda m, b: dj.recover(dj.depth.drop(m, [1]), m, OK, method="distill", temperature=0),
        dj.RecoverError,
        "temperature must be a finite number > 0",
    ),
    (
        "recover distill hidden < 0",
        lambda m, b: dj.recover(dj.depth.drop(m, [1]), m, OK, method="distill", hidden=-1.0),
        dj.RecoverError,
        "hidden must be a finite number >= 0",
    ),
    (
        "recover temperature for lora",
        lambda m, b: dj.recover(dj.depth.drop(m, [1]), m, OK, method="lora", temperature=2.0),
        dj.RecoverError,
        r"temperature= applies to method='distill' only",
    ),
    (
        "recover distill from another table",
        lambda m, b: dj.recover(
            dj.depth.drop(m, [1]),
            dj.init(dj.configs.get("llama-tiny", **CFG), jax.random.key(1)),
            OK,
            method="distill",
        ),
        dj.RecoverError,
        r"shared parameters must be equal; these differ: \['blocks'\]",
    ),
    # programs and specs
    (
        "block id overflows int32",
        lambda m, b: dj.Program.create([0, 2**32 + 1]),
        dj.ProgramError,
        "int32",
    ),
    (
        "parallel value 2",
        lambda m, b: dj.Program.create([0, 1], parallel=[0, 2]),
        dj.ProgramError,
        "parallel",
    ),
    (
        "gate as text",
        lambda m, b: dj.Program.create([0, 1], attn=["a", 1]),
        dj.ProgramError,
        "attn",
    ),
    (
        "spec parallel as text",
        lambda m, b: dj.depth.from_spec(m, {"slices": [{"layers": [0, 1], "parallel": "false"}]}),
        dj.ProgramError,
        "parallel must be true or false",
    ),
    (
        "spec bool rows",
        lambda m, b: dj.depth.from_spec(m, {"slices": [{"layers": [True, 1]}]}),
        dj.ProgramError,
        r"rows \[True\]",
    ),
    (
        "spec gate as text",
        lambda m, b: dj.depth.from_spec(m, {"slices": [{"layers": [0, 1], "mlp": "0.5"}]}),
        dj.ProgramError,
        "mlp",
    ),
    (
        "spec bool repeat",
        lambda m, b: dj.depth.from_spec(m, {"slices": [{"layers": [0], "repeat": True}]}),
        dj.ProgramError,
        "repeat",
    ),
    # model configs
    ("config bool int", lambda m, b: dj.ModelConfig(n_layers=True), dj.ConfigError, "n_layers"),
    ("config text int", lambda m, b: dj.ModelConfig(d_model="64"), dj.ConfigError, "d_model"),
    (
        "config text float",
        lambda m, b: dj.ModelConfig(rope_theta="big"),
        dj.ConfigError,
        "rope_theta",
    ),
    (
        "config rope_theta <= 0",
        lambda m, b: dj.ModelConfig(rope_theta=-1.0),
        dj.ConfigError,
        "rope_theta",
    ),
    (
        "config norm_eps < 0",
        lambda m, b: dj.ModelConfig(norm_eps=-1e-6),
        dj.ConfigError,
        "norm_eps",
    ),
    ("config text bool", lambda m, b: dj.ModelConfig(qk_norm="yes"), dj.ConfigError, "qk_norm"),
    (
        "config param_dtype",
        lambda m, b: dj.ModelConfig(param_dtype="int8"),
        dj.ConfigError,
        "param_dtype='int8'",
    ),
    # training keys
    ("train lr < 0", lambda m, b: parse(["lr=-1e-3"]), TrainConfigError, "lr="),
    ("train lr nan", lambda m, b: parse(["lr=.nan"]), TrainConfigError, "lr="),
    ("train b1 = 1", lambda m, b: parse(["b1=1.0"]), TrainConfigError, "b1="),
    ("train b2 < 0", lambda m, b: parse(["b2=-0.5"]), TrainConfigError, "b2="),
    ("train eps < 0", lambda m, b: parse(["eps=-1e-8"]), TrainConfigError, "eps="),
    ("train clip_norm < 0", lambda m, b: parse(["clip_norm=-1"]), TrainConfigError, "clip_norm="),
    (
        "train weight_decay < 0",
        lambda m, b: parse(["weight_decay=-0.1"]),
        TrainConfigError,
        "weight_decay=",
    ),
    (
        "train min_lr_ratio > 1",
        lambda m, b: parse(["min_lr_ratio=2"]),
        TrainConfigError,
        "min_lr_ratio=",
    ),
    ("train seed < 0", lambda m, b: parse(["seed=-1"]), TrainConfigError, "seed"),
    ("train YAML value", lambda m, b: parse(["lr=[1"]), TrainConfigError, "lr=.*YAML"),
    (
        "train data_shards",
        lambda m, b: parse(["batch_size=16", "data_shards=3"]),
        TrainConfigError,
        "data_shards=3",
    ),
    (
        "train seq_len > max_seq_len",
        lambda m, b: parse(["seq_len=2048"]).check_model(dj.configs.get("llama-tiny")),
        TrainConfigError,
        "max_seq_len=1024",
    ),
    ("train regex", lambda m, b: trainable_mask(m.params, "blocks/("), TrainConfigError, "regex"),
    (
        "train regex matches nothing",
        lambda m, b: trainable_mask(m.params, "lora"),
        TrainConfigError,
        "matches no parameter",
    ),
    # data, tokenizers
    (
        "data nothing matches",
        lambda m, b: expand_files(["/nonexistent/*.txt"]),
        DataError,
        "nothing matches",
    ),
    ("tokenizer spec", lambda m, b: load_tokenizer("bpe"), TokenizerError, "expected 'byte'"),
    # GGUF export (refused before anything is written)
    (
        "gguf of an encoder",
        lambda m, b: dj.gguf.save(b, "/nonexistent/x.gguf"),
        dj.gguf.GGUFError,
        "family 'bert'",
    ),
    (
        "gguf dtype",
        lambda m, b: dj.gguf.save(m, "/nonexistent/x.gguf", dtype="q4_0"),
        dj.gguf.GGUFError,
        "dtype='q4_0'",
    ),
    (
        "gguf of a quantized model",
        lambda m, b: dj.gguf.save(dj.depth.quantize(m, 8), "/nonexistent/x.gguf"),
        dj.gguf.GGUFError,
        "quantized.*dequantize",
    ),
    # quantization (dj.depth.quantize)
    (
        "quantize to 3 bits",
        lambda m, b: dj.depth.quantize(m, 3),
        dj.depth.QuantizedError,
        "4, 8 or 16",
    ),
    (
        "hf export of a quantized model",
        lambda m, b: dj.hf.save(dj.depth.quantize(m, 8), "/nonexistent/q"),
        dj.hf.HFError,
        "quantized.*dequantize=True",
    ),
    (
        "linear_expand of a 3-row table",
        lambda m, b: dj.depth.linear_expand(dj.depth.grow(m, 0), 4),
        dj.depth.LearngeneError,
        "2-row table",
    ),
    # stitching (dj.depth.stitch)
    (
        "stitch models of two vocabularies",
        lambda m, b: dj.depth.stitch(m, m.replace(config=m.config.replace(vocab_size=128)), at=1),
        dj.depth.StitchError,
        "vocabularies differ",
    ),
    (
        "stitch an encoder",
        lambda m, b: dj.depth.stitch(m, b, at=1),
        dj.depth.StitchError,
        "model b is a bidirectional",
    ),
    (
        "stitch at past a's depth",
        lambda m, b: dj.depth.stitch(m, m, at=3),
        dj.depth.StitchError,
        r"at must be an int in 1\.\.2",
    ),
    (
        "stitch resume at b's depth",
        lambda m, b: dj.depth.stitch(m, m, at=1, resume=2),
        dj.depth.StitchError,
        r"resume must be an int in 0\.\.1",
    ),
    (
        "stitch two widths without a map",
        lambda m, b: dj.depth.stitch(m, m.replace(config=m.config.replace(d_model=48)), at=1),
        dj.depth.StitchError,
        "need a stitching map",
    ),
    (
        "stitch inside a parallel group",
        lambda m, b: dj.depth.stitch(dj.depth.parallelize(m, [[0, 1]]), m, at=1),
        dj.depth.StitchError,
        "splits a parallel group of model a",
    ),
    (
        "stitch fine_tune without calibration",
        lambda m, b: dj.depth.stitch(m, m, at=1, fine_tune=2),
        dj.depth.StitchError,
        "fine_tune needs calibration",
    ),
    (
        "trace a stitched model",
        lambda m, b: dj.apply(dj.depth.stitch(m, m, at=1), np.zeros((1, 4), int), trace=True),
        dj.depth.StitchError,
        "trace=True",
    ),
    (
        "hf export of a stitched model",
        lambda m, b: dj.hf.save(dj.depth.stitch(m, m, at=1), "/nonexistent/s"),
        dj.hf.HFError,
        "stitched model",
    ),
    (
        "gguf of a stitched model",
        lambda m, b: dj.gguf.save(dj.depth.stitch(m, m, at=1), "/nonexistent/s.gguf"),
        dj.gguf.GGUFError,
        "stitched model",
    ),
    (
        "programs= for a stitched model",
        lambda m, b: dj.eval.perplexity(dj.depth.stitch(m, m, at=1), ["ab"], programs=m.program),
        dj.eval.EvalError,
        "stitched model",
    ),
    (
        "draft= for a stitched model",
        lambda m, b: dj.generate(dj.depth.stitch(m, m, at=1), [[1, 2]], 2, temperature=0, draft=1),
        GenerationError,
        "stitched model",
    ),
]


@pytest.mark.parametrize("name, call, error, message", API, ids=[c[0] for c in API])
def test_api_rejects_bad_input(name, call, error, message, m, bert):
    with pytest.raises(error, match=message) as info:
        call(m, bert)
    assert isinstance(info.value, dj.DepthjaxError), "a depthjax error, not a bare ValueError"


def _cli(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    return code, capsys.readouterr().err


CLI = [
    (
        "a stitched model where one model is expected",
        lambda d: ["prune", "--model", str(d / "stitched"), "--n", "1", "--out", str(d / "p")],
        "holds a stitched model",
    ),
    (
        "train --out is a file",
        lambda d: ["train", "--out", str(d / "a_file"), "steps=1"],
        "is a file",
    ),
    (
        "train --config YAML syntax",
        lambda d: ["train", "--out", str(d / "r"), "--config", str(d / "broken.yaml")],
        r"broken\.yaml.*YAML",
    ),
    (
        "train --config binary",
        lambda d: ["train", "--out", str(d / "r"), "--config", str(d / "binary.yaml")],
        r"binary\.yaml",
    ),
    (
        "train --config non-string key",
        lambda d: ["train", "--out", str(d / "r"), "--config", str(d / "int_key.yaml")],
        r"key 1 \(int\) is not a name",
    ),
    (
        "train batch that cannot fit",
        lambda d: ["train", "--out", str(d / "big"), "model=llama-tiny", "batch_size=1000000"],
        r"needs at least [\d.]+ GiB per device .* but a device has",
    ),
    (
        "train --config missing",
        lambda d: ["train", "--out", str(d / "r"), "--config", str(d / "nope.yaml")],
        "nope.yaml",
    ),
    ("train seed < 0", lambda d: ["train", "--out", str(d / "r"), "seed=-1"], "seed must be >= 0"),
    ("train lr < 0", lambda d: ["train", "--out", str(d / "r"), "lr=-0.1"], "lr="),
    ("train b1 >= 1", lambda d: ["train", "--out", str(d / "r"), "b1=1.5"], "b1="),
    ("train value YAML", lambda d: ["train", "--out", str(d / "r"), "lr={"], "YAML"),
    (
        "train model bool",
        lambda d: ["train", "--out", str(d / "r"), "model.n_layers=true"],
        "n_layers",
    ),
    (
        "train seq_len > max",
        lambda d: ["train", "--out", str(d / "r"), "seq_len=4096"],
        "max_seq_len",
    ),
    (
        "train unknown key",
        lambda d: ["train", "--out", str(d / "r"), "step=3"],
        "did you mean 'steps'",
    ),
    (
        "prune n > steps",
        lambda d: ["prune", "--model", str(d / "ck"), "--n", "10", "--out", str(d / "p")],
        r"--n 10.*2 steps",
    ),
    (
        "prune rank > width",
        lambda d: [
            "prune",
            "--model",
            str(d / "ck"),
            "--n",
            "1",
            "--recover",
            "linear",
            "--rank",
            "99",
            "--out",
            str(d / "p"),
        ],
        r"--rank 99",
    ),
    (
        "prune temperature without distill",
        lambda d: [
            "prune",
            "--model",
            str(d / "ck"),
            "--n",
            "1",
            "--recover",
            "lora",
            "--temperature",
            "2",
            "--out",
            str(d / "p"),
        ],
        "--temperature applies to --recover distill only",
    ),
    (
        "prune distill temperature 0",
        lambda d: [
            "prune",
            "--model",
            str(d / "ck"),
            "--n",
            "1",
            "--recover",
            "distill",
            "--temperature",
            "0",
            "--out",
            str(d / "p"),
        ],
        "--temperature must be > 0",
    ),
    (
        "prune seed < 0",
        lambda d: [
            "prune",
            "--model",
            str(d / "ck"),
            "--n",
            "1",
            "--seed",
            "-1",
            "--out",
            str(d / "p"),
        ],
        "--seed",
    ),
    (
        "prune batches 0",
        lambda d: [
            "prune",
            "--model",
            str(d / "ck"),
            "--n",
            "1",
            "--batches",
            "0",
            "--out",
            str(d / "p"),
        ],
        "--batches",
    ),
    (
        "prune --out is a file",
        lambda d: ["prune", "--model", str(d / "ck"), "--n", "1", "--out", str(d / "a_file")],
        "a_file",
    ),
    ("score missing model", lambda d: ["score", "--model", str(d / "nothing")], "nothing"),
    (
        "score seq-len 0",
        lambda d: ["score", "--model", str(d / "ck"), "--seq-len", "0"],
        "--seq-len",
    ),
    (
        "score --out is a file",
        lambda d: ["score", "--model", str(d / "ck"), "--out", str(d / "a_file")],
        "a_file",
    ),
    (
        "depth spec YAML syntax",
        lambda d: [
            "depth",
            "--in",
            str(d / "ck"),
            "--spec",
            str(d / "broken.yaml"),
            "--out",
            str(d / "o"),
        ],
        "YAML",
    ),
    (
        "depth spec binary",
        lambda d: [
            "depth",
            "--in",
            str(d / "ck"),
            "--spec",
            str(d / "binary.yaml"),
            "--out",
            str(d / "o"),
        ],
        r"binary\.yaml",
    ),
    (
        "depth spec parallel text",
        lambda d: [
            "depth",
            "--in",
            str(d / "ck"),
            "--spec",
            str(d / "spec_parallel.yaml"),
            "--out",
            str(d / "o"),
        ],
        "parallel must be true or false",
    ),
    (
        "depth spec bool rows",
        lambda d: [
            "depth",
            "--in",
            str(d / "ck"),
            "--spec",
            str(d / "spec_bool_rows.yaml"),
            "--out",
            str(d / "o"),
        ],
        "True",
    ),
    (
        "depth spec text gate",
        lambda d: [
            "depth",
            "--in",
            str(d / "ck"),
            "--spec",
            str(d / "spec_string_gate.yaml"),
            "--out",
            str(d / "o"),
        ],
        "mlp",
    ),
    (
        "depth spec bool repeat",
        lambda d: [
            "depth",
            "--in",
            str(d / "ck"),
            "--spec",
            str(d / "spec_bool_repeat.yaml"),
            "--out",
            str(d / "o"),
        ],
        "repeat",
    ),
    (
        "depth spec bool range",
        lambda d: [
            "depth",
            "--in",
            str(d / "ck"),
            "--spec",
            str(d / "spec_range_bool.yaml"),
            "--out",
            str(d / "o"),
        ],
        "layer_range",
    ),
    (
        "depth spec not a mapping",
        lambda d: [
            "depth",
            "--in",
            str(d / "ck"),
            "--spec",
            str(d / "spec_list.yaml"),
            "--out",
            str(d / "o"),
        ],
        "mapping",
    ),
    (
        "depth --out is a file",
        lambda d: [
            "depth",
            "--in",
            str(d / "ck"),
            "--spec",
            str(d / "spec_ok.yaml"),
            "--out",
            str(d / "a_file"),
        ],
        "a_file",
    ),
    ("depth of an HF directory", lambda d: ["depth", "--in", str(d / "hf")], "manifest.json"),
    (
        "native manifest without files",
        lambda d: ["convert", "--from", "native", str(d / "ck_no_files"), "--to", str(d / "o1")],
        r"manifest\.json is not a complete depthjax manifest.*'files' \(missing\)",
    ),
    (
        "native int32 tensors",
        lambda d: ["convert", "--from", "native", str(d / "ck_int"), "--to", str(d / "o2")],
        r"embed/.* has dtype int32, not floating point",
    ),
    (
        "hf rope_scaling is text",
        lambda d: [
            "convert",
            "--from",
            "hf",
            str(d / "hf_rope_scaling_text"),
            "--to",
            str(d / "o3"),
        ],
        r"rope_scaling.*'linear'",
    ),
    (
        "hf rope_parameters is text",
        lambda d: [
            "convert",
            "--from",
            "hf",
            str(d / "hf_rope_parameters_text"),
            "--to",
            str(d / "o4"),
        ],
        r"rope_parameters.*'linear'",
    ),
    (
        "hf num_hidden_layers -1",
        lambda d: ["convert", "--from", "hf", str(d / "hf_minus_layers"), "--to", str(d / "o6")],
        r"num_hidden_layers must be a positive integer, got -1",
    ),
    (
        "spec with empty layers",
        lambda d: [
            "depth",
            "--in",
            str(d / "ck"),
            "--spec",
            str(d / "spec_empty_layers.yaml"),
            "--out",
            str(d / "o7"),
        ],
        r"slice 0: layers is empty",
    ),
    (
        "hf auto_map",
        lambda d: ["convert", "--from", "hf", str(d / "hf_auto_map"), "--to", str(d / "o5")],
        r"auto_map",
    ),
    (
        "convert onto a checkpoint",
        lambda d: ["convert", "--from", "native", str(d / "ck"), "--to", str(d / "hf")],
        "already holds a checkpoint",
    ),
    (
        "convert to a file",
        lambda d: ["convert", "--from", "native", str(d / "ck"), "--to", str(d / "a_file")],
        "is a file",
    ),
    (
        "convert native of an HF dir",
        lambda d: ["convert", "--from", "native", str(d / "hf"), "--to", str(d / "x")],
        "manifest.json",
    ),
    (
        "generate temperature nan",
        lambda d: ["generate", "--model", str(d / "ck"), "--prompt", "hi", "--temperature", "nan"],
        "temperature",
    ),
    (
        "generate 0 tokens",
        lambda d: ["generate", "--model", str(d / "ck"), "--prompt", "hi", "--max-new-tokens", "0"],
        "max_new_tokens",
    ),
    (
        "generate exit-at",
        lambda d: ["generate", "--model", str(d / "ck"), "--prompt", "hi", "--exit-at", "9"],
        "exit_at=9",
    ),
    (
        "generate eos outside vocab",
        lambda d: ["generate", "--model", str(d / "ck"), "--prompt", "hi", "--eos-id", "999"],
        "eos_id=999",
    ),
    (
        "generate seed < 0",
        lambda d: ["generate", "--model", str(d / "ck"), "--prompt", "hi", "--seed", "-3"],
        "--seed",
    ),
    (
        "generate empty prompt",
        lambda d: ["generate", "--model", str(d / "ck"), "--prompt", ""],
        "no tokens",
    ),
    (
        "generate tokenizer missing",
        lambda d: [
            "generate",
            "--model",
            str(d / "ck"),
            "--prompt",
            "hi",
            "--tokenizer",
            str(d / "t.json"),
        ],
        "tokenizer",
    ),
    (
        "convert to gguf onto a file",
        lambda d: [
            "convert",
            "--from",
            "native",
            str(d / "ck"),
            "--to",
            str(d / "a_file"),
            "--to-format",
            "gguf",
        ],
        "--overwrite",
    ),
]


@pytest.mark.parametrize("name, argv, message", CLI, ids=[c[0] for c in CLI])
def test_cli_rejects_bad_input(name, argv, message, files, capsys):
    code, err = _cli(argv(files), capsys)
    assert code == 2, err
    assert "Traceback" not in err and err.strip(), err
    assert len([line for line in err.splitlines() if "error" in line]) == 1, err
    if message:
        import re

        assert re.search(message, err), err


def test_there_are_at_least_60_bad_inputs():
    assert len(API) + len(CLI) >= 60


def _command_raising(error):
    def run(args):
        raise error

    class Raises:  # a command that raises `error` from deep inside the library
        @staticmethod
        def add_command(sub):
            sub.add_parser("raises").set_defaults(func=run)

    return Raises


@pytest.mark.parametrize("error", [KeyError("x"), ValueError("x")], ids=lambda e: type(e).__name__)
def test_unexpected_errors_show_a_traceback_and_say_it_is_a_bug(error, monkeypatch, capsys):
    """Any exception that is not a depthjax error is a bug, a bare ValueError included."""
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + (_command_raising(error),))
    code, err = _cli(["raises"], capsys)  # a command with a bug in it
    assert code == 1, err
    assert "Traceback" in err and type(error).__name__ in err and "this is a bug in depthjax" in err


@pytest.mark.parametrize(
    "error",
    [
        AdaptiveError("capacity must be in (0, 1], got 2"),
        RopeError("rope_scaling factor must be > 0, got -1"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_every_library_error_is_a_user_error(error, monkeypatch, capsys):
    """The boundary catches the one base class, so errors it never listed (AdaptiveError and
    RopeError were missing from its old hand-written tuple) are exit 2 with one line too."""
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + (_command_raising(error),))
    code, err = _cli(["raises"], capsys)
    assert code == 2, err
    assert err.strip() == f"depthjax raises: error: {error}", err


def test_data_files_that_are_not_utf8_are_refused_by_byte(tmp_path):
    from depthjax.files.textfiles import read_documents

    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"fine text\n" + bytes([0xFF, 0xFE, 0x00]) + b"more")
    with pytest.raises(DataError, match=r"blob\.bin is not UTF-8 text: byte 10 \(0xff\)"):
        list(read_documents(blob))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(b'{"text": "a"}\n{"text": "\xc3"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl is not UTF-8 text: byte 24"):
        list(read_documents(jsonl))
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes("caf\u00e9\r\nline".encode())
    assert list(read_documents(crlf)) == [("crlf.txt", "caf\u00e9\nline")]


def test_shuffle_window_0_is_said_in_the_first_log_line():
    from depthjax.train.loop import describe_data

    assert "no shuffling (shuffle_window=0" in describe_data(parse(["shuffle_window=0"]))
    assert "shuffle window 1024" in describe_data(parse([]))
    from depthjax.train.config import help_text

    assert "0 or 1: no shuffling" in help_text()


def test_tokenizer_json_truncation_and_padding_do_not_cut_documents(tmp_path):
    """all-MiniLM's tokenizer.json truncates to 128 and pads: that is for single model
    inputs; corpus and task text are encoded whole."""
    from tests.conftest import char_tokenizer

    path = char_tokenizer(tmp_path / "tokenizer.json", truncate=8, pad=16)
    ids = load_tokenizer(str(path)).encode("a longer document " * 4)
    assert len(ids) == 72 and 0 not in ids.tolist()


@pytest.mark.parametrize(
    "failure", [OSError("transient I/O error"), ValueError("tree structure differs")]
)
def test_only_a_failed_integrity_check_sets_a_checkpoint_aside(failure, tmp_path, monkeypatch):
    import io

    import jax.numpy as jnp

    from depthjax.train.checkpoints import RestoreError, TrainCheckpoints
    from depthjax.train.logs import RunLog
    from depthjax.train.step import TrainState

    tc = parse(["async_checkpoint=false", "tensorboard=false"])
    state = TrainState(
        step=jnp.int32(2),
        params={"w": jnp.ones(3)},
        opt_state={},
        bad_step=jnp.int32(-1),
        skipped=jnp.int32(0),
    )
    ckpts = TrainCheckpoints(tmp_path / "checkpoints", tc)
    ckpts.save(2, state, {"shard": 0}, {"meta": 1})
    ckpts.wait()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(ckpts.manager, "restore", fail)
    log = RunLog(tmp_path, 2, tensorboard=False, enabled=True, stream=io.StringIO())
    with pytest.raises(RestoreError, match=r"checkpoint 2 .* passed its integrity check but "):
        ckpts.restore_latest(abstract, log)
    assert isinstance(RestoreError("x"), dj.DepthjaxError)
    assert (tmp_path / "checkpoints" / "2").is_dir()
    assert not (tmp_path / "checkpoints_corrupt").exists()
    monkeypatch.undo()
    step, restored, data, meta = ckpts.restore_latest(abstract, log)
    assert step == 2 and data == {"shard": 0} and float(restored.params["w"][0]) == 1.0
    ckpts.close()


def test_a_run_that_cannot_fit_is_refused_before_the_first_step():
    from depthjax.core import sharding as shd
    from depthjax.train import memory

    tc = parse(["model=llama-tiny", "batch_size=1000000"])
    cfg, mesh = tc.model_config(), shd.make_mesh(tc.mesh.data, tc.mesh.fsdp, tc.mesh.tensor)
    kw = dict(depth=cfg.n_layers, n_params=10**6, n_trainable=10**6, mesh=mesh)
    with pytest.raises(TrainConfigError, match=r"needs at least .* GiB per device .* has "):
        memory.check_fits(cfg, tc, **kw)
    memory.check_fits(cfg, parse(["model=llama-tiny", "batch_size=8"]), **kw)  # fits


def test_a_collective_that_cannot_complete_names_the_silent_process(monkeypatch):
    from depthjax.train import hosts

    monkeypatch.setattr(hosts, "silent_processes", lambda: [1])
    error = hosts.lost("barrier 'depthjax-compiled'", RuntimeError("Gloo all-reduce failed"))
    assert isinstance(error, dj.DepthjaxError)
    assert "process(es) 1 stopped answering" in str(error)
    assert "Gloo all-reduce failed" in str(error) and "resume" in str(error)
    monkeypatch.setattr(hosts, "silent_processes", lambda: None)
    assert "cannot say which" in str(hosts.lost("a collective", RuntimeError("x")))
