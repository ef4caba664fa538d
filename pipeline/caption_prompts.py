"""What generate-text asks the LLM: label sets drawn per anchor label, and the chat prompts that ask for them.

A round's plan is a pure function of the seed and of the parts already written (their tally), so a killed run
replays the plans over the parts on disk and generates only what is missing.
"""

from __future__ import annotations

import json
import math
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ovml.pipeline.caption_pool import ShardTally
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.settings import GenerateTextConfig
from ovml.pipeline.vocabulary import Vocabulary
from ovml.prompts import read_prompt_file

PROMPTS_FILE = "caption_prompts.json"
MIN_YIELD = 0.2  # cap on over-planning when the model rarely mentions what it was asked for


@dataclass(frozen=True)
class PlannedPrompt:
    labels: tuple[str, ...]
    prompt_id: str
    seed: int


class LabelSetSampler:
    """Draws the companions of an anchor label with probability proportional to a weight matrix row.

    uniform: every other label weighs 1; similar: the nearest labels in CLIP text space weigh 1;
    cooccurrence: weights are co-occurrence counts. Labels with no weight fill any remaining slots uniformly.
    """

    def __init__(self, labels: list[str], weights: np.ndarray):
        self.labels = labels
        self.weights = weights.astype(np.float64)
        np.fill_diagonal(self.weights, 0.0)

    def label_set(self, anchor: int, size: int, rng: np.random.Generator) -> list[int]:
        weights = self.weights[anchor]
        partners = np.flatnonzero(weights > 0)
        take = min(size - 1, len(partners))
        chosen = list(rng.choice(partners, size=take, replace=False, p=weights[partners] / weights[partners].sum())
                      ) if take else []
        rest = np.setdiff1d(np.arange(len(self.labels)), [anchor, *chosen])
        fill = min(size - 1 - take, len(rest))
        chosen += list(rng.choice(rest, size=fill, replace=False)) if fill else []
        return [anchor, *(int(i) for i in chosen)]


def cooccurrence_counts(path: Path, vocabulary: Vocabulary) -> np.ndarray:
    """Pair counts from a tag file (one image per line, labels or their synonyms separated by commas)."""
    index = {label.lower(): i for i, label in enumerate(vocabulary.labels)}
    for label, names in vocabulary.synonyms.items():
        index.update({name.lower(): index[label.lower()] for name in names})
    counts = np.zeros((len(vocabulary.labels),) * 2)
    for line in path.read_text(encoding="utf-8").splitlines():
        present = sorted({index[t] for t in (" ".join(tag.split()).lower() for tag in line.split(",")) if t in index})
        for a in present:
            counts[a, present] += 1
    if not (counts - np.diag(np.diag(counts))).any():  # the diagonal counts lone labels, not pairs
        raise OvmlError(f"co-occurrence file {path} has no line with two vocabulary labels; "
                        "write one image per line with its labels separated by commas")
    return counts


@dataclass(frozen=True)
class CaptionPrompts:
    """One system prompt, worked examples as earlier chat turns, and request variants for diversity.

    Small models follow a format far better after seeing it answered. Everything before the final request
    is the same for every prompt, so llama.cpp reuses its cache for that prefix instead of re-reading it.
    """

    system: str
    examples: list[dict]
    variants: dict[str, str]

    @classmethod
    def load(cls) -> CaptionPrompts:
        data = json.loads(read_prompt_file(PROMPTS_FILE))
        return cls(data["system"], data["examples"], dict(sorted(data["variants"].items())))

    def messages(self, prompt_id: str, labels: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
        turns = [("system", self.system)]
        for example in self.examples:
            turns += [("user", _fill(example["request"], example["labels"])),
                      ("assistant", json.dumps({"caption": example["caption"]}))]
        return (*turns, ("user", _fill(self.variants[prompt_id], labels)))

    def head(self, prompt_id: str) -> str:
        """How the variant's request begins whatever the labels: a backend evaluates it once (ChatRequest.head)."""
        return self.variants[prompt_id].split("$")[0]


def _fill(template: str, labels: tuple[str, ...] | list[str]) -> str:
    named = labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]
    return string.Template(template).substitute(labels=named)


def plan_round(tally: ShardTally, target: int, sampler: LabelSetSampler, prompt_ids: list[str],
                cfg: GenerateTextConfig, rng: np.random.Generator) -> list[PlannedPrompt]:
    """Prompts for every label short of `target`, scaled up by how often asked labels end up kept."""
    scale = 1 / max(tally.label_yield(), MIN_YIELD)
    position = {label: i for i, label in enumerate(sampler.labels)}
    remaining = {label: math.ceil(short * scale) for label, short in tally.shortfall(target).items()}
    anchors = [label for label, n in remaining.items() for _ in range(n)]
    plan = []
    for anchor in (anchors[i] for i in rng.permutation(len(anchors))):
        if remaining.get(anchor, 0) <= 0:
            continue
        size = min(int(rng.integers(cfg.min_labels, cfg.max_labels + 1)), len(sampler.labels))
        chosen = sampler.label_set(position[anchor], size, rng)
        labels = tuple(sampler.labels[i] for i in rng.permutation(chosen))
        for label in labels:
            if label in remaining:
                remaining[label] -= 1
        plan.append(PlannedPrompt(labels, prompt_ids[int(rng.integers(len(prompt_ids)))],
                                  int(rng.integers(2**31))))
    return plan
