"""Champion against challenger: both ONNX exports scored on the new snapshot's held-out
test split, and the rule that decides whether the challenger takes over.

Why the test split: the challenger's search chose it on the validation split, so its
validation score is optimistic. Test images are picked by a hash of their path
(``trainables.data.holdout.carve_test``): with the same ``data.test_fraction`` a file held
out of the champion's snapshot is held out of every later one, and a new file is new
to both models. A snapshot without a test split (``data.test_fraction: 0``) is scored
on its validation split, and the gate says so; validation is picked by a hash too
(``carve_val``), so with the same seed the champion trained on none of it either. (A
stratified draw re-made per snapshot had the champion trained on 161 of 360 validation
images of a grown snapshot.)

Both bundles run in ONNX Runtime, the artefact that will serve, each with the
preprocessing recorded in its bundle, over the same images. Scores are over the **new
snapshot's classes**; the rule for classes that changed:

- **A class added** in the new snapshot is one the champion cannot predict: its F1 for
  that class is 0, and that counts in its macro-F1. The per-class drop check skips it
  (there is nothing to drop from).
- **A class removed** from the new snapshot is not scored (it has no images). A champion
  prediction of it is simply wrong: it costs the true class its recall.

The challenger is promoted only when its export passed the parity check (it exists:
``export_checkpoint`` publishes nothing else), its macro-F1 is at least the champion's
plus ``min_gain``, its gain is evidence (the paired bootstrap 95 % interval of
challenger minus champion, over the same images, lies above 0: a gain the split cannot
tell from 0 is "no evidence of improvement", whatever ``min_gain`` says), and no class
both models know loses more than ``max_class_drop`` F1. With no champion yet, a
challenger that passed parity is promoted.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score

from search.export.bundle import INPUT_NAME, ONNX_FILE, OUTPUT_NAME
from search.export.onnx import create_session
from search.export.scoring import eval_loader
from search.markdown import md_text
from search.results.intervals import paired_difference
from trainables.data.datasets import DataSplit


@dataclass(frozen=True)
class Score:
    """One model's F1 on the new snapshot's test (or validation) split, per new class and averaged."""

    macro_f1: float
    per_class_f1: dict[str, float]
    num_images: int
    known_classes: list[str]  # the classes the model was trained on
    scored_on: str = "val"  # which split of the new snapshot: "test", or "val" when it has none
    # Per image, in the split's order: the true class and the predicted one (new snapshot's
    # indices, -1 for a class it lacks); empty in gate.json files written before intervals.
    labels: list[int] = field(default_factory=list)
    predictions: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Decision:
    """Whether the challenger takes over, why, and every number behind it."""

    promote: bool
    reasons: list[str]
    challenger: Score | None  # None: its export failed the parity check, nothing to score
    champion: Score | None
    champion_version: str | None  # the registered version compared with; None: no champion
    min_gain: float
    max_class_drop: float
    added_classes: list[str] = field(default_factory=list)
    removed_classes: list[str] = field(default_factory=list)
    class_drops: dict[str, float] = field(default_factory=dict)  # champion F1 - challenger F1, shared classes
    # Challenger minus champion macro-F1 with its paired bootstrap interval (intervals.Interval.to_json);
    # None without a champion or in gate.json files written before intervals.
    gain: dict[str, float] | None = None
    # Images of the scored split left out because a model trained on an identical one (by
    # content); None: not checked (no champion, or gate.json files written before the check).
    left_out: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @staticmethod
    def from_json(text: str) -> Decision:
        raw = json.loads(text)
        scores = {k: Score(**raw[k]) if raw[k] else None for k in ("challenger", "champion")}
        return Decision(**{**raw, **scores})


def gate_split(split: DataSplit) -> str:
    """The split the gate scores on: the held-out test split, or validation without one."""
    return "test" if split.test else "val"


def unseen_split(split: DataSplit, champion_trained: set[str]) -> tuple[DataSplit, int]:
    """``split`` with its gate images (``gate_split``) limited to those neither model trained
    on, by content (sha1): the champion's training images (``champion_trained``) and the
    challenger's (``split.train``). Returns it and how many images were left out.

    With the same ``data.test_fraction`` and seed the split already holds none (its files
    are picked by path hash); a copy of a training image under another name, a changed
    fraction or seed, or a tiny class's bounds (``carve_val``) is what this catches. A
    split left empty is kept whole, and the count says so.
    """
    which = gate_split(split)
    trained = champion_trained | {sample.sha1 for sample in split.train}
    images = split.samples(which)
    kept = tuple(sample for sample in images if sample.sha1 not in trained)
    if not kept:
        return split, len(images)
    return replace(split, **{which: kept}), len(images) - len(kept)


def score_bundle(bundle: Path, split: DataSplit, batch_size: int = 64) -> Score:
    """F1 of the ONNX bundle in ``bundle`` on ``split``'s test images (``gate_split``)."""
    which = gate_split(split)
    meta = {"preprocessing": json.loads((bundle / "preprocessing.json").read_text()),
            "config": json.loads((bundle / "config.json").read_text())}
    known = json.loads((bundle / "class_names.json").read_text())
    session = create_session(bundle / ONNX_FILE)
    labels, outputs = [], []
    for x, y in eval_loader(split, meta, batch_size, which=which):
        outputs.append(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0].argmax(1))
        labels.append(y.numpy())
    new_index = {name: i for i, name in enumerate(split.class_names)}
    # A prediction of a class the new snapshot lacks is -1: wrong for every true class.
    to_new = np.array([new_index.get(name, -1) for name in known])
    predicted = to_new[np.concatenate(outputs)]
    truth = np.concatenate(labels)
    per_class = f1_score(truth, predicted, labels=list(range(len(split.class_names))), average=None,
                         zero_division=0.0)
    return Score(float(np.mean(per_class)), dict(zip(split.class_names, map(float, per_class))), len(truth), known,
                 which, truth.tolist(), predicted.tolist())


def refuse_export(error: str, champion_version: str | None, min_gain: float, max_class_drop: float) -> Decision:
    """The decision when the challenger's export failed the parity check: never promoted."""
    return Decision(False, [f"its export failed the parity check: {error}"], None, None, champion_version,
                    min_gain, max_class_drop)


def decide(challenger: Score, champion: Score | None, champion_version: str | None, min_gain: float,
           max_class_drop: float) -> Decision:
    """The gate's rule (module docstring) applied to two scores on the same split."""
    if champion is None:
        return Decision(True, ["no champion yet; the challenger's export passed the parity check"],
                        challenger, None, None, min_gain, max_class_drop)
    scored = list(challenger.per_class_f1)
    added = [c for c in scored if c not in champion.known_classes]
    removed = [c for c in champion.known_classes if c not in challenger.per_class_f1]
    drops = {c: champion.per_class_f1[c] - challenger.per_class_f1[c] for c in scored if c not in added}
    reasons = []
    needed = champion.macro_f1 + min_gain
    difference = challenger.macro_f1 - champion.macro_f1
    # Five digits and the difference itself: at four, 0.99156 against 0.99160 read "0.9916 is below 0.9916".
    if challenger.macro_f1 < needed:
        reasons.append(f"macro-F1 {challenger.macro_f1:.5f} is below the champion's {champion.macro_f1:.5f} "
                       f"+ min_gain {min_gain:g} = {needed:.5f} (difference {difference:+.5f})")
    gain = _gain(challenger, champion)
    if gain is not None and gain.low <= 0 <= difference:
        reasons.append(f"no evidence of improvement: the gain {gain.value:+.5f} has a 95 % interval "
                       f"[{gain.low:+.4f}, {gain.high:+.4f}] over the {challenger.num_images} images, which holds 0")
    worst = [f"'{c}' by {d:.4f}" for c, d in sorted(drops.items(), key=lambda kv: -kv[1]) if d > max_class_drop]
    if worst:
        reasons.append(f"F1 drops by more than max_class_drop {max_class_drop:g} for {', '.join(worst)}")
    promote = not reasons
    if promote:
        evidence = "" if gain is None else f", 95 % interval of the gain [{gain.low:+.4f}, {gain.high:+.4f}]"
        reasons.append(f"macro-F1 {challenger.macro_f1:.5f} ≥ {needed:.5f} (champion {champion.macro_f1:.5f} "
                       f"+ {min_gain:g}; gain {difference:+.5f}{evidence}); no class drops more than "
                       f"{max_class_drop:g}; export passed parity")
    return Decision(promote, reasons, challenger, champion, champion_version, min_gain, max_class_drop, added,
                    removed, drops, None if gain is None else gain.to_json())


def _gain(challenger: Score, champion: Score):
    """Challenger minus champion macro-F1 over the same images, with its paired bootstrap
    interval; None when either score lacks per-image predictions (older gate.json files)."""
    if not challenger.predictions or len(challenger.predictions) != len(champion.predictions):
        return None
    return paired_difference(challenger.labels, challenger.predictions, champion.predictions,
                             len(challenger.per_class_f1))


def _class_rows(decision: Decision) -> list[tuple[str, str, str, str]]:
    """(class, champion F1, challenger F1, signed change) per new-snapshot class, then macro."""
    champion, challenger = decision.champion, decision.challenger
    rows = []
    for c, f1 in challenger.per_class_f1.items():
        old = "" if champion is None else f"{champion.per_class_f1[c]:.4f}"
        change = f"{-decision.class_drops[c]:+.4f}" if c in decision.class_drops else ""
        rows.append((c, old, f"{f1:.4f}", change))
    gain = "" if champion is None else f"{challenger.macro_f1 - champion.macro_f1:+.5f}"
    if decision.gain:
        gain += f" (95 % [{decision.gain['low']:+.4f}, {decision.gain['high']:+.4f}])"
    rows.append(("macro", "" if champion is None else f"{champion.macro_f1:.4f}", f"{challenger.macro_f1:.4f}", gain))
    return rows


_CLASS_RULES = (
    ("added", "the champion cannot predict it: champion F1 0, not checked for drops"),
    ("removed", "no images in the new snapshot: not scored; champion predictions of it count as errors"),
)


def _scored_on(decision: Decision) -> str:
    where = ("held-out test split" if decision.challenger.scored_on == "test"
             else "validation split (it has no test split, data.test_fraction: 0)")
    text = f"Scored on the new snapshot's {where} ({decision.challenger.num_images} images), ONNX Runtime."
    if decision.left_out is not None and decision.champion is not None:
        text += (f" Neither model trained on any of them (checked by content against both training splits; "
                 f"{decision.left_out} left out for that).")
    return text


def describe_html(decision: Decision) -> str:
    """The decision as an HTML section for the top of report.html: the same verdict,
    reasons, class changes and table as ``describe``."""
    e = html.escape
    verdict = "promoted" if decision.promote else "not promoted"
    against = f"champion version {e(decision.champion_version)}" if decision.champion_version else "no champion"
    parts = [f'<section id="gate"><h2>Retrain gate: challenger <strong>{verdict}</strong> (against {against})</h2>',
             "<ul>" + "".join(f"<li>{e(r)}</li>" for r in decision.reasons) + "</ul>"]
    if decision.challenger is not None:
        changed = [(c, name, rule) for name, rule in _CLASS_RULES
                   for c in (decision.added_classes if name == "added" else decision.removed_classes)]
        if changed:
            parts.append("<ul>" + "".join(f"<li>Class <code>{e(c)}</code> {name} in the new snapshot: {rule}.</li>"
                                          for c, name, rule in changed) + "</ul>")
        head = "".join(f"<th>{h}</th>" for h in ("class", "champion F1", "challenger F1", "change (+ gain, − loss)"))
        body = "".join("<tr>" + "".join(f"<td>{e(v)}</td>" for v in row) + "</tr>" for row in _class_rows(decision))
        parts.append(f"<p class=note>{e(_scored_on(decision))}</p><table><thead><tr>{head}</tr></thead>"
                     f"<tbody>{body}</tbody></table>")
    return "".join(parts) + "</section>"


def describe(decision: Decision, level: int = 1) -> str:
    """The decision as Markdown, under a heading of ``level``: verdict, reasons, class
    changes and the per-class table."""
    verdict = "**promoted**" if decision.promote else "**not promoted**"
    against = f"champion version {decision.champion_version}" if decision.champion_version else "no champion"
    lines = ["#" * level + " Champion/challenger gate", "", f"Challenger {verdict} (against {against}):",
             *[f"- {md_text(r)}" for r in decision.reasons], ""]  # reasons quote class names and errors
    if decision.challenger is None:
        return "\n".join(lines)
    for name, rule in _CLASS_RULES:
        classes = decision.added_classes if name == "added" else decision.removed_classes
        lines += [f"- Class '{md_text(c)}' {name} in the new snapshot: {rule}." for c in classes]
    lines += ["", _scored_on(decision), "",
              "| class | champion F1 | challenger F1 | change (+ gain, − loss) |", "|---|---|---|---|"]
    rows = _class_rows(decision)
    lines += [f"| {md_text(c)} | {old} | {new} | {change} |" for c, old, new, change in rows[:-1]]
    _, old, new, change = rows[-1]
    lines.append(f"| **macro** | {old} | {new} | {change} |")
    return "\n".join(lines) + "\n"
