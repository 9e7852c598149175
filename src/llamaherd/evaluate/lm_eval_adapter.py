"""llamaherd models inside lm-evaluation-harness, as the registered model type "llamaherd".

lm-eval 0.4 finds model types only in its own registry (no plugin entry points), so the type is
registered when this module is imported, and by the start-up hook of `llamaherd.evaluate.lm_eval_hook`
(which makes plain `lm_eval --model llamaherd ...` work). Without the hook, run lm-eval through this module:

    python -m llamaherd.evaluate.lm_eval_adapter --model llamaherd \\
        --model_args model=smollm2-135m-instruct,dtype=fp32 --tasks arc_challenge --batch_size 16

Every argument after the module name is lm-eval's own command line. From Python,
`import llamaherd.evaluate.lm_eval_adapter` and pass `model="llamaherd"` to `lm_eval.simple_evaluate`.
"""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from llamaherd.evaluate.engine import Encoded, LoglikelihoodEngine

DEFAULT_BATCH_SIZE = 16


@register_model("llamaherd")
class LlamaherdLM(LM):
    """lm-eval's LM interface over `load_model` and the llamaherd log-likelihood engine.

    model_args: model (name, path, PEFT adapter directory or hub id), base (an adapter's base model, default: its
    base_model_name_or_path), dtype (fp32/bf16/fp16), quantize (int8), add_bos_token
    (default: the tokenizer's own setting, as lm-eval's hf model), max_length (default: the model's).
    """

    def __init__(self, model: str | None = None, dtype: str = "fp32", quantize: str | None = None,
                 add_bos_token: bool | None = None, max_length: int | None = None, batch_size: int | str = 1,
                 device: str | None = None, base: str | None = None, **_ignored: object) -> None:
        import torch

        from llamaherd.load import load_model

        super().__init__()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        loaded = load_model(model, dtype=dtype, device=device, quantize=quantize, base=base)
        self.tokenizer = loaded.tokenizer
        self.add_bos = loaded.tokenizer.add_bos_default if add_bos_token is None else add_bos_token
        size = DEFAULT_BATCH_SIZE if str(batch_size).startswith("auto") else int(batch_size)
        self.engine = LoglikelihoodEngine(loaded.model, loaded.tokenizer, self.add_bos, size, max_length)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of log-probs, is_greedy) per (context, continuation) request."""
        return self._score(self.engine.encode([req.args for req in requests]), disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of the model's length, as lm-eval's hf model."""
        windows, owners = [], []
        for n, req in enumerate(requests):
            tokens = self.tokenizer.encode(req.args[0], add_bos=self.add_bos)
            prefix = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id
            for ctx, cont in map(make_disjoint_window,
                                 get_rolling_token_windows(tokens, prefix, self.engine.max_length, 1)):
                windows.append(Encoded(tuple(ctx), tuple(cont), False))
                owners.append(n)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._score(windows, disable_tqdm), strict=True):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) text up to the first of its stop strings or EOS, per request. All
        requests go through one generation engine, batch_size at a time (continuous batching), each decoded as
        it would be alone; the engine's rows hold the longest prompt + max_gen_toks, not the whole context."""
        from llamaherd.engine import Engine, SamplingParams

        prompts, params = [], []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            max_new = int(kwargs.get("max_gen_toks", 256))
            params.append(SamplingParams(
                max_new_tokens=max_new, stop_strings=[until] if isinstance(until, str) else list(until),
                temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                skip_special_tokens=True,  # as lm-eval's hf model decodes
            ))
            prompts.append(self.tokenizer.encode(context, add_bos=self.add_bos)[-(self.engine.max_length - max_new):])
        if not prompts:
            return []
        engine = Engine(self.engine.model, self.tokenizer, max_batch=min(self.engine.batch_size, len(prompts)),
                        max_len=max(len(p) + sp.max_new_tokens for p, sp in zip(prompts, params)))
        handles = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        with tqdm(total=len(handles), desc="llamaherd generate_until", disable=disable_tqdm) as bar:
            for event in engine.stream():
                bar.update(event.finish_reason is not None)
        return [h.completions[0].text for h in handles]

    def _score(self, encoded: list[Encoded], disable_tqdm: bool) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool]] = [(0.0, False)] * len(encoded)
        for i, r in tqdm(self.engine.iter_results(encoded), total=len(encoded), disable=disable_tqdm,
                         desc="llamaherd loglikelihood"):
            results[i] = (r.logprob, r.is_greedy)
        return results


def main() -> None:
    """lm-eval's command line with the "llamaherd" model type available."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
