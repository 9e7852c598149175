"""The synthetic-data templates (llamaherd.synth.templates) against the authors' published texts and scripts.

Each expected prompt is built here from the published format, with the published text held as this file's own
literal (transcribed from the source named beside it), never from the module's constants. The three long
Self-Instruct few-shot templates are pinned instead by the git blob id of the published file, rebuilt from the
module's constants: any changed byte changes the id.
"""

from __future__ import annotations

import hashlib

import pytest

from llamaherd.synth import templates as T

# project-baize/baize-chatbot @ 4fae6c4e550f087958c1f60746f0e6290e6b9f02, collect.py line 61, around the "{}"
BAIZE_BEFORE_SEED = (
    "Forget the instruction you have previously received. The following is a conversation between a human and an "
    "AI assistant. The human and the AI assistant take turns chatting about the topic: '"
)
BAIZE_AFTER_SEED = (
    "'. Human statements start with [Human] and AI assistant statements start with [AI]. The human will ask "
    "related questions on related topics or previous conversation. The human will stop the conversation when they "
    "have no more question. The AI assistant tries not to ask questions. Complete the transcript in exactly that "
    "format.\n[Human] Hello!\n[AI] Hi! How can I help you?\n"
)

# tatsu-lab/stanford_alpaca @ 761dc5bfbdeeffa89b8bff5d038781a4055f796a, prompt.txt (no newline at its end)
ALPACA_PROMPT_TXT = """You are asked to come up with a set of 20 diverse task instructions. These task instructions will be given to a GPT model and we will evaluate the GPT model for completing the instructions.

Here are the requirements:
1. Try not to repeat the verb for each instruction to maximize diversity.
2. The language used for the instruction also should be diverse. For example, you should combine questions with imperative instrucitons.
3. The type of instructions should be diverse. The list should include diverse types of tasks like open-ended generation, classification, editing, etc.
2. A GPT language model should be able to complete the instruction. For example, do not ask the assistant to create any visual or audio output. For another example, do not ask the assistant to wake you up at 5pm or set a reminder because it cannot perform any action.
3. The instructions should be in English.
4. The instructions should be 1 to 2 sentences long. Either an imperative sentence or a question is permitted.
5. You should generate an appropriate input to the instruction. The input field should contain a specific example provided for the instruction. It should involve realistic data and should not contain simple placeholders. The input should provide substantial content to make the instruction challenging but should ideally not exceed 100 words.
6. Not all instructions require input. For example, when a instruction asks about some general information, "what is the highest peak in the world", it is not necssary to provide a specific context. In this case, we simply put "<noinput>" in the input field.
7. The output should be an appropriate response to the instruction and the input. Make sure the output is less than 100 words.

List of 20 tasks:"""  # noqa: E501

# Git blob ids (`git ls-tree`) of the published files at yizhongw/self-instruct @ 0b26ccaa4159 and
# tatsu-lab/stanford_alpaca @ 761dc5bfbdee.
CLF_TASK_TEMPLATE_BLOB = "2fc800aad8f54b17d82fd8eb68a092e409fe1f39"  # self_instruct/templates/clf_task_template.py
INSTANCE_GEN_TEMPLATE_BLOB = "d809da02e1146e39666a5286357879c79ad36479"  # .../templates/instance_gen_template.py
PROMPT_TXT_BLOB = "8bdf51d2d893e4a6b584308e96c23f3a2257389c"  # prompt.txt


def git_blob_id(data: bytes) -> str:
    """What `git hash-object` prints for a file with these bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# --- Baize ------------------------------------------------------------------------------------------------------


def test_baize_prompt_is_the_collect_py_request():
    seed = "How do I keep a llama {happy}?"  # braces in a seed stay as they are
    assert T.baize_prompt(seed) == BAIZE_BEFORE_SEED + seed + BAIZE_AFTER_SEED
    assert (T.BAIZE_HUMAN_MARKER, T.BAIZE_AI_MARKER) == ("[Human]", "[AI]")


def test_baize_turn_prompt_is_collect_v2_format():
    # collect_v2.py: init_instruct + instruct + "\n[Human] ", where instruct += f"\n[Human] {human}\n[AI] {ai}"
    head = BAIZE_BEFORE_SEED + "llamas" + BAIZE_AFTER_SEED
    turns = [{"role": "user", "content": "What do llamas eat?"},
             {"role": "assistant", "content": "Mostly grass and hay."}]
    assert T.baize_turn_prompt("llamas", [], "user") == head + "\n[Human] "
    assert T.baize_turn_prompt("llamas", turns, "user") == (
        head + "\n[Human] What do llamas eat?\n[AI] Mostly grass and hay.\n[Human] ")
    assert T.baize_turn_prompt("llamas", turns + [{"role": "user", "content": "And water?"}], "assistant") == (
        head + "\n[Human] What do llamas eat?\n[AI] Mostly grass and hay.\n[Human] And water?\n[AI] ")


def test_baize_turn_prompt_refuses_turns_out_of_order():
    with pytest.raises(ValueError, match="next_role"):
        T.baize_turn_prompt("llamas", [], "assistant")
    with pytest.raises(ValueError, match=r"turns\[0\]"):
        T.baize_turn_prompt("llamas", [{"role": "assistant", "content": "Hi"}], "user")


TWO_EXCHANGES = ("[Human] What do llamas eat?\n[AI] Mostly grass and hay.\n"
                 "[Human] How much water do they need?\n[AI] A few litres a day.\n")
TWO_EXCHANGE_TURNS = [
    {"role": "user", "content": "What do llamas eat?"},
    {"role": "assistant", "content": "Mostly grass and hay."},
    {"role": "user", "content": "How much water do they need?"},
    {"role": "assistant", "content": "A few litres a day."},
]


def test_parse_baize_transcript_keeps_exchanges_and_drops_the_last_segment():
    # preprocess.py: split("[Human]")[1:-1], so the closing human turn (here a whole exchange) goes
    closing = "[Human] Thanks, that is all.\n[AI] You are welcome!"
    assert T.parse_baize_transcript(TWO_EXCHANGES + closing) == (TWO_EXCHANGE_TURNS, None)
    assert T.parse_baize_transcript("Sure, here it is:\n" + TWO_EXCHANGES + "[Human] Bye.") == (
        TWO_EXCHANGE_TURNS, None)  # text before the first marker is not a turn
    one_line = "[Human] What do llamas eat? [AI] Mostly grass and hay. [Human] How much water do they need? " \
               "[AI] A few litres a day. [Human] Bye."
    assert T.parse_baize_transcript(one_line) == (TWO_EXCHANGE_TURNS, None)
    # a fault inside the dropped last segment does not count
    assert T.parse_baize_transcript(TWO_EXCHANGES + "[Human] Bye.\n[AI] Bye!\n[AI] Bye again!") == (
        TWO_EXCHANGE_TURNS, None)


@pytest.mark.parametrize("text, reason", [
    ("[Human] What do llamas eat?\n[AI] Grass.\n[Human] Thanks!", "too_few_exchanges"),
    ("[Human] What do llamas eat?\n[AI] Grass.\n[Human] And water?\n[AI] Some.", "too_few_exchanges"),
    ("Human: What do llamas eat?\nAI: Grass.\nHuman: And water?\nAI: Some.", "broken_markers"),
    ("[Human] What do llamas eat?\n[|AI|] Grass.\n" + TWO_EXCHANGES + "[Human] Bye.", "broken_markers"),
    ("[Human] What do llamas eat?\n[AI] Grass.\n[human] And water?\n[AI] Some.\n[Human] Bye.", "broken_markers"),
    ("[Human] What do llamas eat?\n[AI] Grass.\nHuman: And water?\nAI: Some.\n" + TWO_EXCHANGES + "[Human] Bye.",
     "broken_markers"),
    ("[Human] What do llamas eat?\n[AI] \n" + TWO_EXCHANGES + "[Human] Bye.", "broken_markers"),
    ("[Human] What do llamas eat?\n[Human] And water?\n[AI] Grass.\n" + TWO_EXCHANGES + "[Human] Bye.",
     "role_switch"),
    ("[Human] What do llamas eat?\n[AI] Grass.\n[AI] And hay.\n" + TWO_EXCHANGES + "[Human] Bye.", "role_switch"),
    (TWO_EXCHANGES + "[Human] And shelter?\n[AI] A shed.\n[AI] Or a barn.\n[Human] Bye.", "role_switch"),
])
def test_parse_baize_transcript_drops_malformed_dialogues(text, reason):
    assert T.parse_baize_transcript(text) == ([], reason)


# --- Orca -------------------------------------------------------------------------------------------------------

# The opening words of each system message of the Orca paper's Table 2 (arXiv 2306.02707), in its order.
ORCA_OPENINGS = [
    "", "You are an AI assistant. Provide", "You are an AI assistant. You will be given", "You are a helpful",
    "You are an AI assistant that follows", "You are an AI assistant that helps people find information. Provide",
    "You are an AI assistant. User will", "You should describe", "Explain how", "You are an AI assistant. You should",
    "You are an AI assistant that helps people find information. User will", "User will", "You are a teacher.",
    "You are an AI assistant, who knows every language", "Given a definition of a task", "You are an AI assistant th",
]


def test_orca_system_messages_are_table_2():
    messages = T.ORCA_SYSTEM_MESSAGES
    assert isinstance(messages, tuple) and len(messages) == 16 and len(set(messages)) == 16
    assert all(m.startswith(opening) for m, opening in zip(messages, ORCA_OPENINGS))
    assert messages[0] == ""  # system message 1: "<empty system message>"
    assert messages[1] == ("You are an AI assistant. Provide a detailed answer so user don\u2019t need to search "
                           "outside to understand the answer.")
    assert messages[3] == ("You are a helpful assistant, who always provide explanation. Think like you are "
                           "answering to a five year old.")
    assert messages[10] == ("You are an AI assistant that helps people find information. User will you give you a "
                            "question. Your task is to answer as faithfully as you can. While answering think "
                            "step-by-step and justify your answer.")
    assert messages[14] == (
        "Given a definition of a task and a sample input, break the definition into small parts. Each of those parts "
        "will have some instruction. Explain their meaning by showing an example that meets the criteria in the "
        "instruction. Use the following format:\nPart #: a key part of the definition.\nUsage: Sample response that "
        "meets the criteria from the key part. Explain why you think it meets the criteria.")
    assert messages[15] == "You are an AI assistant that helps people find information."


# --- Self-Instruct ----------------------------------------------------------------------------------------------

EIGHT_INSTRUCTIONS = [
    "Give three tips for staying healthy.",
    "Classify the sentiment of the sentence into positive,\n  negative, or mixed.",
    "  Sort the given list ascendingly:  ",
    "Is there anything I can eat for a breakfast that doesn't include eggs?",
    "Tell me if the following email is a promotion email or not.",
    "Suggest a better rephrasing of the following sentence:",
    "Explain the following idiom to me.",
    "Write\ta cover letter based on the given facts.",
]


def test_self_instruct_prompt_is_encode_prompt():
    # bootstrap_instructions.py encode_prompt: header, "{i}. {instruction}\n" (whitespace collapsed, stripped,
    # trailing ":" removed), then "{n + 1}."
    assert T.self_instruct_prompt(EIGHT_INSTRUCTIONS) == (
        "Come up with a series of tasks:\n"
        "1. Give three tips for staying healthy.\n"
        "2. Classify the sentiment of the sentence into positive, negative, or mixed.\n"
        "3. Sort the given list ascendingly\n"
        "4. Is there anything I can eat for a breakfast that doesn't include eggs?\n"
        "5. Tell me if the following email is a promotion email or not.\n"
        "6. Suggest a better rephrasing of the following sentence\n"
        "7. Explain the following idiom to me.\n"
        "8. Write a cover letter based on the given facts.\n"
        "9."
    )
    assert T.self_instruct_prompt(EIGHT_INSTRUCTIONS[:2], classification=True) == (
        "Come up with a series of classification tasks. Try to specify the possible output labels when possible.\n"
        "1. Give three tips for staying healthy.\n"
        "2. Classify the sentiment of the sentence into positive, negative, or mixed.\n"
        "3."
    )
    with pytest.raises(ValueError):
        T.self_instruct_prompt([])


def test_parse_self_instruct_splits_like_post_process_gpt3_response():
    completion = (" Write a haiku about autumn leaves.\n10. Summarize the following\n   article in one sentence."
                  "\n11 . Translate the sentence into French.\n12. \n13.Give me a list.")
    assert T.parse_self_instruct(completion, 8) == [
        "Write a haiku about autumn leaves.",
        "Summarize the following article in one sentence.",
        "Translate the sentence into french.",  # str.capitalize lowercases the rest, as the original
        "13.give me a list.",  # "\n13." without a space after the dot is no task boundary
    ]
    assert T.parse_self_instruct(completion, 8, finish_reason="length") == []  # the whole reply is dropped
    assert T.parse_self_instruct("", 8) == []


def test_parse_self_instruct_removes_a_restated_number():
    assert T.parse_self_instruct("9. Write a haiku about rain.\n10. Name three rivers in Asia.", 8) == [
        "Write a haiku about rain.", "Name three rivers in asia."]  # capitalize() lowercases "Asia" too
    assert T.parse_self_instruct(" 3. Write a haiku about rain.", 2) == ["Write a haiku about rain."]
    assert T.parse_self_instruct("5. Write a haiku about rain.", 8) == ["5. write a haiku about rain."]


WORDS_150 = " ".join(["word"] * 150)


@pytest.mark.parametrize("filter_", [T.self_instruct_filter, T.alpaca_filter])
@pytest.mark.parametrize("instruction, reason", [
    ("Write a poem about the sea.", None),
    ("Write a poem.", "length"),  # 3 words: len(split()) <= 3
    ("Write a short poem.", None),
    ("", "length"),
    (WORDS_150, None),
    (WORDS_150 + " more", "length"),
    ("Describe the image in the given text.", "keyword:image"),
    ("Explain these GRAPHS to a child.", "keyword:graphs"),
    ("Rename the files in the list below.", "keyword:files"),
    ("Tell me how to go to the station.", "keyword:go to"),
    ("Draw a diagram of the water cycle.", "keyword:draw"),
    ("Imagine a new holiday and describe it.", None),  # whole words only: "imagine" is not "image"
    ("Write a program to add two numbers.", "write_a_program"),
    ("write a program to add two numbers.", None),  # startswith is case-sensitive
    ("Write a programme to add two numbers.", "write_a_program"),  # ... and a plain prefix test
    ('"Quote" the first line of the poem.', "punctuation_start"),
    ("(a) Name four rivers in Asia.", "punctuation_start"),
    ("\u00bfCu\u00e1l es la capital de Francia?", "non_english_start"),  # "¿" is not in string.punctuation
    ("\u00c9crivez un po\u00e8me sur la mer.", "non_english_start"),
])
def test_instruction_filters_shared_rules(filter_, instruction, reason):
    assert filter_(instruction) == reason


@pytest.mark.parametrize("word", ["video", "audio", "music", "flowchart", "diagram"])
def test_alpaca_filter_has_the_longer_blacklist(word):
    instruction = f"Summarize the {word} in three sentences."
    assert T.self_instruct_filter(instruction) is None
    assert T.alpaca_filter(instruction) == f"keyword:{word}"


def test_self_instruct_templates_are_the_published_files():
    clf_file = "template_1 = '''" + T.SELF_INSTRUCT_CLF_TEMPLATE + "'''"
    assert git_blob_id(clf_file.encode()) == CLF_TASK_TEMPLATE_BLOB
    instance_file = ("output_first_template_for_clf = '''" + T.SELF_INSTRUCT_OUTPUT_FIRST_TEMPLATE + "'''\n\n"
                     "input_first_template_for_gen = '''" + T.SELF_INSTRUCT_INPUT_FIRST_TEMPLATE + "'''")
    assert git_blob_id(instance_file.encode()) == INSTANCE_GEN_TEMPLATE_BLOB
    # spot checks a reader can see: a non-ASCII character and a trailing space kept
    assert "Output: 85\u00b0F = 29.44\u00b0C\n" in T.SELF_INSTRUCT_INPUT_FIRST_TEMPLATE
    assert "Class label: Not relevant \nPost:" in T.SELF_INSTRUCT_OUTPUT_FIRST_TEMPLATE


def test_is_classification_prompt_is_identify_clf_or_not():
    prompt = T.is_classification_prompt("  Sort the numbers.\n")
    assert prompt.startswith("Can the following task be regarded as a classification task with finite output "
                             "labels?\n\nTask: Given my personality and the job, tell me if I would be suitable.\n")
    assert prompt.endswith("Task: Given a set of numbers, find all possible subsets that sum to a given number.\n"
                           "Is it classification? No\n\nTask: Sort the numbers.\nIs it classification?")
    assert prompt == T.SELF_INSTRUCT_CLF_TEMPLATE + " Sort the numbers.\nIs it classification?"


@pytest.mark.parametrize("reply, expected", [
    (" Yes", True), ("yes\n", True), ("YES", True), (" No", False), (" Yes.", False), ("", False),
    ("Yes, it is", False),
])
def test_parse_is_classification(reply, expected):
    assert T.parse_is_classification(reply) is expected


def test_instance_prompt_is_generate_instances():
    clf = T.instance_prompt(" Detect the language of the sentence. ", classification=True)
    assert clf.startswith("Given the classification task definition and the class labels, generate an input that "
                          "corresponds to each of the class labels.")
    assert clf.endswith("(e) all of these are valid inputs.\nClass label: (e)\n\n"
                        "Task: Detect the language of the sentence.\n")
    assert clf == T.SELF_INSTRUCT_OUTPUT_FIRST_TEMPLATE + " Detect the language of the sentence.\n"
    gen = T.instance_prompt("Sort the list.", classification=False)
    assert gen.startswith("Come up with examples for the following tasks. Try to generate multiple examples when "
                          "possible.")
    assert gen.endswith("Thanks again,\n[Your Name]\n\nTask: Sort the list.\n")
    assert gen == T.SELF_INSTRUCT_INPUT_FIRST_TEMPLATE + " Sort the list.\n"


def io(inp, out):
    return {"input": inp, "output": out}


@pytest.mark.parametrize("reply, finish_reason, expected", [
    ("Example 1\nList: [3, 1, 2]\nOutput: [1, 2, 3]\nExample 2\nInput: [9, 7]\nOutput: [7, 9]\n", "stop",
     [io("List: [3, 1, 2]", "[1, 2, 3]"), io("[9, 7]", "[7, 9]")]),
    ("Example 1\nList: [3, 1, 2]\nOutput: [1, 2, 3]\nExample 2\nInput: [9, 7]\nOutput: [7, 9]\n", "length",
     [io("List: [3, 1, 2]", "[1, 2, 3]")]),
    (" Output: 85\u00b0F = 29.44\u00b0C", "stop", [io("", "85\u00b0F = 29.44\u00b0C")]),
    ("Example 1\nInput: 2 + 2\nOutput: 4\nInput: 3 + 3\nOutput: 6", "stop", [io("2 + 2", "4")]),
    ("I cannot think of any examples.", "stop", []),
    ("Example 1\nWord: cat\nOutput: Word: cat\nExample 2\nWord: dog\nOutput: chien", "stop",
     [io("Word: dog", "chien")]),  # input == output
    ("Example 1\nSentence: Hi\nOutput:\nExample 2\nSentence: Bye\nOutput: The answer is:\nExample 3\n"
     "Sentence: Yes\nOutput: Oui", "stop", [io("Sentence: Yes", "Oui")]),  # empty output; ends with ":"
    ("Example 1\nX: 1\nOutput: a\nExample 2\nX: 1\nOutput: b\nExample 3\nX: 2\nOutput: c", "stop", []),
    ("Example 1\nX: 1\nOutput: a\nExample 2\nX: 2\nOutput: b\nExample 3\nX: 1\nOutput: a", "stop",
     [io("X: 1", "a"), io("X: 2", "b")]),
    ("Example 1\nOutput: a\nExample 2\nOutput: b", "stop", [io("", "a"), io("", "b")]),
])
def test_parse_instances_generation(reply, finish_reason, expected):
    assert T.parse_instances(reply, classification=False, finish_reason=finish_reason) == expected


@pytest.mark.parametrize("reply, finish_reason, expected", [
    ("Class label: Positive\nSentence: I love this film.\nClass label: Negative\nSentence: It was dull.\n", "stop",
     [io("Sentence: I love this film.", "Positive"), io("Sentence: It was dull.", "Negative")]),
    ("Class label: Positive\nSentence: I love this film.\nClass label: Negative\nSentence: It was", "length",
     [io("Sentence: I love this film.", "Positive")]),
    ("Class label: Montreal", "stop", [io("", "Montreal")]),
    ("Positive: I love this film.", "stop", []),
    ("Class label: Yes\nQ: Is it?\nClass label: No\nQ: Is it?", "stop", []),  # same input, two labels
])
def test_parse_instances_classification(reply, finish_reason, expected):
    assert T.parse_instances(reply, classification=True, finish_reason=finish_reason) == expected


# --- Alpaca -----------------------------------------------------------------------------------------------------

ALPACA_TASKS = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "1. Eat well.\n2. Sleep enough.\n3. Move every day."},
    {"instruction": "Translate the sentence\n into French:", "input": "Good morning.", "output": "Bonjour."},
    {"instruction": "Sort the list.", "input": "[3, 1, 2]", "output": "[1, 2, 3]"},
]


def test_alpaca_prompt_is_encode_prompt():
    assert T.ALPACA_PROMPT_HEADER == ALPACA_PROMPT_TXT
    assert git_blob_id(ALPACA_PROMPT_TXT.encode()) == PROMPT_TXT_BLOB
    # generate_instruction.py encode_prompt: prompt.txt + "\n", per task "###\n{i}. Instruction: ...\n{i}. Input:\n
    # {input or <noinput>}\n{i}. Output:\n{output}\n", then "###\n{n + 1}. Instruction:"
    assert T.alpaca_prompt(ALPACA_TASKS) == (
        ALPACA_PROMPT_TXT + "\n"
        "###\n1. Instruction: Give three tips for staying healthy.\n1. Input:\n<noinput>\n1. Output:\n"
        "1. Eat well.\n2. Sleep enough.\n3. Move every day.\n"
        "###\n2. Instruction: Translate the sentence into French\n2. Input:\nGood morning.\n2. Output:\nBonjour.\n"
        "###\n3. Instruction: Sort the list.\n3. Input:\n[3, 1, 2]\n3. Output:\n[1, 2, 3]\n"
        "###\n4. Instruction:"
    )
    with pytest.raises(ValueError, match="'output'"):
        T.alpaca_prompt([{"instruction": "Sort the list.", "input": ""}])
    with pytest.raises(ValueError):
        T.alpaca_prompt([])


RIVERS = {"instruction": "Name three rivers in Europe.", "input": "", "output": "The Danube, the Rhine and the Seine."}
PASSIVE = {"instruction": "Rewrite the sentence in the passive voice.", "input": "The cat chased the mouse.",
           "output": "The mouse was chased by the cat."}
ANTONYM = {"instruction": "Give an antonym of the word.", "input": "Happy", "output": "Sad"}
RIVERS_TEXT = " Name three rivers in Europe.\n4. Input:\n<noinput>\n4. Output:\nThe Danube, the Rhine and the Seine.\n"
PASSIVE_TEXT = ("###\n5. Instruction: Rewrite the sentence in the passive voice.\n5. Input:\nThe cat chased the "
                "mouse.\n5. Output:\nThe mouse was chased by the cat.\n")


@pytest.mark.parametrize("reply, finish_reason, expected", [
    (RIVERS_TEXT + PASSIVE_TEXT + "###\n6. Instruction: Give an antonym of the word.\n6. Input:\nHappy\n"
     "6. Output:\nSad\n###\n7. Instruction: Summarize", "stop", [RIVERS, PASSIVE, ANTONYM]),
    (RIVERS_TEXT + PASSIVE_TEXT, "stop", [RIVERS, PASSIVE]),
    (RIVERS_TEXT + PASSIVE_TEXT, "length", [RIVERS]),  # the last piece may be cut off
    ("4. Instruction:" + RIVERS_TEXT + PASSIVE_TEXT, "stop", [RIVERS, PASSIVE]),  # restated by a chat teacher
    (RIVERS_TEXT.replace("<noinput>", "<NoInput>") + "###\n5. Instruction: Rewrite it.\n5. Input:\nx\n"
     + PASSIVE_TEXT.replace("5.", "6."), "stop", [RIVERS, PASSIVE]),  # piece 5 lacks its output: skipped
    (RIVERS_TEXT + PASSIVE_TEXT.replace("5.", "9."), "stop", [RIVERS]),  # numbered out of turn
    (RIVERS_TEXT + "###\n5. Instruction: Rewrite it.\n5. Output:\ny\n5. Input:\nx\n", "stop", [RIVERS]),
    ("", "stop", []),
])
def test_parse_alpaca_like_post_process_gpt3_response(reply, finish_reason, expected):
    assert T.parse_alpaca(reply, 3, finish_reason) == expected
