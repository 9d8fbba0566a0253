"""Stratified, seeded train/validation split."""

from collections import Counter

from engine.data import stratified_split


def test_split_keeps_the_label_mix_and_is_seeded():
    labels = ["desirable"] * 800 + ["undesirable"] * 200
    items = list(range(1000))
    train, val = stratified_split(items, labels, 0.2, seed=42)
    assert len(val) == 200 and len(train) == 800 and not set(train) & set(val)
    mix = Counter(labels[i] for i in val)
    assert mix == {"desirable": 160, "undesirable": 40}
    assert stratified_split(items, labels, 0.2, seed=42) == (train, val)
    assert stratified_split(items, labels, 0.2, seed=43)[1] != val


def test_small_groups_still_reach_validation():
    labels = ["a"] * 20 + ["b"] * 3
    _, val = stratified_split(list(range(23)), labels, 0.1, seed=0)
    assert Counter(labels[i] for i in val) == {"a": 2, "b": 1}


def test_unstratified_and_empty_validation():
    items = list(range(10))
    assert stratified_split(items, [None] * 10, 0.0, seed=0) == (items, [])
    train, val = stratified_split(items, ["a"] * 5 + ["b"] * 5, 0.3, seed=0, stratify=False)
    assert len(val) == 3 and len(train) == 7
