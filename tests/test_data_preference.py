"""Preference data: each layout parsed (HH-RLHF split by hand and against the DPO authors' and TRL's rules on the
real file), prompt tokens shared and equal to an independent tokenization of the hand-rendered conversation (and to
transformers' apply_chat_template), margins from Llama 2's Table 27, drops, truncation, one-line errors, batching."""

from __future__ import annotations

import gzip
import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend
from test_data_sft import byte_tokenizer

from llamaherd.data import collate_pairs, load_preference_data, split_pairs
from llamaherd.data.preference import PreferencePair, pair_messages
from llamaherd.data.sft import Record
from llamaherd.errors import InputError
from llamaherd.tokenizer import Tokenizer

HH_FILE = "benchmarks/preferences/hh-rlhf_harmless-base_test.jsonl.gz"
DEMO_FILE = "benchmarks/preferences/dpo_en_demo.json"
# A Llama 2-style Jinja template, for the comparison with transformers' apply_chat_template.
LLAMA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ '<<SYS>>' + m['content'] + '<</SYS>>' }}"
    "{% elif m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from eval_tiny import save_tiny_tokenizer

    out = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tok(tiny_dir) -> Tokenizer:
    """A 128-entry BPE (merges such as '?\\nA' cross line ends) that adds <s>."""
    return Tokenizer.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def reference(tiny_dir) -> Backend:
    """The same tokenizer.json through `tokenizers` alone: the independent tokenization."""
    return Backend.from_file(str(tiny_dir / "tokenizer.json"))


def ids_of(reference: Backend, text: str) -> list[int]:
    """Ids of rendered text; text that does not render <s> itself gets it from the tokenizer's post-processor, as
    transformers' tokenizer(text) adds it."""
    return reference.encode(text, add_special_tokens=not text.startswith("<s>")).ids


def write(path: Path, records: list, jsonl: bool = True) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records) if jsonl else json.dumps(records, indent=2)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def load(path, tok, fmt="llama-2", max_seq_len=4096, **kw):
    return load_preference_data(path, tok, fmt, max_seq_len, **kw)


# ---- the prompt layout, rendered by hand ----------------------------------------------------------------------
PAIR = {"system": "Be brief.", "prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Red, I think."}
RENDERED = {  # (prompt, chosen answer, rejected answer) as each built-in format lays the pair out
    "llama-2": ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nName a colour. [/INST] ", "Blue. </s>",
                "Red, I think. </s>"),
    "vicuna": ("Be brief. USER: Name a colour. ASSISTANT:", " Blue.</s>", " Red, I think.</s>"),
    "alpaca": ("Be brief.\n\n### Instruction:\nName a colour.\n\n### Response:\n", "Blue.</s>", "Red, I think.</s>"),
}


@pytest.mark.parametrize("fmt", list(RENDERED))
@pytest.mark.parametrize("as_messages", [False, True])
def test_prompt_layout_shares_prompt_tokens_equal_to_the_hand_rendered_text(tok, reference, tmp_path, fmt,
                                                                          as_messages):
    rec = dict(PAIR)
    if as_messages:  # TRL's conversational explicit-prompt layout
        rec = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
               "chosen": [{"role": "assistant", "content": "Blue."}],
               "rejected": [{"role": "assistant", "content": "Red, I think."}]}
    (pair,), stats = load(write(tmp_path / "p.jsonl", [rec]), tok, fmt)
    prompt, chosen, rejected = RENDERED[fmt]
    assert pair.prompt_ids + pair.chosen_ids == ids_of(reference, prompt + chosen)
    assert pair.prompt_ids + pair.rejected_ids == ids_of(reference, prompt + rejected)
    assert pair.prompt_ids[0] == tok.bos_id and pair.prompt_ids.count(tok.bos_id) == 1
    assert pair.chosen_ids[-1] == pair.rejected_ids[-1] == tok.eos_id
    assert tok.decode(pair.chosen_ids).endswith("</s>")
    assert (pair.margin, pair.source) == (0.0, f"{tmp_path / 'p.jsonl'}:1")
    assert (stats.records, stats.pairs, stats.truncated, stats.layouts) == (1, 1, 0, Counter(prompt=1))


def test_llama2_prompt_is_the_prompt_text_tokenized_alone(tok, reference, tmp_path):
    """Where no token spans the prompt's end, prompt_ids is exactly the prompt's own tokenization."""
    (pair,), _ = load(write(tmp_path / "p.jsonl", [PAIR]), tok, "llama-2")
    assert pair.prompt_ids == ids_of(reference, RENDERED["llama-2"][0])


def test_tokens_that_merge_across_the_prompt_end_go_to_the_answers(tmp_path):
    """A byte-level BPE whose first merge is '\\n' + 'B' and second 't' + '\\n': chatml's prompt ends in 'assistant\\n',
    so before 'Blue' the newline joins the answer's first token and 't' stays alone, while before 'Red' it joins the
    't'. The shared prompt stops before 't' on both sides, and prompt + answer is still each side's tokenization."""
    from llamaherd.tokenizer import _bytes_to_unicode

    specials = ("<s>", "</s>", "<|im_end|>")
    vocab = {t: i for i, t in enumerate(specials)}
    for c in sorted(set(_bytes_to_unicode().values())):
        vocab[c] = len(vocab)
    vocab["ĊB"], vocab["tĊ"] = len(vocab), len(vocab) + 1
    backend = Backend(models.BPE(vocab, [("Ċ", "B"), ("t", "Ċ")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok = Tokenizer(backend, bos_id=0, eos_id=2, add_bos_default=True)
    (pair,), _ = load(write(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "Blue", "rejected": "Red"}]), tok,
                      "chatml")
    text = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert pair.prompt_ids + pair.chosen_ids == [0] + backend.encode(text + "Blue<|im_end|>").ids
    assert pair.prompt_ids + pair.rejected_ids == [0] + backend.encode(text + "Red<|im_end|>").ids
    assert tok.decode(pair.prompt_ids) == "<s>" + text[:-2]
    assert tok.decode(pair.chosen_ids) == "t\nBlue<|im_end|>" and tok.decode(pair.rejected_ids) == "t\nRed<|im_end|>"
    assert vocab["ĊB"] in pair.chosen_ids and vocab["tĊ"] in pair.rejected_ids


def test_jinja_template_matches_transformers_apply_chat_template(tiny_dir, tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(tiny_dir)
    hf.chat_template = LLAMA_TEMPLATE
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the quick fox"},
              {"role": "assistant", "content": "the lazy dog"}, {"role": "user", "content": "water boils?"}]
    rec = {"prompt": prompt, "chosen": "at one hundred degrees", "rejected": "ice melts"}
    (pair,), _ = load(write(tmp_path / "p.jsonl", [rec]), tok, LLAMA_TEMPLATE)
    for answer, ids in (("at one hundred degrees", pair.chosen_ids), ("ice melts", pair.rejected_ids)):
        expected = hf.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=True)
        assert pair.prompt_ids + ids == expected["input_ids"]
    generation = hf.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert pair.prompt_ids == generation


def test_template_that_renders_the_prompt_differently_before_an_answer_is_refused(tok, tmp_path):
    template = ("{% if messages[-1]['role'] == 'assistant' %}{{ 'Answered: ' }}{% endif %}"
                "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}")
    f = write(tmp_path / "p.jsonl", [PAIR])
    with pytest.raises(InputError, match=r"p\.jsonl:1: the chat template renders earlier turns differently"):
        load(f, tok, template)


# ---- HH-RLHF transcripts ------------------------------------------------------------------------------------
def record(data: dict, line: int = 3) -> Record:
    return Record("x.jsonl", line, data)


def test_hh_transcripts_split_at_the_last_shared_assistant_turn():
    shared = "\n\nHuman: Hi there\n\nAssistant:  Hello!\n\nHuman: Name a colour."
    pm = pair_messages(record({"chosen": shared + "\n\nAssistant: Blue.", "rejected": shared + "\n\nAssistant: Red."}))
    assert pm.prompt == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                         {"role": "user", "content": "Name a colour."}]
    assert pm.chosen == {"role": "assistant", "content": "Blue."}
    assert pm.rejected == {"role": "assistant", "content": "Red."}
    assert (pm.layout, pm.margin) == ("hh-rlhf", 0.0)


def test_hh_answers_sharing_their_first_words_still_split_before_the_answer():
    """The common characters run into the answers ('I ...'); the split is at the turn, not at the characters."""
    base = "Human: What should I do?\n\nAssistant:"
    pm = pair_messages(record({"chosen": base + " I would rest.", "rejected": base + " I would run."}))
    assert pm.prompt == [{"role": "user", "content": "What should I do?"}]
    assert (pm.chosen["content"], pm.rejected["content"]) == ("I would rest.", "I would run.")


def test_hh_consecutive_turns_of_one_speaker_are_merged():
    """As in harmless-base test row 668: an answer wrote 'Human: ...' inline, then another Assistant turn."""
    c = ("\n\nHuman: Hi\n\nAssistant: Hello.  Human: And you?\n\nAssistant: Fine.\n\nHuman: Colour?"
         "\n\nAssistant: Blue.")
    r = c.replace("Blue.", "Red.")
    pm = pair_messages(record({"chosen": c, "rejected": r}))
    assert pm.prompt == [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello.  Human: And you?\n\nFine."},
                         {"role": "user", "content": "Colour?"}]
    assert (pm.chosen["content"], pm.rejected["content"]) == ("Blue.", "Red.")


def test_hh_sides_that_differ_before_the_final_turn_are_dropped_as_diverged(tok, tmp_path):
    c = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Colour?\n\nAssistant: Blue."
    r = "\n\nHuman: Hi\n\nAssistant: Hey.\n\nHuman: Colour?\n\nAssistant: Red."
    assert pair_messages(record({"chosen": c, "rejected": r})) is None
    ok = {"chosen": c, "rejected": c.replace("Blue.", "Green.")}
    with pytest.warns(UserWarning, match=r"1 diverged;.*p\.jsonl:2"):
        pairs, stats = load(write(tmp_path / "p.jsonl", [ok, {"chosen": c, "rejected": r}]), tok)
    assert (len(pairs), stats.dropped) == (1, Counter(diverged=1))
    assert stats.examples == {"diverged": [f"{tmp_path}/p.jsonl:2"]}


def reference_split(row: dict) -> tuple[str, str, str]:
    """The DPO authors' loader (preference_datasets.py, split_prompt_and_responses): both sides cut after the chosen
    side's last '\\n\\nAssistant:'."""
    prompt = row["chosen"][: row["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")]
    return prompt, row["chosen"][len(prompt):], row["rejected"][len(prompt):]


def llama2_render(turns: list[str]) -> str:
    """Meta's llama generation.py layout written out: <s>[INST] user [/INST] answer </s> per exchange."""
    return "".join(f"<s>[INST] {u} [/INST] {a} </s>" for u, a in zip(turns[::2], turns[1::2]))


def test_hh_rlhf_real_rows_match_the_dpo_loader_and_an_independent_rendering(shared_dir, tok, reference, tmp_path):
    with gzip.open(shared_dir / HH_FILE, "rt") as f:
        rows = [json.loads(next(f)) for _ in range(50)]
    path = write(tmp_path / "hh.jsonl.gz", rows)
    pairs, stats = load(path, tok, "llama-2", max_seq_len=100_000)
    assert (stats.records, stats.pairs, stats.layouts) == (50, 50, Counter({"hh-rlhf": 50}))
    for n, (row, pair) in enumerate(zip(rows, pairs), 1):
        prompt, chosen, rejected = reference_split(row)
        assert row["rejected"].startswith(prompt), n  # these 50 rows are well formed
        turns = [t.strip() for t in re.split(r"\n\n(?:Human|Assistant):", prompt[: -len("\n\nAssistant:")])[1:]]
        assert pair.source == f"{path}:{n}"
        assert pair.prompt_ids + pair.chosen_ids == ids_of(reference, llama2_render([*turns, chosen.strip()])), n
        assert pair.prompt_ids + pair.rejected_ids == ids_of(reference, llama2_render([*turns, rejected.strip()])), n


def trl_split(row: dict) -> tuple[str, str, str]:
    """TRL's examples/datasets/hh-rlhf-helpful-base.py: the common characters, cut back to their last
    '\\n\\nAssistant: ' (its prompt ends with it)."""
    prompt = os.path.commonprefix([row["chosen"], row["rejected"]])
    if not prompt.endswith("\n\nAssistant: "):
        prompt = prompt[: prompt.rfind("\n\nAssistant: ")] + "\n\nAssistant: "
    return prompt, row["chosen"][len(prompt):], row["rejected"][len(prompt):]


def words(text: str) -> str:
    """Text with collapsed white space."""
    return " ".join(text.split())


def unlabelled(transcript: str) -> str:
    """A transcript's words without its turn labels: what the messages of its turns keep, merged or not."""
    return words(re.sub(r"\n\n(Human|Assistant):", " ", transcript))


def test_hh_rlhf_whole_file_splits_as_trl_does(shared_dir):
    """Every one of the 2,312 rows: our prompt and answers carry TRL's text (turn labels of merged turns aside)."""
    with gzip.open(shared_dir / HH_FILE, "rt") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 2312
    for n, row in enumerate(rows, 1):
        pm = pair_messages(record(row, n))
        prompt, chosen, rejected = trl_split(row)
        assert words(" ".join(m["content"] for m in pm.prompt)) == unlabelled(prompt), n
        assert words(pm.chosen["content"]) == unlabelled(chosen), n
        assert words(pm.rejected["content"]) == unlabelled(rejected), n


def test_hh_rlhf_empty_answers_are_an_error_or_dropped_on_request(shared_dir, tok):
    with gzip.open(shared_dir / HH_FILE, "rt") as f:
        rows = [json.loads(line) for line in f]
    empty = [n for n, row in enumerate(rows, 1) if not all(a.strip() for a in trl_split(row)[1:])]
    assert len(empty) == 4
    with pytest.raises(InputError, match=rf"hh-rlhf_harmless-base_test\.jsonl\.gz:{empty[0]}: field 'chosen': the "
                                         "answer is empty; .*skip_empty"):
        load(shared_dir / HH_FILE, tok, max_seq_len=64)


@pytest.mark.slow
def test_hh_rlhf_whole_file_loads_with_skip_empty(shared_dir, tok):
    with gzip.open(shared_dir / HH_FILE, "rt") as f:
        rows = [json.loads(line) for line in f]
    empty = [n for n, row in enumerate(rows, 1) if not all(a.strip() for a in trl_split(row)[1:])]
    with pytest.warns(UserWarning, match="4 empty"):
        pairs, stats = load(shared_dir / HH_FILE, tok, max_seq_len=512, skip_empty=True)
    assert (stats.records, stats.pairs, stats.dropped) == (2312, 2312 - len(empty), Counter(empty=len(empty)))
    assert stats.examples["empty"] == [f"{shared_dir / HH_FILE}:{n}" for n in empty]
    assert all(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= 512 for p in pairs)


# ---- LLaMA-Factory and TRL's implicit-prompt messages ----------------------------------------------------------
def test_llama_factory_demo_rows_match_transformers(shared_dir, tiny_dir, tok, tmp_path):
    """Every 8th row of dpo_en_demo.json (single and multi-turn, with and without a system turn)."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(tiny_dir)
    hf.chat_template = LLAMA_TEMPLATE
    rows = json.loads((shared_dir / DEMO_FILE).read_text())[::8]
    assert {r["conversations"][0]["from"] for r in rows} == {"human", "system"}
    assert max(len(r["conversations"]) for r in rows) > 3
    pairs, stats = load(write(tmp_path / "demo.json", rows, jsonl=False), tok, LLAMA_TEMPLATE, 100_000)
    assert (stats.pairs, stats.layouts) == (len(rows), Counter({"llama-factory": len(rows)}))
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    for row, pair in zip(rows, pairs):
        prompt = [{"role": roles[t["from"]], "content": t["value"]} for t in row["conversations"]]
        for key, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            messages = [*prompt, {"role": "assistant", "content": row[key]["value"]}]
            assert pair.prompt_ids + ids == hf.apply_chat_template(messages, tokenize=True)["input_ids"]


def test_llama_factory_demo_file_reads_whole(shared_dir):
    records = [record(r, n) for n, r in enumerate(json.loads((shared_dir / DEMO_FILE).read_text()), 1)]
    assert len(records) == 300
    for rec in records:
        pm = pair_messages(rec)
        assert pm.layout == "llama-factory" and pm.prompt[-1]["role"] == "user"
        assert (pm.chosen["content"], pm.rejected["content"]) == (rec.data["chosen"]["value"],
                                                                  rec.data["rejected"]["value"])


def test_implicit_prompt_message_lists_split_like_transcripts():
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
              {"role": "user", "content": "Colour?"}]
    pm = pair_messages(record({"chosen": [*prompt, {"role": "assistant", "content": "Blue"}],
                               "rejected": [*prompt, {"role": "assistant", "content": "Red"}]}))
    assert (pm.layout, pm.prompt, pm.chosen["content"], pm.rejected["content"]) == ("messages", prompt, "Blue", "Red")
    other = [*prompt[:2], {"role": "user", "content": "Shape?"}, {"role": "assistant", "content": "Round"}]
    assert pair_messages(record({"chosen": [*prompt, {"role": "assistant", "content": "Blue"}],
                                 "rejected": other})) is None


# ---- margins ----------------------------------------------------------------------------------------------------
def test_margins_and_llama2_ratings(tok, tmp_path):
    """Llama 2, appendix A.3.3, Table 27: 'margin small' 1, 2/3, 1/3, 0 (the default), 'margin large' 3, 2, 1, 0."""
    ratings = ["Significantly Better", "better", "slightly  better", "Negligibly Better / Unsure"]
    records = [{**PAIR, "rating": r} for r in ratings] + [{**PAIR, "margin": 2.5}, {**PAIR, "margin": 0}, PAIR]
    f = write(tmp_path / "m.jsonl", records)
    assert [p.margin for p in load(f, tok)[0]] == pytest.approx([1, 2 / 3, 1 / 3, 0, 2.5, 0, 0])
    assert [p.margin for p in load(f, tok, margin_table="llama2-large")[0]] == [3, 2, 1, 0, 2.5, 0, 0]
    table = {"Significantly better": 4, "better": 3, "Slightly Better": 2, "negligibly better or unsure": 0.5}
    assert [p.margin for p in load(f, tok, margin_table=table)[0]] == [4, 3, 2, 0.5, 2.5, 0, 0]
    batch = collate_pairs(load(f, tok)[0], pad_id=0)
    assert batch["margin"].dtype == torch.float32
    assert batch["margin"].tolist() == pytest.approx([1, 2 / 3, 1 / 3, 0, 2.5, 0, 0])


@pytest.mark.parametrize(("extra", "kw", "message"), [
    ({"rating": "much better"}, {}, r"m\.jsonl:1: field 'rating' is 'much better'; use one of 'significantly better'"),
    ({"rating": 3}, {}, r"m\.jsonl:1: field 'rating' must be a string, got int"),
    ({"margin": 1, "rating": "better"}, {}, r"m\.jsonl:1: fields 'margin' and 'rating' are both given"),
    ({"margin": -0.5}, {}, r"m\.jsonl:1: field 'margin' is -0\.5; a margin is >= 0 \(swap 'chosen' and 'rejected'"),
    ({"margin": True}, {}, r"m\.jsonl:1: field 'margin' must be a finite number, got True"),
    ({"margin": "1"}, {}, r"m\.jsonl:1: field 'margin' must be a finite number, got '1'"),
    ({}, {"margin_table": "llama2-huge"}, r"unknown margin table 'llama2-huge'; use one of llama2-small, llama2-large"),
    ({"rating": "better"}, {"margin_table": {"better": -1}}, r"margin table: the margin of 'better' is -1"),
])
def test_bad_margins_are_one_line_errors(tok, tmp_path, extra, kw, message):
    with pytest.raises(InputError, match=message):
        load(write(tmp_path / "m.jsonl", [{**PAIR, **extra}]), tok, **kw)


def test_nan_margin_is_refused(tok, tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text('{"prompt": "a", "chosen": "b", "rejected": "c", "margin": NaN}\n')
    with pytest.raises(InputError, match=r"m\.jsonl:1: field 'margin' must be a finite number, got nan"):
        load(f, tok)


# ---- drops, truncation --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def btok() -> Tokenizer:
    """One token per byte, <s> = 0 added in front, <|im_end|> = 2 the EOS: lengths are character counts."""
    return byte_tokenizer(eos="<|im_end|>")


CHATML_PROMPT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def test_truncation_keep_end_cuts_the_prompt_on_the_left_and_keeps_bos(btok, tmp_path):
    question = "".join(chr(ord("a") + i % 26) for i in range(100))
    f = write(tmp_path / "t.jsonl", [{"prompt": question, "chosen": "A" * 20, "rejected": "B" * 10}])
    text = CHATML_PROMPT.format(question)
    assert len(btok.encode(text)) == 17 + 100 + 1 + 23  # <|im_end|> is one token; 142 prompt tokens with <s>
    (whole,), stats = load(f, btok, "chatml", max_seq_len=200)
    assert (len(whole.prompt_ids), stats.truncated) == (142, 0)
    # 142 + 21 > 100: the prompt keeps <s> and its last 78 tokens (100 - 21 - 1), the answers stay whole
    (pair,), stats = load(f, btok, "chatml", max_seq_len=100)
    assert pair.prompt_ids[0] == 0 and btok.decode(pair.prompt_ids[1:]) == btok.decode(btok.encode(text)[-78:])
    assert len(pair.prompt_ids) == 79 and btok.decode(pair.prompt_ids).endswith("<|im_start|>assistant\n")
    assert (btok.decode(pair.chosen_ids), btok.decode(pair.rejected_ids)) == ("A" * 20 + "<|im_end|>",
                                                                              "B" * 10 + "<|im_end|>")
    assert stats.truncated == 1
    # max_seq_len 24: the prompt keeps its floor of 24 // 4 = 6 tokens, the longer answer is cut to 18 (no EOS)
    (pair,), _ = load(f, btok, "chatml", max_seq_len=24)
    assert btok.decode(pair.prompt_ids) == "<s>" + "assistant\n"[-5:]
    assert (btok.decode(pair.chosen_ids), btok.decode(pair.rejected_ids)) == ("A" * 18, "B" * 10 + "<|im_end|>")
    (pair,), _ = load(f, btok, "chatml", max_seq_len=24, min_prompt_len=12)
    assert (len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)) == (12, 12, 11)


def test_truncation_none_keeps_the_prompt_and_drops_pairs_without_room(btok, tmp_path):
    f = write(tmp_path / "t.jsonl", [{"prompt": "q" * 100, "chosen": "A" * 20, "rejected": "B" * 10}])
    (pair,), stats = load(f, btok, "chatml", max_seq_len=150, truncation="none")
    assert len(pair.prompt_ids) == 142 and btok.decode(pair.chosen_ids) == "A" * 8
    assert (btok.decode(pair.rejected_ids), stats.truncated) == ("B" * 8, 1)
    g = write(tmp_path / "u.jsonl", [{"prompt": "q" * 100, "chosen": "A" * 20, "rejected": "B" * 10},
                                     {"prompt": "q", "chosen": "A", "rejected": "B"}])
    with pytest.warns(UserWarning, match=r"1 no_room.*u\.jsonl:1"):
        pairs, stats = load(g, btok, "chatml", max_seq_len=142, truncation="none")
    assert (len(pairs), stats.dropped, pairs[0].source) == (1, Counter(no_room=1), f"{g}:2")


def test_identical_and_empty_pairs_are_dropped_and_counted(btok, tmp_path):
    records = [
        {"prompt": "q", "chosen": "same", "rejected": "same"},                      # identical
        {"prompt": "q", "chosen": "AAAAAAAAAX", "rejected": "AAAAAAAAAY"},          # identical once cut to 8
        {"prompt": "q", "chosen": "good", "rejected": "bad"},                       # kept
        {"prompt": "q", "chosen": " ", "rejected": "bad"},                          # empty
        {"prompt": "q", "chosen": "good", "rejected": ""},                          # empty
    ]
    f = write(tmp_path / "d.jsonl", records)
    with pytest.warns(UserWarning, match=r"5 records \(prompt 5\) -> 1 pairs; dropped: .*"):
        pairs, stats = load(f, btok, "chatml", max_seq_len=43 + 8, truncation="none", skip_empty=True)
    assert [p.source for p in pairs] == [f"{f}:3"]
    assert stats.dropped == Counter(identical=1, identical_after_truncation=1, empty=2)
    assert stats.examples == {"identical": [f"{f}:1"], "identical_after_truncation": [f"{f}:2"],
                              "empty": [f"{f}:4", f"{f}:5"]}
    assert stats.summary() == ("5 records (prompt 5) -> 1 pairs; dropped: 2 empty, 1 identical, "
                               "1 identical_after_truncation; 0 truncated")
    with pytest.raises(InputError, match=r"d\.jsonl:4: field 'chosen': the answer is empty"):
        load(f, btok, "chatml", max_seq_len=51, truncation="none")


def test_a_file_whose_pairs_are_all_dropped_is_an_error(btok, tmp_path):
    f = write(tmp_path / "d.jsonl", [{"prompt": "q", "chosen": "same", "rejected": "same"}])
    with pytest.warns(UserWarning), pytest.raises(InputError, match=r"d\.jsonl: no preference pairs left: .*identical"):
        load(f, btok, "chatml")


# ---- errors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("content", "message"), [
    ('{"prompt": "q", "chosen": "a"}\n', r"x\.jsonl:1: field 'rejected' is missing"),
    ('\n{"prompt": "q", "chosen": ["a", "b"], "rejected": "c"}\n',
     r"x\.jsonl:2: field 'chosen' must hold one assistant message, got 2; put earlier turns in the prompt"),
    ('{"prompt": "q", "chosen": {"from": "human", "value": "a"}, "rejected": "c"}\n',
     r"x\.jsonl:1: field 'chosen' is a message from 'human'; an answer comes from the assistant"),
    ('{"prompt": "q", "chosen": "a", "rejected": {"role": "assistant", "content": 5}}\n',
     r"x\.jsonl:1: field 'rejected\.content' must be a string, got int"),
    ('{"prompt": "q", "chosen": "a", "rejected": 7}\n',
     r"x\.jsonl:1: field 'rejected' must be a string or an assistant message, got int"),
    ('{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a", '
     '"rejected": "b"}\n', r"x\.jsonl:1: field 'prompt': the prompt must end with a user message"),
    ('{"prompt": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"}\n',
     r"x\.jsonl:1: field 'prompt\[0\]\.role' is 'robot'"),
    ('{"prompt": " ", "chosen": "a", "rejected": "b"}\n', r"x\.jsonl:1: field 'prompt' is empty"),
    ('{"prompt": 3, "chosen": "a", "rejected": "b"}\n', r"x\.jsonl:1: field 'prompt' must be a string or a list"),
    ('{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "system": "t", '
     '"chosen": "a", "rejected": "b"}\n', r"x\.jsonl:1: field 'system' is given and 'prompt' opens with a system"),
    ('{"chosen": "just text", "rejected": "more text"}\n', r"x\.jsonl:1: field 'chosen' is not an HH-RLHF transcript"),
    ('{"chosen": "\\n\\nHuman: q\\n\\nAssistant: a\\n\\nHuman: more", '
     '"rejected": "\\n\\nHuman: q\\n\\nAssistant: b"}\n',
     r"x\.jsonl:1: field 'chosen' ends with a user turn; a transcript must end with the assistant's answer"),
    ('{"chosen": [{"role": "user", "content": "q"}], "rejected": "x"}\n',
     r"x\.jsonl:1: field 'rejected' must be a non-empty list of \{role, content\} messages"),
    ('{"conversations": [{"from": "gpt", "value": "a"}], "chosen": {"from": "gpt", "value": "a"}, '
     '"rejected": {"from": "gpt", "value": "b"}}\n', r"x\.jsonl:1: field 'conversations': the prompt must end with a "
                                                      "user message"),
    ('{"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt"}, '
     '"rejected": {"from": "gpt", "value": "b"}}\n', r"x\.jsonl:1: field 'chosen\.value' is missing"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b"\n', r"x\.jsonl:1: invalid JSON"),
    ('["not an object"]\n', r"x\.jsonl:1: expected a JSON object per record, got list"),
    ("", r"x\.jsonl: no records"),
    ('{"prompt": [{"role": "user", "content": "q"}, {"role": "user", "content": "r"}], "chosen": "a", '
     '"rejected": "b"}\n', r"x\.jsonl:1: message 1 has role 'user' but the llama-2 format needs"),
])
def test_bad_rows_are_one_line_errors_naming_file_line_and_field(tok, tmp_path, content, message):
    f = tmp_path / "x.jsonl"
    f.write_text(content)
    with pytest.raises(InputError, match=message) as e:
        load(f, tok)
    assert "\n" not in str(e.value).replace("\\n", "")


def test_bad_files_and_settings_are_one_line_errors(tok, tmp_path):
    with pytest.raises(InputError, match=r"missing\.jsonl: data file not found"):
        load(tmp_path / "missing.jsonl", tok)
    with pytest.raises(InputError, match=r"is a directory; pass a data file"):
        load(tmp_path, tok)
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match=r"bad\.jsonl\.gz: not a readable gzip file"):
        load(tmp_path / "bad.jsonl.gz", tok)
    f = write(tmp_path / "p.jsonl", [PAIR])
    with pytest.raises(InputError, match=r"unknown truncation 'keep_start'; use one of keep_end, none"):
        load(f, tok, truncation="keep_start")
    with pytest.raises(InputError, match=r"min_prompt_len=64 must be between 1 and max_seq_len - 1 = 63"):
        load(f, tok, max_seq_len=64, min_prompt_len=64)


# ---- files, splitting, batching -----------------------------------------------------------------------------------
def test_gzip_and_json_array_files_read_as_jsonl(tok, tmp_path):
    records = [{**PAIR, "chosen": f"Blue {i}."} for i in range(3)]
    plain = load(write(tmp_path / "p.jsonl", records), tok)[0]
    gz_path = write(tmp_path / "p.jsonl.gz", records)
    array_path = write(tmp_path / "p.json", records, jsonl=False)
    for path, lines in ((gz_path, [1, 2, 3]), (array_path, [2, 8, 14])):
        pairs = load(path, tok)[0]
        assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs] == [
            (p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in plain]
        assert [p.source for p in pairs] == [f"{path}:{n}" for n in lines]
    assert [array_path.read_text().splitlines()[n - 1] for n in (2, 8, 14)] == ["  {"] * 3


def test_split_pairs_is_seeded_disjoint_and_ordered(tok, tmp_path):
    pairs = load(write(tmp_path / "p.jsonl", [{**PAIR, "chosen": f"Blue {i}."} for i in range(40)]), tok)[0]
    train, val = split_pairs(pairs, val_fraction=0.1, seed=3)
    assert (len(train), len(val)) == (36, 4)
    assert [p.source for p in val] == [p.source for p in split_pairs(pairs, 0.1, seed=3)[1]]
    assert [p.source for p in val] != [p.source for p in split_pairs(pairs, 0.1, seed=4)[1]]
    assert {p.source for p in train}.isdisjoint(p.source for p in val)
    assert sorted(train + val, key=pairs.index) == pairs
    assert [pairs.index(p) for p in val] == sorted(pairs.index(p) for p in val)


def test_collate_pairs_by_hand():
    pairs = [PreferencePair([1, 2, 3], [4, 5], [6], 0.5), PreferencePair([7], [8, 9, 10, 11], [12, 13], 1.0)]
    b = collate_pairs(pairs, pad_id=99)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11], [1, 2, 3, 6, 99], [7, 12, 13, 99, 99]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert b["response_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 1, 0], [0, 1, 1, 0, 0]]
    assert b["last_index"].tolist() == [4, 4, 3, 2]
    assert b["margin"].tolist() == [0.5, 1.0]
    assert (b["input_ids"].dtype, b["attention_mask"].dtype, b["response_mask"].dtype) == (
        torch.long, torch.bool, torch.bool)
    assert b["last_index"].dtype == torch.long


def test_response_mask_shift_convention_scores_each_answer_token_once():
    """The documented recipe (logits[:, :-1] against input_ids[:, 1:] under response_mask[:, 1:]) sums exactly the
    log-probs of the answer tokens, each predicted from the position before it; padding adds nothing."""
    pairs = [PreferencePair([1, 2, 3], [4, 5], [6], 0.0), PreferencePair([7], [8, 9, 10, 11], [12, 13], 0.0)]
    b = collate_pairs(pairs, pad_id=0)
    logits = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(0))
    logp = logits.log_softmax(-1)
    recipe = (logp[:, :-1].gather(-1, b["input_ids"][:, 1:, None])[..., 0] * b["response_mask"][:, 1:]).sum(-1)
    rows = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    answers = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    by_hand = [sum(logp[i, t - 1, row[t]] for t in range(len(row) - len(answer), len(row)))
               for i, (row, answer) in enumerate(zip(rows, answers))]
    assert recipe.tolist() == pytest.approx([float(x) for x in by_hand], abs=1e-6)
    reward_tokens = b["input_ids"].gather(1, b["last_index"][:, None])[:, 0]
    assert reward_tokens.tolist() == [5, 11, 6, 13]  # each row's last real token, not a pad
