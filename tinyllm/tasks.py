"""Fine-tuning tasks built on the world of data.py, and how to encode, batch and evaluate them.

Every example is a (prompt, answer) pair of strings. Fine-tuning trains on prompt + answer with the loss on
the answer tokens only (targets are -100 everywhere else), as instruction tuning does. Every answer ends in
"\\n", so greedy decoding knows where to stop.

- extract:  read one field off a sentence about an invented person (the lab's default task).
            "kim is a baker, owns a cat and loves pink.\\njob" -> " baker\\n"
- record:   rewrite the sentence as a record, in a fixed order: a harder change of format.
            "kim is 31 and lives in rome.\\nrecord" -> " name kim, city rome, age 31\\n"
- qa:       answer from pretraining knowledge. "where does mia live\\nanswer" -> " oslo\\n"
            Split by people: the test people's facts are in the corpus but in no fine-tuning example.
- classify: true or false, beyond generation. "mia lives in oslo.\\ntrue or false" -> " true\\n"
            Scored like a classifier head: the logits of the label tokens at one position.

Legend: N = number of examples, T = longest example minus one, B = batch size, V = vocab size.
"""
import os
import re
from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np

from .data import (AGE_RANGE, ATTRIBUTES, TEMPLATES, VALUES, _pick, fact_sentence, invented_person, state)
from .layers import IGNORE_INDEX   # a target the loss skips
from .parallel import cores, parallel_map
from .model import is_int

MAX_EXAMPLE_CHARS = 100     # prompt + answer; leaves room in a 128-token context for prefix/prompt tokens


@dataclass(repr=False)
class Task:
    """A task's three splits of (prompt, answer) and how to judge an answer (kind, labels)."""
    name: str
    kind: str           # "generate": exact match of greedy decoding; "classify": the best-scored label
    train: list         # lists of (prompt, answer)
    val: list
    test: list
    labels: tuple = ()  # classify only: every possible answer
    format: str = ""    # generate only: a regular expression every answer matches (the task's structure)

    def __repr__(self):
        return (f"Task(name={self.name!r}, kind={self.kind!r}, train={len(self.train)}, "
                f"val={len(self.val)}, test={len(self.test)}, labels={self.labels!r})")


def split_people(world, seed=0, val_fraction=0.125, test_fraction=0.25):
    """Split the world's people into (train_names, val_names, test_names), at random for a seed."""
    names = world.names
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    n_test = max(1, round(test_fraction * len(world)))
    n_val = max(1, round(val_fraction * len(world)))
    if n_test + n_val >= len(world):
        raise ValueError(f"a world of {len(world)} people is too small to split into train, val and test")
    return order[n_test + n_val:], order[n_test:n_test + n_val], order[:n_test]


def _other_value(attr, true_value, rng):
    """A random value for attr that differs from true_value."""
    pool = range(*AGE_RANGE) if attr == "age" else VALUES[attr]
    return _pick(rng, [v for v in pool if v != true_value])

# ----------------------------------------------------------------------------------------------------
# the tasks
#
# Their prompts and answers use only characters the pretraining text is full of (letters, digits, space,
# '.', ',', "'" and the newline). A character pretraining never showed has an untrained input embedding,
# and with the tied LM head an output row that was only ever pushed down: every method then starts
# far behind, and only one that may train that row (full fine-tuning) can catch up. A comparison on such
# a task measures who may train a new symbol, not the methods; record_symbols keeps that effect for the
# lesson that shows it (lessons/17_new_tokens.py), and tests check every lab task against the corpus.

RECORD_FIELDS = ("city", "job", "age", "pet", "color")    # the order of the fields in a record
EXTRACT_FIELDS = ("city", "job", "pet", "color")          # words the pretrained model knows; no ages to copy


def _invented_person(rng, fields):
    """An invented person (data.INVENTED_NAMES: training on it never contradicts pretraining) with 2 or 3
    of the fields, and a sentence stating them: ('kim', {'job': 'baker', 'pet': 'cat'}, 'kim owns a cat
    and is a baker.')."""
    name, values = invented_person(rng, fields)
    return name, values, state(name, values, rng)


def _extract_example(rng):
    """Read one field off a sentence: 'kim is a baker, owns a cat and loves pink.\njob' -> ' baker\n'."""
    _, values, sentence = _invented_person(rng, EXTRACT_FIELDS)
    field = _pick(rng, list(values))
    return f"{sentence}\n{field}", f" {values[field]}\n"


def _record_example(rng):
    """Rewrite the sentence as a record, fields in a fixed order: ' name kim, job baker, pet cat\n'."""
    name, values, sentence = _invented_person(rng, RECORD_FIELDS)
    fields = [f for f in RECORD_FIELDS if f in values]
    return f"{sentence}\nrecord", " " + ", ".join([f"name {name}"] + [f"{f} {values[f]}" for f in fields]) + "\n"


def _record_symbols_example(rng):
    """The record task written with symbols pretraining never showed (':', '=', '|'), for lesson 17:
    'fact: kim is 31 and lives in rome.\nrecord:' -> ' name=kim|city=rome|age=31\n'."""
    name, values, sentence = _invented_person(rng, RECORD_FIELDS)
    fields = [f for f in RECORD_FIELDS if f in values]
    return f"fact: {sentence}\nrecord:", " " + "|".join([f"name={name}"] + [f"{f}={values[f]}" for f in fields]) + "\n"


def _invented_task(name, make_example, seed, n_train, n_val, n_test):
    """A task of invented examples: distinct prompts, so no prompt is in two splits."""
    rng = np.random.default_rng(seed)
    examples = {}
    while len(examples) < n_train + n_val + n_test:
        prompt, answer = make_example(rng)
        if len(prompt) + len(answer) <= MAX_EXAMPLE_CHARS:
            examples[prompt] = answer
    items = list(examples.items())
    return Task(name, "generate", train=items[:n_train], val=items[n_train:n_train + n_val],
                test=items[n_train + n_val:], format=FORMATS[name])


ONE_WORD = r" [a-z0-9]+\n"
FORMATS = {"extract": ONE_WORD, "qa": ONE_WORD,
           "record": r" name [a-z]+(, (" + "|".join(RECORD_FIELDS) + r") [a-z0-9]+)+\n",
           "record_symbols": r" name=[a-z]+(\|(" + "|".join(RECORD_FIELDS) + r")=[a-z0-9]+)+\n"}


def format_ok(predictions, task):
    """For each prediction, whether it has the task's structure (Task.format), right or wrong."""
    pattern = re.compile(task.format)
    return [bool(pattern.fullmatch(p)) for p in predictions]


def record_scores(predictions, answers):
    """For the record tasks (either writing): how often the answer has the record's structure, and how
    many of the answers' fields (name included) the predictions have right.
    Returns {'format_rate', 'field_accuracy': fields right / fields asked}."""
    symbols = "|" in answers[0]
    sep, pattern = ("|", FORMATS["record_symbols"]) if symbols else (", ", FORMATS["record"])
    hits, total = 0, 0
    for pred, answer in zip(predictions, answers):
        want, got = answer.strip().split(sep), set(pred.strip().split(sep))
        hits, total = hits + sum(w in got for w in want), total + len(want)
    return {"format_rate": float(np.mean([bool(re.fullmatch(pattern, p)) for p in predictions])),
            "field_accuracy": hits / total}


def make_extract_task(world=None, seed=0, n_train=2000, n_val=200, n_test=200):
    """The lab's default task. `world` is not used (the people are invented); it keeps get_task uniform."""
    return _invented_task("extract", _extract_example, seed, n_train, n_val, n_test)


def make_record_task(world=None, seed=0, n_train=2000, n_val=200, n_test=200):
    """The format task: copy a name and two or three values into a fixed structure."""
    return _invented_task("record", _record_example, seed, n_train, n_val, n_test)


def make_record_symbols_task(world=None, seed=0, n_train=2000, n_val=200, n_test=200):
    """The record task with unseen symbols (not a lab task: see the note above)."""
    return _invented_task("record_symbols", _record_symbols_example, seed, n_train, n_val, n_test)


QUESTIONS = {
    "city": ("where does {name} live", "which city does {name} live in"),
    "job": ("what is {name}'s job", "what does {name} do for a living"),
    "pet": ("what pet does {name} have", "what kind of animal does {name} keep"),
    "pet_name": ("what is the name of {name}'s {pet}", "what is {name}'s {pet} called"),
    "age": ("how old is {name}", "what is {name}'s age"),
    "color": ("what is {name}'s favorite color", "which color does {name} like best"),
}


def _qa_examples(world, names):
    return [(f"{question.format(name=name, pet=world[name].pet)}\nanswer", f" {getattr(world[name], attr)}\n")
            for name in names for attr in ATTRIBUTES for question in QUESTIONS[attr]]


def make_qa_task(world, seed=0):
    """Questions about the world: 'where does mia live\nanswer' -> ' oslo\n'. Val and test ask about people
    absent from train, so their facts are in the pretraining text only."""
    train, val, test = split_people(world, seed)
    rng = np.random.default_rng(seed)
    examples = _qa_examples(world, train)
    return Task("qa", "generate", train=[examples[i] for i in rng.permutation(len(examples))],
                val=_qa_examples(world, val), test=_qa_examples(world, test), format=FORMATS["qa"])


def _classify_examples(world, names, rng):
    """One true and one false statement per person and attribute, in random paraphrases: balanced."""
    examples = []
    for name in names:
        person = world[name]
        for attr in ATTRIBUTES:
            for truth in (True, False):
                value = None if truth else _other_value(attr, getattr(person, attr), rng)
                statement = fact_sentence(person, attr, int(rng.integers(len(TEMPLATES[attr]))), value)
                examples.append((f"{statement}\ntrue or false", " true\n" if truth else " false\n"))
    return examples


def make_classify_task(world, seed=0):
    """True/false statements about the world, 'mia lives in oslo.\ntrue or false' -> ' true\n', split by
    people like qa."""
    train, val, test = split_people(world, seed)
    rng = np.random.default_rng(seed)
    examples = _classify_examples(world, train, rng)
    return Task("classify", "classify", train=[examples[i] for i in rng.permutation(len(examples))],
                val=_classify_examples(world, val, rng), test=_classify_examples(world, test, rng),
                labels=(" true\n", " false\n"))


TASKS = {"extract": make_extract_task, "record": make_record_task, "qa": make_qa_task,
         "classify": make_classify_task}                 # the lab's tasks: every character seen in pretraining
OTHER_TASKS = {"record_symbols": make_record_symbols_task}


def get_task(name, world, seed=0):
    """The task called name (one of TASKS, or record_symbols), with splits fixed by seed."""
    make = {**TASKS, **OTHER_TASKS}.get(name)
    if make is None:
        raise ValueError(f"unknown task {name!r}; valid names are {', '.join(map(repr, {**TASKS, **OTHER_TASKS}))}")
    return make(world, seed=seed)

# ----------------------------------------------------------------------------------------------------
# encoding and batching


def encode_examples(tok, examples, block_size):
    """Token arrays for training on the answers only.

    Inputs:
    - tok: a tokenizer with encode(); examples: list of (prompt, answer), both non-empty.
    - block_size: the model's context; an example of L tokens needs L - 1 <= block_size.

    Returns:
    - idx: (N,T) int64, tokens[:-1] of each example, right-padded with the newline id.
    - targets: (N,T) int64, tokens[1:] at the answer tokens and IGNORE_INDEX (-100) everywhere else
      (prompt and padding). T is the longest example's length minus one.
    """
    if not is_int(block_size) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    check_examples(examples, "encode")
    rows = []
    for i, (prompt, answer) in enumerate(examples):
        p, a = tok.encode(prompt), tok.encode(answer)
        if len(p) + len(a) - 1 > block_size:
            raise ValueError(f"example {i} has {len(p) + len(a)} tokens (prompt + answer), but block_size "
                             f"{block_size} fits at most {block_size + 1}; shorten it or use a larger block_size")
        rows.append((p, a))
    T = max(len(p) + len(a) for p, a in rows) - 1
    pad = int(tok.encode("\n")[0])                 # any valid id would do: its targets are ignored
    idx = np.full((len(rows), T), pad, dtype=np.int64)
    targets = np.full((len(rows), T), IGNORE_INDEX, dtype=np.int64)
    for n, (p, a) in enumerate(rows):
        tokens = np.concatenate([p, a])
        idx[n, :len(tokens) - 1] = tokens[:-1]
        targets[n, len(p) - 1:len(tokens) - 1] = a   # position t predicts token t+1; the answer starts at len(p)
    return idx, targets


def check_examples(examples, what):
    """Raise a clear error unless examples is a non-empty list of (prompt, answer) string pairs."""
    if not isinstance(examples, (list, tuple)) or not examples:
        raise ValueError(f"no examples to {what}: need a non-empty list of (prompt, answer) pairs, "
                         f"got {examples!r:.80}")
    for i, ex in enumerate(examples):
        if not (isinstance(ex, (tuple, list)) and len(ex) == 2 and all(isinstance(s, str) for s in ex)):
            raise ValueError(f"example {i} must be a (prompt, answer) pair of strings, got {ex!r:.80}")
        if not (ex[0] and ex[1]):       # an empty answer would count as correct without a single token
            raise ValueError(f"example {i} has an empty prompt or answer; both need at least one character")


def _trim(x, y):
    """Drop the columns after the batch's last answer token. They are only padding, and attention is causal,
    so no other position's logits change; the batch just gets cheaper."""
    used = np.flatnonzero((y != IGNORE_INDEX).any(axis=0))
    T = used[-1] + 1 if used.size else 1
    return x[:, :T], y[:, :T]


def iterate_batches(idx, targets, batch_size, rng):
    """One epoch in random order: yields (x, y), (B,T') with B <= batch_size and T' <= T."""
    order = rng.permutation(len(idx))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        yield _trim(idx[rows], targets[rows])


def sample_batch(idx, targets, batch_size, rng):
    """batch_size random examples (with replacement) as (x, y), (B,T') with T' <= T."""
    rows = rng.integers(0, len(idx), size=batch_size)
    return _trim(idx[rows], targets[rows])

# ----------------------------------------------------------------------------------------------------
# evaluation


def _same_length_groups(token_lists, batch_size):
    """Indices grouped by token count, at most batch_size per group: each group stacks into one (B,T)
    array with no padding, so a whole group runs through the model in one call."""
    by_length = defaultdict(list)
    for i, tokens in enumerate(token_lists):
        by_length[len(tokens)].append(i)
    for length in sorted(by_length):
        rows = by_length[length]
        for start in range(0, len(rows), batch_size):
            yield rows[start:start + batch_size]


def context_room(model):
    """Positions left for real tokens: block_size, less what a prefix or prompt takes (PeftModel)."""
    return model.config.block_size - getattr(model, "reserved_positions", 0)


def _check_fits(n_tokens, block_size, prompt):
    if n_tokens > block_size:
        raise ValueError(f"the prompt {prompt[:40]!r}... needs a context of {n_tokens} tokens but block_size "
                         f"is {block_size}; use a shorter prompt (fewer shots) or a larger block_size")


def greedy_continuations(model, tok, prompts, n_new, batch_size=64, workers=None):
    """Greedy decoding of n_new[i] tokens after prompts[i]; returns the generated strings. The groups of
    same-length prompts are decoded on `workers` threads (None: one per core)."""
    ids = [tok.encode(p) for p in prompts]
    out = [None] * len(prompts)

    def decode(rows):
        x = np.stack([ids[i] for i in rows])                                  # (B,T)
        steps = max(n_new[i] for i in rows)
        _check_fits(x.shape[1] + steps - 1, context_room(model), prompts[rows[0]])
        y = model.generate(x, steps, temperature=0.0)                         # (B,T+steps)
        for i, row in zip(rows, y):
            out[i] = tok.decode(row[x.shape[1]:x.shape[1] + n_new[i]])
    parallel_map(decode, _same_length_groups(ids, batch_size), workers or cores())
    return out


def label_scores(model, tok, prompts, labels, batch_size=64, workers=None):
    """Score each label for each prompt, like a classifier head over the label tokens.

    The labels share a prefix (" " in " true\\n" / " false\\n"). The model reads prompt + prefix, and the
    logits at the last position for the character where each label goes its own way ("t", "f") are the
    scores.

    Returns:
    - scores: (N, len(labels)) float logits; the prediction is labels[scores.argmax(1)].
    """
    prefix = os.path.commonprefix(list(labels))
    if len(set(labels)) != len(labels) or any(len(label) == len(prefix) for label in labels):
        raise ValueError(f"labels {labels!r} must be distinct and none may be the start of another")
    label_ids = tok.encode("".join(label[len(prefix)] for label in labels))
    ids = [tok.encode(p + prefix) for p in prompts]
    scores = np.zeros((len(prompts), len(labels)))

    def score(rows):
        x = np.stack([ids[i] for i in rows])                                  # (B,T)
        _check_fits(x.shape[1], context_room(model), prompts[rows[0]])
        logits, _ = model.forward(x)                                          # (B,T,V)
        scores[rows] = logits[:, -1, label_ids]
    parallel_map(score, _same_length_groups(ids, batch_size), workers or cores())
    return scores


def evaluate(model, tok, task_or_examples, split="test", max_new_tokens=None, batch_size=64):
    """Accuracy of a model on a task split (or on a list of (prompt, answer), judged as generation).

    generate tasks: greedy decoding after each prompt, correct when the generated text starts with the
      answer. As answers end in "\\n", that is exact match of the text up to the first newline.
      max_new_tokens defaults to each answer's length (a fixed smaller value marks longer answers wrong).
    classify tasks: the label with the highest label_scores() is the prediction.

    Returns: dict with
    - accuracy: float; n: int, number of examples.
    - correct: list of bool; predictions: list of str (generated text cut after its first newline, or
      the chosen label).
    """
    if isinstance(task_or_examples, Task):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        examples, kind, labels = getattr(task_or_examples, split), task_or_examples.kind, task_or_examples.labels
    else:
        examples, kind, labels = task_or_examples, "generate", ()
    check_examples(examples, "evaluate")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_new_tokens is not None and (not is_int(max_new_tokens) or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be None (each answer's length) or a positive integer, "
                         f"got {max_new_tokens!r}")
    prompts, answers = [p for p, _ in examples], [a for _, a in examples]

    if kind == "classify":
        unknown = set(answers) - set(labels)
        if unknown:
            raise ValueError(f"answers {sorted(unknown)!r} are not among the labels {labels!r}")
        scores = label_scores(model, tok, prompts, labels, batch_size)
        predictions = [labels[j] for j in scores.argmax(axis=1)]
        correct = [pred == answer for pred, answer in zip(predictions, answers)]
    else:
        n_new = [max_new_tokens or len(a) for a in answers]
        generated = greedy_continuations(model, tok, prompts, n_new, batch_size)
        correct = [text.startswith(answer) for text, answer in zip(generated, answers)]
        predictions = [text.split("\n")[0] + "\n" if "\n" in text else text for text in generated]
    return {"accuracy": float(np.mean(correct)), "n": len(examples), "correct": correct,
            "predictions": predictions}

# ----------------------------------------------------------------------------------------------------
# few-shot prompting: the same tasks without training


def few_shot_prompt(task, query, k, seed=0):
    """query preceded by k solved training examples: prompt_1 + answer_1 + ... + prompt_k + answer_k + query.

    The answers end in "\\n", which separates the shots. A seed picks the same shots for every query.
    Returns a str; with the character tokenizer its token count is its length.
    """
    if not 0 <= k <= len(task.train):
        raise ValueError(f"k must be between 0 and {len(task.train)} (the training examples), got {k}")
    rng = np.random.default_rng(seed)
    shots = [task.train[i] for i in rng.choice(len(task.train), size=k, replace=False)]
    return "".join(prompt + answer for prompt, answer in shots) + query


def few_shot_task(task, k, seed=0):
    """task with every val and test prompt turned into a k-shot prompt, ready for evaluate()."""
    shots = few_shot_prompt(task, "", k, seed)            # the same shots before every query
    def wrap(examples):
        return [(shots + prompt, answer) for prompt, answer in examples]
    return replace(task, name=f"{task.name}-{k}shot", val=wrap(task.val), test=wrap(task.test))
