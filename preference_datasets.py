"""Preference datasets: loading, splitting, tokenisation and deterministic iteration.

Every dataset loads into an ordered dict prompt -> PromptData (responses, preference pairs over them,
SFT target, oracle reference). Sources: `hh` (Anthropic/hh-rlhf), `shp` (stanfordnlp/SHP), `jeopardy`
(J! Archive JSON file), `haikus` (statworx/haiku CSV) and user JSONL files given by path. A local
file or directory always wins over the Hugging Face hub.

Determinism contract: for fixed arguments (seed included) every function here returns or yields the
same sequence in every process. The trainer resumes by re-creating an iterator with the same
arguments and skipping the elements it already consumed (`skip_examples`), so nothing here may
depend on global RNG state, hash randomisation or wall time. All seeded choices use private
`random.Random` instances seeded by strings (string seeds are hashed with SHA-512, stable across
runs and Python processes).

Unusable records are skipped and counted, never raised deep inside a batch: loaders report their
skips in one line per load, iterators report elements dropped for the tokenizer's EOS string in one
line per iterator. Whole-file problems raise `utils.DataError` with a one-line message naming the
file and, where known, the line.
"""
import csv
import functools
import io
import itertools
import json
import math
import os
import random
import re
import string
from collections import Counter, defaultdict
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import torch

from utils import ConfigError, DataError

DATASET_NAMES = ('hh', 'shp', 'jeopardy', 'haikus')
SPLITS = ('train', 'test')
PROMPT_SUBSETS = ('all', 'sft', 'pool')
TRUNCATION_MODES = ('keep_end', 'keep_start')
HUB_IDS = {'hh': 'Anthropic/hh-rlhf', 'shp': 'stanfordnlp/SHP', 'haikus': 'statworx/haiku'}

# Share of prompts that becomes the test split when a source has a single split (at least one prompt).
TEST_FRACTION = 0.1
# File names looked up inside a data directory: '{split}{ext}'.
SPLIT_FILE_EXTS = ('.jsonl', '.json', '.csv')

HH_ASSISTANT_TAG = '\n\nAssistant:'
SHP_PROMPT_TEMPLATE = '\n\nHuman: {history}\n\nAssistant:'
# SHP comments get a leading space so the prompt/response boundary matches HH ("Assistant: text").
SHP_RESPONSE_PREFIX = ' '
SHP_MIN_SCORE_RATIO = 2.0
# Preference order correct (0) > abstain "" (1) > wrong (2); one of these pairs is drawn per clue.
JEOPARDY_PAIRS = ((0, 1), (0, 2), (1, 2))
JEOPARDY_NO_VALUE = ('', 'None')  # Final Jeopardy / Tiebreaker clues carry value "None".
HAIKU_PROMPT_TEMPLATE = 'Write a haiku (three lines of 5, 7 and 5 syllables) that includes the words: {keywords}.\n'

# What a file of each kind must look like; quoted in every DataError about that file.
EXPECTED = {
    'hh': 'JSON lines with string fields chosen, rejected (Anthropic/hh-rlhf dialogues)',
    'shp': 'JSON lines with fields history, human_ref_A, human_ref_B, labels, score_A, score_B (stanfordnlp/SHP)',
    'jeopardy': 'a JSON list of J! Archive clues with fields category, question, value, answer, round, '
                'show_number[, wrong_answer]',
    'haikus': 'CSV with columns keywords, text (statworx/haiku)',
    'user': 'JSON lines {prompt, chosen, rejected}, {prompt, responses, pairs}, or unlabelled {prompt, response_a, '
            'response_b} (optional sft_target, reference)',
}
REQUIRED_FIELDS = {
    'hh': ('chosen', 'rejected'),
    'shp': ('history', 'human_ref_A', 'human_ref_B', 'labels', 'score_A', 'score_B'),
    'jeopardy': ('category', 'question', 'answer'),
    'haikus': ('keywords', 'text'),
    'user': ('prompt',),
}


@dataclass
class PromptData:
    """Everything known about one prompt.

    responses: candidate responses (strings, without the prompt).
    pairs: (i_preferred, j_dispreferred) indices into `responses`.
    sft_target: the response SFT trains on.
    reference: the answer an oracle may compare against, belonging to THIS prompt (hh/shp: the SFT
        target, jeopardy: the correct answer, haikus: None).
    keywords: words the haiku must contain (haikus only).
    unlabelled: (a, b) indices into `responses` of pairs without a preference (user files with
        response_a/response_b): an oracle labels the ones an active run selects.
    """
    responses: List[str]
    pairs: List[Tuple[int, int]]
    sft_target: str
    reference: Optional[str] = None
    keywords: Optional[List[str]] = None
    unlabelled: List[Tuple[int, int]] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Reading files


def _one_line(text: str) -> str:
    return ' '.join(str(text).split())


def _read_rows(path: str, expected: str) -> Tuple[List[Any], Set[str], bool]:
    """Rows of a local .csv, .json (list) or .jsonl / JSON-lines .json file.

    Returns (rows, fields present in at least one row or in the CSV header, is_csv). A CSV row with
    the wrong number of columns becomes None so that the loader counts it as malformed.
    """
    try:
        with open(path, encoding='utf-8-sig', newline='') as f:  # -sig: tolerate a BOM
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f'{path}: not UTF-8 text (byte {e.start}: {e.reason}); expected {expected}') from e
    except OSError as e:
        raise DataError(f'{path}: cannot read ({e.strerror}); expected {expected}') from e
    if not text.strip():
        raise DataError(f'{path}: file is empty; expected {expected}')
    if path.lower().endswith('.csv'):
        return _parse_csv(path, text, expected)
    return _parse_json(path, text, expected)


def _parse_csv(path: str, text: str, expected: str) -> Tuple[List[Any], Set[str], bool]:
    # strict=True turns an unterminated quoted field (a truncated file) into an error instead of
    # silently swallowing the rest of the file into one cell.
    reader = csv.DictReader(io.StringIO(text), strict=True)
    rows: List[Any] = []
    try:
        header = reader.fieldnames or []
        for row in reader:
            malformed = None in row or any(value is None for value in row.values())
            rows.append(None if malformed else row)
    except csv.Error as e:
        raise DataError(f'{path}: line {reader.line_num}: invalid CSV ({e}); expected {expected}') from e
    return rows, set(header), True


def _parse_json(path: str, text: str, expected: str) -> Tuple[List[Any], Set[str], bool]:
    if text.lstrip().startswith('['):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f'{path}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg}); '
                            f'expected {expected}') from e
    else:
        rows = []
        # split('\n'), not splitlines(): JSON strings may legally contain U+2028 and friends.
        for lineno, line in enumerate(text.split('\n'), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f'{path}: line {lineno}: invalid JSON ({e.msg}); expected one JSON object '
                                f'per line: {expected}') from e
    present = set()
    for row in rows:
        if isinstance(row, dict):
            present.update(row)
    return rows, present, False


def _check_fields(where: str, kind: str, present: Set[str], is_csv: bool) -> None:
    """Raise DataError when a required field is absent from every row (or from the CSV header)."""
    for field in REQUIRED_FIELDS[kind]:
        if field not in present:
            location = 'line 1: the header lacks the column' if is_csv else 'no row has the field'
            raise DataError(f"{where}: {location} '{field}'; expected {EXPECTED[kind]}")
    if kind == 'user' and not ({'chosen', 'rejected'} <= present or {'responses', 'pairs'} <= present
                               or {'response_a', 'response_b'} <= present):
        raise DataError(f"{where}: no row has the fields 'chosen' and 'rejected', 'responses' and 'pairs', or "
                        f"'response_a' and 'response_b'; expected {EXPECTED[kind]}")


# ----------------------------------------------------------------------------------------------
# Loaders: rows -> prompts


class _Collector:
    """Prompts in first-seen order; rows sharing a prompt merge, identical responses share an index."""

    def __init__(self):
        self.data: Dict[str, PromptData] = {}
        self._positions: Dict[str, Dict[str, int]] = {}
        self.n_rows = 0
        self.skipped: Counter = Counter()

    def entry(self, prompt: str, sft_target: str, reference: Optional[str] = None,
              keywords: Optional[List[str]] = None) -> PromptData:
        """The prompt's entry; created with these fields when new (the first row of a prompt wins)."""
        if prompt not in self.data:
            self.data[prompt] = PromptData([], [], sft_target, reference, keywords)
            self._positions[prompt] = {}
        return self.data[prompt]

    def response(self, prompt: str, text: str) -> Tuple[int, bool]:
        """(index of `text` among the prompt's responses, whether it was new)."""
        positions = self._positions[prompt]
        if text in positions:
            return positions[text], False
        positions[text] = len(self.data[prompt].responses)
        self.data[prompt].responses.append(text)
        return positions[text], True

    def pair(self, prompt: str, preferred: str, dispreferred: str) -> bool:
        """Add a preference; returns False when exactly this pair is already there (nothing added)."""
        entry = self.entry(prompt, preferred, preferred)
        pair = (self.response(prompt, preferred)[0], self.response(prompt, dispreferred)[0])
        if pair in entry.pairs:
            return False
        entry.pairs.append(pair)
        return True

    def run(self, rows: Iterable[Any], handle: Callable[[Any], Optional[str]]) -> None:
        """Feed every row to `handle`, which returns a skip reason or None."""
        for row in rows:
            self.n_rows += 1
            reason = handle(row)
            if reason is not None:
                self.skipped[reason] += 1

    def summary(self, label: str, where: str) -> str:
        return (f'{label}: skipped {sum(self.skipped.values())} of {self.n_rows} rows in {where} '
                f'({_reasons(self.skipped)})')


def _reasons(counts: Counter) -> str:
    return ', '.join(f'{n} {reason}' for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _strings(row: Any, keys: Sequence[str]) -> Tuple[Optional[List[str]], Optional[str]]:
    """(the string values of `keys` in `row`, None) or (None, skip reason)."""
    if not isinstance(row, dict):
        return None, 'malformed row'
    values = []
    for key in keys:
        value = row.get(key)
        if value is None:
            return None, f'missing {key}'
        if not isinstance(value, str):
            return None, f'{key} not a string'
        values.append(value)
    return values, None


def _load_hh(rows: Iterable[Any], col: _Collector, seed: int) -> None:
    """prompt = chosen up to and including its last "\\n\\nAssistant:"; pair (chosen tail, rejected tail)."""
    def handle(row):
        values, reason = _strings(row, ('chosen', 'rejected'))
        if reason:
            return reason
        chosen, rejected = values
        cut = chosen.rfind(HH_ASSISTANT_TAG)
        if cut < 0:
            return 'no Assistant turn'
        prompt = chosen[:cut + len(HH_ASSISTANT_TAG)]
        if not chosen[:cut].strip():
            return 'empty prompt'
        if not rejected.startswith(prompt):
            return 'chosen/rejected prompts differ'
        chosen_tail, rejected_tail = chosen[len(prompt):], rejected[len(prompt):]
        if not chosen_tail.strip():
            return 'empty chosen'
        if chosen_tail == rejected_tail:
            return 'chosen == rejected'
        return None if col.pair(prompt, chosen_tail, rejected_tail) else 'duplicate pair'

    col.run(rows, handle)


def _shp_ratio(score_a: float, score_b: float) -> float:
    """max/min of the two comment scores; a non-positive lower score against a higher one counts as infinite."""
    low, high = sorted((score_a, score_b))
    if high == low:
        return 1.0
    return high / low if low > 0 else math.inf


def _load_shp(rows: Iterable[Any], col: _Collector, seed: int) -> None:
    """Keep pairs with score ratio >= 2; labels == 1 means A preferred; sft_target = best-scored response."""
    scores: Dict[str, Dict[str, float]] = defaultdict(dict)

    def handle(row):
        values, reason = _strings(row, ('history', 'human_ref_A', 'human_ref_B'))
        if reason:
            return reason
        history, text_a, text_b = values
        label = row.get('labels')
        if label not in (0, 1):
            return 'invalid labels'
        try:
            score_a, score_b = float(row['score_A']), float(row['score_B'])
        except (KeyError, TypeError, ValueError):
            return 'invalid score'
        if not history.strip():
            return 'empty prompt'
        if not text_a.strip() or not text_b.strip():
            return 'empty response'
        if text_a == text_b:
            return 'chosen == rejected'
        if _shp_ratio(score_a, score_b) < SHP_MIN_SCORE_RATIO:
            return 'score ratio < 2'
        prompt = SHP_PROMPT_TEMPLATE.format(history=history)
        response_a, response_b = SHP_RESPONSE_PREFIX + text_a, SHP_RESPONSE_PREFIX + text_b
        preferred, dispreferred = (response_a, response_b) if label == 1 else (response_b, response_a)
        if not col.pair(prompt, preferred, dispreferred):
            return 'duplicate pair'
        for response, score in ((response_a, score_a), (response_b, score_b)):
            scores[prompt][response] = max(score, scores[prompt].get(response, -math.inf))
        return None

    col.run(rows, handle)
    for prompt, entry in col.data.items():
        # max() keeps the first of equally scored responses, so ties resolve in file order.
        best = max(entry.responses, key=lambda response: scores[prompt][response])
        entry.sft_target = entry.reference = best


def _strip_quotes(question: str) -> str:
    """J! Archive wraps questions in single quotes: "'For the last 8 years...'" -> "For the last 8 years..."."""
    question = question.strip()
    if len(question) >= 2 and question[0] == question[-1] == "'":
        question = question[1:-1]
    return question.strip()


def _jeopardy_prompt(category: str, value: Any, question: str) -> str:
    value_text = '' if value is None else str(value).strip()
    if value_text in JEOPARDY_NO_VALUE:
        return f'{category}: {question}'
    return f'{category}, for {value_text}: {question}'


@dataclass
class _Clue:
    prompt: str
    answer: str
    category: str
    board: Tuple[str, str]  # (show_number, round)
    wrong_answer: Optional[str]


def _same_answer(a: str, b: str) -> bool:
    return a.strip().lower() == b.strip().lower()


def _draw_wrong_answer(clue: _Clue, pools: Sequence[List[_Clue]], rng: random.Random) -> Optional[str]:
    """A different clue's answer from the first pool that has one (same category, same board, any)."""
    for pool in pools:
        if any(not _same_answer(other.answer, clue.answer) for other in pool):
            # Rejection sampling keeps the "any clue" pool O(1) per clue; it ends because a
            # different answer exists in the pool.
            while True:
                other = rng.choice(pool)
                if not _same_answer(other.answer, clue.answer):
                    return other.answer
    return None


def _load_jeopardy(rows: Iterable[Any], col: _Collector, seed: int) -> None:
    """Responses [answer, "", wrong_answer]; one seeded pair per clue out of JEOPARDY_PAIRS.

    Clues whose question holds an HTML link (<a href ...>, audio/video clues) cannot be answered from
    text and are dropped. Without a `wrong_answer` field the wrong answer is the answer of another
    clue of the same category, else of the same show and round, else of any clue, drawn with a
    per-clue RNG seeded by (seed, prompt): the draw does not depend on file order.
    """
    clues: List[_Clue] = []
    seen: Set[str] = set()

    def handle(row):
        values, reason = _strings(row, ('category', 'question', 'answer'))
        if reason:
            return reason
        category, question, answer = values
        if '<a href' in question.lower():
            return 'HTML link in question'
        question = _strip_quotes(question)
        if not category.strip() or not question:
            return 'empty prompt'
        if not answer.strip():
            return 'empty answer'
        prompt = _jeopardy_prompt(category.strip(), row.get('value'), question)
        if prompt in seen:
            return 'duplicate prompt'
        seen.add(prompt)
        wrong = row.get('wrong_answer')
        usable_wrong = isinstance(wrong, str) and wrong.strip() and not _same_answer(wrong, answer)
        board = (str(row.get('show_number')), str(row.get('round')))
        clues.append(_Clue(prompt, answer, category.strip(), board, wrong if usable_wrong else None))
        return None

    col.run(rows, handle)
    by_category: Dict[str, List[_Clue]] = defaultdict(list)
    by_board: Dict[Tuple[str, str], List[_Clue]] = defaultdict(list)
    for clue in clues:
        by_category[clue.category].append(clue)
        by_board[clue.board].append(clue)
    for clue in clues:
        wrong = clue.wrong_answer
        if wrong is None:
            rng = random.Random(f'jeopardy-wrong-answer:{seed}:{clue.prompt}')
            wrong = _draw_wrong_answer(clue, (by_category[clue.category], by_board[clue.board], clues), rng)
            if wrong is None:
                col.skipped['no wrong answer available'] += 1
                continue
        pair = random.Random(f'jeopardy-pair:{seed}:{clue.prompt}').choice(JEOPARDY_PAIRS)
        col.data[clue.prompt] = PromptData([clue.answer, '', wrong], [pair], clue.answer, clue.answer)


def _haiku_keywords(field: str) -> List[str]:
    """'Autumn, moon ' -> ['autumn', 'moon']. statworx separates keywords by spaces ('in treetop' for
    'In a treetop'), so commas and whitespace both separate; lowercased, punctuation-only entries dropped."""
    words = (word.strip(string.punctuation).lower() for word in re.split(r'[\s,]+', field))
    return [word for word in words if word]


def haiku_keyword_prompts(path: str, seed: int) -> Dict[str, PromptData]:
    """Haiku prompts from a keyword list (one word per line, e.g. data/haiku_keywords.txt): each word
    with a partner drawn by `seed`. No responses or pairs: for online runs, where the oracle labels."""
    try:
        with open(path, encoding='utf-8') as f:
            words = [w.strip().lower() for w in f if w.strip() and not w.startswith('#')]
    except OSError as e:
        raise DataError(f'{path}: cannot read ({e.strerror}); expected one keyword per line') from e
    if len(words) < 2:
        raise DataError(f'{path}: holds {len(words)} keywords; expected at least 2, one per line')
    data = {}
    for word in words:
        partner = random.Random(f'haiku-keywords:{seed}:{word}').choice([w for w in words if w != word])
        keywords = [word, partner]
        data[HAIKU_PROMPT_TEMPLATE.format(keywords=', '.join(keywords))] = PromptData([], [], '', None, keywords)
    return data


def _load_haikus(rows: Iterable[Any], col: _Collector, seed: int) -> None:
    """Prompt from HAIKU_PROMPT_TEMPLATE; responses = the haikus for those keywords; no pairs."""
    def handle(row):
        values, reason = _strings(row, ('keywords', 'text'))
        if reason:
            return reason
        keywords, text = _haiku_keywords(values[0]), values[1]
        if not keywords:
            return 'empty keywords'
        if not text.strip():
            return 'empty text'
        prompt = HAIKU_PROMPT_TEMPLATE.format(keywords=', '.join(keywords))
        col.entry(prompt, text, None, keywords)
        return None if col.response(prompt, text)[1] else 'duplicate row'

    col.run(rows, handle)


def _user_pairs(row: dict) -> Tuple[Optional[Tuple[List[str], List[Tuple[int, int]], bool]], Optional[str]]:
    """((responses, pairs, unlabelled), None) from any user row form, or (None, skip reason); an
    unlabelled row gives its one pair (a, b) in file order."""
    if 'response_a' in row or 'response_b' in row:
        values, reason = _strings(row, ('response_a', 'response_b'))
        if reason:
            return None, reason
        if values[0] == values[1]:
            return None, 'response_a == response_b'
        return (values, [(0, 1)], True), None
    if 'chosen' in row or 'rejected' in row:
        values, reason = _strings(row, ('chosen', 'rejected'))
        if reason:
            return None, reason
        if not values[0].strip():
            return None, 'empty chosen'
        if values[0] == values[1]:
            return None, 'chosen == rejected'
        return (values, [(0, 1)], False), None
    responses, pairs = row.get('responses'), row.get('pairs')
    if responses is None or pairs is None:
        return None, 'missing chosen/rejected or responses/pairs'
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses) or not responses:
        return None, 'invalid responses'
    if not isinstance(pairs, list):
        return None, 'invalid pairs'
    checked = []
    for pair in pairs:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(responses) for i in pair)
                or pair[0] == pair[1]):
            return None, 'invalid pairs'
        checked.append((pair[0], pair[1]))
    return (responses, checked, False), None


def _load_user(rows: Iterable[Any], col: _Collector, seed: int) -> None:
    """Rows sharing a prompt merge. sft_target: the first explicit `sft_target`, else the preferred
    response of the prompt's first pair (responses[0] when it has no pairs). reference: the first
    explicit `reference`, else sft_target."""
    explicit: Dict[str, Dict[str, str]] = defaultdict(dict)

    def handle(row):
        values, reason = _strings(row, ('prompt',))
        if reason:
            return reason
        prompt = values[0]
        if not prompt.strip():
            return 'empty prompt'
        parsed, reason = _user_pairs(row)
        if reason:
            return reason
        responses, pairs, unlabelled = parsed
        extras = {}
        for key in ('sft_target', 'reference'):
            if row.get(key) is not None:
                if not isinstance(row[key], str) or not row[key].strip():
                    return f'invalid {key}'
                extras[key] = row[key]
        default_target = responses[pairs[0][0]] if pairs and not unlabelled else responses[0]
        entry = col.entry(prompt, default_target)
        indices = [col.response(prompt, response)[0] for response in responses]
        known = entry.unlabelled if unlabelled else entry.pairs
        for i, j in pairs:
            # Identical texts share an index, so a pair between two copies of one text carries nothing.
            if indices[i] != indices[j] and (indices[i], indices[j]) not in known:
                known.append((indices[i], indices[j]))
        for key, value in extras.items():
            explicit[prompt].setdefault(key, value)
        return None

    col.run(rows, handle)
    for prompt, entry in col.data.items():
        entry.sft_target = explicit[prompt].get('sft_target', entry.sft_target)
        # an unlabelled pair's response_a is no reference answer
        entry.reference = explicit[prompt].get('reference', entry.sft_target if entry.pairs else None)


LOADERS = {'hh': _load_hh, 'shp': _load_shp, 'jeopardy': _load_jeopardy, 'haikus': _load_haikus,
           'user': _load_user}


# ----------------------------------------------------------------------------------------------
# Sources and splits


def _is_path(name: str) -> bool:
    return name.lower().endswith(('.jsonl', '.json')) or os.sep in name or os.path.isdir(name)


def _dataset_kind(name: str) -> str:
    if name in DATASET_NAMES:
        return name
    if _is_path(name):
        return 'user'
    raise ConfigError(f"datasets: unknown dataset '{name}'; allowed: {', '.join(DATASET_NAMES)}, or a path to a "
                      f".jsonl/.json file (or a directory holding train.jsonl and test.jsonl)")


def _local_file(path: str, split: str, kind: str) -> Tuple[str, bool]:
    """(file to read, whether it holds exactly `split`): a directory must hold '{split}.jsonl' (.json, .csv)."""
    if os.path.isdir(path):
        for ext in SPLIT_FILE_EXTS:
            candidate = os.path.join(path, split + ext)
            if os.path.isfile(candidate):
                return candidate, True
        names = ', '.join(split + ext for ext in SPLIT_FILE_EXTS)
        raise DataError(f'{path}: directory holds none of {names}; expected {EXPECTED[kind]}')
    if not os.path.isfile(path):
        raise DataError(f'{path}: file not found; expected {EXPECTED[kind]}')
    return path, False


def _hub_rows(kind: str, split: str, cache_dir: Optional[str]) -> Tuple[Any, Set[str], bool, str]:
    """(rows, columns, whether the rows are exactly `split`, description) from the Hugging Face hub."""
    if kind == 'jeopardy':
        raise ConfigError('dataset_files.jeopardy: jeopardy has no canonical copy on the Hugging Face hub; '
                          'pass the J! Archive JSON file with dataset_files.jeopardy=PATH')
    hub_id = HUB_IDS[kind]
    import datasets  # imported here: the library is slow to import and only the hub path needs it

    try:
        splits = datasets.load_dataset(hub_id, cache_dir=cache_dir)
    except Exception as e:  # network, authentication, offline mode without a cache: all mean "no hub"
        raise DataError(f'{hub_id}: cannot load from the Hugging Face hub ({type(e).__name__}: {_one_line(e)}); '
                        f'pass a local copy with dataset_files.{kind}=PATH') from e
    if all(name in splits for name in SPLITS):
        return splits[split], set(splits[split].column_names), True, f'hub {hub_id} [{split}]'
    # Without both splits on the hub (statworx/haiku has one), all rows are split here like a local
    # single file, so that train and test never overlap.
    rows = datasets.concatenate_datasets([splits[name] for name in sorted(splits)])
    return rows, set(rows.column_names), False, f'hub {hub_id}'


def _take_split(data: Dict[str, PromptData], split: str, seed: int) -> Dict[str, PromptData]:
    """The prompts of `split` from a single-split source, in file order.

    A permutation of the prompts seeded by `seed` sends its last TEST_FRACTION (at least one prompt)
    to 'test', the rest to 'train'.
    """
    prompts = list(data)
    order = list(range(len(prompts)))
    random.Random(f'test-split:{seed}').shuffle(order)
    n_test = max(1, round(TEST_FRACTION * len(prompts)))
    test = set(order[len(order) - n_test:])
    want_test = split == 'test'
    return {prompt: data[prompt] for i, prompt in enumerate(prompts) if (i in test) == want_test}


def _load_dataset(name: str, split: str, seed: int = 0, data_file: Optional[str] = None,
                  cache_dir: Optional[str] = None, silent: bool = False, split_seed: int = 0) -> Dict[str, PromptData]:
    """Load one split of a dataset as an ordered dict prompt -> PromptData (file order).

    name: one of DATASET_NAMES, or a path to user data (.jsonl/.json file, or a directory holding
        train.jsonl/test.jsonl).
    seed: draws inside the data that are part of a run's randomness (the Jeopardy pair per clue).
    split_seed: what defines the prompt set and its split, fixed across a seed sweep (the test split
        of a single-file source, haiku keyword partners).
    data_file: a local file or directory that wins over the hub (ignored for user paths, whose name
        is the file). A directory must hold '{split}.jsonl' (or .json/.csv); a single file holds
        every split and is split by `split_seed` (see _take_split), as are single-split hub datasets.
    Skipped rows are reported in one printed line (unless `silent`); a file that cannot be read, or
    lacks a required field in every row, raises DataError; nothing usable at all raises DataError.
    """
    if split not in SPLITS:
        raise ConfigError(f"split: '{split}' is not one of {', '.join(SPLITS)}")
    kind = _dataset_kind(name)
    source = name if kind == 'user' else data_file
    if kind == 'haikus' and str(source).endswith('.txt'):
        return _take_split(haiku_keyword_prompts(os.path.expanduser(str(source)), split_seed), split, split_seed)
    if source is None:
        rows, present, exact_split, where = _hub_rows(kind, split, cache_dir)
        is_csv = False
    else:
        path, exact_split = _local_file(os.path.expanduser(str(source)), split, kind)
        rows, present, is_csv = _read_rows(path, EXPECTED[kind])
        where = path
    _check_fields(where, kind, present, is_csv)
    col = _Collector()
    LOADERS[kind](rows, col, seed)
    label = f'{name}/{split}'
    if not col.data:
        raise DataError(f'{where}: no usable rows ({_reasons(col.skipped) or "no rows"}); expected {EXPECTED[kind]}')
    if col.skipped and not silent:
        print(col.summary(label, where))
    return col.data if exact_split else _take_split(col.data, split, split_seed)


def _file_stamp(path: Optional[str]) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(os.path.expanduser(str(path)))
        return st.st_mtime_ns, st.st_size
    except (OSError, TypeError):
        return None


@functools.lru_cache(maxsize=32)
def _cached_dataset(name, split, seed, data_file, cache_dir, silent, stamp, split_seed) -> Dict[str, PromptData]:
    return _load_dataset(name, split, seed, data_file, cache_dir, silent, split_seed)


def get_dataset(name: str, split: str, seed: int = 0, data_file: Optional[str] = None,
                cache_dir: Optional[str] = None, silent: bool = False, split_seed: int = 0) -> Dict[str, PromptData]:
    """`_load_dataset`, memoised per process (keyed by the file's mtime and size, so an edited file is
    read again): the jobs of a `-m` sweep in one process parse each file once. Treat the result as
    read-only."""
    stamp = _file_stamp(name if name not in DATASET_NAMES else data_file)
    return _cached_dataset(name, split, seed, data_file, cache_dir, silent, stamp, split_seed)


def split_prompts(prompts: List[str], pretrain_fraction: float, seed: int) -> Tuple[List[str], List[str]]:
    """Split prompts into (SFT share, active-selection pool) for offline methods.

    A permutation seeded by `seed` (the run's split_seed): its first round(pretrain_fraction * n) prompts go to SFT, the
    rest to the pool. Both lists are in permutation order, disjoint, and cover `prompts` (which must
    be unique). Raises ConfigError unless 0 <= pretrain_fraction < 1.
    """
    if not 0.0 <= pretrain_fraction < 1.0:
        raise ConfigError(f'pretrain_fraction: {pretrain_fraction} is outside [0, 1)')
    order = list(prompts)
    random.Random(f'split-prompts:{seed}').shuffle(order)
    n_sft = round(pretrain_fraction * len(order))
    return order[:n_sft], order[n_sft:]


def truncation_mode_for(name: str) -> str:
    """'keep_end' for dialogue data (hh, shp: the last turns matter), 'keep_start' otherwise."""
    return 'keep_end' if name in ('hh', 'shp') else 'keep_start'


# ----------------------------------------------------------------------------------------------
# Tokenisation


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    if not 1 <= max_prompt_length < max_length:
        raise ConfigError(f'max_prompt_length: {max_prompt_length} must be at least 1 and below '
                          f'max_length ({max_length}) so every response keeps at least one token')


def _check_mode(truncation_mode: str) -> None:
    if truncation_mode not in TRUNCATION_MODES:
        raise ConfigError(f"truncation_mode: '{truncation_mode}' is not one of {', '.join(TRUNCATION_MODES)}")


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ConfigError('model.tokenizer_name_or_path: the tokenizer has no EOS token')
    return tokenizer.eos_token_id


def _prompt_ids(prompt: str, tokenizer) -> Tuple[List[int], bool]:
    """(prompt token ids, whether a BOS was prepended): BOS only when the tokenizer adds one itself."""
    ids = tokenizer(prompt, add_special_tokens=False)['input_ids']
    bos = tokenizer.bos_token_id
    with_special = tokenizer(prompt)['input_ids']
    if bos is not None and with_special[:1] == [bos] and ids[:1] != [bos]:
        return [bos] + ids, True
    return ids, False


def _response_ids(response: str, tokenizer) -> List[int]:
    return tokenizer(response, add_special_tokens=False)['input_ids'] + [_eos_id(tokenizer)]


def tokenize_prompt(prompt: str, tokenizer, max_prompt_length: int, truncation_mode: str) -> List[int]:
    """Prompt token ids, BOS first if the tokenizer adds one, cut to max_prompt_length when longer
    ('keep_end' keeps its last tokens, behind the BOS; 'keep_start' its first).

    The cut never depends on the response, so generation (which has no response yet), scoring and
    training all condition on the same context.
    """
    _check_mode(truncation_mode)
    prompt_ids, has_bos = _prompt_ids(prompt, tokenizer)
    if len(prompt_ids) <= max_prompt_length:
        return prompt_ids
    if truncation_mode == 'keep_start':
        return prompt_ids[:max_prompt_length]
    head = prompt_ids[:1] if has_bos else []
    keep = max_prompt_length - len(head)
    return head + prompt_ids[len(prompt_ids) - keep:]


def tokenize_response(prompt_ids: List[int], response: str, tokenizer, max_length: int) -> Dict[str, List[int]]:
    """'input_ids' (prompt, response, EOS), 'attention_mask' (all 1) and 'labels' (-100 on the prompt)
    of one response after `prompt_ids`; the response keeps its start and is cut (losing its EOS) to
    fit max_length. Since the prompt is at most max_prompt_length < max_length, at least one response
    token always remains."""
    response_ids = _response_ids(response, tokenizer)[:max_length - len(prompt_ids)]
    input_ids = prompt_ids + response_ids
    return {'input_ids': input_ids, 'attention_mask': [1] * len(input_ids),
            'labels': [-100] * len(prompt_ids) + response_ids}


def tokenize_prompt_response(prompt: str, response: str, tokenizer, max_length: int, max_prompt_length: int,
                             truncation_mode: str) -> Dict[str, List[int]]:
    """Token ids of prompt + response, each tokenised separately (see tokenize_prompt and
    tokenize_response): 'prompt_input_ids', 'input_ids', 'attention_mask', 'labels', of length
    T = len(prompt ids) + len(response ids) <= max_length. Never raises on long text."""
    _check_lengths(max_length, max_prompt_length)
    prompt_ids = tokenize_prompt(prompt, tokenizer, max_prompt_length, truncation_mode)
    return {'prompt_input_ids': prompt_ids, **tokenize_response(prompt_ids, response, tokenizer, max_length)}


def pair_element(prompt: str, prompt_ids: List[int], responses: Dict[str, Tuple[str, Dict[str, List[int]]]]) -> Dict:
    """A training element from already tokenised parts: responses maps 'chosen' (and 'rejected') to
    (text, tokenize_response(prompt_ids, text, ...)). Keys as documented in tokenize_element."""
    element: Dict[str, Any] = {'prompt': prompt, **{key: text for key, (text, _) in responses.items()}}
    element['prompt_input_ids'] = prompt_ids
    element['prompt_attention_mask'] = [1] * len(prompt_ids)
    for key, (_, sequence) in responses.items():
        for field, values in sequence.items():
            element[f'{key}_{field}'] = values
    return element


def tokenize_element(prompt: str, chosen: Optional[str], rejected: Optional[str], tokenizer, max_length: int,
                     max_prompt_length: int, truncation_mode: str, sft_target: Optional[str] = None) -> Dict:
    """One training element: a preference pair (chosen and rejected) or an SFT example.

    chosen=None makes an SFT element whose 'chosen' is `sft_target`; rejected=None leaves out the
    rejected_* keys. Returns the strings 'prompt', 'chosen' (response only), 'rejected' (pairs),
    'sft_target' (when given); 'prompt_input_ids', 'prompt_attention_mask' (length P); and for each
    of chosen/rejected '{k}_input_ids', '{k}_attention_mask', '{k}_labels' (length P + R_k <=
    max_length). Both responses share the same prompt tokens.
    """
    _check_lengths(max_length, max_prompt_length)
    if chosen is None:
        if sft_target is None:
            raise ValueError('tokenize_element needs `chosen` or `sft_target`')
        chosen = sft_target
    texts = {'chosen': chosen} if rejected is None else {'chosen': chosen, 'rejected': rejected}
    prompt_ids = tokenize_prompt(prompt, tokenizer, max_prompt_length, truncation_mode)
    element = pair_element(prompt, prompt_ids, {key: (text, tokenize_response(prompt_ids, text, tokenizer, max_length))
                                                for key, text in texts.items()})
    if sft_target is not None:
        element['sft_target'] = sft_target
    return element


def _pad(rows: List[Any], value: int, left: bool) -> torch.Tensor:
    tensors = [torch.as_tensor(row, dtype=torch.long) for row in rows]
    width = max(t.numel() for t in tensors)
    out = torch.full((len(tensors), width), value, dtype=torch.long)
    for i, t in enumerate(tensors):
        if left:
            out[i, width - t.numel():] = t
        else:
            out[i, :t.numel()] = t
    return out


def collate(elements: List[Dict], pad_token_id: int) -> Dict:
    """Batch elements, padding to the longest sequence of THIS list (a selected subset re-pads shorter).

    *_input_ids (pad_token_id), *_attention_mask (0) and *_labels (-100) become LongTensors (B, T):
    right-padded, except the prompt_* keys, which are left-padded so that generation can continue
    every prompt from the last column. Keys ending in '_logps' become float32 tensors (B,). Every
    other key (strings, references, keyword lists) becomes a list of length B.
    """
    if not elements:
        raise ValueError('collate needs at least one element')
    if pad_token_id is None:
        raise ConfigError('model.tokenizer_name_or_path: the tokenizer has no pad token; set pad_token_id')
    batch: Dict[str, Any] = {}
    for key in elements[0]:
        values = [element[key] for element in elements]
        if key.endswith(('input_ids', 'attention_mask', 'labels')):
            value = pad_token_id if key.endswith('input_ids') else 0 if key.endswith('attention_mask') else -100
            batch[key] = _pad(values, value, left=key.startswith('prompt_'))
        elif key.endswith('_logps'):
            batch[key] = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in values])
        else:
            batch[key] = values
    return batch


# ----------------------------------------------------------------------------------------------
# Iteration


@dataclass
class _Item:
    """One element before tokenisation: a pair of `data` (DPO mode) or its SFT target (pair None)."""
    dataset: str
    prompt: str
    data: PromptData
    pair: Optional[Tuple[int, int]]

    def texts(self) -> List[str]:
        if self.pair is None:
            return [self.prompt, self.data.sft_target]
        return [self.prompt, self.data.responses[self.pair[0]], self.data.responses[self.pair[1]]]


def _check_budget(split: str, n_epochs: Optional[int], n_examples: Optional[int]) -> Optional[int]:
    """The number of epochs to run (None = until n_examples); exactly one of the two in 'train'."""
    if n_epochs is not None and n_examples is not None:
        raise ConfigError(f'n_epochs / n_examples: set only one (got n_epochs={n_epochs}, n_examples={n_examples})')
    if n_epochs is None and n_examples is None:
        if split == 'train':
            raise ConfigError('n_epochs / n_examples: the train split needs exactly one of them')
        return 1
    if (n_epochs is not None and n_epochs < 0) or (n_examples is not None and n_examples < 0):
        raise ConfigError(f'n_epochs / n_examples: must be non-negative (got {n_epochs}, {n_examples})')
    return n_epochs


def _ordered(items: List[Any], seed: int, shuffle: bool, n_epochs: Optional[int],
             n_examples: Optional[int]) -> Iterator[Any]:
    """Epoch after epoch of `items` (each epoch a fresh permutation seeded by (seed, epoch) when
    shuffling), until n_epochs epochs or n_examples items in total; nothing at all when `items` is empty."""
    if not items:  # an n_examples budget would otherwise loop over empty epochs forever
        return
    produced = 0
    for epoch in itertools.count() if n_epochs is None else range(n_epochs):
        order = list(range(len(items)))
        if shuffle:
            random.Random(f'order:{seed}:{epoch}').shuffle(order)
        for index in order:
            if n_examples is not None and produced >= n_examples:
                return
            yield items[index]
            produced += 1


# Parsed datasets of one split: [(dataset name, prompt -> PromptData)], in the order of the run's `datasets`.
Datasets = List[Tuple[str, Dict[str, PromptData]]]


def load_datasets(names: List[str], split: str, *, seed: int = 0, split_seed: int = 0,
                  data_files: Optional[Dict[str, str]] = None, cache_dir: Optional[str] = None,
                  silent: bool = False) -> Datasets:
    """Parse `split` of every dataset in `names` (see get_dataset): a run does this once per split
    and hands the result to the iterators, the tokenizer builder and the checks."""
    if not names:
        raise ConfigError('datasets: the list of datasets is empty')
    files = data_files or {}
    return [(name, get_dataset(name, split, seed=seed, data_file=files.get(name), cache_dir=cache_dir,
                               silent=silent, split_seed=split_seed)) for name in names]


def _select_prompts(data: Dict[str, PromptData], prompt_subset: str, pretrain_fraction: float,
                    seed: int) -> List[str]:
    """The prompts of `prompt_subset` in file order."""
    prompts = list(data)
    if prompt_subset == 'all':
        return prompts
    sft, pool = split_prompts(prompts, pretrain_fraction, seed)
    keep = set(sft if prompt_subset == 'sft' else pool)
    return [prompt for prompt in prompts if prompt in keep]


def _drop_eos(items: List[Any], texts: Callable[[Any], List[str]], eos: Optional[str], label: str,
              unit: str, silent: bool) -> List[Any]:
    """Items none of whose texts contain the EOS string (it would end the sequence early); one summary line."""
    if eos is None:
        return items
    kept = [item for item in items if not any(eos in text for text in texts(item))]
    if len(kept) < len(items) and not silent:
        print(f'{label}: skipped {len(items) - len(kept)} of {len(items)} {unit} '
              f'({len(items) - len(kept)} EOS in text)')
    return kept


def iterate_elements(datasets: Datasets, tokenizer, split: str, *, seed: int, shuffle: bool, max_length: int,
                     max_prompt_length: int, sft_mode: bool, n_epochs: Optional[int] = None,
                     n_examples: Optional[int] = None, prompt_subset: str = 'all', pretrain_fraction: float = 0.0,
                     silent: bool = False, skip_examples: int = 0,
                     prompt_format: Optional[Callable[[str], str]] = None, split_seed: int = 0,
                     unlabelled: bool = False) -> Iterator[Dict]:
    """Tokenised elements (see tokenize_element) of the concatenated `datasets` (load_datasets of `split`).

    One element per (prompt, pair) in DPO mode, one per prompt (its sft_target) in SFT mode; each
    also carries 'dataset', 'reference' and 'keywords' of its prompt. prompt_subset 'sft'/'pool'
    keeps the SFT share / the rest of each dataset's prompts per split_prompts(pretrain_fraction,
    split_seed); split_seed also fixes the test split of single-file sources, so that runs differing
    only in `seed` share their splits. Order: per epoch a permutation seeded by (seed, epoch) when `shuffle`, else file order;
    it stops after n_epochs epochs or n_examples elements (exactly one for 'train'; neither means
    one pass elsewhere). The sequence is a pure function of the arguments, so a resumed run that
    passes skip_examples=k gets exactly the suffix after the first k elements (n_examples counts
    from the start of the sequence, skipped elements included). Elements whose text contains the
    tokenizer's EOS string are dropped before ordering and counted in one printed line (unless
    silent). prompt_format (e.g. a chat template) maps each prompt before tokenisation; the EOS
    check runs on the raw data, since templates may legitimately hold the EOS string. With no usable
    element (e.g. haikus, which have no pairs, in DPO mode) nothing is yielded and, unless silent, a
    line says so. Arguments are checked when this is called, not at the first next().
    unlabelled=True iterates the pairs without a preference instead (PromptData.unlabelled): 'chosen'
    and 'rejected' then hold response_a and response_b in file order, not a label, and the element
    says so ('unlabelled': True, 'source_prompt': the prompt before prompt_format, for the oracle).
    """
    _check_lengths(max_length, max_prompt_length)
    if prompt_subset not in PROMPT_SUBSETS:
        raise ConfigError(f"prompt_subset: '{prompt_subset}' is not one of {', '.join(PROMPT_SUBSETS)}")
    if skip_examples < 0:
        raise ConfigError(f'skip_examples: must be non-negative (got {skip_examples})')
    n_epochs = _check_budget(split, n_epochs, n_examples)
    _eos_id(tokenizer)
    items = []
    for name, data in datasets:
        for prompt in _select_prompts(data, prompt_subset, pretrain_fraction, split_seed):
            entry = data[prompt]
            pairs = [None] if sft_mode else entry.unlabelled if unlabelled else entry.pairs
            items.extend(_Item(name, prompt, entry, pair) for pair in pairs)
    label = f"{'+'.join(name for name, _ in datasets)}/{split}"
    items = _drop_eos(items, _Item.texts, tokenizer.eos_token, label, 'elements', silent)
    if not items and not silent:
        mode = 'SFT' if sft_mode else 'preference-pair'
        print(f"{label}: no usable {mode} elements (prompt_subset='{prompt_subset}', "
              f"pretrain_fraction={pretrain_fraction}); nothing to iterate")
    fmt = prompt_format or (lambda prompt: prompt)

    def generate():
        for item in itertools.islice(_ordered(items, seed, shuffle, n_epochs, n_examples), skip_examples, None):
            if item.pair is None:
                chosen, rejected = None, None
            else:
                chosen, rejected = item.data.responses[item.pair[0]], item.data.responses[item.pair[1]]
            element = tokenize_element(fmt(item.prompt), chosen, rejected, tokenizer, max_length, max_prompt_length,
                                       truncation_mode_for(item.dataset), sft_target=item.data.sft_target)
            element['dataset'] = item.dataset
            element['reference'] = item.data.reference
            element['keywords'] = None if item.data.keywords is None else list(item.data.keywords)
            if unlabelled:
                element['unlabelled'] = True
                element['source_prompt'] = item.prompt
            yield element

    return generate()


def get_batch_iterator(datasets: Datasets, tokenizer, split: str, batch_size: int, *, pad_token_id: int,
                       skip_examples: int = 0, **kwargs) -> Iterator[Dict]:
    """Collated batches (see collate) of iterate_elements(datasets, tokenizer, split, **kwargs).

    The first `skip_examples` elements are skipped without tokenising them (resuming), the rest are
    grouped into lists of batch_size; the last, partial batch is yielded too.
    """
    if batch_size < 1:
        raise ConfigError(f'batch_size: must be at least 1 (got {batch_size})')
    if pad_token_id is None:
        raise ConfigError('model.tokenizer_name_or_path: the tokenizer has no pad token; set pad_token_id')
    elements = iterate_elements(datasets, tokenizer, split, skip_examples=skip_examples, **kwargs)

    def generate():
        while True:
            batch = list(itertools.islice(elements, batch_size))
            if not batch:
                return
            yield collate(batch, pad_token_id)

    return generate()


def iterate_prompts(datasets: Datasets, split: str, *, seed: int, shuffle: bool, n_epochs: Optional[int] = None,
                    n_examples: Optional[int] = None, tokenizer=None,
                    silent: bool = False) -> Iterator[Tuple[str, str, PromptData]]:
    """(dataset name, prompt, PromptData) for the online loop, with the ordering rules of iterate_elements
    (n_examples counts prompts). With a tokenizer, prompts containing its EOS string are dropped and
    counted in one printed line."""
    n_epochs = _check_budget(split, n_epochs, n_examples)
    items = [(name, prompt, entry) for name, data in datasets for prompt, entry in data.items()]
    label = f"{'+'.join(name for name, _ in datasets)}/{split}"
    eos = tokenizer.eos_token if tokenizer is not None else None
    items = _drop_eos(items, lambda item: [item[1]], eos, label, 'prompts', silent)
    if not items and not silent:
        print(f'{label}: no usable prompts; nothing to iterate')
    return _ordered(items, seed, shuffle, n_epochs, n_examples)


def unlabelled_files(datasets: Datasets) -> List[str]:
    """The datasets that hold pairs without a preference (user files with response_a/response_b)."""
    return [name for name, data in datasets if any(entry.unlabelled for entry in data.values())]


def training_texts(datasets: Datasets) -> List[str]:
    """Every prompt, response and SFT target of the (train) `datasets`, each text once, in file order:
    the corpus for training a small tokenizer (deterministic, so it can be cached by content)."""
    texts: Dict[str, None] = {}
    for _, data in datasets:
        for prompt, entry in data.items():
            texts.update(dict.fromkeys([prompt, *entry.responses, entry.sft_target]))
    return [text for text in texts if text]


def trained_prompts(datasets: Datasets, *, split_seed: int, prompt_subset: str, pretrain_fraction: float) -> Set[str]:
    """The prompts of the (train) `datasets` in `prompt_subset` (see iterate_elements), as a set: what a
    stage with these settings trains on, or selects from."""
    return {prompt for _, data in datasets for prompt in _select_prompts(data, prompt_subset, pretrain_fraction, split_seed)}
