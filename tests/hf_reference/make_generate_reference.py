"""Reference side of the greedy-generation parity test (Python 3.11 reference env; never
imports depthjax). Reuses make_reference.py's tiny configs and weight randomization.

    python make_generate_reference.py OUT    save tiny models with transformers and their
                                             greedy continuations (left-padded batch) to
                                             OUT/manifest.json
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import transformers as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_reference import CASES, VOCAB, _randomize  # noqa: E402

GENERATE_CASES = ("llama", "qwen3", "gpt2")
NEW_TOKENS = 10


def make(out: str) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, VOCAB, (2, 7)).astype(np.int64)
    mask = np.ones_like(prompt)
    mask[1, :3] = 0  # left padding, the layout transformers expects
    prompt[1, :3] = 0
    manifest = {}
    for seed, case in enumerate(GENERATE_CASES):
        make_config, _ = CASES[case]
        model = tf.AutoModelForCausalLM.from_config(
            make_config(), attn_implementation="eager"
        ).eval()
        _randomize(model, 100 + seed)
        directory = os.path.join(out, case)
        model.save_pretrained(directory)
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
        manifest[case] = {
            "dir": directory,
            "prompt": prompt.tolist(),
            "mask": mask.tolist(),
            "expected": ids[:, prompt.shape[1] :].tolist(),
        }
        print(f"[reference] {case}: greedy {NEW_TOKENS} tokens", flush=True)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)


if __name__ == "__main__":
    make(sys.argv[1])
