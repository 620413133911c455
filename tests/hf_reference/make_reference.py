"""Reference side of the Hugging Face parity tests. Runs under the Python 3.11 reference
environment (torch + transformers, see requirements.txt), never imports depthjax.

    python make_reference.py make OUT        tiny random models of every family, saved with
                                             transformers, plus inputs, expected outputs and
                                             (decoders) greedy continuations of a
                                             left-padded batch
    python make_reference.py run MANIFEST    load the directories a manifest lists with
                                             transformers and write their outputs

Manifests are JSON: {case: {"dir", "kind": "causal"|"encoder"|"sentence", "inputs": npz
file, "expected": npy file}} (causal cases also "generate": {"prompt", "mask", "expected"});
`make` writes OUT/manifest.json, `run` writes <dir>/transformers_out.npy for each case.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import numpy as np
import torch
import transformers as tf

SEQ = 12
VOCAB = 128


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (norm scales too), so every mapping error shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm = any(k in name for k in ("norm", "LayerNorm", "ln_"))
            if is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.08 * noise)


def _llama_like(cls, **kw):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return cls(**{**base, **kw})


# Today's families. Windows are shorter than SEQ and rope scaling acts at the tested
# positions (llama3/yarn change every frequency table; dynamic NTK and longrope switch on
# because SEQ exceeds max_position_embeddings / original_max_position_embeddings).
WINDOW = 5
_GEMMA = dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW)
MODERN = {
    "llama3": lambda: _llama_like(
        tf.LlamaConfig,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
    ),
    "llama_yarn": lambda: _llama_like(
        tf.LlamaConfig,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "llama_dynamic": lambda: _llama_like(
        tf.LlamaConfig,
        max_position_embeddings=8,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    ),
    "mistral_window": lambda: _llama_like(tf.MistralConfig, sliding_window=WINDOW),
    "qwen2_window": lambda: _llama_like(
        tf.Qwen2Config,
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=1,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
    ),
    "gemma2": lambda: _llama_like(
        tf.Gemma2Config, **_GEMMA, attn_logit_softcapping=5.0, final_logit_softcapping=3.0
    ),
    "gemma3": lambda: _llama_like(
        tf.Gemma3TextConfig,
        **_GEMMA,
        num_hidden_layers=4,
        sliding_window_pattern=3,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    ),
    "olmo2": lambda: _llama_like(tf.Olmo2Config, pad_token_id=0),
    "phi3": lambda: _llama_like(
        tf.Phi3Config,
        sliding_window=WINDOW + 1,
        pad_token_id=0,
        max_position_embeddings=32,
        original_max_position_embeddings=8,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.2, 1.5, 2.0],
            "long_factor": [1.0, 2.0, 4.0, 8.0],
        },
    ),
}


CASES = {
    # name: (config factory, kind)
    "llama": (
        lambda: _llama_like(tf.LlamaConfig, rope_theta=50000.0, tie_word_embeddings=False),
        "causal",
    ),
    "llama_bias_tied": (
        lambda: _llama_like(
            tf.LlamaConfig, attention_bias=True, mlp_bias=True, tie_word_embeddings=True
        ),
        "causal",
    ),
    "mistral": (
        lambda: _llama_like(tf.MistralConfig, sliding_window=None, tie_word_embeddings=False),
        "causal",
    ),
    "qwen2": (
        lambda: _llama_like(tf.Qwen2Config, rope_theta=1e6, tie_word_embeddings=True),
        "causal",
    ),
    "qwen3": (
        lambda: _llama_like(tf.Qwen3Config, head_dim=32, rope_theta=1e6, tie_word_embeddings=False),
        "causal",
    ),
    "gpt2": (
        lambda: tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=3,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "causal",
    ),
    "bert": (
        lambda: tf.BertConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=64,
        ),
        "encoder",
    ),
    **{name: (factory, "causal") for name, factory in MODERN.items()},
}


def _inputs(kind: str, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (2, SEQ)).astype(np.int32)
    if kind == "causal":
        return {"tokens": tokens}
    mask = np.ones_like(tokens)
    mask[1, -4:] = 0  # padding in the second sequence
    types = np.zeros_like(tokens)
    types[:, SEQ // 2 :] = 1
    return {"tokens": tokens, "mask": mask, "token_types": types}


def _load(directory: str, kind: str):
    auto = tf.AutoModelForCausalLM if kind == "causal" else tf.AutoModel
    return auto.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()


def _forward(model, kind: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        ids = torch.from_numpy(inputs["tokens"]).long()
        if kind == "causal":
            return model(input_ids=ids).logits.float().numpy()
        out = model(
            input_ids=ids,
            attention_mask=torch.from_numpy(inputs["mask"]).long(),
            token_type_ids=torch.from_numpy(inputs["token_types"]).long(),
        )
        return out.last_hidden_state.float().numpy()


NEW_TOKENS = 10


def _greedy(model) -> dict:
    """Greedy continuations of a left-padded prompt batch (the layout transformers wants)."""
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, VOCAB, (2, 7)).astype(np.int64)
    mask = np.ones_like(prompt)
    mask[1, :3] = 0
    prompt[1, :3] = 0
    with torch.no_grad():
        ids = model.generate(
            input_ids=torch.from_numpy(prompt),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    return {
        "prompt": prompt.tolist(),
        "mask": mask.tolist(),
        "expected": ids[:, prompt.shape[1] :].tolist(),
    }


def _tokenizer(directory: str) -> dict:
    """A tiny byte-level BPE tokenizer.json, and how transformers' fast tokenizer encodes
    some text with it (the depthjax side must agree)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB + 64,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["def depth(model):\n    return len(model.blocks)\n"] * 20 + [
        "the quick brown fox jumps over the lazy dog"
    ] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(os.path.join(directory, "tokenizer.json"))
    fast = tf.PreTrainedTokenizerFast(tokenizer_file=os.path.join(directory, "tokenizer.json"))
    samples = ["def depth(model): return 42", "the lazy fox<|endoftext|>", "ünïcödé"]
    return {"samples": samples, "ids": [fast(s)["input_ids"] for s in samples]}


def make(out: str) -> None:
    torch.manual_seed(0)
    manifest = {}
    for seed, (case, (make_config, kind)) in enumerate(CASES.items()):
        directory = os.path.join(out, case)
        config = make_config()
        model = (
            (tf.AutoModelForCausalLM if kind == "causal" else tf.AutoModel)
            .from_config(config, attn_implementation="eager")
            .eval()
        )
        _randomize(model, seed)
        model.save_pretrained(directory)
        inputs = _inputs(kind, seed)
        np.savez(os.path.join(directory, "inputs.npz"), **inputs)
        np.save(os.path.join(directory, "expected.npy"), _forward(model, kind, inputs))
        manifest[case] = {
            "dir": directory,
            "kind": kind,
            "inputs": os.path.join(directory, "inputs.npz"),
            "expected": os.path.join(directory, "expected.npy"),
        }
        if kind == "causal":
            manifest[case]["generate"] = _greedy(model)
        if case == "llama":  # the same weights again, sharded, with a tokenizer
            sharded = os.path.join(out, "llama_sharded")
            model.save_pretrained(sharded, max_shard_size="200KB")
            with open(os.path.join(sharded, "tokenizer_expected.json"), "w") as f:
                json.dump(_tokenizer(sharded), f)
            manifest["llama_sharded"] = {**manifest[case], "dir": sharded}
        if case == "llama":  # the same weights in bfloat16, run by transformers in bfloat16
            manifest["llama_bf16"] = _bfloat16(out, model, inputs)
        if case == "bert":  # a sentence-transformers layout around the same weights
            manifest["sentence"] = _sentence_transformers(out, model, inputs)
        print(f"[reference] {case}: {type(model).__name__}", flush=True)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)


def _bfloat16(out: str, model, inputs) -> dict:
    """save_pretrained of the model cast to bfloat16, and its bfloat16 logits (eager
    attention, every op in bfloat16 as transformers runs it)."""
    directory = os.path.join(out, "llama_bf16")
    model = copy.deepcopy(model).to(torch.bfloat16)
    model.save_pretrained(directory)
    np.savez(os.path.join(directory, "inputs.npz"), **inputs)
    np.save(os.path.join(directory, "expected.npy"), _forward(model, "causal", inputs))
    return {
        "dir": directory,
        "kind": "causal",
        "inputs": os.path.join(directory, "inputs.npz"),
        "expected": os.path.join(directory, "expected.npy"),
    }


def _sentence_transformers(out: str, model, inputs) -> dict:
    """modules.json + 0_Transformer/ + 1_Pooling/ as sentence-transformers writes them;
    expected: the mean of real tokens' last hidden states, L2-normalized."""
    root = os.path.join(out, "sentence")
    model.save_pretrained(os.path.join(root, "0_Transformer"))
    os.makedirs(os.path.join(root, "1_Pooling"))
    modules = [
        {
            "idx": 0,
            "name": "0",
            "path": "0_Transformer",
            "type": "sentence_transformers.models.Transformer",
        },
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {
            "idx": 2,
            "name": "2",
            "path": "2_Normalize",
            "type": "sentence_transformers.models.Normalize",
        },
    ]
    with open(os.path.join(root, "modules.json"), "w") as f:
        json.dump(modules, f)
    with open(os.path.join(root, "1_Pooling", "config.json"), "w") as f:
        json.dump(
            {
                "word_embedding_dimension": 64,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            },
            f,
        )
    hidden = torch.from_numpy(_forward(model, "encoder", inputs))
    mask = torch.from_numpy(inputs["mask"]).float()[..., None]
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    np.savez(os.path.join(root, "inputs.npz"), **inputs)
    np.save(os.path.join(root, "expected.npy"), pooled.numpy())
    return {
        "dir": root,
        "kind": "sentence",
        "inputs": os.path.join(root, "inputs.npz"),
        "expected": os.path.join(root, "expected.npy"),
    }


def run(manifest_path: str) -> None:
    """For each case, write <dir>/transformers_out.npy: transformers' output on its inputs."""
    with open(manifest_path) as f:
        manifest = json.load(f)
    for case, entry in manifest.items():
        inputs = dict(np.load(entry["inputs"]))
        out = _forward(_load(entry["dir"], entry["kind"]), entry["kind"], inputs)
        np.save(os.path.join(entry["dir"], "transformers_out.npy"), out)
        print(f"[reference] reloaded {case}", flush=True)


if __name__ == "__main__":
    command, path = sys.argv[1], sys.argv[2]
    {"make": make, "run": run}[command](path)
