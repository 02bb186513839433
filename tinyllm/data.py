"""A deterministic synthetic world of people, and the pretraining corpus written about it.

Every value is drawn from fixed lists with np.random.default_rng(seed): the same seed gives the same world
and the same text, and nothing is downloaded. The world is small on purpose, so that a 4-layer, 128-wide
character-level GPT trained for a few CPU minutes memorises a good share of its facts; the fine-tuning
tasks (tasks.py) then ask about those facts, and fact_recall_examples() measures how many survive.

Legend: N = number of token ids in a corpus, B = batch size, T = block size (sequence length).
"""
from dataclasses import dataclass

import numpy as np

# ----------------------------------------------------------------------------------------------------
# the world: people and the values their attributes are drawn from (all lower-case, all one word)

SHE_NAMES = ("mia", "ava", "zoe", "ivy", "eva", "amy", "lea", "ella", "lily", "ruby", "nora", "rosa",
             "anna", "maya", "sara", "nina", "lucy", "iris", "jade", "emma", "cleo", "hana", "tara", "vera")
HE_NAMES = ("leo", "max", "sam", "ben", "tom", "dan", "noah", "finn", "jack", "owen", "liam", "otto",
            "adam", "eli", "hugo", "ivan", "jon", "kai", "luca", "omar", "paul", "raj", "theo", "yuri")
NAMES = SHE_NAMES + HE_NAMES
CITIES = ("oslo", "rome", "paris", "lima", "cairo", "tokyo", "delhi", "quito", "dublin", "berlin")
JOBS = ("baker", "doctor", "teacher", "pilot", "farmer", "nurse", "painter", "chef", "singer", "lawyer")
PETS = ("dog", "cat", "bird", "fish", "horse", "rabbit")   # jobs and pets start with a consonant: "a ..."
PET_VERBS = {"dog": "walked", "cat": "fed", "bird": "sang to", "fish": "fed", "horse": "rode",
             "rabbit": "brushed"}
PET_NAMES = ("rex", "bo", "coco", "fido", "luna", "milo", "pip", "tess", "daisy", "ziggy", "pepper", "nemo",
             "toby", "bella", "rocky", "ginger", "shadow", "muffin", "peanut", "willow", "mango", "bubbles",
             "fluffy", "socks", "gus", "dot", "pixie", "snowy", "buster", "biscuit", "oreo", "kiwi", "bean",
             "pickle", "waffles", "sunny", "button", "chip", "fudge", "olive")
COLORS = ("red", "blue", "green", "yellow", "black", "white", "pink", "purple")
AGE_RANGE = (18, 80)   # ages are drawn from range(18, 80): always two digits
ATTRIBUTES = ("city", "job", "pet", "pet_name", "age", "color")


@dataclass(frozen=True)
class Person:
    name: str
    pronoun: str    # "she" or "he", used by the stories
    city: str
    job: str
    pet: str        # the kind of animal, e.g. "dog"
    pet_name: str
    age: int
    color: str      # favourite colour

    @property
    def possessive(self):
        return "her" if self.pronoun == "she" else "his"


class World:
    """n_people people with distinct names and distinct pet names; other values may repeat.

    Inputs:
    - seed: int; the same seed always gives the same world.
    - n_people: int, at least 2 (stories pair people up) and at most min(len(NAMES), len(PET_NAMES)).
    """

    def __init__(self, seed=0, n_people=24):
        most = min(len(NAMES), len(PET_NAMES))
        if not 2 <= n_people <= most:
            raise ValueError(f"n_people must be between 2 and {most} (the number of distinct names), "
                             f"got {n_people}")
        rng = np.random.default_rng(seed)
        names = [NAMES[i] for i in rng.permutation(len(NAMES))[:n_people]]
        pet_names = [PET_NAMES[i] for i in rng.permutation(len(PET_NAMES))[:n_people]]
        self.seed = seed
        self.people = [Person(name=name, pronoun="she" if name in SHE_NAMES else "he",
                              city=_pick(rng, CITIES), job=_pick(rng, JOBS), pet=_pick(rng, PETS),
                              pet_name=pet_name, age=int(rng.integers(*AGE_RANGE)), color=_pick(rng, COLORS))
                       for name, pet_name in zip(names, pet_names)]
        self._by_name = {p.name: p for p in self.people}

    @property
    def names(self):
        return [p.name for p in self.people]

    def __getitem__(self, name):
        return self._by_name[name]

    def __len__(self):
        return len(self.people)

    def __repr__(self):
        return f"World(seed={self.seed}, n_people={len(self)})"


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]

# ----------------------------------------------------------------------------------------------------
# sentences: several paraphrases of every fact, and short stories that mention facts

# The first paraphrase of each attribute ends with the value, so cutting the value off leaves a cloze
# prompt for fact_recall_examples: "mia lives in" -> " oslo.".
TEMPLATES = {
    "city": ("{name} lives in {v}.", "{name}'s home is in {v}.", "the home of {name} is in {v}.",
             "{name} has a house in {v}."),
    "job": ("{name} works as a {v}.", "{name} is a {v} by trade.", "{name} earns a living as a {v}.",
            "{name} has a job as a {v}."),
    "pet": ("{name} has a pet {v}.", "{name} owns a {v}.", "the pet of {name} is a {v}."),
    "pet_name": ("{name}'s {pet} is called {v}.", "the name of {name}'s {pet} is {v}.",
                 "{name} named {poss} {pet} {v}."),
    "age": ("{name}'s age is {v}.", "{name} is {v} years old.", "{name} turned {v} this year."),
    "color": ("{name}'s favorite color is {v}.", "{name} likes the color {v} best.",
              "the favorite color of {name} is {v}."),
}

# {o_...} fields belong to a second person, so stories also tie people to each other. A value always
# comes after its person's name: it can then be recalled rather than guessed.
STORIES = (
    "one day {name} {verb} {poss} {pet} {pet_name} in {city}. then {pron} went to work as a {job}.",
    "{name} is a {job} in {city}. every morning {pron} says hello to {poss} {pet} {pet_name}.",
    "on {poss} birthday {name} turned {age}. {pet_name} the {pet} got a {color} hat.",
    "{name} painted {poss} door {color}, because {color} is {poss} favorite color.",
    "{name} took a train to see {o_name}, who works in {o_city} as a {o_job}.",
    "{name} the {job} asked {o_name} for help. {o_name} is {o_age} years old and lives in {o_city}.",
    "{name} and {o_name} met in {city}. {name} is {age} and {o_name} is {o_age}.",
)


def fact_sentence(person, attr, template=0, value=None):
    """One sentence stating a fact, e.g. "mia lives in oslo.".

    Inputs:
    - person: Person; attr: one of ATTRIBUTES; template: index into TEMPLATES[attr].
    - value: written instead of the true value when given (tasks.py uses it for false statements).
    """
    v = getattr(person, attr) if value is None else value
    return TEMPLATES[attr][template].format(name=person.name, v=v, pet=person.pet, poss=person.possessive)


def _profile(person, rng):
    """Every fact about one person, each in a random paraphrase, in a random order."""
    return " ".join(fact_sentence(person, attr, int(rng.integers(len(TEMPLATES[attr]))))
                    for attr in rng.permutation(ATTRIBUTES))


def _stories(person, other, rng):
    """Two different short stories about person (and other)."""
    fields = dict(name=person.name, pron=person.pronoun, poss=person.possessive, city=person.city,
                  job=person.job, pet=person.pet, pet_name=person.pet_name, verb=PET_VERBS[person.pet],
                  age=person.age, color=person.color,
                  o_name=other.name, o_city=other.city, o_job=other.job, o_age=other.age)
    return " ".join(STORIES[i].format(**fields) for i in rng.permutation(len(STORIES))[:2])


def _numbers(person, rng):
    """Ages in a few years' time, and small sums: the corpus's arithmetic."""
    later, earlier = rng.integers(2, 10, size=2)
    sentences = [f"{person.name} is {person.age} years old.",
                 f"in {later} years {person.pronoun} will be {person.age + later}.",
                 f"{earlier} years ago {person.pronoun} was {person.age - earlier}."]
    for a, b in rng.integers(0, 50, size=(2, 2)):
        sentences.append(f"{a} plus {b} is {a + b}." if rng.random() < 0.5 else
                         f"{max(a, b)} minus {min(a, b)} is {abs(a - b)}.")
    return " ".join(sentences)


# Invented people: not in the world, with new facts in every document. A recap states an invented person's
# facts, then again in another order and other words: text that can only be predicted by reading back what
# the document said, not from memory. It teaches the model to look things up in its context, which is
# what the fine-tuning tasks ask of it (tasks.py uses the same names and phrases).
INVENTED_NAMES = ("kim", "ada", "bob", "eve", "ugo", "ines", "joe", "tim", "pia", "ola", "ray", "sue",
                  "ned", "liv", "abe", "fay", "gil", "hal", "ida", "kit", "lou", "meg", "ron", "val")
VALUES = {"city": CITIES, "job": JOBS, "pet": PETS, "pet_name": PET_NAMES, "color": COLORS}
CLAUSES = {"city": ("lives in {v}", "is from {v}"), "job": ("works as a {v}", "is a {v}"),
           "age": ("is {v}", "is aged {v}"), "pet": ("has a {v}", "owns a {v}"),
           "color": ("likes {v}", "loves {v}")}


def invented_person(rng, fields, n=(2, 3)):
    """An invented person with n[0] to n[1] of the fields, in the fields' order: (name, {field: value})."""
    name = _pick(rng, INVENTED_NAMES)
    k = int(rng.integers(n[0], n[1] + 1))
    chosen = [fields[i] for i in sorted(rng.choice(len(fields), k, replace=False))]
    return name, {f: str(rng.integers(*AGE_RANGE)) if f == "age" else _pick(rng, VALUES[f]) for f in chosen}


def state(name, values, rng):
    """'kim owns a cat, is from rome and likes red.': the facts in random order and wording."""
    clauses = [_pick(rng, CLAUSES[f]).format(v=values[f]) for f in rng.permutation(list(values))]
    return f"{name} {', '.join(clauses[:-1])} and {clauses[-1]}."


def _recap(rng):
    name, values = invented_person(rng, ("city", "job", "age", "pet", "color"))
    return f"{state(name, values, rng)} in short, {state(name, values, rng)}"


def make_document(world, person, rng):
    """One document (one line, no newline) about person: a profile, stories or numbers; or a recap of an
    invented person."""
    r = rng.random()
    if r < 0.45:                                   # profiles state every fact: the densest text
        return _profile(person, rng)
    if r < 0.75:
        others = [p for p in world.people if p is not person]
        return _stories(person, _pick(rng, others), rng)
    if r < 0.88:
        return _numbers(person, rng)
    return _recap(rng)

# ----------------------------------------------------------------------------------------------------
# the corpus and batches of it


def make_corpus(world, n_chars=300_000, n_docs=None, seed=0):
    """The pretraining text: documents, each ended by "\\n".

    People take turns in a shuffled order, one document each per round, so every person is written
    about equally often.

    Inputs:
    - world: World.
    - n_chars: int; stop at the first document boundary at or past this many characters.
    - n_docs: int or None; if given, write exactly this many documents instead (n_chars is ignored).
    - seed: int; the same world and seed always give the same text.

    Returns:
    - text: str.
    """
    rng = np.random.default_rng(seed)
    docs, size = [], 0
    while True:
        for i in rng.permutation(len(world)):
            done = len(docs) >= n_docs if n_docs is not None else size >= n_chars
            if done:
                return "".join(docs)
            doc = make_document(world, world.people[i], rng) + "\n"
            docs.append(doc)
            size += len(doc)


def split_corpus(text, val_fraction=0.1):
    """Split text into (train_text, val_text) on document boundaries: the last documents go to val.

    The documents are already in random order, so the tail is a fair sample.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    docs = text.splitlines(keepends=True)
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to split, got {len(docs)}")
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    return "".join(docs[:-n_val]), "".join(docs[-n_val:])


def corpus_splits(data):
    """The world, and the train and val text, that a pretraining run's data settings describe.

    data: dict with world_seed, n_people, n_chars, corpus_seed, val_fraction (tinyllm.pretrain.PRETRAIN_DATA,
    or a checkpoint's meta['data']). Pretraining and the forgetting probe both rebuild the corpus here, so
    the probe reads exactly the validation text the model was kept from.
    """
    world = World(data["world_seed"], data["n_people"])
    text = make_corpus(world, n_chars=data["n_chars"], seed=data["corpus_seed"])
    return (world, *split_corpus(text, data["val_fraction"]))


def get_batch(data, batch_size, block_size, rng):
    """Random windows of the corpus for next-token prediction (as in nanoGPT).

    Inputs:
    - data: (N,) int token ids.
    - batch_size: B; block_size: T; rng: np.random.Generator.

    Returns:
    - x: (B,T) int64, data[i:i+T] for B random starts i.
    - y: (B,T) int64, data[i+1:i+T+1], so y[b, t] is the token that follows x[b, :t+1].
    """
    data = np.asarray(data)
    if data.ndim != 1:
        raise ValueError(f"data must be a 1-D array of token ids, got shape {data.shape}")
    if len(data) < block_size + 1:
        raise ValueError(f"data has {len(data)} tokens but a window needs block_size + 1 = {block_size + 1}; "
                         f"use more text or a smaller block_size")
    starts = rng.integers(0, len(data) - block_size, size=batch_size)       # (B,)
    pos = starts[:, None] + np.arange(block_size)                           # (B,T)
    return data[pos].astype(np.int64), data[pos + 1].astype(np.int64)


def unigram_loss(ids, vocab_size):
    """Entropy in nats of the token frequencies in ids: the loss of a model that ignores context.

    A pretrained model must get well below it; log(vocab_size) is the loss of uniform guessing.
    """
    counts = np.bincount(np.asarray(ids).ravel(), minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())

# ----------------------------------------------------------------------------------------------------
# measuring what the model knows


def fact_recall_examples(world):
    """Cloze prompts for every fact of every person, phrased as the corpus phrases them.

    Returns:
    - list of (prompt, answer), e.g. ("mia lives in", " oslo."): len(world) * len(ATTRIBUTES) of them.
    """
    examples = []
    for person in world.people:
        for attr in ATTRIBUTES:
            sentence = fact_sentence(person, attr)     # first paraphrase: the value comes last
            answer = f" {getattr(person, attr)}."
            examples.append((sentence[:-len(answer)], answer))
    return examples
