"""Label vocabularies and the check that a caption really mentions a label.

A vocabulary file has one label per line, optionally followed by synonyms: `label: synonym, synonym`.
Blank lines and lines starting with `#` are ignored. The order of the file is the training order.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from ovml.pipeline.errors import OvmlError
from ovml.pipeline.paths import input_file

# English plurals that no suffix rule produces; common object labels need them (person/people).
IRREGULAR_PLURALS = {
    "person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice",
    "foot": "feet", "tooth": "teeth", "goose": "geese", "ox": "oxen", "leaf": "leaves", "knife": "knives",
    "wolf": "wolves", "shelf": "shelves", "loaf": "loaves", "calf": "calves", "life": "lives", "wife": "wives",
}
_IRREGULAR_SINGULARS = {plural: singular for singular, plural in IRREGULAR_PLURALS.items()}
DATASET_SPLIT = re.compile(r"[A-Za-z0-9_-]+:[A-Za-z0-9_-]+")
_SIBILANT = ("s", "x", "z", "ch", "sh")
_VOWELS = "aeiou"


@dataclass(frozen=True)
class Vocabulary:
    labels: list[str]
    synonyms: dict[str, list[str]] = field(default_factory=dict)
    sources: list[Path] = field(default_factory=list)  # the files it was read from: the stage's inputs

    def as_json(self) -> dict:
        return {"labels": list(self.labels), "synonyms": {k: list(v) for k, v in self.synonyms.items()}}


def read_vocabulary_json(path: Path) -> list[str]:
    """The ordered training labels of captions/vocabulary.json, as generate-text wrote them."""
    try:
        labels = json.loads(path.read_text(encoding="utf-8")).get("labels")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        labels = None
    if not labels or not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise OvmlError(f"{path} has no 'labels' list of strings; run the same `ovml generate-text` command again "
                        "(it rewrites the file and keeps the captions)")
    return labels


def load_vocabulary(spec: str, dataset_root: str | None = None) -> Vocabulary:
    """A vocabulary from a label file, or a dataset's label split such as `nuswide:seen` (needs its root)."""
    if not spec:
        raise OvmlError("no label vocabulary given; pass --labels FILE (one label per line), or set "
                        "labels = \"FILE\" in the [generate_text] section of the --config file")
    path = Path(spec)
    if not path.exists() and DATASET_SPLIT.fullmatch(spec):
        return _dataset_split(spec, dataset_root)
    input_file(path, "labels file", "pass a text file with one label per line to --labels")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise OvmlError(f"labels file {path} is not UTF-8 text; save it as UTF-8") from None
    return replace(parse_vocabulary(text, source=str(path)), sources=[path])


def _dataset_split(spec: str, dataset_root: str | None) -> Vocabulary:
    from ovml.pipeline.datasets import read_dataset

    name, _, split = spec.partition(":")
    if not dataset_root:
        raise OvmlError(f"--labels {spec} reads the labels from the dataset: pass its folder with --dataset-root")
    dataset = read_dataset(name, dataset_root)
    if split not in dataset.splits:
        raise OvmlError(f"{name} has no label split '{split}'; choose one of: {', '.join(dataset.splits)}")
    return Vocabulary(list(dataset.splits[split]), sources=list(dataset.annotation_files))


def parse_vocabulary(text: str, source: str = "labels file") -> Vocabulary:
    labels: list[str] = []
    synonyms: dict[str, list[str]] = {}
    seen: dict[str, int] = {}
    meaning: dict[str, tuple[str, int]] = {}  # each name, label or synonym, -> (its label, its line)
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        label, _, rest = line.partition(":")
        label = " ".join(label.split())
        if not label:
            raise OvmlError(f"{source} line {line_no}: empty label before ':'; write 'label: synonym, synonym'")
        key = label.lower()
        if key in seen:
            raise OvmlError(
                f"{source} line {line_no}: label '{label}' is already on line {seen[key]}; keep one of them"
            )
        seen[key] = line_no
        labels.append(label)
        names = [" ".join(s.split()) for s in rest.split(",")]
        if any(names) and not all(names):
            raise OvmlError(f"{source} line {line_no}: empty synonym; separate synonyms with single commas")
        if any(names):
            synonyms[label] = names
        for name in [label, *(n for n in names if n)]:
            other, other_line = meaning.setdefault(name.lower(), (label, line_no))
            if other.lower() != key:  # one name for two labels: every mention would count for whichever won
                raise OvmlError(f"{source} line {line_no}: '{name}' already names label '{other}' (line "
                                f"{other_line}); a name may stand for one label only, so drop one of them")
    if not labels:
        raise OvmlError(f"{source} has no labels; write one label per line")
    return Vocabulary(labels, synonyms)


def word_forms(word: str) -> set[str]:
    """The word plus its singular and plural under regular English rules (-s, -es, -ies) and a few irregulars."""
    w = word.lower()
    forms = {w}
    if w in IRREGULAR_PLURALS:
        forms.add(IRREGULAR_PLURALS[w])
    if w in _IRREGULAR_SINGULARS:
        forms.add(_IRREGULAR_SINGULARS[w])
    if len(w) > 3 and w.endswith("ies"):
        forms.add(w[:-3] + "y")
    elif w.endswith("es") and w[:-2].endswith(_SIBILANT):
        forms.add(w[:-2])
    elif len(w) > 2 and w.endswith("s") and not w.endswith("ss"):
        forms.add(w[:-1])
    if w.endswith("y") and len(w) > 1 and w[-2] not in _VOWELS:
        forms.add(w[:-1] + "ies")
    elif w.endswith(_SIBILANT):
        forms.add(w + "es")
    else:
        forms.add(w + "s")
    return forms


def _phrase_forms(phrase: str) -> set[str]:
    """Multi-word labels inflect their last word only: 'traffic light' -> 'traffic lights'."""
    *head, last = _normalise(phrase).split()
    return {" ".join([*head, form]) for form in word_forms(last)}


def _normalise(surface: str) -> str:
    """Lower case, with hyphens and runs of spaces as one space: 't-shirt' and 'T  shirt' are one name."""
    return " ".join(re.split(r"[\s\-]+", surface.lower().strip(" -")))


class MentionMatcher:
    """Finds which vocabulary labels a text mentions: whole words, any case, singular or plural, synonyms.

    The longest phrase wins where phrases overlap, so 'hot dog' does not also count as 'dog'. Names written
    in the vocabulary take precedence over inflections, so 'glass' and 'glasses' can both be labels.
    """

    def __init__(self, vocabulary: Vocabulary):
        self.labels = list(vocabulary.labels)
        owner: dict[str, str] = {}
        for label in self.labels:
            for name in [label, *vocabulary.synonyms.get(label, [])]:
                for form in _phrase_forms(name):
                    owner.setdefault(form, label)
        for label in self.labels:
            for name in [label, *vocabulary.synonyms.get(label, [])]:
                owner[_normalise(name)] = label
        self._owner = owner
        alternatives = sorted(owner, key=len, reverse=True)
        body = "|".join(r"[\s\-]+".join(re.escape(w) for w in form.split()) for form in alternatives)
        self._pattern = re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.IGNORECASE)

    def mentions(self, text: str) -> list[str]:
        """Labels mentioned in `text`, in vocabulary order."""
        found = {self._owner[_normalise(m.group(0))] for m in self._pattern.finditer(text)}
        return [label for label in self.labels if label in found]
