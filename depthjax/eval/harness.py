"""depthjax models inside EleutherAI's lm-evaluation-harness (`pip install depthjax[eval]`).

    lm_eval --model depthjax --model_args path=DIR[,program=SPEC.yaml] --tasks T

DIR is a native checkpoint (dj.save) or a local Hugging Face directory; `program` a slice
spec (depthjax.depth.spec) applied to its table. Other model_args: tokenizer ('byte' or a
tokenizer.json; default the directory's, else bytes), batch_size, max_length (the scoring
window; default the config's max_seq_len), prefix_token (the token that conditions an empty
context and each document's first token; default the config's bos/eos id, else 10, a
newline, for byte-level models), max_gen_toks (default 256), fsdp and tensor (shard the
parameters over a `data x fsdp x tensor` mesh of every device, as `dj.hf.load(mesh=)`;
data fills the rest).

The lm_eval command finds "depthjax" through the depthjax_lm_eval hook that the package
installs (a .pth file); in Python, importing this module registers it. Log-likelihoods go
through depthjax.eval's batched engine, so they equal `dj.eval.loglikelihoods` on the same
tokens; generation is greedy (`dj.eval.generate_until`).
"""

from __future__ import annotations

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from ..core.model import DepthModel
from ..core.sharding import make_mesh
from ..files.model_dir import ModelDir
from .generation import generate_until
from .scoring import EvalError, Request, loglikelihoods, resolve_tokenizer, rolling_requests

_LM_EVAL_ARGS = {"device", "max_batch_size", "trust_remote_code", "dtype"}


@register_model("depthjax")
class DepthjaxLM(TemplateLM):
    """An lm_eval LM over a DepthModel: from `path` (+ `program` spec) or a `model` object."""

    def __init__(
        self,
        path=None,
        program=None,
        tokenizer=None,
        batch_size=16,
        max_length=None,
        prefix_token=None,
        max_gen_toks=256,
        fsdp=None,
        tensor=None,
        model: DepthModel | None = None,
        **kwargs,
    ):
        super().__init__()
        unknown = set(kwargs) - _LM_EVAL_ARGS
        if unknown:
            raise EvalError(
                f"unknown depthjax model_args {sorted(unknown)}; known: path, "
                "program, tokenizer, batch_size, max_length, prefix_token, max_gen_toks, "
                "fsdp, tensor"
            )
        if (path is None) == (model is None):
            raise EvalError("the depthjax model needs path=DIR (or, in Python, model=)")
        spec = tokenizer if isinstance(tokenizer, str) else None
        options = {}
        if fsdp is not None or tensor is not None:
            if path is None:
                raise EvalError("fsdp= and tensor= shard a model read from path=")
            options["mesh"] = make_mesh(data=-1, fsdp=int(fsdp or 1), tensor=int(tensor or 1))
        md = ModelDir.read(path, tokenizer=spec, **options) if path is not None else None
        model = md.model if md else model
        if program is not None:
            from ..depth import from_spec, load_spec

            model = from_spec(model, load_spec(program))
        self.model = model
        if tokenizer is not None and not isinstance(tokenizer, str):
            self.tokenizer_obj = tokenizer
        else:
            self.tokenizer_obj = md.tokenizer if md else resolve_tokenizer(model, tokenizer)
        self.batch_size = 16 if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
        self._max_length = int(max_length) if max_length else model.config.max_seq_len
        self.max_gen_toks = int(max_gen_toks)
        found = md.special_token("bos_token_id", "eos_token_id") if md else None
        self._prefix = (
            int(prefix_token) if prefix_token is not None else (found if found is not None else 10)
        )
        self._eos = md.special_token("eos_token_id") if md else None

    # -- what TemplateLM needs ---------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eos if self._eos is not None else self._prefix

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return np.asarray(self.tokenizer_obj.encode(string)).tolist()

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer_obj.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        reqs = [
            Request(np.asarray(ctx, np.int32), np.asarray(cont, np.int32))
            for _, ctx, cont in requests
        ]
        ll, greedy = loglikelihoods(
            self.model,
            reqs,
            batch_size=self.batch_size,
            max_len=self._max_length,
            description="lm_eval loglikelihood",
        )
        out = [(float(a), bool(g)) for a, g in zip(ll[0], greedy[0])]
        for (pair, _, _), answer in zip(requests, out):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Every token of each document scored once (lm-eval's disjoint rolling windows,
        the first predicted from prefix_token), all documents' windows in one batched call."""
        windows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            doc = rolling_requests(
                self.tok_encode(text), self._max_length, prefix_token=self._prefix
            )
            windows += doc
            owner += [i] * len(doc)
        ll, _ = loglikelihoods(
            self.model,
            windows,
            batch_size=self.batch_size,
            max_len=self._max_length,
            description="lm_eval rolling",
        )
        totals = np.zeros(len(requests))
        np.add.at(totals, np.asarray(owner, int), ll[0])
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), float(total))
        return totals.tolist()

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, grouped by their generation settings."""
        groups: dict[tuple, list[int]] = {}
        settings = []
        for i, req in enumerate(requests):
            context, kw = req.args
            kw = dict(kw or {})
            if kw.get("do_sample") or float(kw.get("temperature", 0.0) or 0.0) > 0:
                raise EvalError(
                    "the depthjax lm_eval model generates greedily only "
                    f"(got do_sample={kw.get('do_sample')}, "
                    f"temperature={kw.get('temperature')})"
                )
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if self._eos is not None:
                until.append(self.tok_decode([self._eos]))
            key = (tuple(until), int(kw.get("max_gen_toks", self.max_gen_toks)))
            groups.setdefault(key, []).append(i)
            settings.append(context)
        out = [""] * len(requests)
        for (until, max_new), idx in groups.items():
            texts = generate_until(
                self.model,
                [settings[i] for i in idx],
                stop=until,
                max_new_tokens=max_new,
                tokenizer=self.tokenizer_obj,
                batch_size=self.batch_size,
                eos_id=self._eos,
            )
            for i, text in zip(idx, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out
