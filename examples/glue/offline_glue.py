"""Offline stand-in for GLUE: generated datasets in the hub's exact format, with real signal.

No dataset hub is reachable on many training machines, yet the GLUE example must run end
to end. This module generates, for every GLUE task, a ``datasets.DatasetDict`` with the
same splits, columns, ``Features`` and ``ClassLabel`` names as ``nyu-mll/glue`` so that
one code path in ``run_glue.py`` handles both. Labels follow simple, hidden rules over a
small lexicon (word polarity with negation and "but", paraphrase by synonyms and word
order, similarity as the share of matching facts, entailment of sub-facts, pronoun
reference by adjective type), plus a little label noise, so a model has to *learn*
something and the score of a method means something. Everything is seeded and pure
Python: the same arguments always give the same datasets.

The scores on these tasks are not GLUE scores; they only rank methods against each other
on one machine. See README.md for the real-data path.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import datasets

GLUE_TASKS: tuple[str, ...] = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")

# Text columns per task, as on the hub (second is None for single-sentence tasks).
TASK_TO_KEYS: dict[str, tuple[str, str | None]] = {
    "cola": ("sentence", None),
    "sst2": ("sentence", None),
    "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}

# ClassLabel names exactly as nyu-mll/glue declares them (None: regression).
LABEL_NAMES: dict[str, list[str] | None] = {
    "cola": ["unacceptable", "acceptable"],
    "sst2": ["negative", "positive"],
    "mrpc": ["not_equivalent", "equivalent"],
    "stsb": None,
    "qqp": ["not_duplicate", "duplicate"],
    "mnli": ["entailment", "neutral", "contradiction"],
    "qnli": ["entailment", "not_entailment"],
    "rte": ["entailment", "not_entailment"],
    "wnli": ["not_entailment", "entailment"],
}

# Default split sizes (train, each evaluation split, each test split); GLUE's own sizes
# differ by task, these keep the offline default fast on a CPU.
DEFAULT_SIZES: dict[str, tuple[int, int, int]] = {
    "cola": (4000, 600, 200),
    "sst2": (4000, 600, 200),
    "mrpc": (3000, 600, 200),
    "stsb": (3000, 600, 200),
    "qqp": (4000, 600, 200),
    "mnli": (6000, 600, 200),
    "qnli": (4000, 600, 200),
    "rte": (2500, 300, 200),
    "wnli": (1000, 200, 100),
}

GENERATOR_VERSION = "3"  # bump when the generated text changes (keys the model cache)


def glue_features(task: str) -> datasets.Features:
    """The ``Features`` of ``nyu-mll/glue`` for ``task`` (label is float32 for stsb)."""
    first, second = TASK_TO_KEYS[task]
    feats: dict[str, datasets.features.FeatureType] = {first: datasets.Value("string")}
    if second is not None:
        feats[second] = datasets.Value("string")
    names = LABEL_NAMES[task]
    feats["label"] = datasets.Value("float32") if names is None else datasets.ClassLabel(names=names)
    feats["idx"] = datasets.Value("int32")
    return datasets.Features(feats)


def glue_splits(task: str) -> tuple[list[str], list[str]]:
    """(evaluation splits, test splits) of ``task`` as named on the hub."""
    if task == "mnli":
        return ["validation_matched", "validation_mismatched"], ["test_matched", "test_mismatched"]
    return ["validation"], ["test"]


# --------------------------------------------------------------------------------------
# Lexicon
# --------------------------------------------------------------------------------------
POSITIVE = [
    "good", "great", "wonderful", "brilliant", "charming", "delightful", "moving", "funny",
    "beautiful", "clever", "fresh", "gripping", "touching", "superb", "lovely", "smart",
]
NEGATIVE = [
    "bad", "boring", "dull", "awful", "tedious", "clumsy", "bland", "messy",
    "weak", "silly", "flat", "tiresome", "lazy", "painful", "stale", "hollow",
]
REVIEW_NOUNS = [
    "film", "movie", "story", "plot", "acting", "script", "cast", "ending",
    "music", "direction", "dialogue", "pace", "humor", "camera work", "score", "lead",
]
SUBJECTS = [
    "teacher", "doctor", "child", "farmer", "pilot", "singer", "writer", "student",
    "chef", "driver", "painter", "nurse", "baker", "lawyer", "soldier", "artist",
]
OBJECTS = [
    "car", "house", "boat", "book", "lamp", "table", "bike", "phone",
    "window", "door", "letter", "bag", "chair", "box", "clock", "map",
]
PLACES = ["park", "city", "garden", "market", "school", "kitchen", "station", "library", "village", "office"]
# Regular verbs whose past tense equals the past participle (passive voice reads right).
VERBS = [
    "painted", "cleaned", "washed", "fixed", "moved", "opened", "watched", "carried",
    "found", "sold", "bought", "built", "visited", "kept", "checked", "repaired",
]
VERB_BASE = {
    "painted": "paint", "cleaned": "clean", "washed": "wash", "fixed": "fix", "moved": "move",
    "opened": "open", "watched": "watch", "carried": "carry", "found": "find", "sold": "sell",
    "bought": "buy", "built": "build", "visited": "visit", "kept": "keep", "checked": "check",
    "repaired": "repair",
}
COLORS = ["red", "blue", "green", "old", "new", "small", "large", "heavy", "clean", "dirty"]
ANTONYMS = {"old": "new", "new": "old", "small": "large", "large": "small", "clean": "dirty",
            "dirty": "clean", "heavy": "light", "red": "blue", "blue": "red", "green": "red"}
# Synonyms used for paraphrases; the relation is symmetric.
_SYN_PAIRS = [
    ("car", "automobile"), ("house", "home"), ("boat", "ship"), ("bike", "bicycle"), ("phone", "telephone"),
    ("bag", "sack"), ("large", "big"), ("small", "little"), ("bought", "purchased"), ("fixed", "mended"),
    ("repaired", "restored"), ("checked", "inspected"), ("teacher", "instructor"), ("doctor", "physician"),
    ("child", "kid"), ("city", "town"), ("market", "bazaar"), ("office", "workplace"), ("film", "movie"),
    ("buy", "purchase"), ("fix", "mend"), ("check", "inspect"), ("chef", "cook"), ("driver", "chauffeur"),
]
SYNONYMS: dict[str, str] = {**{a: b for a, b in _SYN_PAIRS}, **{b: a for a, b in _SYN_PAIRS}}
TIMES = ["yesterday", "last week", "on monday", "in the morning", "after lunch", "at night"]
FEELINGS = ["happy", "tired", "angry", "proud", "nervous", "calm"]
# Winograd-style pairs: the adjective decides whether "it" is the object or the subject.
WNLI_VERBS = ["lift", "carry", "move", "push"]
WNLI_OBJECT_ADJ = ["heavy", "large", "bulky", "wide"]  # "could not lift X because it was too heavy" -> X
WNLI_SUBJECT_ADJ = ["weak", "tired", "small", "sick"]  # "... because it was too weak" -> the subject
WNLI_AGENTS = ["man", "woman", "boy", "girl", "robot", "horse", "crane", "truck"]
WNLI_THINGS = ["rock", "crate", "table", "piano", "log", "barrel", "sofa", "statue"]


def _syn(rng: random.Random, word: str, p: float = 0.5) -> str:
    return SYNONYMS[word] if word in SYNONYMS and rng.random() < p else word


# A "fact" is the slots (subject, verb, object, adjective, place); several tasks compare two facts.
Fact = tuple[str, str, str, str, str]


def _fact(rng: random.Random) -> Fact:
    return (rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(COLORS), rng.choice(PLACES))


def _perturb(rng: random.Random, fact: Fact, n: int) -> Fact:
    """Change ``n`` distinct slots of ``fact`` to other (non-synonymous) values."""
    pools = [SUBJECTS, VERBS, OBJECTS, COLORS, PLACES]
    out = list(fact)
    for slot in rng.sample(range(5), n):
        out[slot] = rng.choice([w for w in pools[slot] if w != fact[slot]])
    return tuple(out)  # type: ignore[return-value]


def _render(rng: random.Random, fact: Fact, style: int, syn: float = 0.0) -> str:
    s, v, o, a, p = (_syn(rng, w, syn) for w in fact)
    return [
        f"the {s} {v} the {a} {o} in the {p} .",
        f"in the {p} , the {s} {v} the {a} {o} .",
        f"the {a} {o} was {v} by the {s} in the {p} .",
        f"at the {p} the {a} {o} got {v} by a {s} .",
    ][style]


# --------------------------------------------------------------------------------------
# Per-task generators: each returns (fields..., label) for one example.
# --------------------------------------------------------------------------------------
def _sst2(rng: random.Random, split: str) -> tuple:
    def phrase(polarity: int) -> tuple[str, int]:
        # A negated adjective of the opposite polarity expresses `polarity`.
        negate = rng.random() < 0.25
        pool = POSITIVE if (polarity > 0) != negate else NEGATIVE
        word = rng.choice(pool)
        if negate:
            return f"not {word}", polarity
        return (f"very {word}" if rng.random() < 0.2 else word), polarity

    label = rng.randint(0, 1)
    pol = 1 if label else -1
    n1, n2 = rng.sample(REVIEW_NOUNS, 2)
    form = rng.randrange(5)
    if form == 0:
        text = f"the {n1} was {phrase(pol)[0]} ."
    elif form == 1:  # "and" joins phrases of the same polarity, as in real reviews
        text = f"the {n1} was {phrase(pol)[0]} and {phrase(pol)[0]} ."
    elif form == 2:
        text = f"a {phrase(pol)[0]} {n1} with a {phrase(pol)[0]} {n2} ."
    elif form == 3:  # "but": the second clause decides
        text = f"the {n1} was {phrase(-pol)[0]} , but the {n2} was {phrase(pol)[0]} ."
    else:
        text = f"i found the {n1} {phrase(pol)[0]} , and the {n2} {phrase(pol)[0]} ."
    return text, label


def _cola(rng: random.Random, split: str) -> tuple:
    if rng.random() < 0.5:
        text = _render(rng, _fact(rng), rng.randrange(4), syn=0.3)
    else:
        text = _sst2(rng, split)[0]
    if rng.random() < 0.7:
        return text, 1
    words = text.split()
    kind = rng.randrange(4)
    if kind == 0:  # swap two adjacent words that differ
        i = rng.randrange(len(words) - 2)
        words[i], words[i + 1] = words[i + 1], words[i]
    elif kind == 1:  # drop a word
        del words[rng.randrange(len(words) - 1)]
    elif kind == 2:  # duplicate a word
        i = rng.randrange(len(words) - 1)
        words.insert(i, words[i])
    else:  # move the first word to the end
        words = words[1:-1] + [words[0], words[-1]]
    bad = " ".join(words)
    return bad, (1 if bad == text else 0)


def _mrpc(rng: random.Random, split: str) -> tuple:
    fact = _fact(rng)
    s1 = _render(rng, fact, rng.randrange(4))
    if rng.random() < 0.68:  # GLUE's MRPC is ~68% paraphrases
        return s1, _render(rng, fact, rng.randrange(4), syn=0.6), 1
    return s1, _render(rng, _perturb(rng, fact, rng.choice([1, 1, 2])), rng.randrange(4), syn=0.6), 0


def _stsb(rng: random.Random, split: str) -> tuple:
    fact = _fact(rng)
    n = rng.randrange(6)  # number of changed slots
    other = _perturb(rng, fact, n)
    score = 5.0 * (5 - n) / 5 + rng.gauss(0.0, 0.25)
    return (_render(rng, fact, rng.randrange(4)), _render(rng, other, rng.randrange(4), syn=0.5),
            float(min(5.0, max(0.0, score))))


_QQP_TEMPLATES = [
    "how do i {v} a {o} ?", "what is the best way to {v} a {o} ?", "how can i {v} my {o} ?",
    "what should i do to {v} an old {o} ?", "is it hard to {v} a {o} ?", "where can i {v} a {o} ?",
]


def _qqp(rng: random.Random, split: str) -> tuple:
    v, o = VERB_BASE[rng.choice(VERBS)], rng.choice(OBJECTS)
    t1, t2 = rng.sample(_QQP_TEMPLATES, 2)
    q1 = t1.format(v=v, o=o)
    if rng.random() < 0.37:  # GLUE's QQP is ~37% duplicates
        return q1, t2.format(v=_syn(rng, v, 0.6), o=_syn(rng, o, 0.6)), 1
    if rng.random() < 0.5:
        v2, o2 = rng.choice([VERB_BASE[w] for w in VERBS if VERB_BASE[w] != v]), o
    else:
        v2, o2 = v, rng.choice([w for w in OBJECTS if w != o])
    return q1, rng.choice([t1, t2]).format(v=v2, o=o2), 0


def _nli_pair(rng: random.Random, styles: list[int], label: str) -> tuple[str, str]:
    """Premise from ``fact``; a hypothesis that is entailed, contradicted, or neither."""
    fact = _fact(rng)
    s, v, o, a, p = fact
    premise = _render(rng, fact, rng.choice(styles))
    if label == "entailment":
        hyp = rng.choice([
            f"the {_syn(rng, s)} {v} something .",
            f"a {_syn(rng, o)} was {v} .",
            f"someone {v} the {_syn(rng, a)} {_syn(rng, o)} .",
            f"the {_syn(rng, s)} was in the {_syn(rng, p)} .",
        ])
    elif label == "contradiction":
        hyp = rng.choice([
            f"the {_syn(rng, s)} did not {VERB_BASE[v]} the {_syn(rng, o)} .",
            f"nobody {v} the {_syn(rng, o)} .",
            f"the {_syn(rng, o)} was {ANTONYMS[a]} .",
            f"the {_syn(rng, s)} was never in the {_syn(rng, p)} .",
        ])
    else:  # neutral: new information
        hyp = rng.choice([
            f"the {_syn(rng, s)} {v} the {_syn(rng, o)} {rng.choice(TIMES)} .",
            f"the {_syn(rng, s)} was {rng.choice(FEELINGS)} .",
            f"the {_syn(rng, s)} also {rng.choice(VERBS)} a {rng.choice(OBJECTS)} .",
            f"the {_syn(rng, o)} belonged to a {rng.choice(SUBJECTS)} .",
        ])
    return premise, hyp


def _mnli(rng: random.Random, split: str) -> tuple:
    # The mismatched splits use sentence shapes never seen in training ("another genre").
    styles = [2, 3] if split.endswith("mismatched") else [0, 1]
    label = rng.randrange(3)
    return (*_nli_pair(rng, styles, LABEL_NAMES["mnli"][label]), label)


def _rte(rng: random.Random, split: str) -> tuple:
    label = rng.randrange(2)  # 0 entailment, 1 not_entailment
    kind = "entailment" if label == 0 else rng.choice(["neutral", "contradiction"])
    return (*_nli_pair(rng, [0, 1, 2, 3], kind), label)


def _qnli(rng: random.Random, split: str) -> tuple:
    fact = _fact(rng)
    s, v, o, _, _ = fact
    kind = rng.randrange(3)
    question = [f"who {v} the {o} ?", f"where did the {s} {VERB_BASE[v]} the {o} ?", f"what did the {s} {VERB_BASE[v]} ?"][kind]
    label = rng.randrange(2)  # 0 entailment: the sentence answers the question
    if label == 0:
        ctx = fact
    else:  # change a slot the question depends on
        slot = [rng.choice([1, 2]), rng.choice([0, 1, 2]), rng.choice([0, 1])][kind]
        pools = [SUBJECTS, VERBS, OBJECTS]
        ctx = list(fact)
        ctx[slot] = rng.choice([w for w in pools[slot] if w != fact[slot]])
        ctx = tuple(ctx)
    return question, _render(rng, ctx, rng.randrange(4), syn=0.3), label


def _wnli(rng: random.Random, split: str) -> tuple:
    agent, thing, verb = rng.choice(WNLI_AGENTS), rng.choice(WNLI_THINGS), rng.choice(WNLI_VERBS)
    adj = rng.choice(WNLI_OBJECT_ADJ + WNLI_SUBJECT_ADJ)
    referent = thing if adj in WNLI_OBJECT_ADJ else agent
    s1 = f"the {agent} could not {verb} the {thing} because it was too {adj} ."
    label = rng.randrange(2)  # 1 entailment
    named = referent if label == 1 else (agent if referent == thing else thing)
    return s1, f"the {named} was too {adj} .", label


_GENERATORS: dict[str, Callable[[random.Random, str], tuple]] = {
    "cola": _cola, "sst2": _sst2, "mrpc": _mrpc, "stsb": _stsb, "qqp": _qqp,
    "mnli": _mnli, "qnli": _qnli, "rte": _rte, "wnli": _wnli,
}
_TASK_SEED = {t: i for i, t in enumerate(GLUE_TASKS)}
_SPLIT_SEED = {"train": 0, "validation": 1, "validation_matched": 1, "validation_mismatched": 2,
               "test": 3, "test_matched": 3, "test_mismatched": 4}


def load_offline_glue(
    task: str,
    *,
    train_size: int | None = None,
    eval_size: int | None = None,
    test_size: int | None = None,
    label_noise: float = 0.05,
    seed: int = 0,
) -> datasets.DatasetDict:
    """Generate GLUE task ``task`` offline, in the format of ``load_dataset("nyu-mll/glue", task)``.

    ``label_noise`` flips that share of classification labels (uniformly to another class),
    so no method reaches 100% and differences between methods stay visible. Test splits
    carry label -1, as on the hub.
    """
    if task not in _GENERATORS:
        raise ValueError(f"`task` must be one of {list(GLUE_TASKS)}, got {task!r}.")
    n_train, n_eval, n_test = DEFAULT_SIZES[task]
    sizes = {"train": train_size if train_size is not None else n_train}
    eval_splits, test_splits = glue_splits(task)
    for name in eval_splits:
        sizes[name] = eval_size if eval_size is not None else n_eval
    for name in test_splits:
        sizes[name] = test_size if test_size is not None else n_test
    first, second = TASK_TO_KEYS[task]
    names = LABEL_NAMES[task]
    out = {}
    for split, n in sizes.items():
        rng = random.Random(f"{seed}-{_TASK_SEED[task]}-{_SPLIT_SEED[split]}")
        noise_rng = random.Random(f"noise-{seed}-{_TASK_SEED[task]}-{_SPLIT_SEED[split]}")  # texts independent of noise
        rows: dict[str, list] = {name: [] for name in glue_features(task)}  # hub column order
        for i in range(n):
            *texts, label = _GENERATORS[task](rng, split)
            flip, other = noise_rng.random(), noise_rng.randrange(1, len(names) if names else 2)
            if names is not None and flip < label_noise:
                label = (label + other) % len(names)  # uniformly one of the other classes
            rows[first].append(texts[0])
            if second is not None:
                rows[second].append(texts[1])
            rows["label"].append(-1 if split.startswith("test") else label)
            rows["idx"].append(i)
        out[split] = datasets.Dataset.from_dict(rows, features=glue_features(task))
    return datasets.DatasetDict(out)


def pretraining_corpus(n_per_task: int = 1500, seed: int = 0) -> list[str]:
    """Unlabelled sentences from every task, to train the tokenizer and pre-train the model."""
    texts: list[str] = []
    for task in GLUE_TASKS:
        rng = random.Random(f"corpus-{seed}-{task}")
        for _ in range(n_per_task):
            texts.extend(t for t in _GENERATORS[task](rng, "train")[:-1])
    random.Random(seed).shuffle(texts)
    return texts
