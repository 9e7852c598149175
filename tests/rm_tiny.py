"""A tiny random transformers reward model (LlamaForSequenceClassification, one label) with a tokenizer of its own,
unlike the policies' (tests/eval_tiny.py): rejection sampling and PPO must re-tokenize the text for it."""

from __future__ import annotations

from pathlib import Path

import torch

from eval_tiny import CORPUS

PAD = 3  # "<pad>": transformers scores a row at its last token that is not the pad


def save_tiny_reward_model(out: Path, seed: int = 3) -> Path:
    """Weights, config (num_labels 1) and a byte-level BPE (256 bytes, 4 special tokens, 96 merges learnt from
    reversed text) in `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256 + 4 + 96, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([line[::-1] for line in CORPUS], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(out)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, num_labels=1,
                         pad_token_id=PAD, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.5)  # rewards well spread
    model.save_pretrained(out, safe_serialization=True)
    return out


def transformers_scores(rm_dir: Path, conversations: list[list[dict]], chat_format: str) -> list[float]:
    """Each conversation's reward from transformers, on the ids the data module gives its last answer as a training
    pair does (prompt_ids + answer_ids, the reward model's own tokenizer)."""
    from transformers import AutoModelForSequenceClassification

    from llamaherd.data.preference import encode_pair, pair_messages
    from llamaherd.data.sft import Record, resolve_chat_format
    from llamaherd.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_path(rm_dir)
    fmt = resolve_chat_format(chat_format, tokenizer)
    hf = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    scores = []
    for messages in conversations:
        row = {"prompt": messages[:-1], "chosen": messages[-1]["content"], "rejected": messages[-1]["content"]}
        pair = encode_pair(pair_messages(Record("conversation", 1, row)), tokenizer, fmt)
        with torch.no_grad():
            scores.append(hf(torch.tensor([pair.prompt_ids + pair.chosen_ids])).logits[0, 0].item())
    return scores
