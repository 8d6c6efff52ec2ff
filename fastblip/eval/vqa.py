"""VQA accuracy as the standard VQA evaluator (``vqaEval.py`` of the VQA API) computes it, and the results JSON.

Per question: for each of the 10 human answers, acc = min(1, #other 9 humans that gave the predicted answer / 3);
the question's accuracy is the mean over those 10 leave-one-out subsets; overall = mean over questions, in
percent. Normalisation as the evaluator: newlines/tabs to spaces and strip for all answers; *only when the human
answers disagree* (``len(set(gt)) > 1``) the prediction and the human answers go through punctuation handling
(``processPunctuation``) and number-word/article/contraction handling (``processDigitArticle``), a quirk of the
standard evaluator kept here so numbers match the server.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastblip.errors import InputError

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# the evaluator's regexes verbatim ("(?!<=\d)" is a lookahead in the original too)
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def process_punctuation(text: str) -> str:
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # the evaluator passes re.UNICODE (32) as ``count``: at most 32 periods are removed
    return PERIOD_STRIP.sub("", out, count=re.UNICODE)


def process_digit_article(text: str) -> str:
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """Full normalisation (punctuation, then number words/articles/contractions)."""
    return process_digit_article(process_punctuation(_clean(text)))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def question_accuracy(pred: str, human_answers: list[str]) -> float:
    """Accuracy in [0, 1] of one prediction against its (normally 10) human answers."""
    if not human_answers:
        raise InputError("a VQA question needs at least one human answer")
    gts = [_clean(a) for a in human_answers]
    res = _clean(pred)
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        res = process_digit_article(process_punctuation(res))
    accs = []
    for i in range(len(gts)):
        matching = sum(1 for j, a in enumerate(gts) if j != i and a == res)
        accs.append(min(1.0, matching / 3))
    return sum(accs) / len(accs)


def vqa_accuracy(results: list[dict], answers: dict[int, list[str]]) -> dict:
    """``results`` [{question_id, answer}], ``answers`` {question_id: human answers} ->
    {"vqa_acc": percent, "num_questions": n, "per_question": {qid: percent}}."""
    per = {}
    for r in results:
        qid = r["question_id"]
        if qid not in answers:
            raise InputError(f"question_id {qid} has no ground-truth answers")
        per[qid] = 100.0 * question_accuracy(r["answer"], answers[qid])
    if not per:
        raise InputError("VQA accuracy of an empty result list")
    return {"vqa_acc": sum(per.values()) / len(per), "num_questions": len(per), "per_question": per}


def write_results(results: list[dict], path: str | Path) -> Path:
    """The evaluation server's format: a JSON list of {"question_id": int, "answer": str} (atomic write)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"question_id": int(r["question_id"]), "answer": str(r["answer"])} for r in results]
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(rows), encoding="utf-8")
    tmp.replace(p)
    return p
