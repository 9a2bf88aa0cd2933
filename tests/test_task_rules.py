"""Task rules: haiku syllables, lines, score and metrics; Jeopardy! normalisation, grades and metrics."""
import csv
import math
import os

import pytest

import task_rules
from task_rules import (compare_haikus, count_syllables, haiku_lines, haiku_metrics, haiku_score, haiku_syllables,
                        is_strict_haiku, jeopardy_grade, jeopardy_metrics, normalize_answer)

# three hand-written 5-7-5 haikus in the statworx/haiku CSV format (its columns, quoted multi-line
# text, CRLF line endings)
HAIKU_CSV = os.path.join(os.path.dirname(__file__), "fixtures", "haiku_575.csv")


# ------------------------------------------------------------------ haiku rule

def test_syllables_dictionary_and_fallback():
    assert count_syllables("fire") == 2  # max over pronunciations (F AY1 ER0 vs F AY1 R)
    assert count_syllables("Caterpillar,") == 4
    assert count_syllables("mother's") == 2
    assert count_syllables("blorptastic") == 3  # unknown word: vowel groups
    assert count_syllables("snorkelate") == 3  # silent final e
    assert count_syllables("1984") == 4 and count_syllables("") == 0


def test_haikus_in_the_dataset_format():
    with open(HAIKU_CSV, newline="") as f:
        rows = {r["__hf_index_id"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["1", "2", "3"]
    for row_id in ("1", "2", "3"):  # counted by hand: 5-7-5
        text, keywords = rows[row_id]["text"], rows[row_id]["keywords"].split()
        assert haiku_syllables(text) == [5, 7, 5]
        assert is_strict_haiku(text, keywords)


def test_haiku_near_misses():
    good = "An old silent pond\nA frog jumps into the pond\nSplash! Silence again"
    assert haiku_syllables(good) == [5, 7, 5]
    six = "An old silent pond too\nA frog jumps into the pond\nSplash! Silence again"
    assert compare_haikus(six, good, ["frog"]) == "B"
    assert compare_haikus(good, "An old silent pond\nA frog jumps into the pond", ["frog"]) == "A"
    assert is_strict_haiku("\n\n" + good + "\n\n", ["frog"]) and haiku_lines(good + "\n") == good.split("\n")
    assert not is_strict_haiku(good, ["toad"])
    assert haiku_score(good, ["frog", "toad"]) == (False, True, 0, 1)
    # one line: distance counts the missing lines; four lines: the extra line's syllables count
    assert haiku_score("an old silent pond", [])[1:3] == (False, -12)
    assert haiku_score(good + "\nagain", [])[1:3] == (False, -2)
    blorp = "A blorptastic pond\nA frog jumps into the pond\nSplash! Silence again"
    assert haiku_syllables(blorp)[0] == 5  # unknown word counted by the fallback


def test_keywords_break_distance_ties_and_match_whole_words():
    a = "Cold rain on the roof\nThe frog sings to the gray sky\nSpring comes slowly here"
    b = "Cold rain on the roof\nThe dog sings to the gray sky\nSpring comes slowly here"
    assert compare_haikus(a, b, ["frog", "spring rain"]) == "A"  # neither is strict; one keyword vs none
    assert haiku_score(a, ["rain on"])[3] == 1 and haiku_score(a, ["rai"])[3] == 0
    assert haiku_score("FROGS\nfrog\nx", ["Frog"])[3] == 1


def test_haiku_metrics():
    good = "An old silent pond\nA frog jumps into the pond\nSplash! Silence again"
    m = haiku_metrics([good, "one line only", good], [["frog"], ["frog", "line"], []])
    assert m["strict_valid_rate"] == pytest.approx(2 / 3)
    assert m["three_line_rate"] == pytest.approx(2 / 3)
    assert m["mean_syllable_distance"] == pytest.approx((0 + (1 + 7 + 5) + 0) / 3)
    assert m["keyword_inclusion_rate"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert math.isnan(haiku_metrics([], [])["strict_valid_rate"])
    with pytest.raises(ValueError):
        haiku_metrics([good], [])


def test_haiku_keyword_list_is_in_the_dictionary():
    path = os.path.join(os.path.dirname(__file__), "..", "data", "haiku_keywords.txt")
    words = [w.strip() for w in open(path) if w.strip()]
    assert len(words) >= 250 and len(set(words)) == len(words)
    assert all(w in task_rules._cmu() for w in words)


# ------------------------------------------------------------------ jeopardy rule

def test_normalize_answer():
    assert normalize_answer("  The <i>Beatles</i>!! ") == "beatles"
    assert normalize_answer("U.S.A. & Canada") == "usa and canada"
    assert normalize_answer("Café  Society") == "cafe society"
    assert normalize_answer("an apple a day") == "apple a day"
    assert normalize_answer("The") == "the"


@pytest.mark.parametrize("response,correct,grade", [
    ("copernicus", "Copernicus", "correct"),
    ("Who is Copernicus?", "Copernicus", "correct"),
    ("the Beatles", "Beatles", "correct"),
    ("Beatles", "The Beatles", "correct"),
    ("Cobb", "(Ty) Cobb", "correct"),
    ("Ty Cobb", "(Ty) Cobb", "correct"),
    ("Ty", "(Ty) Cobb", "wrong"),
    ("Sri Lanka", "Ceylon (or Sri Lanka)", "correct"),
    ("Ceylon", "Ceylon (or Sri Lanka)", "correct"),
    ("liberty", "life (or liberty or property)", "correct"),
    ("Myanmar", "Myanmar (Burma)", "correct"),
    ("party", "art", "wrong"),
    ("Art Garfunkel", "(Art) Garfunkel", "correct"),
    ("", "Copernicus", "abstain"),
    ("   \n", "Copernicus", "abstain"),
    ("Galileo", "Copernicus", "wrong"),
])
def test_jeopardy_grade(response, correct, grade):
    assert jeopardy_grade(response, correct) == grade


def test_jeopardy_metrics():
    m = jeopardy_metrics(["Copernicus", "", "Kepler", "copernicus!"], ["Copernicus"] * 4)
    assert m == {"correct_rate": 0.5, "abstain_rate": 0.25, "wrong_rate": 0.25}
