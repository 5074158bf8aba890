"""EvalAI answer normalisation and soft VQA accuracy, as LLaVA's TextVQA / VQAv2 / VizWiz tooling applies them.

`normalize_answer` reproduces `m4c_evaluator.EvalAIAnswerProcessor` step by step, quirks included:

1. lower-case; delete every `,` and `?`; `'s` becomes ` 's` (so "man's" -> "man 's"); strip.
   Deleting commas first means "red,blue" -> "redblue" and "1,000" -> "1000".
2. newlines and tabs become spaces; strip.
3. for each punctuation mark of `; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`: if the text (as it was before this
   step) has the mark followed by a space or preceded by a space, every occurrence is deleted, otherwise every
   occurrence becomes a space ("black-and-white" -> "black and white", "black - white" -> "black  white").
   `'`, `:`, `*`, `#`, `%`, `&`, `$` are not in the list and stay. (The shared rule also deletes every mark when the
   text has a digit, a comma and a digit in a row; step 1 has removed the commas, so here that never happens.)
4. a period not followed by a digit is deleted ("3.5" and ".5" keep theirs, "5." and "e.g." lose theirs); like the
   reference (whose intended look-behind is written as a look-ahead, and whose `re.UNICODE` lands in the `count`
   argument) at most 32 periods are deleted.
5. split on whitespace; number words none/zero..ten become digits; a/an/the are dropped; tokens found in the
   contraction table are replaced ("dont" -> "don't"); tokens joined by single spaces.

The contraction table maps every spelling of a contraction with exactly one apostrophe left out to the full form
("couldnt've" and "couldn'tve" -> "couldn't've"). The reference table spells the first-person keys with a capital
I ("Im", "Ive", "Id've"), which never match lower-cased text, so "im" and "ive" stay as they are here too; it also
maps "somebody'd" to "somebodyd", which is kept.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

_PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_MAX_PERIODS = 32  # re.UNICODE == 32, passed as `count` by the reference
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_NUMBERS = {word: str(value) for value, word in enumerate(_NUMBER_WORDS)}
_NUMBERS["none"] = "0"
_ARTICLES = frozenset(("a", "an", "the"))

_CONTRACTED_FORMS = """
ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll how's
isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't should've shouldn't
somebody'll somebody's someone'd someone'll someone's something'd something'll that's there'd there're there's
they'd they'll they're they've 'twas wasn't we've weren't what'll what're what's what've when's where'd where's
where've who'd who'll who's who've why'll why're why's won't would've wouldn't y'all you'd you'll you're you've
couldn't've hadn't've he'd've it'd've mightn't've she'd've shouldn't've somebody'd've someone'd've something'd've
there'd've they'd've we'd've who'd've wouldn't've you'd've y'all'll y'all'd've 'ow's'at
""".split()


def _contraction_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for form in _CONTRACTED_FORMS:
        for position, char in enumerate(form):
            if char == "'":
                table[form[:position] + form[position + 1 :]] = form
    table["somebody'd"] = "somebodyd"  # reversed in the reference table
    return table


CONTRACTIONS: dict[str, str] = _contraction_table()


def _tokenize(text: str) -> str:
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    return text.strip()


def process_punctuation(text: str) -> str:
    """Steps 3 and 4, shared with GT-Vision-Lab's `vqaEval`, which (keeping its commas) does reach the digit-comma-
    digit branch: "1,000" -> "1000" but "red,blue" -> "red blue"."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS)


def process_digit_article(text: str, contractions: Mapping[str, str] = CONTRACTIONS) -> str:
    """Step 5 (lower-cased words, digits for number words, no articles, contractions restored), shared with
    `vqaEval`; VizWiz's evaluator passes its own contraction table."""
    words = [_NUMBERS.get(word, word) for word in text.lower().split()]
    return " ".join(contractions.get(word, word) for word in words if word not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """EvalAI normalisation of one answer (see the module docstring for the exact steps)."""
    text = _tokenize(text)
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def leave_one_out_accuracy(prediction: str, answers: Sequence[str], entries: Sequence[object] | None = None) -> float:
    """Soft VQA accuracy in [0, 1]: the mean over the answers of min(1, matches of `prediction` among the others / 3).

    "The others" of answer i are the answers whose entry differs from entry i; entries default to the positions,
    so exactly one answer is left out (m4c, VizWiz). `vqaEval` compares whole annotation entries (answer text,
    confidence, id); official VQAv2 entries all differ by `answer_id`. The sums run in answer order, as in every
    reference. No answers score 0.
    """
    if not answers:
        return 0.0
    keys = range(len(answers)) if entries is None else entries
    scores = []
    for own in keys:
        matches = sum(answer == prediction for answer, key in zip(answers, keys) if key != own)
        scores.append(min(1, matches / 3))
    return sum(scores) / len(scores)


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """m4c's soft VQA accuracy in [0, 1] (TextVQA): `leave_one_out_accuracy` after normalising prediction and answers.

    With 10 answers, 1/2/3/4+ matching annotators give 0.3/0.6/0.9/1.0. Works for any number of answers (a single
    answer leaves an empty subset, so scores 0); no answers score 0.
    """
    return leave_one_out_accuracy(normalize_answer(prediction), [normalize_answer(answer) for answer in gt_answers])
