import numpy as np
import pytest

from data_prep.tokenize import encode_expressions, load_tokenizer, vocabulary_hash


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load_tokenizer.cache_clear()
    yield
    load_tokenizer.cache_clear()


def test_real_words_get_bert_base_uncased_ids():
    ids, mask, n_words = encode_expressions(load_tokenizer(), ["The small blue triangle"], max_tokens=8)
    # bert-base-uncased: [CLS]=101, the=1996, small=2235, blue=2630, triangle=9546, [SEP]=102
    assert ids[0].tolist() == [101, 1996, 2235, 2630, 9546, 102, 0, 0]
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert n_words.tolist() == [4]


def test_long_expression_is_cut_and_loses_its_sep_like_the_reference():
    ids, mask, n_words = encode_expressions(load_tokenizer(), ["a " * 30], max_tokens=20)
    assert ids.dtype == np.int32 and ids.shape == (1, 20)
    assert ids[0, 0] == 101 and 102 not in ids[0] and mask.all()
    assert n_words[0] == 30


def test_whitespace_tokenises_to_no_words():
    _, _, n_words = encode_expressions(load_tokenizer(), ["   "], max_tokens=20)
    assert n_words.tolist() == [0]


def test_bert_base_uncased_offline_uses_the_identical_vocabulary():
    bert = load_tokenizer("bert-base-uncased")
    minilm = load_tokenizer("all-minilm-l6-v2")
    assert len(bert) == 30522
    assert vocabulary_hash(bert) == vocabulary_hash(minilm)


def test_unknown_tokenizer_is_an_error():
    with pytest.raises(OSError):
        load_tokenizer("/no/such/tokenizer-dir")
