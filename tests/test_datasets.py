"""Tests for preference_datasets: loaders on real-format fixtures, splits, tokenisation, iterators.

Everything is local: fixtures under tests/fixtures and small tokenizers trained or built here.
"""
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import preference_datasets as pds
from utils import ConfigError, DataError

FIXTURES = Path(__file__).parent / 'fixtures'
SPECIALS = ['<pad>', '<s>', '</s>']


def fixture(name: str) -> str:
    return str(FIXTURES / name)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<s>', eos_token='</s>', pad_token='<pad>')


@pytest.fixture(scope='module')
def tokenizer():
    """Byte-level BPE (vocab 1000) trained on the fixture text; adds no special tokens by itself."""
    lines = []
    for path in sorted(FIXTURES.rglob('*')):
        if path.is_file():
            lines.extend(path.read_text(encoding='utf-8').splitlines())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=1000, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return wrap(tok)


def word_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    """Word-level tokenizer with hand-known ids: p0..p9 -> 3..12, r0..r9 -> 13..22 (pad 0, bos 1, eos 2)."""
    vocab = {token: i for i, token in enumerate(SPECIALS + [f'p{i}' for i in range(10)] + [f'r{i}' for i in range(10)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token='<pad>'))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', 1)])
    return wrap(tok)


PROMPT_10 = ' '.join(f'p{i}' for i in range(10))   # ids 3..12
RESPONSE_3 = 'r0 r1 r2'                             # ids 13, 14, 15 (+ EOS 2)


def load_all(name, data_file=None, seed=0):
    """train + test of a single-file source, checking that the two splits are disjoint."""
    train = pds.get_dataset(name, 'train', seed=seed, data_file=data_file, silent=True)
    test = pds.get_dataset(name, 'test', seed=seed, data_file=data_file, silent=True)
    assert not set(train) & set(test)
    return {**train, **test}


def read_jsonl(name):
    return [json.loads(line) for line in open(fixture(name), encoding='utf-8') if line.strip()]


def _load(names, split, kwargs):
    """Parse `names` once, as a run does, taking the loading arguments out of an iterator's kwargs."""
    return pds.load_datasets(names, split, seed=kwargs.get('seed', 0), split_seed=kwargs.get('split_seed', 0),
                             data_files=kwargs.pop('data_files', None), cache_dir=kwargs.pop('cache_dir', None),
                             silent=kwargs.get('silent', False))


def loaded_elements(names, tokenizer, split, **kwargs):
    return pds.iterate_elements(_load(names, split, kwargs), tokenizer, split, **kwargs)


def loaded_batches(names, tokenizer, split, batch_size, **kwargs):
    return pds.get_batch_iterator(_load(names, split, kwargs), tokenizer, split, batch_size, **kwargs)


def loaded_prompts(names, split, **kwargs):
    datasets = _load(names, split, kwargs)
    kwargs.pop('split_seed', None)
    return pds.iterate_prompts(datasets, split, **kwargs)


def dpo_kwargs(**overrides):
    kwargs = dict(seed=0, shuffle=True, max_length=256, max_prompt_length=128, sft_mode=False,
                  data_files={'hh': fixture('hh.jsonl')}, silent=True)
    kwargs.update(overrides)
    return kwargs


# ----------------------------------------------------------------------------------------------
# Loaders


def test_hh_loader_prompt_format_pairs_and_reference():
    rows = read_jsonl('hh.jsonl')
    data = load_all('hh', fixture('hh.jsonl'))
    assert len(data) == len(rows) == 20
    for row in rows:
        prompt = row['chosen'][:row['chosen'].rfind('\n\nAssistant:') + len('\n\nAssistant:')]
        entry = data[prompt]
        assert prompt.endswith('\n\nAssistant:') and prompt.startswith('\n\nHuman:')
        assert entry.pairs == [(0, 1)]
        assert prompt + entry.responses[0] == row['chosen'] and prompt + entry.responses[1] == row['rejected']
        assert entry.sft_target == entry.reference == entry.responses[0]
        assert entry.keywords is None
    assert any(p.count('\n\nHuman:') >= 2 for p in data), 'fixture should hold multi-turn dialogues'


def test_hh_rows_with_the_same_prompt_merge(tmp_path):
    prompt = '\n\nHuman: Hi\n\nAssistant:'
    rows = [{'chosen': prompt + ' Hello!', 'rejected': prompt + ' Go away.'},
            {'chosen': prompt + ' Hi, how can I help?', 'rejected': prompt + ' Go away.'},
            {'chosen': prompt + ' Hello!', 'rejected': prompt + ' Go away.'}]
    path = tmp_path / 'train.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    data = pds.get_dataset('hh', 'train', data_file=str(tmp_path), silent=True)
    entry = data[prompt]
    assert entry.responses == [' Hello!', ' Go away.', ' Hi, how can I help?']
    assert entry.pairs == [(0, 1), (2, 1)]   # the third row repeats the first pair: counted, not added
    assert entry.sft_target == entry.reference == ' Hello!'


def test_hh_malformed_rows_are_skipped_and_counted_once(capsys):
    data = pds.get_dataset('hh', 'train', data_file=fixture('hh_malformed.jsonl'))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith('hh/train: skipped 6 of 9 rows in ') and 'hh_malformed.jsonl' in line
    for reason in ('1 missing rejected', '1 malformed row', '1 no Assistant turn', '1 chosen/rejected prompts differ',
                   '1 empty chosen', '1 empty prompt'):
        assert reason in line
    test = pds.get_dataset('hh', 'test', data_file=fixture('hh_malformed.jsonl'), silent=True)
    assert len(data) + len(test) == 3
    assert capsys.readouterr().out == ''


def test_single_file_split_is_fixed_by_split_seed_not_by_seed():
    prompts = list(load_all('hh', fixture('hh.jsonl')))
    first = pds.get_dataset('hh', 'test', seed=0, data_file=fixture('hh.jsonl'), silent=True)
    again = pds.get_dataset('hh', 'test', seed=0, data_file=fixture('hh.jsonl'), silent=True)
    assert list(first) == list(again) and len(first) == 2       # 10 % of 20 prompts
    train = pds.get_dataset('hh', 'train', seed=0, data_file=fixture('hh.jsonl'), silent=True)
    assert [p for p in prompts if p in train] == list(train)     # file order is kept
    assert not set(train) & set(first) and len(train) + len(first) == len(prompts)
    # a seed sweep keeps the test set; another split_seed draws another one
    for seed in range(1, 6):
        assert set(pds.get_dataset('hh', 'test', seed=seed, data_file=fixture('hh.jsonl'), silent=True)) == set(first)
    other_tests = [set(pds.get_dataset('hh', 'test', seed=0, split_seed=s, data_file=fixture('hh.jsonl'), silent=True))
                   for s in range(1, 6)]
    assert any(t != set(first) for t in other_tests)


def test_shp_ratio_filter_labels_and_sft_target(capsys):
    data = load_all('shp', fixture('shp.jsonl'))
    rows = read_jsonl('shp.jsonl')
    # p3 has only a pair with ratio 1.2, so its prompt is gone; p1's ratio-1.5 pair is gone too.
    assert len(data) == 4
    assert '\n\nHuman: Is it safe to eat raw cookie dough?\n\nAssistant:' not in data
    onions = data['\n\nHuman: ' + rows[0]['history'] + '\n\nAssistant:']
    assert onions.responses == [' ' + rows[0]['human_ref_A'], ' ' + rows[0]['human_ref_B'],
                                ' ' + rows[1]['human_ref_A']]
    assert onions.pairs == [(0, 1), (0, 2), (1, 2)]
    assert ' ' + rows[3]['human_ref_A'] not in onions.responses
    assert onions.sft_target == onions.reference == ' ' + rows[0]['human_ref_A']   # score 30, the highest
    basil = data['\n\nHuman: ' + rows[6]['history'] + '\n\nAssistant:']   # labels 0: B preferred
    assert basil.responses[basil.pairs[0][0]] == ' ' + rows[6]['human_ref_B']
    assert basil.sft_target == ' ' + rows[6]['human_ref_B']
    exactly_two = data['\n\nHuman: ' + rows[4]['history'] + '\n\nAssistant:']   # ratio exactly 2 is kept
    assert exactly_two.pairs == [(0, 1)]
    pds.get_dataset('shp', 'train', data_file=fixture('shp.jsonl'))
    assert 'skipped 2 of 8 rows' in capsys.readouterr().out


def jeopardy_rows(name):
    return json.load(open(fixture(name), encoding='utf-8'))


def test_jeopardy_without_wrong_answer(capsys):
    rows = jeopardy_rows('jeopardy.json')
    data = load_all('jeopardy', fixture('jeopardy.json'), seed=3)
    links = [r for r in rows if '<a href' in r['question']]
    assert len(links) == 3 and len(data) == len(rows) - 3
    pds.get_dataset('jeopardy', 'train', seed=3, data_file=fixture('jeopardy.json'))
    out = capsys.readouterr().out
    assert 'skipped 3 of 21 rows' in out and '(3 HTML link in question)' in out
    by_prompt = {}
    for r in rows:
        if r in links:
            continue
        question = r['question'][1:-1]
        prompt = (f"{r['category']}: {question}" if r['value'] == 'None'
                  else f"{r['category']}, for {r['value']}: {question}")
        by_prompt[prompt] = r
    assert set(by_prompt) == set(data)
    assert 'THE SOLAR SYSTEM: Objects that pass closer to the sun than Mercury have been named for this ' \
           'mythological figure' in data
    assert 'HISTORY, for $1,000: This Asian political party was founded in 1885 with "Indian National" as part ' \
           'of its name' in data
    for prompt, entry in data.items():
        row = by_prompt[prompt]
        assert entry.responses[0] == entry.sft_target == entry.reference == row['answer']
        assert entry.responses[1] == ''
        assert len(entry.pairs) == 1 and entry.pairs[0] in pds.JEOPARDY_PAIRS
        wrong = entry.responses[2]
        assert wrong.lower() != row['answer'].lower()
        same_category = [r['answer'] for r in by_prompt.values() if r['category'] == row['category']]
        same_board = [r['answer'] for r in by_prompt.values()
                      if (r['show_number'], r['round']) == (row['show_number'], row['round'])]
        if len(set(same_category)) > 1:
            assert wrong in same_category
        elif len(set(same_board)) > 1:
            assert wrong in same_board          # e.g. the one kept '"X"s & "O"s' clue
        else:
            assert wrong in [r['answer'] for r in by_prompt.values()]   # Final Jeopardy: any clue


def test_jeopardy_pairs_and_wrong_answers_are_seeded():
    def draws(seed):
        data = load_all('jeopardy', fixture('jeopardy.json'), seed)
        return {p: (e.pairs[0], e.responses[2]) for p, e in data.items()}
    assert draws(0) == draws(0)
    assert any(draws(seed) != draws(0) for seed in (1, 2, 3))
    pairs = [pair for seed in range(4) for pair, _ in draws(seed).values()]
    assert set(pairs) == set(pds.JEOPARDY_PAIRS)


def test_jeopardy_with_wrong_answer_field():
    rows = jeopardy_rows('jeopardy_wrong.json')
    data = load_all('jeopardy', fixture('jeopardy_wrong.json'))
    assert len(data) == len(rows)
    for row in rows:
        entry = data[f"{row['category']}, for {row['value']}: {row['question'][1:-1]}"]
        assert entry.responses == [row['answer'], '', row['wrong_answer']]
        assert entry.reference == row['answer']


def test_haikus_loader():
    with open(fixture('haiku.csv'), newline='', encoding='utf-8') as f:
        rows = list(csv.DictReader(f))
    data = load_all('haikus', fixture('haiku.csv'))
    keyword_sets = {tuple(k.strip().lower() for k in r['keywords'].split(',') if k.strip()) for r in rows}
    assert len(data) == len(keyword_sets) == len(rows) - 1      # two rows share the keywords 'night'
    night = data[pds.HAIKU_PROMPT_TEMPLATE.format(keywords='night')]
    assert night.responses == [r['text'] for r in rows if r['keywords'] == 'night']
    assert night.sft_target == night.responses[0] and night.keywords == ['night'] and night.pairs == []
    say = data[pds.HAIKU_PROMPT_TEMPLATE.format(keywords='say')]        # raw field 'say,'
    assert say.keywords == ['say']
    for prompt, entry in data.items():
        assert entry.reference is None and entry.pairs == []
        assert prompt == pds.HAIKU_PROMPT_TEMPLATE.format(keywords=', '.join(entry.keywords))
        assert all(k == k.lower().strip() for k in entry.keywords)


def test_haikus_keywords_split_on_spaces_and_commas():
    # statworx writes 'in treetop' for a haiku containing 'In a treetop': each word is a keyword
    assert pds._haiku_keywords(' Autumn Moon, frog ,, say,') == ['autumn', 'moon', 'frog', 'say']


def test_haiku_keyword_list_builds_prompts(tmp_path):
    path = tmp_path / 'words.txt'
    path.write_text('moon\nfrog\npond\nsnow\n')
    train = pds.get_dataset('haikus', 'train', seed=0, data_file=str(path))
    test = pds.get_dataset('haikus', 'test', seed=0, data_file=str(path))
    assert len(train) + len(test) == 4 and not set(train) & set(test)
    for prompt, data in {**train, **test}.items():
        assert len(data.keywords) == 2 and data.keywords[0] != data.keywords[1]
        assert prompt == pds.HAIKU_PROMPT_TEMPLATE.format(keywords=', '.join(data.keywords))
    assert pds.get_dataset('haikus', 'train', seed=0, data_file=str(path)) == train


def test_haikus_malformed_rows(capsys):
    pds.get_dataset('haikus', 'train', data_file=fixture('haiku_malformed.csv'))
    out = capsys.readouterr().out
    assert out.count('\n') == 1
    assert 'skipped 3 of 7 rows' in out
    assert '1 malformed row' in out and '1 empty keywords' in out and '1 empty text' in out


def test_user_jsonl_pairs_form_merges_rows():
    data = load_all(fixture('user_pairs.jsonl'))
    assert len(data) == 11                              # 12 rows, two share a prompt
    sums = data['What is 2+2?']
    assert sums.responses == [' 4', ' 5', ' Four.'] and sums.pairs == [(0, 1), (2, 1)]
    assert sums.sft_target == sums.reference == ' 4'    # chosen of the first pair
    color = data['Name a primary color.']
    assert color.sft_target == color.reference == ' Red.'   # explicit sft_target
    hamlet = data['Who wrote Hamlet?']
    assert hamlet.sft_target == ' William Shakespeare.' and hamlet.reference == ' Shakespeare'


def test_user_jsonl_responses_form():
    data = load_all(fixture('user_responses.jsonl'))
    ranks = data['Rank these answers to 3*3.']
    assert ranks.responses == [' 9', ' 6', ' 33', ' nine'] and ranks.pairs == [(0, 1), (0, 2), (1, 2), (3, 1)]
    assert ranks.sft_target == ' 9'
    assert data['Give a synonym for happy.'].sft_target == ' glad'
    assert data['Which is heavier, a kilo of feathers or a kilo of steel?'].sft_target == ' They weigh the same.'
    greeting = data['Write a greeting.']
    assert greeting.pairs == [] and greeting.sft_target == ' Hello there!'


def test_user_directory_uses_split_files():
    train = pds.get_dataset(fixture('user_dir'), 'train', silent=True)
    test = pds.get_dataset(fixture('user_dir'), 'test', silent=True)
    assert list(train) == ['What is the capital of Italy?', 'What is the capital of Japan?',
                           'What is the capital of Canada?']
    assert list(test) == ['What is the capital of Australia?']


def test_user_malformed_rows(capsys):
    data = load_all(fixture('user_malformed.jsonl'))
    assert sorted(data) == ['What is 1+1?', 'What is 5+1?', 'What is 7+1?']
    pds.get_dataset(fixture('user_malformed.jsonl'), 'test')
    out = capsys.readouterr().out
    assert out.count('\n') == 1 and 'skipped 7 of 10 rows' in out
    for reason in ('empty prompt', 'missing rejected', 'invalid pairs', 'prompt not a string', 'malformed row',
                   'chosen == rejected', 'invalid sft_target'):
        assert f'1 {reason}' in out


@pytest.mark.parametrize('name, file, fragments', [
    ('hh', 'hh_truncated.jsonl', ['line 4', 'invalid JSON', 'chosen, rejected']),
    ('hh', 'hh_wrong_columns.jsonl', ["no row has the field 'chosen'", 'chosen, rejected']),
    ('jeopardy', 'jeopardy_truncated.json', ['line 4', 'invalid JSON', 'category']),
    ('haikus', 'haiku_truncated.csv', ['line 7', 'invalid CSV', 'keywords, text']),
    ('haikus', 'haiku_wrong_columns.csv', ["line 1: the header lacks the column 'keywords'"]),
    ('hh', 'does_not_exist.jsonl', ['file not found', 'chosen, rejected']),
    (None, 'no_such_user_file.jsonl', ['file not found', 'prompt']),
])
def test_bad_files_raise_one_line_data_error(name, file, fragments):
    path = fixture(file)
    with pytest.raises(DataError) as info:
        if name is None:
            pds.get_dataset(path, 'train')
        else:
            pds.get_dataset(name, 'train', data_file=path)
    message = str(info.value)
    assert '\n' not in message and message.startswith(path)
    for fragment in fragments:
        assert fragment in message


def test_directory_without_split_file_raises_data_error(tmp_path):
    (tmp_path / 'test.jsonl').write_text('')
    with pytest.raises(DataError, match='train.jsonl') as info:
        pds.get_dataset('shp', 'train', data_file=str(tmp_path))
    assert str(tmp_path) in str(info.value)
    with pytest.raises(DataError, match='file is empty'):
        pds.get_dataset('shp', 'test', data_file=str(tmp_path))


def test_config_errors_for_names_splits_and_hubless_jeopardy():
    with pytest.raises(ConfigError, match='unknown dataset'):
        pds.get_dataset('imdb', 'train')
    with pytest.raises(ConfigError, match="'validation'"):
        pds.get_dataset('hh', 'validation', data_file=fixture('hh.jsonl'))
    with pytest.raises(ConfigError, match=r'dataset_files\.jeopardy=PATH'):
        pds.get_dataset('jeopardy', 'train')


# ----------------------------------------------------------------------------------------------
# Offline split


def test_split_prompts_is_deterministic_disjoint_and_covering():
    prompts = [f'prompt {i}' for i in range(50)]
    sft, pool = pds.split_prompts(prompts, 0.3, seed=7)
    assert len(sft) == 15 and len(pool) == 35
    assert not set(sft) & set(pool) and set(sft) | set(pool) == set(prompts)
    assert (sft, pool) == pds.split_prompts(prompts, 0.3, seed=7)
    assert set(pds.split_prompts(prompts, 0.3, seed=8)[0]) != set(sft)
    none, everything = pds.split_prompts(prompts, 0.0, seed=7)
    assert none == [] and sorted(everything) == sorted(prompts)


@pytest.mark.parametrize('fraction', [-0.1, 1.0, 1.5])
def test_split_prompts_rejects_fraction_outside_unit_interval(fraction):
    with pytest.raises(ConfigError, match='pretrain_fraction'):
        pds.split_prompts(['a', 'b'], fraction, seed=0)


# ----------------------------------------------------------------------------------------------
# Tokenisation


def test_tokenize_prompt_response_labels_and_eos(tokenizer):
    prompt, response = '\n\nHuman: What is a kennel?\n\nAssistant:', ' A place to leave your puppy.'
    out = pds.tokenize_prompt_response(prompt, response, tokenizer, 512, 256, 'keep_end')
    prompt_ids = tokenizer(prompt, add_special_tokens=False)['input_ids']
    response_ids = tokenizer(response, add_special_tokens=False)['input_ids']
    eos = tokenizer.eos_token_id
    assert out['prompt_input_ids'] == prompt_ids
    assert out['input_ids'] == prompt_ids + response_ids + [eos]
    assert out['attention_mask'] == [1] * len(out['input_ids'])
    assert out['labels'] == [-100] * len(prompt_ids) + response_ids + [eos]
    assert out['labels'][-1] == eos and eos not in out['input_ids'][:-1]


def test_bos_is_prepended_only_when_the_tokenizer_adds_one():
    plain = pds.tokenize_prompt_response(PROMPT_10, RESPONSE_3, word_tokenizer(False), 64, 32, 'keep_start')
    assert plain['prompt_input_ids'] == list(range(3, 13))
    with_bos = pds.tokenize_prompt_response(PROMPT_10, RESPONSE_3, word_tokenizer(True), 64, 32, 'keep_start')
    assert with_bos['prompt_input_ids'] == [1] + list(range(3, 13))
    assert with_bos['input_ids'] == [1] + list(range(3, 13)) + [13, 14, 15, 2]
    assert with_bos['labels'] == [-100] * 11 + [13, 14, 15, 2]


@pytest.mark.parametrize('add_bos, mode, prompt_ids', [
    (False, 'keep_start', [3, 4, 5, 6]),
    (False, 'keep_end', [9, 10, 11, 12]),
    (True, 'keep_start', [1, 3, 4, 5]),
    (True, 'keep_end', [1, 10, 11, 12]),      # BOS survives keep_end truncation
])
def test_truncation_keep_start_and_keep_end(add_bos, mode, prompt_ids):
    out = pds.tokenize_prompt_response(PROMPT_10, RESPONSE_3, word_tokenizer(add_bos), max_length=8,
                                       max_prompt_length=4, truncation_mode=mode)
    assert out['prompt_input_ids'] == prompt_ids
    assert out['input_ids'] == prompt_ids + [13, 14, 15, 2]
    assert out['labels'] == [-100] * 4 + [13, 14, 15, 2]


def test_short_prompt_is_not_truncated_but_long_response_is():
    long_response = ' '.join(f'r{i}' for i in range(10))        # 10 tokens + EOS
    out = pds.tokenize_prompt_response('p0 p1', long_response, word_tokenizer(False), max_length=8,
                                       max_prompt_length=4, truncation_mode='keep_end')
    assert out['input_ids'] == [3, 4] + list(range(13, 19))       # response cut to 6 tokens, EOS gone
    assert len(out['input_ids']) == 8


@pytest.mark.parametrize('mode', pds.TRUNCATION_MODES)
@pytest.mark.parametrize('add_bos', [False, True])
def test_total_length_never_exceeds_max_length(mode, add_bos):
    tok = word_tokenizer(add_bos)
    prompt = ' '.join(f'p{i % 10}' for i in range(40))
    response = ' '.join(f'r{i % 10}' for i in range(40))
    for max_length, max_prompt_length in ((8, 4), (8, 7), (12, 1), (30, 20)):
        out = pds.tokenize_prompt_response(prompt, response, tok, max_length, max_prompt_length, mode)
        assert len(out['input_ids']) == len(out['labels']) == max_length
        assert len(out['prompt_input_ids']) == max_prompt_length
        assert out['labels'].count(-100) == max_prompt_length


def test_invalid_lengths_raise_config_error():
    tok = word_tokenizer(False)
    with pytest.raises(ConfigError, match='max_prompt_length'):
        pds.tokenize_prompt_response(PROMPT_10, RESPONSE_3, tok, 8, 8, 'keep_end')
    with pytest.raises(ConfigError, match='truncation_mode'):
        pds.tokenize_prompt_response(PROMPT_10, RESPONSE_3, tok, 8, 4, 'keep_middle')


def test_tokenize_element_pair_shares_prompt_and_sft_has_only_chosen():
    tok = word_tokenizer(False)
    pair = pds.tokenize_element(PROMPT_10, 'r0', 'r0 r1 r2 r3 r4', tok, 10, 4, 'keep_end', sft_target='r0')
    # The longer (rejected) response forces the prompt cut for both.
    assert pair['prompt_input_ids'] == [9, 10, 11, 12] and pair['prompt_attention_mask'] == [1] * 4
    assert pair['chosen_input_ids'] == [9, 10, 11, 12, 13, 2]
    assert pair['rejected_input_ids'] == [9, 10, 11, 12, 13, 14, 15, 16, 17, 2]
    assert pair['chosen_labels'] == [-100] * 4 + [13, 2]
    assert (pair['prompt'], pair['chosen'], pair['rejected']) == (PROMPT_10, 'r0', 'r0 r1 r2 r3 r4')
    assert pair['sft_target'] == 'r0'
    sft = pds.tokenize_element('p0 p1', None, None, tok, 10, 4, 'keep_end', sft_target='r5')
    assert sft['chosen'] == 'r5' and sft['chosen_input_ids'] == [3, 4, 18, 2]
    assert not any(key.startswith('rejected') for key in sft)


def test_collate_repads_a_subset_to_its_own_longest():
    tok = word_tokenizer(False)
    responses = ['r0', 'r0 r1 r2 r3 r4 r5', 'r1 r2']
    elements = [pds.tokenize_element(p, c, 'r9', tok, 32, 16, 'keep_start') for p, c in
                zip(['p0', 'p0 p1 p2', 'p3'], responses)]
    for i, element in enumerate(elements):
        element['reference_chosen_logps'] = -1.5 * i
    full = pds.collate(elements, pad_token_id=0)
    assert full['chosen_input_ids'].shape == (3, 10) and full['chosen_input_ids'].dtype == torch.long
    subset = pds.collate([elements[0], elements[2]], pad_token_id=0)
    assert subset['chosen_input_ids'].shape == (2, 4)
    assert subset['chosen_input_ids'].tolist() == [[3, 13, 2, 0], [6, 14, 15, 2]]
    assert subset['chosen_attention_mask'].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert subset['chosen_labels'].tolist() == [[-100, 13, 2, -100], [-100, 14, 15, 2]]
    assert full['prompt_input_ids'].tolist() == [[0, 0, 3], [3, 4, 5], [0, 0, 6]]   # prompts left-padded
    assert full['prompt_attention_mask'].tolist() == [[0, 0, 1], [1, 1, 1], [0, 0, 1]]
    assert full['reference_chosen_logps'].dtype == torch.float32
    assert full['reference_chosen_logps'].tolist() == [0.0, -1.5, -3.0]
    assert full['chosen'] == responses and full['prompt'] == ['p0', 'p0 p1 p2', 'p3']


# ----------------------------------------------------------------------------------------------
# Iterators


def test_iterate_elements_skips_eos_text_and_reports_once(tmp_path, tokenizer, capsys):
    shutil.copy(fixture('user_eos.jsonl'), tmp_path / 'train.jsonl')
    name = str(tmp_path)
    elements = list(loaded_elements([name], tokenizer, 'train', seed=0, shuffle=False, max_length=64,
                                         max_prompt_length=32, sft_mode=False, n_epochs=2))
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f'{name}/train: skipped 2 of 6 elements (2 EOS in text)']
    assert len(elements) == 8                                   # 4 usable elements, 2 epochs
    eos = tokenizer.eos_token_id
    for element in elements:
        assert '</s>' not in element['prompt'] + element['chosen'] + element['rejected']
        for key in ('chosen_input_ids', 'rejected_input_ids'):
            assert element[key].count(eos) == 1 and element[key][-1] == eos
    sft = list(loaded_elements([name], tokenizer, 'train', seed=0, shuffle=False, max_length=64,
                                    max_prompt_length=32, sft_mode=True, n_epochs=1))
    assert len(sft) == 4 and 'skipped 2 of 6 elements' in capsys.readouterr().out


def sequence(tokenizer, **overrides):
    return [(e['prompt'], e['chosen'], e['rejected'])
            for e in loaded_elements(['hh'], tokenizer, 'train', **dpo_kwargs(**overrides))]


def test_iterate_elements_is_deterministic_for_a_seed(tokenizer):
    first = sequence(tokenizer, n_epochs=1)
    assert first == sequence(tokenizer, n_epochs=1)
    assert len(first) == 18 and len(set(first)) == 18
    assert first != sequence(tokenizer, n_epochs=1, seed=1)
    in_file_order = sequence(tokenizer, n_epochs=1, shuffle=False)
    assert sorted(first) == sorted(in_file_order) and first != in_file_order
    assert [p for p, _, _ in in_file_order] == list(pds.get_dataset('hh', 'train', data_file=fixture('hh.jsonl'),
                                                                     silent=True))


def test_elements_carry_dataset_reference_and_sft_target(tokenizer):
    element = next(loaded_elements(['hh'], tokenizer, 'train', **dpo_kwargs(n_examples=1)))
    data = pds.get_dataset('hh', 'train', data_file=fixture('hh.jsonl'), silent=True)[element['prompt']]
    assert element['dataset'] == 'hh' and element['reference'] == data.reference == element['chosen']
    assert element['keywords'] is None and element['sft_target'] == data.sft_target


def test_skip_examples_gives_the_suffix_of_the_same_sequence(tokenizer):
    def prompts_of(skip):
        batches = loaded_batches(['hh'], tokenizer, 'train', 4, pad_token_id=tokenizer.pad_token_id,
                                         skip_examples=skip, **dpo_kwargs(n_examples=30))
        return [(prompt, len(batch['prompt'])) for batch in batches for prompt in batch['prompt']]
    full = prompts_of(0)
    assert [size for _, size in full] == [4] * 28 + [2] * 2        # the last, partial batch is yielded
    resumed = prompts_of(11)
    assert [p for p, _ in resumed] == [p for p, _ in full][11:]


def test_prompt_subsets_are_disjoint_and_cover(tokenizer):
    def prompts(subset):
        return {e['prompt'] for e in loaded_elements(['hh'], tokenizer, 'train', **dpo_kwargs(
            n_epochs=1, prompt_subset=subset, pretrain_fraction=0.3))}
    sft, pool, everything = prompts('sft'), prompts('pool'), prompts('all')
    assert len(sft) == round(0.3 * 18) and not sft & pool and sft | pool == everything
    expected_sft, _ = pds.split_prompts(list(pds.get_dataset('hh', 'train', data_file=fixture('hh.jsonl'),
                                                             silent=True)), 0.3, seed=0)
    assert sft == set(expected_sft)
    with pytest.raises(ConfigError, match='prompt_subset'):
        loaded_elements(['hh'], tokenizer, 'train', **dpo_kwargs(n_epochs=1, prompt_subset='rest'))
    with pytest.raises(ConfigError, match='pretrain_fraction'):
        loaded_elements(['hh'], tokenizer, 'train', **dpo_kwargs(n_epochs=1, prompt_subset='sft',
                                                                      pretrain_fraction=1.0))


def test_n_examples_stops_exactly_and_epochs_are_permutations(tokenizer):
    elements = sequence(tokenizer, n_examples=40)
    assert len(elements) == 40
    assert sorted(elements[:18]) == sorted(elements[18:36])     # each epoch is one pass over every element
    assert elements[:18] != elements[18:36]                     # with a fresh permutation
    assert len(sequence(tokenizer, n_examples=5)) == 5
    assert sequence(tokenizer, n_examples=5) == elements[:5]
    assert len(sequence(tokenizer, n_epochs=2)) == 36
    assert sequence(tokenizer, n_epochs=2)[:18] == elements[:18]


def test_budget_rules(tokenizer):
    with pytest.raises(ConfigError, match='n_epochs / n_examples'):
        loaded_elements(['hh'], tokenizer, 'train', **dpo_kwargs())
    with pytest.raises(ConfigError, match='n_epochs / n_examples'):
        loaded_elements(['hh'], tokenizer, 'train', **dpo_kwargs(n_epochs=1, n_examples=3))
    one_pass = list(loaded_elements(['hh'], tokenizer, 'test', **dpo_kwargs()))
    assert len(one_pass) == 2


def test_sft_mode_haikus_one_element_per_prompt(tokenizer):
    data = pds.get_dataset('haikus', 'train', data_file=fixture('haiku.csv'), silent=True)
    elements = list(loaded_elements(['haikus'], tokenizer, 'train', seed=0, shuffle=True, max_length=128,
                                         max_prompt_length=64, sft_mode=True, n_epochs=1,
                                         data_files={'haikus': fixture('haiku.csv')}))
    assert len(elements) == len(data)
    for element in elements:
        entry = data[element['prompt']]
        assert element['chosen'] == entry.sft_target and element['keywords'] == entry.keywords
        assert element['reference'] is None and 'rejected_input_ids' not in element



def test_dataset_without_pairs_yields_nothing_in_dpo_mode(tokenizer, capsys):
    # Online haiku runs still build (empty) DPO eval batches, so this must not raise; an n_examples
    # budget must not loop forever over empty epochs either.
    batches = loaded_batches(['haikus'], tokenizer, 'train', 4, pad_token_id=tokenizer.pad_token_id,
                                     seed=0, shuffle=True, max_length=128, max_prompt_length=64, sft_mode=False,
                                     n_examples=10, data_files={'haikus': fixture('haiku.csv')})
    assert list(batches) == []
    assert 'haikus/train: no usable preference-pair elements' in capsys.readouterr().out


def test_prompt_format_applies_before_tokenisation_and_eos_check_uses_raw_text(tmp_path, tokenizer, capsys):
    shutil.copy(fixture('user_eos.jsonl'), tmp_path / 'train.jsonl')
    template = lambda prompt: f'<s>User: {prompt}</s>Assistant:'   # holds the EOS string on purpose
    elements = list(loaded_elements([str(tmp_path)], tokenizer, 'train', seed=0, shuffle=False, max_length=96,
                                         max_prompt_length=64, sft_mode=False, n_epochs=1, prompt_format=template))
    assert len(elements) == 4 and 'skipped 2 of 6 elements' in capsys.readouterr().out
    first = elements[0]
    assert first['prompt'] == template('What comes after Monday?')
    assert first['prompt_input_ids'] == tokenizer(first['prompt'], add_special_tokens=False)['input_ids']


def test_training_texts_cover_train_prompts_and_responses():
    files = {'hh': fixture('hh.jsonl'), 'jeopardy': fixture('jeopardy.json')}
    texts = pds.training_texts(pds.load_datasets(['hh', 'jeopardy'], 'train', data_files=files, silent=True))
    reordered = pds.training_texts(pds.load_datasets(['jeopardy', 'hh'], 'train', data_files=files, silent=True))
    assert set(texts) == set(reordered) and texts != reordered   # the same corpus; build_tiny_tokenizer sorts it
    hh = pds.get_dataset('hh', 'train', data_file=fixture('hh.jsonl'), silent=True)
    prompt, entry = next(iter(hh.items()))
    assert texts[:3] == [prompt] + entry.responses
    assert len(texts) == len(set(texts)) and '' not in texts


def test_several_datasets_concatenate(tokenizer):
    files = {'hh': fixture('hh.jsonl'), 'jeopardy': fixture('jeopardy.json')}
    elements = list(loaded_elements(['hh', 'jeopardy'], tokenizer, 'train', **dpo_kwargs(
        n_epochs=1, data_files=files)))
    counts = {name: sum(e['dataset'] == name for e in elements) for name in files}
    assert counts == {'hh': 18, 'jeopardy': 16}
    jeopardy = pds.get_dataset('jeopardy', 'train', data_file=files['jeopardy'], silent=True)
    for element in elements:
        if element['dataset'] == 'jeopardy':
            assert element['reference'] == jeopardy[element['prompt']].responses[0]


def test_iterate_prompts_order_and_budget(tokenizer, tmp_path, capsys):
    files = {'jeopardy': fixture('jeopardy.json')}
    first = [(n, p) for n, p, _ in loaded_prompts(['jeopardy'], 'train', seed=4, shuffle=True, n_examples=20,
                                                      data_files=files)]
    assert len(first) == 20 and len(set(first[:16])) == 16
    again = loaded_prompts(['jeopardy'], 'train', seed=4, shuffle=True, n_examples=20, data_files=files)
    assert [(n, p) for n, p, _ in again] == first
    name, prompt, data = next(loaded_prompts(['jeopardy'], 'test', seed=4, shuffle=False, data_files=files))
    assert name == 'jeopardy' and data.reference == data.responses[0]
    shutil.copy(fixture('user_eos.jsonl'), tmp_path / 'train.jsonl')
    capsys.readouterr()
    prompts = [p for _, p, _ in loaded_prompts([str(tmp_path)], 'train', seed=0, shuffle=False, n_epochs=1,
                                                    tokenizer=tokenizer)]
    assert len(prompts) == 5 and 'Repeat </s> please.' not in prompts
    assert 'skipped 1 of 6 prompts (1 EOS in text)' in capsys.readouterr().out


def test_hub_path_uses_both_splits_or_splits_a_single_one(monkeypatch):
    """The hub code path with `datasets.load_dataset` replaced by in-memory datasets (no network)."""
    import datasets
    hh_rows = read_jsonl('hh.jsonl')
    with open(fixture('haiku.csv'), newline='', encoding='utf-8') as f:
        haiku_rows = list(csv.DictReader(f))
    hub = {'Anthropic/hh-rlhf': datasets.DatasetDict({'train': datasets.Dataset.from_list(hh_rows[:15]),
                                                      'test': datasets.Dataset.from_list(hh_rows[15:])}),
           'statworx/haiku': datasets.DatasetDict({'train': datasets.Dataset.from_list(haiku_rows)})}
    calls = []

    def fake_load_dataset(path, cache_dir=None):
        calls.append((path, cache_dir))
        if path not in hub:
            raise ConnectionError('offline')
        return hub[path]

    monkeypatch.setattr(datasets, 'load_dataset', fake_load_dataset)
    assert len(pds.get_dataset('hh', 'train', cache_dir='/cache')) == 15
    assert len(pds.get_dataset('hh', 'test')) == 5
    assert calls[0] == ('Anthropic/hh-rlhf', '/cache')
    train, test = pds.get_dataset('haikus', 'train'), pds.get_dataset('haikus', 'test')
    assert len(train) + len(test) == 28 and not set(train) & set(test)
    assert dict(train) == pds.get_dataset('haikus', 'train', data_file=fixture('haiku.csv'), silent=True)
    with pytest.raises(DataError, match=r'stanfordnlp/SHP: cannot load .*dataset_files\.shp=PATH'):
        pds.get_dataset('shp', 'train')
