"""The demo's task: short sentences in four topics (topics.tsv, shipped with this package),
split into a fixed training and test set."""

from __future__ import annotations

import csv
import io
from importlib import resources
from typing import Optional

DATA_FILE = "topics.tsv"


def load_dataset(path: Optional[str] = None):
    """(labels, train, test): ``train``/``test`` are lists of (text, label index). The split is
    fixed: every fourth sentence of each topic is held out."""
    if path is None:
        text = resources.files("miss_ext.demo").joinpath(DATA_FILE).read_text(encoding="utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE))
    labels = list(dict.fromkeys(row["label"] for row in rows))
    train, test, seen = [], [], {label: 0 for label in labels}
    for row in rows:
        label = row["label"]
        (test if seen[label] % 4 == 3 else train).append((row["text"], labels.index(label)))
        seen[label] += 1
    return labels, train, test


def subsample(examples, per_label: int):
    """The first ``per_label`` examples of each label, in the original order."""
    count, kept = {}, []
    for text, label in examples:
        if count.get(label, 0) < per_label:
            kept.append((text, label))
            count[label] = count.get(label, 0) + 1
    return kept
