"""A tiny random HF Llama plus a tiny BPE tokenizer in one directory, for evaluation-engine tests."""

from __future__ import annotations

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
