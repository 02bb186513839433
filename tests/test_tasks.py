import re
from types import SimpleNamespace

import numpy as np
import pytest

from tinyllm.data import NAMES, fact_recall_examples, make_corpus
from tinyllm.tasks import (IGNORE_INDEX, TASKS, Task, encode_examples, evaluate, few_shot_prompt,
                           few_shot_task, get_task, iterate_batches, label_scores, sample_batch, split_people)
from tinyllm.tokenizer import default_tokenizer

TOK = default_tokenizer()


class LookupModel:
    """A fake GPT that knows some texts by heart: at the last position its logits pick the next character
    of a known text that starts with the context, and id 0 ("\\n") when none does."""

    def __init__(self, texts, block_size=256):
        self.config = SimpleNamespace(block_size=block_size, vocab_size=TOK.vocab_size)
        self.next_char = {}
        for text in texts:
            for i in range(1, len(text)):
                self.next_char.setdefault(text[:i], text[i])
        self.generate_calls = 0

    def forward(self, idx, targets=None):
        logits = np.zeros(idx.shape + (TOK.vocab_size,))
        for b, row in enumerate(idx):
            nxt = self.next_char.get(TOK.decode(row))
            if nxt is not None:
                logits[b, -1, TOK.encode(nxt)[0]] = 10.0
        return logits, None

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, seed=None):
        assert temperature == 0, "evaluate must decode greedily"
        self.generate_calls += 1
        for _ in range(max_new_tokens):
            logits, _ = self.forward(idx)
            idx = np.concatenate([idx, logits[:, -1].argmax(-1)[:, None]], axis=1)
        return idx


def knows(examples):
    return LookupModel([p + a for p, a in examples])


@pytest.fixture(scope="module")
def tasks(world):
    return {name: get_task(name, world) for name in TASKS}


def mentions(text, name):
    return re.search(rf"\b{name}\b", text) is not None

# ----------------------------------------------------------------------------------------------------
# the tasks


def test_tasks_are_deterministic_for_a_seed(world, tasks):
    for name, task in tasks.items():
        again = get_task(name, world, seed=0)
        assert (again.train, again.val, again.test) == (task.train, task.val, task.test)
        other = get_task(name, world, seed=1)
        assert other.train != task.train


def test_unknown_task_lists_the_valid_names(world):
    with pytest.raises(ValueError, match="record.*qa.*classify"):
        get_task("summarise", world)


def test_every_example_is_encodable_and_ends_in_a_newline(tasks):
    for task in tasks.values():
        assert task.train and task.val and task.test
        for prompt, answer in task.train + task.val + task.test:
            TOK.encode(prompt + answer)
            assert answer.startswith(" ") and answer.endswith("\n") and answer.count("\n") == 1


def test_splits_share_no_prompt(tasks):
    for task in tasks.values():
        train, val, test = ({p for p, _ in split} for split in (task.train, task.val, task.test))
        assert not (train & val or train & test or val & test)


@pytest.mark.parametrize("name", ["qa", "classify"])
def test_held_out_people_never_appear_in_fine_tuning_data(world, tasks, name):
    train_names, val_names, test_names = split_people(world)
    assert sorted(train_names + val_names + test_names) == sorted(world.names)
    task = tasks[name]
    for held_out, split in ((test_names, task.test), (val_names, task.val)):
        assert {n for n in world.names if any(mentions(p, n) for p, _ in split)} == set(held_out)
        for person in held_out:
            assert not any(mentions(p + a, person) for p, a in task.train)


def test_held_out_facts_are_in_the_pretraining_corpus(world, tasks):
    corpus = make_corpus(world)
    _, _, test_names = split_people(world)
    for prompt, answer in fact_recall_examples(world):
        if prompt.split()[0].split("'")[0] in test_names:
            assert prompt + answer in corpus


def test_qa_answers_are_the_facts(world, tasks):
    for prompt, answer in tasks["qa"].test:
        person = world[next(n for n in world.names if mentions(prompt, n))]
        assert answer.strip() in {str(getattr(person, a)) for a in ("city", "job", "pet", "pet_name", "age", "color")}


def test_classify_is_balanced(tasks):
    task = tasks["classify"]
    assert task.kind == "classify" and set(task.labels) == {" true\n", " false\n"}
    for split in (task.train, task.val, task.test):
        answers = [a for _, a in split]
        assert answers.count(" true\n") == answers.count(" false\n") == len(split) // 2


@pytest.mark.parametrize("name, sep, eq", [("record", ", ", " "), ("record_symbols", "|", "=")])
def test_record_fields_come_from_the_prompt(world, name, sep, eq):
    for prompt, answer in get_task(name, world).train[:300]:
        fields = dict(item.split(eq) for item in answer.strip().split(sep))
        assert list(fields)[0] == "name" and 3 <= len(fields) <= 4
        assert all(mentions(prompt, value) for value in fields.values())
        assert fields["name"] not in NAMES            # invented people: no clash with the world's facts

# ----------------------------------------------------------------------------------------------------
# encoding and batching


def test_encode_examples_targets_only_the_answers(tasks):
    examples = tasks["record"].test[:50]
    idx, targets = encode_examples(TOK, examples, block_size=128)
    lengths = [len(p) + len(a) for p, a in examples]
    assert idx.shape == targets.shape == (50, max(lengths) - 1) and idx.dtype == targets.dtype == np.int64
    for n, (prompt, answer) in enumerate(examples):
        answered = targets[n] != IGNORE_INDEX
        assert TOK.decode(targets[n][answered]) == answer                     # every answer token, in order
        assert np.flatnonzero(answered).tolist() == list(range(len(prompt) - 1, lengths[n] - 1))
        assert TOK.decode(idx[n][:lengths[n] - 1]) == (prompt + answer)[:-1]
        assert np.all((idx[n] >= 0) & (idx[n] < TOK.vocab_size))              # padding is a valid id


def test_encode_examples_rejects_examples_longer_than_the_context():
    examples = [("ab", "c\n"), ("a" * 10, "b\n")]
    encode_examples(TOK, examples, block_size=11)                              # 12 tokens: T = 11 fits
    with pytest.raises(ValueError, match=r"example 1 has 12 tokens.*block_size 10"):
        encode_examples(TOK, examples, block_size=10)


def test_batches_cover_every_example_and_trim_only_padding(tasks):
    idx, targets = encode_examples(TOK, tasks["qa"].train, block_size=128)
    pad = TOK.encode("\n")[0]
    rows = []
    for x, y in iterate_batches(idx, targets, batch_size=32, rng=np.random.default_rng(0)):
        assert x.shape == y.shape and x.shape[0] <= 32
        assert (y[:, -1] != IGNORE_INDEX).any()                                # trimmed to the last answer
        full = np.pad(x, ((0, 0), (0, idx.shape[1] - x.shape[1])), constant_values=pad)
        rows += [tuple(r) for r in full]
    assert sorted(rows) == sorted(tuple(r) for r in idx)                        # each example once, intact
    x, y = sample_batch(idx, targets, 16, np.random.default_rng(0))
    assert x.shape[0] == 16 and x.shape[1] <= idx.shape[1]

# ----------------------------------------------------------------------------------------------------
# evaluation


def test_a_model_that_knows_the_answers_scores_one(tasks):
    for task in tasks.values():
        result = evaluate(knows(task.test), TOK, task)
        assert result["accuracy"] == 1.0 and result["n"] == len(task.test)
        assert result["predictions"] == [a for _, a in task.test]


def test_accuracy_counts_exactly_the_known_answers(tasks):
    task = tasks["qa"]
    known = task.test[::3]
    result = evaluate(knows(known), TOK, task)
    assert result["correct"] == [ex in known for ex in task.test]
    assert result["accuracy"] == pytest.approx(len(known) / len(task.test))


def test_generation_must_stop_after_the_answer():
    examples = [("q: a?\na:", " oslo\n"), ("q: b?\na:", " rome\n")]
    model = LookupModel(["q: a?\na: oslo\nmore text", "q: b?\na: rome city\n"])
    assert evaluate(model, TOK, examples)["correct"] == [True, False]


def test_prompts_of_one_length_share_one_generate_call(tasks):
    test = tasks["qa"].test
    model = knows(test)
    evaluate(model, TOK, test, batch_size=1000)
    assert model.generate_calls == len({len(p) for p, _ in test})


def test_classify_scores_the_labels(tasks):
    task = tasks["classify"]
    flip = {" true\n": " false\n", " false\n": " true\n"}
    assert evaluate(knows([(p, flip[a]) for p, a in task.test]), TOK, task)["accuracy"] == 0.0
    scores = label_scores(knows(task.test), TOK, [p for p, _ in task.test], task.labels)
    assert scores.shape == (len(task.test), 2)
    # a model that knows nothing ties, picks the first label, and is right half the time (balanced classes)
    assert evaluate(LookupModel([]), TOK, task)["accuracy"] == 0.5


def test_fact_recall_can_be_evaluated(world):
    examples = fact_recall_examples(world)
    assert evaluate(knows(examples), TOK, examples)["accuracy"] == 1.0
    assert evaluate(LookupModel([]), TOK, examples)["accuracy"] == 0.0


def test_prompts_that_do_not_fit_are_rejected(tasks):
    with pytest.raises(ValueError, match="block_size"):
        evaluate(LookupModel([], block_size=20), TOK, tasks["qa"])
    with pytest.raises(ValueError, match="block_size"):
        evaluate(LookupModel([], block_size=20), TOK, tasks["classify"])

# ----------------------------------------------------------------------------------------------------
# few-shot prompting


def test_few_shot_prompt(tasks):
    task = tasks["qa"]
    query = task.test[0][0]
    prompt = few_shot_prompt(task, query, k=3, seed=0)
    assert prompt.endswith(query) and prompt.count("\nanswer") == 4
    shots = prompt[:-len(query)]
    assert sum((p + a) in shots for p, a in task.train) == 3
    assert len(TOK.encode(prompt)) == len(prompt)
    assert few_shot_prompt(task, query, k=0) == query
    assert few_shot_prompt(task, query, k=3, seed=0) == prompt


def test_few_shot_task_evaluates_like_its_task(tasks):
    shot = few_shot_task(tasks["classify"], k=1)
    assert isinstance(shot, Task) and shot.kind == "classify" and shot.train == tasks["classify"].train
    assert evaluate(knows(shot.test), TOK, shot)["accuracy"] == 1.0


SEEN_ENOUGH = 50   # occurrences in the pretraining text


def test_lab_tasks_use_only_characters_pretraining_showed():
    """Every character of every prompt and answer of every lab task occurs at least SEEN_ENOUGH times in the
    pretraining text, so its embedding and its row of the tied head were trained. Why 50: the rarest such
    character, 'x', occurs about 50 times and the pretrained model predicts it in held-out text at about
    3 nats, near the rest (median 0.7); a character it never saw costs 11-21 nats (lesson 17). The record task
    written with '=' and '|' (record_symbols) is the counter-example lesson 17 is about."""
    from collections import Counter
    from tinyllm.data import corpus_splits
    from tinyllm.pretrain import PRETRAIN_DATA
    from tinyllm.tasks import TASKS
    world, train_text, _ = corpus_splits(PRETRAIN_DATA)
    counts = Counter(train_text)
    for name in TASKS:
        task = get_task(name, world)
        chars = {c for split in (task.train, task.val, task.test) for p, a in split for c in p + a}
        rare = sorted((counts[c], c) for c in chars if counts[c] < SEEN_ENOUGH)
        assert not rare, f"{name} uses characters pretraining rarely or never showed: {rare}"
    symbols = get_task("record_symbols", world)
    assert {c for _, a in symbols.train for c in a if counts[c] == 0} == {"=", "|"}
