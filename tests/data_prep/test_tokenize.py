import socket
import time

import numpy as np
import pytest

from data_prep.tokenize import encode_expressions, from_local_or_hub, load_tokenizer, vocabulary_hash
from magnet.config import load_config
from magnet.models import build_model


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


@pytest.fixture
def network_attempts(monkeypatch) -> list:
    """Online mode (HF_HUB_OFFLINE off), every connection refused and recorded."""
    import huggingface_hub.constants

    attempts = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network disabled by the test")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: refuse(address))
    return attempts


def test_paper_model_and_its_tokenizer_resolve_offline_without_a_network_attempt(network_attempts):
    cfg = load_config("paper").model  # text.name_or_path: bert-base-uncased
    build_model(cfg, "meta")  # warm-up: first imports
    load_tokenizer.cache_clear()
    # CPU time for the < 1 s budget (wall time on this shared machine swings with its load); wall
    # time only to show nothing waits: the hub's retries back off 23 s per file.
    wall, cpu = time.perf_counter(), time.process_time()
    build_model(cfg, "meta")
    built = time.process_time()
    tokenizer = load_tokenizer(cfg.text.name_or_path)
    assert network_attempts == []
    assert built - cpu < 1.0 and time.process_time() - built < 1.0
    assert time.perf_counter() - wall < 10.0
    assert len(tokenizer) == 30522 and tokenizer.mask_token_id == 103


def test_a_model_not_available_locally_is_fetched_from_the_hub_only_then():
    calls = []

    def load(source, **kwargs):
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise OSError("not in the cache")
        return f"{source} from the hub"

    assert from_local_or_hub(load, "org/model", revision="main") == "org/model from the hub"
    assert calls == [{"local_files_only": True, "revision": "main"}, {"revision": "main"}]
