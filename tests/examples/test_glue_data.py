"""The offline GLUE stand-in (examples/glue/offline_glue.py): hub format, determinism, real signal."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
sklearn_lm = pytest.importorskip("sklearn.linear_model")
sklearn_text = pytest.importorskip("sklearn.feature_extraction.text")

GLUE_DIR = Path(__file__).resolve().parents[2] / "examples" / "glue"
sys.path.insert(0, str(GLUE_DIR))
import offline_glue as og

# nyu-mll/glue as published on the hub: split names, columns in order, label names (None: float32 score).
HUB_FORMAT = {
    "cola": (["train", "validation", "test"], ["sentence", "label", "idx"], ["unacceptable", "acceptable"]),
    "sst2": (["train", "validation", "test"], ["sentence", "label", "idx"], ["negative", "positive"]),
    "mrpc": (["train", "validation", "test"], ["sentence1", "sentence2", "label", "idx"], ["not_equivalent", "equivalent"]),
    "stsb": (["train", "validation", "test"], ["sentence1", "sentence2", "label", "idx"], None),
    "qqp": (["train", "validation", "test"], ["question1", "question2", "label", "idx"], ["not_duplicate", "duplicate"]),
    "mnli": (["train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched"],
             ["premise", "hypothesis", "label", "idx"], ["entailment", "neutral", "contradiction"]),
    "qnli": (["train", "validation", "test"], ["question", "sentence", "label", "idx"], ["entailment", "not_entailment"]),
    "rte": (["train", "validation", "test"], ["sentence1", "sentence2", "label", "idx"], ["entailment", "not_entailment"]),
    "wnli": (["train", "validation", "test"], ["sentence1", "sentence2", "label", "idx"], ["not_entailment", "entailment"]),
}


@pytest.mark.parametrize("task", sorted(HUB_FORMAT))
def test_hub_format(task):
    splits, columns, names = HUB_FORMAT[task]
    data = og.load_offline_glue(task, train_size=60, eval_size=30, test_size=10)
    assert list(data) == splits
    for split in splits:
        ds = data[split]
        assert ds.column_names == columns
        assert ds.features["idx"] == datasets.Value("int32")
        assert list(ds["idx"]) == list(range(len(ds)))
        if names is None:
            assert ds.features["label"] == datasets.Value("float32")
        else:
            assert ds.features["label"] == datasets.ClassLabel(names=names)
        labels = np.asarray(list(ds["label"]))
        if split.startswith("test"):
            assert len(ds) == 10 and np.all(labels == -1)  # hidden test labels, as on the hub
        else:
            assert len(ds) == (60 if split == "train" else 30)
            if names is None:
                assert labels.min() >= 0.0 and labels.max() <= 5.0
            else:
                assert set(labels.tolist()) <= set(range(len(names)))


def test_deterministic_and_seeded():
    a = og.load_offline_glue("mrpc", train_size=50, eval_size=20)
    b = og.load_offline_glue("mrpc", train_size=50, eval_size=20)
    c = og.load_offline_glue("mrpc", train_size=50, eval_size=20, seed=1)
    assert a["train"].to_dict() == b["train"].to_dict()
    assert a["train"].to_dict() != c["train"].to_dict()
    assert a["train"]["sentence1"][:5] != a["validation"]["sentence1"][:5]  # splits are distinct draws


def test_label_balance_close_to_glue():
    # Positive shares of GLUE's training sets: MRPC ~68%, QQP ~37%, CoLA ~70%, SST-2 ~56%.
    share = {t: float(np.mean(list(og.load_offline_glue(t, train_size=2000)["train"]["label"]))) for t in
             ("mrpc", "qqp", "cola", "sst2")}
    assert share["mrpc"] == pytest.approx(0.68, abs=0.05)
    assert share["qqp"] == pytest.approx(0.37, abs=0.05)
    assert share["cola"] == pytest.approx(0.70, abs=0.06)
    assert share["sst2"] == pytest.approx(0.50, abs=0.05)


def _bow_accuracy(task: str) -> tuple[float, float]:
    """Accuracy of a bag-of-words logistic regression on validation, and the majority-class rate."""
    first, second = og.TASK_TO_KEYS[task]
    data = og.load_offline_glue(task, train_size=2000, eval_size=600)

    def text(ds):
        return [a if second is None else a + " ||| " + b
                for a, b in zip(ds[first], ds[second] if second else ds[first])]

    vec = sklearn_text.CountVectorizer(ngram_range=(1, 2)).fit(text(data["train"]))
    clf = sklearn_lm.LogisticRegression(max_iter=2000).fit(vec.transform(text(data["train"])), list(data["train"]["label"]))
    y = np.asarray(list(data["validation"]["label"]))
    return clf.score(vec.transform(text(data["validation"])), y), np.bincount(y).max() / len(y)


@pytest.mark.parametrize("task,min_gain", [("sst2", 0.25), ("cola", 0.05)])
def test_labels_carry_learnable_signal(task, min_gain):
    acc, majority = _bow_accuracy(task)
    assert acc > majority + min_gain


def test_stsb_score_follows_overlap():
    data = og.load_offline_glue("stsb", train_size=800)["train"]
    overlap = [len(set(a.split()) & set(b.split())) / len(set(a.split()) | set(b.split()))
               for a, b in zip(data["sentence1"], data["sentence2"])]
    assert np.corrcoef(overlap, list(data["label"]))[0, 1] > 0.5


def test_label_noise_rate():
    # The noise draw happens for every example, so both datasets share their texts and differ only in labels.
    clean = og.load_offline_glue("sst2", train_size=4000, label_noise=0.0)["train"]
    noisy = og.load_offline_glue("sst2", train_size=4000, label_noise=0.1)["train"]
    assert list(clean["sentence"]) == list(noisy["sentence"])
    flipped = np.mean(np.asarray(list(clean["label"])) != np.asarray(list(noisy["label"])))
    assert flipped == pytest.approx(0.1, abs=0.015)


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError, match=r"`task` must be one of \['cola', 'sst2'.*got 'squad'"):
        og.load_offline_glue("squad")


def test_pretraining_corpus_covers_every_task():
    corpus = og.pretraining_corpus(n_per_task=20)
    assert len(corpus) == 20 * (2 + 2 * 7)  # one text per single-sentence task (2), two per pair task (7)
    assert len(set(corpus)) > len(corpus) // 2
