"""Blind A/B review of two models' answers (issue 20): a saved session of prompts, answers, hidden sides and
judgements (session.py), its tally with Wilson intervals (stats.py), the prompts it reviews (prompts.py) and
the labelled conversations it appends to a dataset (labels.py). No UI here: the Review screen drives it."""
