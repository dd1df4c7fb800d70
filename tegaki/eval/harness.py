"""`TegakiLM`: lm-evaluation-harness drives a tegaki model through it.

lm-eval asks a model three kinds of question, each a list of requests whose `.args` are:
    loglikelihood          (context, continuation) -> (log p(continuation | context), is it the greedy text)
    loglikelihood_rolling  (text,)                 -> log p(text), every token scored once (sliding window)
    generate_until         (context, {"until": [...], "max_gen_toks": n, ...}) -> the generated text

    import lm_eval
    from tegaki.eval.harness import TegakiLM
    lm_eval.simple_evaluate(model=TegakiLM(model, tokenizer), tasks=["hellaswag"])

When lm_eval is installed TegakiLM is its `LM` subclass, registered as "tegaki" (so
`lm_eval --model tegaki --model_args path=runs/demo` works once this module is imported); without it
the class still answers the same requests, which is how tegaki's tests check it on any machine.
"""

from __future__ import annotations

import torch

from tegaki.decoding import decoding_layout
from tegaki.eval.text import token_logprobs
from tegaki.load import ModelSource

try:  # an optional dependency: pip install lm-eval
    from lm_eval.api.model import LM as _HarnessLM
    from lm_eval.api.registry import register_model as _register
except ImportError:  # the adapter still works without the harness (e.g. called directly)
    _HarnessLM = object

    def _register(*names):
        return lambda cls: cls


DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default for generate_until


@_register("tegaki")
class TegakiLM(_HarnessLM):
    """A tegaki model (and its tokenizer) behind lm-eval's LM interface."""

    def __init__(self, model=None, tokenizer=None, path: str | None = None, batch_size: int = 1, **_ignored):
        super().__init__()
        if model is None:  # lm_eval --model tegaki --model_args path=...: load it here
            source = ModelSource(path)
            model, tokenizer = source.load(), source.tokenizer
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
        return cls(**args)

    # --- the three requests -------------------------------------------------------------------------
    def _context_ids(self, context: str) -> list[int]:
        eot = self.tokenizer.eot_id
        return ([eot] if eot is not None else []) + self.tokenizer.encode_ordinary(context)

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context, continuation = request.args
            context_ids = self._context_ids(context)
            ids = self.tokenizer.encode_ordinary(continuation)
            logp = token_logprobs(self.model, context_ids + ids)[-len(ids) :]
            greedy = self._is_greedy(context_ids, ids)
            results.append((float(logp.sum()), greedy))
        return results

    def _is_greedy(self, context_ids: list[int], ids: list[int]) -> bool:
        """Whether greedy decoding would write exactly `ids` after the context."""
        window = int(self.model.config.block_size)
        inputs = torch.tensor((context_ids + ids)[:-1][-window:], device=self.model.device)[None]
        best = self.model(inputs)[0, -len(ids) :].argmax(-1)  # (len(ids),)
        return bool((best.cpu() == torch.tensor(ids)).all())

    @torch.no_grad()
    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for request in requests:
            (text,) = request.args
            ids = self._context_ids(text)
            out.append(float(token_logprobs(self.model, ids).sum()) if len(ids) > 1 else 0.0)
        return out

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        out = []
        with decoding_layout(self.model):  # packed once for every request, not once per generate call
            for request in requests:
                out.append(self._generate_one(request))
        return out

    def _generate_one(self, request) -> str:
        """One generate_until request: the text the model writes after its context, cut at the first stop."""
        context, kwargs = request.args
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
        window = int(self.model.config.block_size)
        max_new = min(max_new, window - 1)  # the prompt keeps at least its last token
        ids = self._context_ids(context)[-(window - max_new) :]  # the newest context that leaves room
        prompt = torch.tensor(ids, device=self.model.device)[None]
        eot = self.tokenizer.eot_id
        tokens = self.model.generate(
            prompt,
            max_new,
            temperature=temperature,
            tokenizer=self.tokenizer,
            stop_strings=until or None,
            stop_tokens=[eot] if eot is not None else None,
        )
        text = self.tokenizer.decode([i for i in tokens[0, len(ids) :].tolist() if i != eot])
        for stop in until:  # lm-eval wants the text before the first stop sequence
            text = text.split(stop)[0]
        return text
