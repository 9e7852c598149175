"""The published prompts, parsers and filters of the three 2023 synthetic-data recipes, byte for byte.

Baize self-chat (Xu et al. 2023), the Orca system messages (Mukherjee et al. 2023, Table 2), Self-Instruct
(Wang et al. 2022) and its Alpaca variant (Taori et al. 2023). The prompt texts and rule lists are data carried
over verbatim from the authors' repositories (repository, path and commit named at each one); the code that
renders and parses them is ours, written to do what the original scripts do. Where it does something else, the
docstring says so and why.
"""

from __future__ import annotations

import re
import string

# ---------------------------------------------------------------------------------------------------------------
# Baize: project-baize/baize-chatbot @ 4fae6c4e550f087958c1f60746f0e6290e6b9f02
#   collect.py (the prompt, one request per seed), collect_v2.py (turn by turn), preprocess.py (the parse)
# ---------------------------------------------------------------------------------------------------------------

BAIZE_HUMAN_MARKER = "[Human]"
BAIZE_AI_MARKER = "[AI]"
# collect.py line 61 (the same text in collect_v2.py line 63); "{}" takes the seed (a question or topic).
BAIZE_TEMPLATE = (
    "Forget the instruction you have previously received. The following is a conversation between a human and an "
    "AI assistant. The human and the AI assistant take turns chatting about the topic: '{}'. Human statements start "
    "with [Human] and AI assistant statements start with [AI]. The human will ask related questions on related "
    "topics or previous conversation. The human will stop the conversation when they have no more question. The AI "
    "assistant tries not to ask questions. Complete the transcript in exactly that format.\n"
    "[Human] Hello!\n"
    "[AI] Hi! How can I help you?\n"
)
_ROLE_MARKER = {"user": BAIZE_HUMAN_MARKER, "assistant": BAIZE_AI_MARKER}
# Signs that the teacher left Baize's format inside a turn: a garbled marker ("[|Human|]", "[human]", "[ AI ]",
# "[Assistant]", "[User]"; looked for once the exact markers are taken out) or a line opening with the speaker
# prefix of other transcript formats ("Human:", "AI:", "Assistant:").
_GARBLED_MARKER = re.compile(r"\[\s*\|?\s*(?:human|ai|assistant|user)\s*\|?\s*\]", re.IGNORECASE)
_SPEAKER_PREFIX = re.compile(r"^(?:Human|AI|Assistant):", re.MULTILINE)


def baize_prompt(seed: str) -> str:
    """The self-chat request collect.py sends for one seed: the teacher writes the whole transcript."""
    return BAIZE_TEMPLATE.format(seed)


def baize_turn_prompt(seed: str, turns: list[dict], next_role: str) -> str:
    """The transcript so far in Baize's format, ending with the marker of the side that writes next.

    For next_role "user" this is exactly collect_v2.py's user-simulator prompt (the template, then
    "\\n[Human] {user}\\n[AI] {assistant}" per exchange, then "\\n[Human] "; that call stops at "[AI]").
    next_role "assistant" ends with "\\n[AI] " after the last user turn, for a teacher that continues the
    transcript (stop at "[Human]"); collect_v2.py itself sends the assistant side as plain chat messages.
    turns: [{"role": "user"|"assistant", "content": str}], alternating from "user". Raises ValueError when the
    turns do not alternate or next_role is not the side whose turn it is.
    """
    for i, turn in enumerate(turns):
        if turn.get("role") != ("user", "assistant")[i % 2]:
            raise ValueError(f"turns[{i}]: role {turn.get('role')!r}; Baize turns alternate user, assistant, ...")
    expected = ("user", "assistant")[len(turns) % 2]
    if next_role != expected:
        raise ValueError(f"next_role {next_role!r}: after {len(turns)} turns it is the {expected}'s turn")
    rendered = "".join(f"\n{_ROLE_MARKER[t['role']]} {t['content']}" for t in turns)
    return f"{baize_prompt(seed)}{rendered}\n{_ROLE_MARKER[next_role]} "


def parse_baize_transcript(text: str) -> tuple[list[dict], str | None]:
    """Turns of a self-chat transcript the teacher wrote after baize_prompt, or ([], reason) for a dropped one.

    Segmentation follows preprocess.py: split on "[Human]", ignore the text before the first marker, always drop
    the last segment (the closing human turn, or one cut off by the token limit), and split each remaining
    segment on "[AI]" into one user and one assistant turn (contents stripped). preprocess.py stops at the first
    segment that is not one such pair and keeps the exchanges before it; here the whole dialogue is dropped
    instead, with the reason counted (the issue's rule: nothing dropped silently, no half-checked dialogue kept):
      "broken_markers": no "[Human]" at all; a garbled marker or a "Human:"/"AI:" line prefix in a kept segment
        (_GARBLED_MARKER, _SPEAKER_PREFIX); a turn with no text after its marker.
      "role_switch": a segment with no "[AI]" (two human turns in a row) or with more than one (two AI turns).
      "too_few_exchanges": fewer than two exchanges left.
    """
    if BAIZE_HUMAN_MARKER not in text:
        return [], "broken_markers"
    turns: list[dict] = []
    for segment in text.split(BAIZE_HUMAN_MARKER)[1:-1]:
        if _GARBLED_MARKER.search(segment.replace(BAIZE_AI_MARKER, "")) or _SPEAKER_PREFIX.search(segment):
            return [], "broken_markers"
        if segment.count(BAIZE_AI_MARKER) != 1:
            return [], "role_switch"
        human, ai = (part.strip() for part in segment.split(BAIZE_AI_MARKER))
        if not human or not ai:
            return [], "broken_markers"
        turns += [{"role": "user", "content": human}, {"role": "assistant", "content": ai}]
    if len(turns) < 4:
        return [], "too_few_exchanges"
    return turns, None


# ---------------------------------------------------------------------------------------------------------------
# Orca: Mukherjee et al. 2023, arXiv 2306.02707, Table 2 ("System instructions used to augment user instructions
# and task descriptions to query large foundation models for explanation tuning"). No code was released; the text
# is the paper's. Where reproductions differ on a character the paper is followed:
#   2, 6: "don’t" with U+2019, as the paper prints it (OpenOrca's data and most scripts also carry ASCII "don't").
#   11: "step-by-step": the paper breaks the word at its hyphen at a line end; text copied from the PDF reads
#       "step-by- step" or "step-bystep" (the latter is in OpenOrca's data).
#   15: line breaks before "Part #:" and "Usage:", as the paper sets them; other line ends in that cell are wraps.
# ---------------------------------------------------------------------------------------------------------------

ORCA_SYSTEM_MESSAGES: tuple[str, ...] = (
    "",  # 1: the paper's "<empty system message>"
    "You are an AI assistant. Provide a detailed answer so user don’t need to search outside to understand the "
    "answer.",
    "You are an AI assistant. You will be given a task. You must generate a detailed and long answer.",
    "You are a helpful assistant, who always provide explanation. Think like you are answering to a five year old.",
    "You are an AI assistant that follows instruction extremely well. Help as much as you can.",
    "You are an AI assistant that helps people find information. Provide a detailed answer so user don’t need to "
    "search outside to understand the answer.",
    "You are an AI assistant. User will you give you a task. Your goal is to complete the task as faithfully as you "
    "can. While performing the task think step-by-step and justify your steps.",
    "You should describe the task and explain your answer. While answering a multiple choice question, first output "
    "the correct answer(s). Then explain why other answers are wrong. Think like you are answering to a five year "
    "old.",
    "Explain how you used the definition to come up with the answer.",
    "You are an AI assistant. You should describe the task and explain your answer. While answering a multiple "
    "choice question, first output the correct answer(s). Then explain why other answers are wrong. You might need "
    "to use additional knowledge to answer the question.",
    "You are an AI assistant that helps people find information. User will you give you a question. Your task is to "
    "answer as faithfully as you can. While answering think step-by-step and justify your answer.",
    "User will you give you a task with some instruction. Your job is follow the instructions as faithfully as you "
    "can. While answering think step-by-step and justify your answer.",
    "You are a teacher. Given a task, you explain in simple steps what the task is asking, any guidelines it "
    "provides and how to use those guidelines to find the answer.",
    "You are an AI assistant, who knows every language and how to translate one language to another. Given a task, "
    "you explain in simple steps what the task is asking, any guidelines that it provides. You solve the task and "
    "show how you used the guidelines to solve the task.",
    "Given a definition of a task and a sample input, break the definition into small parts. Each of those parts "
    "will have some instruction. Explain their meaning by showing an example that meets the criteria in the "
    "instruction. Use the following format:\n"
    "Part #: a key part of the definition.\n"
    "Usage: Sample response that meets the criteria from the key part. Explain why you think it meets the criteria.",
    "You are an AI assistant that helps people find information.",
)

# ---------------------------------------------------------------------------------------------------------------
# Self-Instruct: yizhongw/self-instruct @ 0b26ccaa415992100fa32df62d41b994cf928e23, self_instruct/:
#   bootstrap_instructions.py (instruction prompt, parse, filters), identify_clf_or_not.py + templates/
#   clf_task_template.py (classification question), generate_instances.py + templates/instance_gen_template.py
#   (instance prompts), prepare_for_finetuning.py (instance parse and filters)
# ---------------------------------------------------------------------------------------------------------------

# bootstrap_instructions.py lines 22 and 24 (encode_prompt)
SELF_INSTRUCT_HEADER = "Come up with a series of tasks:\n"
SELF_INSTRUCT_CLF_HEADER = (
    "Come up with a series of classification tasks. Try to specify the possible output labels when possible.\n"
)
# bootstrap_instructions.py line 55; Alpaca's generate_instruction.py lines 67-86 add five words.
SELF_INSTRUCT_BLACKLIST: tuple[str, ...] = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw", "plot",
    "go to",
)
ALPACA_BLACKLIST: tuple[str, ...] = SELF_INSTRUCT_BLACKLIST + ("video", "audio", "music", "flowchart", "diagram")


def self_instruct_prompt(instructions: list[str], classification: bool = False) -> str:
    """The instruction-generation prompt of bootstrap_instructions.py (encode_prompt): the header, the example
    instructions numbered from 1 (whitespace runs collapsed, a trailing colon dropped), then the next number for
    the teacher to continue. classification: the header of its --use_clf_seed_tasks_only runs.
    """
    if not instructions:
        raise ValueError("self_instruct_prompt needs at least one example instruction")
    prompt = SELF_INSTRUCT_CLF_HEADER if classification else SELF_INSTRUCT_HEADER
    for number, instruction in enumerate(instructions, 1):
        prompt += f"{number}. {_one_line(instruction).rstrip(':')}\n"
    return prompt + f"{len(instructions) + 1}."


def parse_self_instruct(response: str, n_prompt_instructions: int, finish_reason: str | None = None) -> list[str]:
    """The new instructions in a completion of self_instruct_prompt, as post_process_gpt3_response splits them.

    The completion continues task n_prompt_instructions + 1; it is split on later task numbers ("\\n10. ",
    "\\n11 . "), each piece has its whitespace runs collapsed, is stripped and str.capitalize()d (which also
    lowercases the rest, as the original does), and empty pieces are skipped. A reply cut by the token limit
    (finish_reason "length") yields nothing, as in the original. Not applied here: the keyword and length filters
    of the same function (self_instruct_filter). Our one addition: a reply that opens by restating the number the
    prompt ended with ("9. ...", as chat teachers do) has that number removed first.
    """
    if finish_reason == "length":
        return []
    echo = re.match(rf"\s*{n_prompt_instructions + 1}\s?\. ", response)
    if echo:
        response = response[echo.end():]
    pieces = (_one_line(piece).capitalize() for piece in re.split(r"\n\d+\s?\. ", response))
    return [piece for piece in pieces if piece]


def self_instruct_filter(instruction: str) -> str | None:
    """None to keep a parsed instruction, else the first rule of bootstrap_instructions.py it breaks (lines 52-68):
    "length" (3 words or fewer, or more than 150; line 52), "keyword:WORD" (a whole-word, case-insensitive match of
    SELF_INSTRUCT_BLACKLIST; line 55), "write_a_program" (starts with "Write a program"; line 61),
    "punctuation_start" (first character in string.punctuation; line 64), "non_english_start" (first character
    not ASCII; line 67).
    """
    return _instruction_filter(instruction, _SELF_INSTRUCT_KEYWORDS)


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _keyword_patterns(words: tuple[str, ...]) -> tuple[tuple[str, re.Pattern], ...]:
    # find_word_in_string in both scripts: the word between \b boundaries, case-insensitive
    return tuple((word, re.compile(rf"\b({word})\b", re.IGNORECASE)) for word in words)


_SELF_INSTRUCT_KEYWORDS = _keyword_patterns(SELF_INSTRUCT_BLACKLIST)
_ALPACA_KEYWORDS = _keyword_patterns(ALPACA_BLACKLIST)


def _instruction_filter(instruction: str, keywords: tuple[tuple[str, re.Pattern], ...]) -> str | None:
    """The rules both scripts share, in their order; they differ only in the keyword list."""
    n_words = len(instruction.split())
    if n_words <= 3 or n_words > 150:
        return "length"
    for word, pattern in keywords:
        if pattern.search(instruction):
            return f"keyword:{word}"
    if instruction.startswith("Write a program"):
        return "write_a_program"
    if instruction[0] in string.punctuation:
        return "punctuation_start"
    if not instruction[0].isascii():
        return "non_english_start"
    return None


# templates/clf_task_template.py (template_1), verbatim; identify_clf_or_not.py line 100 appends the instruction.
SELF_INSTRUCT_CLF_TEMPLATE = """Can the following task be regarded as a classification task with finite output labels?

Task: Given my personality and the job, tell me if I would be suitable.
Is it classification? Yes

Task: Give me an example of a time when you had to use your sense of humor.
Is it classification? No

Task: Replace the placeholders in the given text with appropriate named entities.
Is it classification? No

Task: Fact checking - tell me if the statement is true, false, or unknown, based on your knowledge and common sense.
Is it classification? Yes

Task: Return the SSN number for the person.
Is it classification? No

Task: Detect if the Reddit thread contains hate speech.
Is it classification? Yes

Task: Analyze the sentences below to identify biases.
Is it classification? No

Task: Select the longest sentence in terms of the number of words in the paragraph, output the sentence index.
Is it classification? Yes

Task: Find out the toxic word or phrase in the sentence.
Is it classification? No

Task: Rank these countries by their population.
Is it classification? No

Task: You are provided with a news article, and you need to identify all the categories that this article belongs to. Possible categories include: Music, Sports, Politics, Tech, Finance, Basketball, Soccer, Tennis, Entertainment, Digital Game, World News. Output its categories one by one, seperated by comma.
Is it classification? Yes

Task: Given the name of an exercise, explain how to do it.
Is it classification? No

Task: Select the oldest person from the list.
Is it classification? Yes

Task: Find the four smallest perfect numbers.
Is it classification? No

Task: Does the information in the document supports the claim? You can answer "Support" or "Unsupport".
Is it classification? Yes

Task: Create a detailed budget for the given hypothetical trip.
Is it classification? No

Task: Given a sentence, detect if there is any potential stereotype in it. If so, you should explain the stereotype. Else, output no.
Is it classification? No

Task: Explain the following idiom to me, and try to give me some examples.
Is it classification? No

Task: Is there anything I can eat for a breakfast that doesn't include eggs, yet includes protein, and has roughly 700-1000 calories?
Is it classification? No

Task: Answer the following multiple choice question. Select A, B, C, or D for the final answer.
Is it classification? Yes

Task: Decide whether the syllogism is logically sound.
Is it classification? Yes

Task: How can individuals and organizations reduce unconscious bias?
Is it classification? No

Task: What are some things you can do to de-stress?
Is it classification? No

Task: Find out the largest one from a set of numbers. Output the number directly.
Is it classification? Yes

Task: Replace the <mask> token in the text with proper words that are consistent with the context. You can use multiple words for each <mask> token.
Is it classification? No

Task: Write a cover letter based on the given facts.
Is it classification? No

Task: Identify the pos tag of the word in the given sentence.
Is it classification? Yes

Task: Write a program to compute the sum of integers from k to n.
Is it classification? No

Task: In this task, you need to compare the meaning of the two sentences and tell if they are the same. Output yes or no.
Is it classification? Yes

Task: To make the pairs have the same analogy, write the fourth word.
Is it classification? No

Task: Given a set of numbers, find all possible subsets that sum to a given number.
Is it classification? No

Task:"""  # noqa: E501


def is_classification_prompt(instruction: str) -> str:
    """identify_clf_or_not.py's question for one instruction: the few-shot template, " ", the stripped
    instruction, "\\nIs it classification?" (the original asks greedily for 3 tokens, stopping at "\\n" or "Task").
    """
    return f"{SELF_INSTRUCT_CLF_TEMPLATE} {instruction.strip()}\nIs it classification?"


def parse_is_classification(response: str) -> bool:
    """True when the stripped reply is "Yes", "yes" or "YES", the test of generate_instances.py line 99."""
    return response.strip() in ("Yes", "yes", "YES")


# templates/instance_gen_template.py, verbatim (non-ASCII characters and trailing spaces included; a trailing
# space is written \x20 so that no editor trims it). Output-first for classification tasks, input-first otherwise.
SELF_INSTRUCT_OUTPUT_FIRST_TEMPLATE = """Given the classification task definition and the class labels, generate an input that corresponds to each of the class labels. If the task doesn't require input, just generate possible class labels.

Task: Classify the sentiment of the sentence into positive, negative, or mixed.
Class label: mixed
Sentence: I enjoy the flavor of the restaurant but their service is too slow.
Class label: Positive
Sentence: I had a great day today. The weather was beautiful and I spent time with friends and family.
Class label: Negative
Sentence: I was really disappointed by the latest superhero movie. I would not recommend it to anyone.

Task: Given a dialogue, classify whether the user is satisfied with the service. You should respond with "Satisfied" or "Unsatisfied".
Class label: Satisfied
Dialogue:
- Agent: Thank you for your feedback. We will work to improve our service in the future.
- Customer: I am happy with the service you provided. Thank you for your help.
Class label: Unsatisfied
Dialogue:
- Agent: I am sorry we will cancel that order for you, and you will get a refund within 7 business days.
- Customer: oh that takes too long. I want you to take quicker action on this.

Task: Given some political opinions, classify whether the person belongs to Democrats or Republicans.
Class label: Democrats
Opinion: I believe that everyone should have access to quality healthcare regardless of their income level.
Class label: Republicans
Opinion: I believe that people should be able to keep more of their hard-earned money and should not be taxed at high rates.

Task: Tell me if the following email is a promotion email or not.
Class label: Promotion
Email: Check out our amazing new sale! We've got discounts on all of your favorite products.
Class label: Not Promotion
Email: We hope you are doing well. Let us know if you need any help.

Task: Detect if the Reddit thread contains hate speech.
Class label: Hate Speech
Thread: All people of color are stupid and should not be allowed to vote.
Class label: Not Hate Speech
Thread: The best way to cook a steak on the grill.

Task:  Does the information in the document supports the claim? You can answer "Support" or "Unsupport".
Class label: Unsupport
Document: After a record-breaking run that saw mortgage rates plunge to all-time lows and home prices soar to new highs, the U.S. housing market finally is slowing. While demand and price gains are cooling, any correction is likely to be a modest one, housing economists and analysts say. No one expects price drops on the scale of the declines experienced during the Great Recession.
Claim: The US housing market is going to crash soon.
Class label: Support
Document: The U.S. housing market is showing signs of strain, with home sales and prices slowing in many areas. Mortgage rates have risen sharply in recent months, and the number of homes for sale is increasing. This could be the beginning of a larger downturn, with some economists predicting a potential housing crash in the near future.
Claim: The US housing market is going to crash soon.

Task: Answer the following multiple-choice question. Select A, B, C, or D for the final answer.
Class label: C
Question: What is the capital of Germany?
A. London
B. Paris
C. Berlin
D. Rome
Class label: D
Question: What is the largest planet in our solar system?
A) Earth
B) Saturn
C) Mars
D) Jupiter
Class label: A
Question: What is the process by which plants make their own food through photosynthesis?
A) Respiration
B) Fermentation
C) Digestion
D) Metabolism
Class label: B
Question: Who wrote the novel "The Great Gatsby"?
A) Ernest Hemingway
B) F. Scott Fitzgerald
C) J.D. Salinger
D) Mark Twain

Task: You need to read a code and detect if there is a syntax error or not. Output true if there is an error, output false if there is not.
Class label: true
Code:
def quick_sort(arr):
    if len(arr) < 2
        return arr
Class label: False
Code:
def calculate_average(numbers):
    total = 0
    for number in numbers:
        total += number
    return total / len(numbers)

Task: You are provided with a news article, and you need to identify all the categories that this article belongs to. Possible categories include Sports and Politics. Output its categories one by one, separated by a comma.
Class label: Sports
Article: The Golden State Warriors have won the NBA championship for the second year in a row.
Class label: Politics
Article: The United States has withdrawn from the Paris Climate Agreement.
Class label: Politics, Sports
Article: The government has proposed cutting funding for youth sports programs.

Task: Given a credit card statement, the cardholder's spending habits, and the account balance, classify whether the cardholder is at risk of defaulting on their payments or not.
Class label: At risk
Credit card statement: Purchases at high-end clothing stores and luxury hotels.
Cardholder's spending habits: Frequent purchases at luxury brands and high-end establishments.
Account balance: Over the credit limit and multiple missed payments.
Class label: Not at risk
Credit card statement: Purchases at grocery stores and gas stations.
Cardholder's spending habits: Regular purchases for necessary expenses and occasional dining out.
Account balance: Slightly below the credit limit and no missed payments.

Task: Given a social media post, the hashtags used, and a topic. classify whether the post is relevant to the topic or not.
Class label: Relevant
Post: I can't believe the government is still not taking action on climate change. It's time for us to take matters into our own hands.
Hashtags: #climatechange #actnow
Topic: Climate change
Class label: Not relevant\x20
Post: I just bought the new iPhone and it is amazing!
Hashtags: #apple #technology
Topic: Travel

Task: The answer will be 'yes' if the provided sentence contains an explicit mention that answers the given question. Otherwise, answer 'no'.\x20
Class label: Yes
Sentence: Jack played basketball for an hour after school.
Question: How long did Jack play basketball?
Class label: No
Sentence: The leaders of the Department of Homeland Security now appear before 88 committees and subcommittees of Congress.
Question: How often are they required to appear?

Task: Tell me what's the second largest city by population in Canada.
Class label: Montreal

Task: Classifying different types of mathematical equations, such as linear, and quadratic equations, based on the coefficients and terms in the equation.
Class label: Linear equation
Equation: y = 2x + 5
Class label: Quadratic equation
Equation: y = x^2 - 4x + 3

Task: Tell me the first number of the given list.
Class label: 1
List: 1, 2, 3
Class label: 2
List: 2, 9, 10

Task: Which of the following is not an input type? (a) number (b) date (c) phone number (d) email address (e) all of these are valid inputs.
Class label: (e)

Task:"""  # noqa: E501
SELF_INSTRUCT_INPUT_FIRST_TEMPLATE = """Come up with examples for the following tasks. Try to generate multiple examples when possible. If the task doesn't require additional input, you can generate the output directly.

Task: Which exercises are best for reducing belly fat at home?
Output:
- Lying Leg Raises
- Leg In And Out
- Plank
- Side Plank
- Sit-ups

Task: Extract all the country names in the paragraph, list them separated by commas.
Example 1
Paragraph: Dr. No is the sixth novel by the English author Ian Fleming to feature his British Secret Service agent James Bond. Written at Fleming's Goldeneye estate in Jamaica, it was first published in the United Kingdom by Jonathan Cape in 1958. In the novel Bond looks into the disappearance in Jamaica of two fellow MI6 operatives who had been investigating Doctor No. Bond travels to No's Caribbean island and meets Honeychile Rider, who is there to collect shells. They are captured and taken to a luxurious facility carved into a mountain. The character of Doctor No, the son of a German missionary and a Chinese woman, was influenced by Sax Rohmer's Fu Manchu stories. Dr. No was the first of Fleming's novels to face widespread negative reviews in Britain, but it was received more favourably in the United States.
Output: English, British, Jamaica, the United Kingdom, German, Chinese, Britain, the United States.

Task: Converting 85 F to Celsius.
Output: 85°F = 29.44°C

Task: Sort the given list ascendingly.\x20
Example 1
List: [10, 92, 2, 5, -4, 92, 5, 101]
Output: [-4, 2, 5, 5, 10, 92, 92, 101]
Example 2
Input 2 - List: [9.99, 10, -5, -1000, 5e6, 999]
Output: [-1000, -5, 9.99, 10, 999, 5e6]

Task: Suggest a better and more professional rephrasing of the following sentence.
Example 1
Sentence: This house is surprisingly not constructed very well, and you probably need more money to fix it after you buy it. If you ask me, I would suggest you to consider other candidates.
Output: This house does not seem to be constructed well, so you may need to spend more money to fix it after you purchase it. I would suggest that you look at other properties.
Example 2
Sentence: Just so you know, we did an experiment last week and found really surprising results - language model can improve itself!
Output: Our experiments last week demonstrated surprising results, proving that the language model can improve itself.

Task: Read the following paragraph and answer a math question about the paragraph. You need to write out the calculation for getting the final answer.
Example 1
Paragraph: Gun violence in the United States results in tens of thousands of deaths and injuries annually, and was the leading cause of death for children 19 and younger in 2020. In 2018, the most recent year for which data are available as of 2021, the Centers for Disease Control and Prevention's (CDC) National Center for Health Statistics reports 38,390 deaths by firearm, of which 24,432 were by suicide. The rate of firearm deaths per 100,000 people rose from 10.3 per 100,000 in 1999 to 12 per 100,000 in 2017, with 109 people dying per day or about 14,542 homicides in total, being 11.9 per 100,000 in 2018. In 2010, there were 19,392 firearm-related suicides, and 11,078 firearm-related homicides in the U.S. In 2010, 358 murders were reported involving a rifle while 6,009 were reported involving a handgun; another 1,939 were reported with an unspecified type of firearm. In 2011, a total of 478,400 fatal and nonfatal violent crimes were committed with a firearm.
Question: How many more firearm-related deaths were there in 2018 compared to 2010?
Output:
38390 - (19392 + 11078) = 38390 - 30470 = 7920.\x20
So, in 2018, there were 7920 more deaths by firearm than in 2010.

Task: Write Python code to solve this leetcode problem.
Example 1
Problem: You are given two non-empty linked lists representing two non-negative integers. The digits are stored in reverse order, and each of their nodes contains a single digit. Add the two numbers and return the sum as a linked list. You may assume the two numbers do not contain any leading zero, except the number 0 itself.
Output:
class Solution(object):
    def addTwoNumbers(self, l1, l2):
        carry = 0
        root = n = ListNode(0)
        while l1 or l2 or carry:
            v1 = v2 = 0
            if l1:
                v1 = l1.val
                l1 = l1.next
            if l2:
                v2 = l2.val
                l2 = l2.next
            carry, val = divmod(v1+v2+carry, 10)
            n.next = ListNode(val)
            n = n.next
        return root.next

Task: Solve the equation and find the value of X. Show your steps.
Example 1
Equation: 10X + 5 = 10
Output: 10X = 5,  X = 0.5
Example 2
Equation: X + Y + 120 = 100
Output: X + Y = -20, X = -20 - Y

Task: Write a program to compute the sum of integers from k to n.
Output:
def sum(k, n):
    sum = 0
    for i in range(k, n+1):
        sum += i
    return sum

Task: Select the oldest person from the given list.
Example 1
List: George Washington, Confucius, Michael Jordan, Michelangelo
Output: Confucious
Example 2
List: Alan Turing, Geoffrey Hinton, Yann LeCun, Yoshua Bengio
Output: Alan Turing

Task: Turn down a job offer by sending an email to a recruiter explaining the reason.
Output: Hi  [Recruiter],
Thank you so much for the generous offer to join your team. As we discussed, I’ve admired the company for a number of years, and am a proud endorser of its products. However, after further consideration of where I currently am in my career, I’ve decided to accept an offer at another company.
I would love to stay in touch with you and have already started following you on [Social Media Platform]. Again, thank you so much for your time and consideration.
Thanks again,
[Your Name]

Task:"""  # noqa: E501


def instance_prompt(instruction: str, classification: bool) -> str:
    """generate_instances.py's instance request (lines 136-139): the template, " ", the stripped instruction, "\\n"."""
    template = SELF_INSTRUCT_OUTPUT_FIRST_TEMPLATE if classification else SELF_INSTRUCT_INPUT_FIRST_TEMPLATE
    return f"{template} {instruction.strip()}\n"


_EXAMPLE = re.compile(r"Example\s?\d*\.?")
_OUTPUT = re.compile(r"Output\s*\d*\s*:")
_INPUT = re.compile(r"Input\s*\d*\s*:")


def parse_instances(response: str, classification: bool, finish_reason: str | None = None) -> list[dict]:
    """The instances in a reply to instance_prompt, [{"input", "output"}], as prepare_for_finetuning.py reads them.

    Classification (parse_instances_for_classification_task): every "Class label:" opens an instance; its first
    line is the output (the label), the rest the input. Otherwise (parse_instances_for_generation_task): split on
    "Example N" when present, else one instance if an "Output:" is present, else none; in each, the text before
    "Output:" is the input (an "Input:" prefix removed) and the text after it, up to any "Input:", the output.
    Then, as the original: the last instance is dropped when finish_reason is "length"; instances whose input equals
    their output, whose output is empty or whose input or output ends with ":" are dropped; when two instances
    share a non-empty input with different outputs, all are dropped; exact repeats are removed. The original
    removes repeats through a set (an arbitrary order); here the first of each is kept in reply order. Not done
    here: the original's random choice of at most 5 instances per instruction.
    """
    pairs = _classification_pairs(response) if classification else _generation_pairs(response)
    if finish_reason == "length":
        pairs = pairs[:-1]
    pairs = [(i, o) for i, o in pairs if i != o and o != "" and not i.endswith(":") and not o.endswith(":")]
    if any(a[0] != "" and a[0] == b[0] and a[1] != b[1] for k, a in enumerate(pairs) for b in pairs[:k]):
        return []
    return [{"input": i, "output": o} for i, o in dict.fromkeys(pairs)]


def _classification_pairs(text: str) -> list[tuple[str, str]]:
    pairs = []
    for piece in text.split("Class label:")[1:]:
        label, _, rest = piece.strip().partition("\n")
        pairs.append((rest.strip(), label.strip()))
    return pairs


def _generation_pairs(text: str) -> list[tuple[str, str]]:
    text = text.strip()
    if _EXAMPLE.search(text):
        pieces = [piece.strip() for piece in _EXAMPLE.split(text) if piece.strip()]
    elif _OUTPUT.search(text):
        pieces = [text]
    else:
        return []
    return [_input_output(piece) for piece in pieces]


def _input_output(text: str) -> tuple[str, str]:
    """parse_input_output of prepare_for_finetuning.py: (input, output) of one example."""
    if _OUTPUT.search(text):
        before, after = _OUTPUT.split(text)[:2]
        inp, out = before.strip(), after.strip()
    else:
        inp, out = "", text.strip()
    out = _INPUT.split(out)[0].strip()  # a second example run on into the output
    return re.sub(r"^Input\s*\d*\s*:", "", inp).strip(), out


# ---------------------------------------------------------------------------------------------------------------
# Alpaca: tatsu-lab/stanford_alpaca @ 761dc5bfbdeeffa89b8bff5d038781a4055f796a, prompt.txt and
#   generate_instruction.py (encode_prompt, post_process_gpt3_response)
# ---------------------------------------------------------------------------------------------------------------

# prompt.txt, verbatim (its typos and its repeated item numbers 2 and 3 included; no newline at the end).
ALPACA_PROMPT_HEADER = """You are asked to come up with a set of 20 diverse task instructions. These task instructions will be given to a GPT model and we will evaluate the GPT model for completing the instructions.

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


def alpaca_prompt(tasks: list[dict]) -> str:
    """Alpaca's request (encode_prompt): prompt.txt, "\\n", then per example task "###\\n", "N. Instruction: ..."
    (whitespace runs collapsed, a trailing colon dropped), "N. Input:\\n" with "<noinput>" for an empty input,
    "N. Output:\\n...", and at the end "###\\n" and the next number's "Instruction:" for the teacher to continue.
    tasks: [{"instruction", "input", "output"}]; raises ValueError when empty or a field is missing.
    """
    if not tasks:
        raise ValueError("alpaca_prompt needs at least one example task")
    prompt = ALPACA_PROMPT_HEADER + "\n"
    for number, task in enumerate(tasks, 1):
        missing = [f for f in ("instruction", "input", "output") if f not in task]
        if missing:
            raise ValueError(f"tasks[{number - 1}] has no {missing[0]!r}: Alpaca examples need instruction, input "
                             "and output")
        instruction = _one_line(task["instruction"]).rstrip(":")
        prompt += (f"###\n{number}. Instruction: {instruction}\n{number}. Input:\n{task['input'] or '<noinput>'}\n"
                   f"{number}. Output:\n{task['output']}\n")
    return prompt + f"###\n{len(tasks) + 1}. Instruction:"


def parse_alpaca(response: str, n_prompt_instructions: int, finish_reason: str) -> list[dict]:
    """The new tasks [{"instruction", "input", "output"}] in a completion of alpaca_prompt, as
    post_process_gpt3_response reads them: "N. Instruction:" is put back in front, the text is split on "###",
    piece k must split on "{N}. Instruction:", "{N}. Input:", "{N}. Output:" (N = n_prompt_instructions + 1 + k)
    into exactly three fields (else it is skipped), fields are stripped and an input of "<noinput>" (any case)
    becomes "". The last piece is skipped when finish_reason is "length" (likely cut off). Not applied here: the
    filters of the same function (alpaca_filter). Ours: the three labels must come in that order (the original
    takes the fields by position and would mislabel a reordered piece), and a reply that opens by restating
    "N. Instruction:" (chat teachers) has it removed first.
    """
    first = n_prompt_instructions + 1
    echo = re.match(rf"\s*{first}\.\s+Instruction:", response)
    if echo:
        response = response[echo.end():]
    pieces = f"{first}. Instruction:{response}".split("###")
    if finish_reason == "length":
        pieces = pieces[:-1]
    tasks = []
    for k, piece in enumerate(pieces):
        fields = re.split(rf"{first + k}\.\s+(Instruction|Input|Output):", piece)
        if len(fields) != 7 or fields[1::2] != ["Instruction", "Input", "Output"]:
            continue
        inp = fields[4].strip()
        tasks.append({"instruction": fields[2].strip(), "input": "" if inp.lower() == "<noinput>" else inp,
                      "output": fields[6].strip()})
    return tasks


def alpaca_filter(instruction: str) -> str | None:
    """None to keep a parsed Alpaca instruction, else the first rule of post_process_gpt3_response it breaks
    (generate_instruction.py lines 64-101): the Self-Instruct rules and reasons (self_instruct_filter) with the
    longer ALPACA_BLACKLIST: "length" (3 words or fewer, or more than 150; line 64), "keyword:WORD" (line 88),
    "write_a_program" (line 94), "punctuation_start" (line 97), "non_english_start" (line 100).
    """
    return _instruction_filter(instruction, _ALPACA_KEYWORDS)
