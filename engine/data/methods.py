"""What each training method learns from: SFT the answers of the rows whose label it trains on, KTO every
labelled row (desirable or undesirable; a pair row gives one of each), DPO and ORPO the pair rows."""

from __future__ import annotations

from engine.data.validate import DatasetError, DatasetReport, Example

METHODS = ("sft", "kto", "dpo", "orpo")


def method_use(report: DatasetReport, train_labels: list[str]) -> dict[str, str]:
    """One line per method saying which rows it would train on, for the dataset screen and `validate`."""
    labels = report.labels
    wanted = set(train_labels)
    sft = sum(n for label, n in labels.items() if not wanted or label in wanted or label == "unlabelled")
    aside = sum(labels.values()) - sft
    desirable, undesirable = labels.get("desirable", 0) + report.pairs, labels.get("undesirable", 0) + report.pairs
    lines = {"sft": f"SFT: {sft + report.pairs} answers" + (f" ({report.pairs} chosen of pairs)" if report.pairs else "")
             + (f", {aside} set aside by data.train_labels" if aside else "")}
    kto = f"KTO: {desirable} desirable + {undesirable} undesirable"
    if report.pairs:
        kto += f" ({report.pairs} pairs split into one of each)"
    if labels.get("unlabelled"):
        kto += f"; {labels['unlabelled']} unlabelled rows left out"
    lines["kto"] = kto
    lines["dpo"] = lines["orpo"] = (f"DPO/ORPO: {report.pairs} pairs" if report.pairs else
                                    "DPO/ORPO: no pair rows (they need prompt + chosen / rejected)")
    return lines


def for_method(method: str, train: list[Example], valid: list[Example], report: DatasetReport,
               warn) -> tuple[list[Example], list[Example]]:
    """The split's rows that `method` trains on (after the split, so a pair's two halves stay on one side)."""
    if method == "sft":
        return train, valid
    if method == "kto":
        unlabelled = sum(1 for e in train + valid if e.label is None and e.rejected is None)
        if unlabelled:
            warn(f"{unlabelled} rows have no label (desirable/undesirable): KTO leaves them out")
        no_prompt = sum(1 for e in train + valid if e.label is not None and e.encoded.trained[0])
        if no_prompt:
            warn(f"{no_prompt} labelled rows are plain text (no prompt to pair another answer with for KTO's "
                 "reference point): KTO leaves them out")
        return _kto_rows(train), _kto_rows(valid)
    pairs = [e for e in train + valid if e.rejected is not None]
    if not pairs:
        found = ", ".join(f"{k}={v}" for k, v in sorted(report.labels.items())) or "none"
        raise DatasetError(f"{report.path}: training.method {method} needs pair rows (prompt + chosen / rejected) "
                           f"and this file has none (rows by label: {found}); for desirable/undesirable labels "
                           "use training.method: kto")
    others = len(train) + len(valid) - len(pairs)
    if others:
        warn(f"{others} rows are not pairs (chosen / rejected): {method} leaves them out")
    return [e for e in train if e.rejected is not None], [e for e in valid if e.rejected is not None]


def _kto_rows(examples: list[Example]) -> list[Example]:
    out = []
    for e in examples:
        if e.rejected is not None:
            out += [Example(e.line, "desirable", e.encoded), Example(e.line, "undesirable", e.rejected)]
        elif e.label is not None and not e.encoded.trained[0]:  # a text row trains from its first token
            out.append(e)
    return out
