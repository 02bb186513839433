import re

import numpy as np
import pytest

from tinyllm.data import (AGE_RANGE, ATTRIBUTES, CITIES, COLORS, JOBS, NAMES, PET_NAMES, PETS, TEMPLATES, World,
                          fact_recall_examples, fact_sentence, get_batch, make_corpus, split_corpus,
                          unigram_loss)
from tinyllm.tokenizer import default_tokenizer


@pytest.fixture(scope="module")
def corpus(world):
    return make_corpus(world)


def test_world_is_deterministic_for_a_seed():
    assert World(seed=3).people == World(seed=3).people
    assert World(seed=3).people != World(seed=4).people


def test_world_values_come_from_the_lists(world):
    assert len(set(world.names)) == len(world) == 24
    assert len({p.pet_name for p in world.people}) == len(world)
    for p in world.people:
        assert p.name in NAMES and p.city in CITIES and p.job in JOBS and p.pet in PETS
        assert p.pet_name in PET_NAMES and p.color in COLORS and AGE_RANGE[0] <= p.age < AGE_RANGE[1]
        assert world[p.name] is p


def test_word_lists_do_not_overlap():
    # a name that is also a city or a pet name would make facts ambiguous
    lists = [NAMES, PET_NAMES, CITIES, JOBS, PETS, COLORS]
    words = [w for lst in lists for w in lst]
    assert len(words) == len(set(words))


@pytest.mark.parametrize("n", [1, len(PET_NAMES) + 1])
def test_world_size_is_checked(n):
    with pytest.raises(ValueError, match="n_people"):
        World(n_people=n)


def test_every_paraphrase_states_the_value(world):
    p = world.people[0]
    for attr in ATTRIBUTES:
        for k in range(len(TEMPLATES[attr])):
            sentence = fact_sentence(p, attr, k)
            assert p.name in sentence and str(getattr(p, attr)) in sentence and sentence.endswith(".")


def test_corpus_is_deterministic_and_sized(world, corpus):
    assert make_corpus(world) == corpus
    assert make_corpus(world, seed=1) != corpus
    longest_doc = max(len(doc) for doc in corpus.splitlines(keepends=True))
    assert 300_000 <= len(corpus) < 300_000 + longest_doc
    assert corpus.endswith("\n") and "\n\n" not in corpus
    assert make_corpus(world, n_docs=7).count("\n") == 7


def test_corpus_is_encodable(corpus):
    tok = default_tokenizer()
    assert tok.decode(tok.encode(corpus)) == corpus


def test_fact_recall_covers_every_fact_as_the_corpus_says_it(world, corpus):
    examples = fact_recall_examples(world)
    assert len(examples) == len(world) * len(ATTRIBUTES)
    assert len({prompt for prompt, _ in examples}) == len(examples)
    for prompt, answer in examples:
        assert answer.startswith(" ") and answer.endswith(".")
        assert prompt + answer in corpus


def test_cloze_prompts_are_unambiguous_in_the_corpus(world, corpus):
    # wherever the corpus says "mia lives in", it goes on " oslo.", so recall has one right answer
    for prompt, answer in fact_recall_examples(world):
        ends = [m.end() for m in re.finditer(r"(?<![a-z])" + re.escape(prompt), corpus)]
        assert ends and {corpus[e:e + len(answer)] for e in ends} == {answer}


def test_every_person_is_written_about_evenly(world, corpus):
    counts = [corpus.count(name + " ") for name in world.names]
    assert min(counts) > 0.5 * max(counts)


def test_split_corpus_on_document_boundaries(corpus):
    train, val = split_corpus(corpus, val_fraction=0.1)
    assert train + val == corpus
    assert train.endswith("\n") and val.endswith("\n")
    assert 0.05 < len(val) / len(corpus) < 0.15
    with pytest.raises(ValueError):
        split_corpus(corpus, val_fraction=1.0)
    with pytest.raises(ValueError):
        split_corpus("one document only\n")


def test_get_batch_windows_are_shifted_by_one():
    data = np.arange(100) * 2
    x, y = get_batch(data, batch_size=8, block_size=10, rng=np.random.default_rng(0))
    assert x.shape == y.shape == (8, 10) and x.dtype == y.dtype == np.int64
    assert np.array_equal(x[:, 1:], y[:, :-1])
    assert np.array_equal(y, x + 2)                 # contiguous windows of data, y one step later
    x2, _ = get_batch(data, 8, 10, np.random.default_rng(0))
    assert np.array_equal(x, x2)


def test_get_batch_can_reach_the_last_token():
    data = np.arange(11)
    x, y = get_batch(data, batch_size=4, block_size=10, rng=np.random.default_rng(0))
    assert np.array_equal(x[0], data[:10]) and np.array_equal(y[0], data[1:])


def test_get_batch_needs_enough_data():
    with pytest.raises(ValueError, match="block_size"):
        get_batch(np.arange(10), batch_size=2, block_size=10, rng=np.random.default_rng(0))


def test_unigram_loss():
    assert unigram_loss(np.arange(64), 64) == pytest.approx(np.log(64))
    assert unigram_loss(np.zeros(50, dtype=np.int64), 64) == pytest.approx(0.0)


def test_corpus_unigram_loss_is_below_uniform(corpus):
    loss = unigram_loss(default_tokenizer().encode(corpus), 64)
    assert 1.0 < loss < np.log(64)
