"""SFT data: record formats, loss masking checked by decoding the trained tokens against hand-written text,
EOS and BOS handling, truncation, clear errors, validation split, packing without cross-attention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from llamaherd.config import Config
from llamaherd.data import (
    IGNORE_INDEX,
    Record,
    collate,
    encode_conversation,
    load_sft_data,
    pack,
    read_records,
    split_validation,
)
from llamaherd.errors import InputError
from llamaherd.model import GPT, Spans
from llamaherd.tokenizer import Tokenizer

SPECIALS = ("<s>", "</s>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def byte_tokenizer(add_bos: bool = True, eos: str = "</s>") -> Tokenizer:
    """One token per UTF-8 byte plus <s>, </s>, <|im_end|> as special tokens: every split is predictable."""
    from llamaherd.tokenizer import _bytes_to_unicode

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for c in sorted(set(_bytes_to_unicode().values())):
        vocab[c] = len(vocab)
    backend = Backend(models.BPE(vocab, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return Tokenizer(backend, bos_id=0, eos_id=vocab[eos], add_bos_default=add_bos)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return byte_tokenizer()


def trained_text(tok: Tokenizer, sample) -> str:
    return tok.decode([t for t in sample.labels if t != IGNORE_INDEX])


def full_text(tok: Tokenizer, sample) -> str:
    """The whole sequence: inputs plus the final target."""
    return tok.decode(sample.input_ids + sample.labels[-1:])


def write(path: Path, records: list, jsonl: bool = True) -> Path:
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, indent=2))
    return path


def test_alpaca_llama2_masks_prompt_and_keeps_single_bos_and_eos(tok, tmp_path):
    f = write(tmp_path / "a.jsonl", [{"instruction": "Name a colour.", "input": "", "output": "Blue."}])
    data = load_sft_data(f, tok, "llama-2", max_seq_len=256)
    (s,) = data.samples
    assert full_text(tok, s) == "<s>[INST] Name a colour. [/INST] Blue. </s>"
    assert s.input_ids[0] == tok.bos_id and s.input_ids[1] != tok.bos_id  # the rendered <s> only
    assert trained_text(tok, s) == "Blue. </s>"
    assert s.labels[-1] == tok.eos_id
    assert (data.stats.records, data.stats.samples, data.stats.trained_tokens) == (1, 1, len("Blue. ") + 1)


def test_alpaca_format_with_input_and_history(tok, tmp_path):
    rec = {"instruction": "Sum them.", "input": "2 and 3", "output": "5", "history": [["Hi", "Hello!"]]}
    (s,) = load_sft_data(write(tmp_path / "a.json", [rec], jsonl=False), tok, "alpaca", 512).samples
    assert full_text(tok, s) == (
        "<s>Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n"
        "### Instruction:\nSum them.\n\n### Input:\n2 and 3\n\n### Response:\n5</s>"
    )
    assert trained_text(tok, s) == "Hello!</s>5</s>"


def test_sharegpt_vicuna_multi_turn(tok, tmp_path):
    rec = {"conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
        {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "See you."}, {"from": "human", "value": "?"},
    ]}
    (s,) = load_sft_data(write(tmp_path / "v.jsonl", [rec]), tok, "vicuna", 512).samples
    assert full_text(tok, s) == (
        f"<s>{VICUNA_SYSTEM} USER: Hi ASSISTANT: Hello.</s>USER: Bye ASSISTANT: See you.</s>"
    )  # the unanswered last question is dropped
    assert trained_text(tok, s) == "Hello.</s>See you.</s>"


def test_openai_messages_with_system_through_a_jinja_template(tmp_path):
    tok = byte_tokenizer(add_bos=False, eos="<|im_end|>")
    rec = {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"},
    ]}
    (s,) = load_sft_data(write(tmp_path / "m.jsonl", [rec]), tok, CHATML_TEMPLATE, 512).samples
    assert full_text(tok, s) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\n3+3?<|im_end|>\n<|im_start|>assistant\n6<|im_end|>"
    )
    assert trained_text(tok, s) == "4<|im_end|>6<|im_end|>"


GREETING_FIRST = {"conversations": [{"from": "gpt", "value": "Welcome!"}, {"from": "human", "value": "Hi"},
                                    {"from": "gpt", "value": "Hello"}]}
GREETING_MESSAGES = [{"role": "assistant", "content": "Welcome!"}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello"}]


def chatml_template(default_system: str | None, generation_tags: bool = False) -> str:
    """ChatML written as SmolLM2's template is (a default system message when the first is not one); with
    generation_tags, the `{% generation %}` blocks that transformers' return_assistant_tokens_mask reads."""
    start, end = ("{% generation %}", "{% endgeneration %}") if generation_tags else ("", "")
    system = ("{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n" + default_system
              + "<|im_end|>\n' }}{% endif %}") if default_system else ""
    return ("{% for m in messages %}" + system + "{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
            + start + "{{ m['content'] + '<|im_end|>' }}" + end + "{{ '\n' }}{% else %}"
            "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("default_system", [None, "You are helpful."])
def test_opening_assistant_message_is_trained_as_transformers_renders_it(tmp_path, default_system):
    """ShareGPT that opens with the assistant's greeting: transformers' apply_chat_template gives the ids and
    (with the same template's generation blocks) the assistant mask; ours must match both."""
    from transformers import PreTrainedTokenizerFast

    tok = byte_tokenizer(add_bos=False, eos="<|im_end|>")
    hf = PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer().backend, bos_token="<s>", eos_token="<|im_end|>")
    ref = hf.apply_chat_template(GREETING_MESSAGES, chat_template=chatml_template(default_system, True),
                                 tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    (s,) = load_sft_data(write(tmp_path / "g.jsonl", [GREETING_FIRST]), tok, chatml_template(default_system),
                         512).samples
    ids = s.input_ids + s.labels[-1:]
    assert ids == ref["input_ids"][: len(ids)]
    assert hf.decode(ref["input_ids"][len(ids) :]) == "\n"  # the template's newline after the last <|im_end|>
    assert [label != IGNORE_INDEX for label in s.labels] == [bool(m) for m in ref["assistant_masks"][1 : len(ids)]]
    assert trained_text(tok, s) == "Welcome!<|im_end|>Hello<|im_end|>"


def test_eos_appended_when_the_template_has_none(tok):
    template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    from llamaherd.data.sft import resolve_chat_format

    fmt = resolve_chat_format(template, tok)
    ids, trained = encode_conversation(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tok, fmt
    )
    assert tok.decode(ids) == "<s>user: hi\nassistant: yo\n</s>"
    assert ids[-1] == tok.eos_id and trained[-1]
    assert tok.decode([i for i, t in zip(ids, trained) if t]) == "yo\n</s>"


def test_train_on_prompt(tok, tmp_path):
    f = write(tmp_path / "a.jsonl", [{"instruction": "Q", "output": "A"}])
    (s,) = load_sft_data(f, tok, "llama-2", 256, train_on_prompt=True).samples
    assert trained_text(tok, s) == "[INST] Q [/INST] A </s>"  # every target; BOS is never one


def test_truncation_drops_samples_without_response_and_reports_them(tok, tmp_path):
    records = [
        {"instruction": "x" * 50, "output": "late"},  # response starts after 40 tokens
        {"instruction": "short", "output": "a long answer " * 5},  # response partly kept
        {"instruction": "ok", "output": "fine"},
    ]
    f = write(tmp_path / "t.jsonl", records)
    with pytest.warns(UserWarning, match=r"1 samples dropped.*t\.jsonl:1"):
        data = load_sft_data(f, tok, "llama-2", max_seq_len=40)
    assert data.stats.dropped == [f"{f}:1"]
    assert data.stats.truncated == 1
    assert [s.sources for s in data.samples] == [[f"{f}:2"], [f"{f}:3"]]
    hostile = write(tmp_path / "t\x1b]0;x\x07.jsonl", records)  # the warning names the file: escaped
    with pytest.warns(UserWarning, match=r"t\\x1b\]0;x\\x07\.jsonl:1") as caught:
        load_sft_data(hostile, tok, "llama-2", max_seq_len=40)
    assert "\x1b" not in str(caught[0].message)
    assert len(data.samples[0]) == 40
    assert trained_text(tok, data.samples[0]) == ("a long answer " * 5)[: 40 - len("[INST] short [/INST] ")]
    assert all(any(t != IGNORE_INDEX for t in s.labels) for s in data.samples)


def test_plain_text_windows_train_every_token_once(tok, tmp_path):
    text = "The quick brown fox jumps over the lazy dog."
    (tmp_path / "doc.txt").write_text(text)
    data = load_sft_data(tmp_path / "doc.txt", tok, "llama-2", max_seq_len=16)
    ids = tok.encode(text, add_bos=True) + [tok.eos_id]
    assert [t for s in data.samples for t in s.labels] == ids[1:]
    assert all(len(s) <= 16 for s in data.samples) and len(data.samples) == 3
    jsonl = load_sft_data(write(tmp_path / "t.jsonl", [{"text": text}]), tok, "llama-2", 64)
    assert full_text(tok, jsonl.samples[0]) == f"<s>{text}</s>"


@pytest.mark.parametrize(
    ("content", "jsonl", "message"),
    [
        ('{"instruction": "a", "output": "b"}\n\n{"instruction": "c"}\n', True,
         r"x\.jsonl:3: field 'output' is missing"),
        ('{"instruction": "a", "output": 5}\n', True, r"x\.jsonl:1: field 'output' must be a string, got int"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": \n', True, r"x\.jsonl:2: invalid JSON"),
        (('[\n  {"instruction": "a", "output": "b"},\n  {"conversations": [{"from": "human", "value": "hi"},\n'
         '    {"from": "robot", "value": "x"}]}\n]'), False,
         r"x\.json:3: field 'conversations\[1\]\.from' is 'robot'"),
        (('[\n  {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},\n'
         '  [1, 2]\n]'), False, r"x\.json:3: expected a JSON object per record, got list"),
        ('{"messages": [{"role": "user", "content": "a"}]}\n', True, r"x\.jsonl:1: .*no assistant message"),
        ('{"messages": [{"role": "user", "content": ["a"]}]}\n', True,
         r"x\.jsonl:1: field 'messages\[0\]\.content' must be a string, got list"),
        ('{"prompt": "a", "completion": "b"}\n', True, r"x\.jsonl:1: unknown record layout"),
        (('{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"},'
         ' {"from": "gpt", "value": "c"}]}\n'), True, r"x\.jsonl:1: message 0 has role 'assistant'"),
    ],
)
def test_malformed_records_name_file_line_and_field(tok, tmp_path, content, jsonl, message):
    f = tmp_path / ("x.jsonl" if jsonl else "x.json")
    f.write_text(content)
    with pytest.raises(InputError, match=message):
        load_sft_data(f, tok, "llama-2", 128)


def test_json_array_line_numbers(tmp_path):
    f = write(tmp_path / "a.json", [{"instruction": str(i), "output": "o"} for i in range(3)], jsonl=False)
    lines = f.read_text().splitlines()
    records = list(read_records(f))
    assert [lines[r.line - 1].strip() for r in records] == ["{"] * 3
    assert [r.data["instruction"] for r in records] == ["0", "1", "2"]
    assert Record(str(f), 7, {}).where == f"{f}:7"


def test_validation_split_is_seeded_and_disjoint(tok, tmp_path):
    f = write(tmp_path / "a.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(40)])
    samples = load_sft_data(f, tok, "llama-2", 64).samples
    train, val = split_validation(samples, val_fraction=0.1, seed=7)
    _, again_val = split_validation(samples, val_fraction=0.1, seed=7)
    other = split_validation(samples, val_fraction=0.1, seed=8)[1]
    assert len(val) == 4 and len(train) == 36
    assert [s.sources for s in val] == [s.sources for s in again_val]
    assert [s.sources for s in val] != [s.sources for s in other]
    assert {s.sources[0] for s in train}.isdisjoint(s.sources[0] for s in val)
    assert len(split_validation(samples, val_size=5, seed=0)[1]) == 5


def test_packed_samples_do_not_attend_to_each_other(tok, tmp_path):
    records = [{"instruction": "q" * n, "output": "a" * (2 * n)} for n in (1, 2, 1, 3, 1)]
    samples = load_sft_data(write(tmp_path / "p.jsonl", records), tok, "llama-2", 64).samples
    rows = pack(samples, max_seq_len=64)
    assert len(rows) < len(samples) and all(len(r) <= 64 for r in rows)
    assert [s for r in rows for s in r.sources] == [s.sources[0] for s in samples]
    batch = collate(rows, pad_id=tok.eos_id)
    # positions restart at each sample; segment ids number the samples, 0 on padding
    r0 = batch["positions"][0, : len(rows[0])].tolist()
    assert r0 == [p for n in rows[0].lengths for p in range(n)]
    assert batch["segment_ids"][-1, len(rows[-1]):].eq(0).all()
    assert batch["labels"][-1, len(rows[-1]):].eq(IGNORE_INDEX).all()

    torch.manual_seed(0)
    model = GPT(Config(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_query_groups=2, n_embd=32,
                       intermediate_size=48, block_size=128)).eval()
    # the block-diagonal causal mask, written out: query t sees key s <= t of the same sample
    T = batch["input_ids"].shape[1]
    block_diagonal = torch.zeros(len(rows), T, T, dtype=torch.bool)
    for b, row in enumerate(rows):
        start = 0
        for n in [*row.lengths, T - len(row)]:  # the padding as one more block
            block_diagonal[b, start : start + n, start : start + n] = torch.ones(n, n, dtype=torch.bool).tril()
            start += n
    with torch.no_grad():
        packed = model(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])
        masked = model(batch["input_ids"], positions=batch["positions"], attn_mask=block_diagonal)
        separate = [model(torch.tensor([s.input_ids]))[0] for s in samples]
    k = 0
    for b, row in enumerate(rows):
        start = 0
        for n in row.lengths:
            torch.testing.assert_close(packed[b, start : start + n], separate[k], atol=1e-5, rtol=1e-5)
            start, k = start + n, k + 1
        torch.testing.assert_close(packed[b, : len(row)], masked[b, : len(row)], atol=1e-5, rtol=1e-5)
    # without the segments the later samples would see the earlier ones
    with torch.no_grad():
        leaky = model(batch["input_ids"], positions=batch["positions"])
    assert (leaky[0, rows[0].lengths[0] :] - packed[0, rows[0].lengths[0] :]).abs().max() > 1e-3


def test_collate_unpacked_right_pads_without_mask(tok, tmp_path):
    samples = load_sft_data(write(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"},
                                                         {"instruction": "ccc", "output": "dddd"}]),
                            tok, "llama-2", 64).samples
    batch = collate(samples, pad_id=tok.eos_id)
    assert batch["input_ids"][0, len(samples[0]):].eq(tok.eos_id).all()
    assert batch["labels"][0, len(samples[0]):].eq(IGNORE_INDEX).all()
    assert batch["segment_ids"].tolist() == [[1] * len(samples[0]) + [0] * (len(samples[1]) - len(samples[0])),
                                             [1] * len(samples[1])]
    # one sample per row, padded on the right: plain causal attention is exact, no per-sample spans needed
    assert Spans.from_segment_ids(batch["segment_ids"]) is None
    assert Spans.from_segment_ids(torch.tensor([[1, 1, 2, 0]])).rows == [[(0, 2), (2, 3), (3, 4)]]


# ---- real instruction data and the real SmolLM2 vocabulary --------------------------------------------------
@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    from llamaherd.embedded import embedded_model_path

    return Tokenizer.from_path(embedded_model_path())


SMOLLM2_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lima.json", "alpaca_en_demo.json"])
def test_real_files_with_the_models_own_template(shared_dir, smollm2, name):
    """Every sample: the inputs are the hand-built ChatML text, the trained tokens are exactly the answers."""
    path = shared_dir / "benchmarks" / "instructions" / name
    raw = json.loads(path.read_text())
    data = load_sft_data(path, smollm2, smollm2.chat_template, max_seq_len=8192)
    assert data.stats.records == len(raw) == len(data.samples) and not data.stats.dropped
    exact = 0
    for rec, s in zip(raw, data.samples, strict=True):
        turns = [*map(tuple, rec.get("history") or []), (
            rec["instruction"] + (f"\n\n{rec['input']}" if rec["input"] else ""), rec["output"])]
        expected = SMOLLM2_SYSTEM + "".join(
            f"<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n" for u, a in turns
        )
        assert full_text(smollm2, s) == expected.removesuffix("\n")
        answers = "".join(f"{a}<|im_end|>" for _, a in turns)
        if any(a[:1].isspace() for _, a in turns):
            # an answer that starts with whitespace shares its first token with the header's "\n"
            assert trained_text(smollm2, s).replace("\n", "") == answers.replace("\n", "")
        else:
            assert trained_text(smollm2, s) == answers
            exact += 1
        assert s.labels[-1] == smollm2.eos_id
    assert exact > 0.95 * len(raw)


@pytest.mark.slow
def test_opening_assistant_message_with_the_real_smollm2_template(tmp_path, smollm2):
    """The embedded model's own template (a default system message): token ids as transformers gives them."""
    from transformers import AutoTokenizer

    from llamaherd.embedded import embedded_model_path

    path = embedded_model_path()
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ref = hf.apply_chat_template(GREETING_MESSAGES, chat_template=smollm2.chat_template, tokenize=True,
                                 return_dict=True)["input_ids"]
    (s,) = load_sft_data(write(tmp_path / "g.jsonl", [GREETING_FIRST]), smollm2, smollm2.chat_template, 512).samples
    ids = s.input_ids + s.labels[-1:]
    assert ids == ref[: len(ids)] and hf.decode(ref[len(ids) :]) == "\n"
    assert trained_text(smollm2, s) == "Welcome!<|im_end|>Hello<|im_end|>"


@pytest.mark.slow
def test_real_lima_truncation_is_reported_and_bos_single(shared_dir, smollm2):
    path = shared_dir / "benchmarks" / "instructions" / "lima.json"
    with pytest.warns(UserWarning, match="samples dropped"):
        data = load_sft_data(path, smollm2, "llama-2", max_seq_len=256)
    st = data.stats
    assert st.dropped and st.records == st.samples + len(st.dropped) and st.truncated > 0
    assert all(len(s) <= 256 and any(t != IGNORE_INDEX for t in s.labels) for s in data.samples)
    bos = smollm2.bos_id  # llama-2 renders its BOS as text; it must not be doubled
    assert all(s.input_ids[0] == bos and s.input_ids[1] != bos for s in data.samples)
    rows = pack(split_validation(data.samples, 0.05, seed=0)[0], 256)
    assert all(len(r) <= 256 for r in rows) and sum(len(r.lengths) for r in rows) == len(data.samples) - round(
        0.05 * len(data.samples))
