"""A tiny random HF Llama plus a tiny BPE tokenizer in one directory, and tiny benchmark files, for evaluation tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

from hf_tiny import save_hf_model

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: What is the capital of France?\nAnswer: Paris",
    "A person is washing a car. They rinse the soap off with a hose.",
    "The following are multiple choice questions (with answers) about biology.",
    "Q: How many legs does a spider have?\nA: Eight legs.",
    "water boils at one hundred degrees, ice melts at zero degrees",
] * 20


def save_tiny_tokenizer(out: Path) -> None:
    """A 128-entry BPE with a Metaspace pre-tokenizer (SentencePiece-like) that adds <s> on request."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out)


def save_tiny_eval_model(out: Path, kind: str = "llama-gqa") -> Path:
    """Model weights, config and tokenizer files in `out` (loadable by llamaherd and by transformers)."""
    save_hf_model(kind, out)
    save_tiny_tokenizer(out)
    return out


class TinyEncoder:
    """The engine's tokenizer interface over the saved tokenizer.json (independent of llamaherd.tokenizer)."""

    def __init__(self, directory: Path) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.bos_id, self.eos_id = 1, 2

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_bos).ids

    def encode_batch(self, texts: list[str], add_bos: bool = False) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=add_bos)]


WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "water", "boils", "ice", "melts", "car",
         "soap", "hose", "legs", "spider", "capital")


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_tiny_benchmarks(root: Path, n_test: int = 40) -> None:
    """ARC-Challenge in AI2's jsonl layout and TruthfulQA's mc_task.json, with made-up questions."""
    rng = random.Random(0)
    arc = root / "arc_challenge"
    arc.mkdir(parents=True)
    for split, n in (("Train", 30), ("Test", n_test)):
        with (arc / f"ARC-Challenge-{split}.jsonl").open("w") as f:
            for i in range(n):
                labels = "ABCD" if i % 5 else "1234"
                choices = [{"text": _sentence(rng, rng.randint(1, 4)), "label": lab} for lab in labels]
                row = {"id": f"{split}_{i}", "question": {"stem": _sentence(rng, 6) + "?", "choices": choices},
                       "answerKey": rng.choice(labels)}
                f.write(json.dumps(row) + "\n")
    items = []
    for _ in range(16):
        n_true, n_false = rng.randint(1, 3), rng.randint(1, 3)
        targets = {_sentence(rng, 3) + f" {k}.": int(k < n_true) for k in range(n_true + n_false)}
        items.append({"question": _sentence(rng, 5) + "?", "mc1_targets": targets, "mc2_targets": targets})
    (root / "truthfulqa").mkdir()
    (root / "truthfulqa" / "mc_task.json").write_text(json.dumps(items))
