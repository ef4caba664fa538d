"""Label vocabulary files and the check that a caption mentions a label."""

from __future__ import annotations

import pytest
from helpers import voc2007_release

from ovml.pipeline.errors import OvmlError
from ovml.pipeline.vocabulary import MentionMatcher, load_vocabulary, parse_vocabulary, word_forms


def matcher(text: str) -> MentionMatcher:
    return MentionMatcher(parse_vocabulary(text))


def test_file_keeps_label_order_and_synonyms(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("# animals\n\ndog: puppy, hound\ncat\n  traffic   light  \n", encoding="utf-8")
    vocabulary = load_vocabulary(str(path))
    assert vocabulary.labels == ["dog", "cat", "traffic light"]
    assert vocabulary.synonyms == {"dog": ["puppy", "hound"]}


def test_duplicate_label_is_an_error_naming_both_lines():
    with pytest.raises(OvmlError, match="line 3: label 'Dog' is already on line 1"):
        parse_vocabulary("dog\ncat\nDog: puppy\n")


@pytest.mark.parametrize("text", ["cat\ndog: cat\n", "dog: cat\ncat\n", "dog: pup\nwolf: Pup\n"])
def test_a_name_that_stands_for_two_labels_is_an_error(text):
    with pytest.raises(OvmlError, match="already names label .*a name may stand for one label only"):
        parse_vocabulary(text)


def test_a_synonym_may_repeat_its_own_label():
    assert parse_vocabulary("dog: Dog, puppy\n").synonyms == {"dog": ["Dog", "puppy"]}


def test_empty_synonym_is_an_error():
    with pytest.raises(OvmlError, match="empty synonym"):
        parse_vocabulary("dog: puppy,,hound\n")


def test_file_without_labels_is_an_error():
    with pytest.raises(OvmlError, match="has no labels"):
        parse_vocabulary("# only a comment\n\n")


def test_missing_file_is_a_one_line_error(tmp_path):
    with pytest.raises(OvmlError, match="does not exist") as info:
        load_vocabulary(str(tmp_path / "nope.txt"))
    assert "\n" not in str(info.value)


def test_dataset_split_vocabulary_needs_the_dataset_root():
    with pytest.raises(OvmlError, match="pass its folder with --dataset-root"):
        load_vocabulary("nuswide:seen")


def test_dataset_split_vocabulary_reads_the_split_from_the_dataset(tmp_path):
    vocabulary = load_vocabulary("voc2007:all", str(voc2007_release(tmp_path)))
    assert len(vocabulary.labels) == 20 and "dining table" in vocabulary.labels


def test_unknown_dataset_split_lists_the_known_ones(tmp_path):
    with pytest.raises(OvmlError, match="voc2007 has no label split 'unseen'; choose one of: all"):
        load_vocabulary("voc2007:unseen", str(voc2007_release(tmp_path)))


@pytest.mark.parametrize(("word", "plural"), [("dog", "dogs"), ("bus", "buses"), ("box", "boxes"),
                                              ("bench", "benches"), ("butterfly", "butterflies"),
                                              ("person", "people"), ("knife", "knives")])
def test_word_forms_go_both_ways_between_singular_and_plural(word, plural):
    assert plural in word_forms(word)
    assert word in word_forms(plural)


def test_match_ignores_case_and_accepts_plurals():
    assert matcher("dog\nbus\nbutterfly\nperson\n").mentions("Two DOGS, three Butterflies and people near buses") \
        == ["dog", "bus", "butterfly", "person"]


def test_match_needs_whole_words():
    assert matcher("cat\ncar\n").mentions("a category of carpets") == []


def test_multi_word_label_matches_with_plural_or_hyphen():
    m = matcher("traffic light\nt-shirt\n")
    assert m.mentions("Traffic  lights above a man in a t shirt") == ["traffic light", "t-shirt"]
    assert m.mentions("a traffic-light") == ["traffic light"]


def test_synonyms_count_as_their_label():
    assert matcher("dog: puppy, hound\ncat\n").mentions("a sleepy puppy") == ["dog"]


def test_longest_label_wins_where_labels_overlap():
    assert matcher("dog\nhot dog\nbun\n").mentions("a hot dog in a bun") == ["hot dog", "bun"]


def test_a_label_written_in_the_vocabulary_beats_an_inflection_of_another():
    assert matcher("glass\nglasses\n").mentions("reading glasses next to a glass") == ["glass", "glasses"]


def test_possessive_still_mentions_the_label():
    assert matcher("dog\n").mentions("the dog's ball") == ["dog"]
