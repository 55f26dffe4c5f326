"""Reading the refer layout: the safe unpickler, names from instances.json, split matching."""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path

import pytest
from refer_fixture import IMAGES, REFS

from data_prep.refer import ReferFormatError, UnsafePickleError, load_refer, load_refs_pickle


def test_reads_refs_and_images_from_instances(refer_root: Path) -> None:
    data = load_refer(refer_root, "refcoco", "unc")
    assert len(data.refs) == len(REFS)
    ref = next(r for r in data.refs if r.ref_id == 2)
    assert (ref.ann_id, ref.image_id, ref.split) == (102, 2, "train")
    assert [s.sent_id for s in ref.sentences] == [7, 8]
    # The image name comes from instances.json, not from the ref's file_name.
    assert data.images[2].file_name == IMAGES[2][0]
    assert (data.images[1].width, data.images[1].height) == (40, 30)
    unicode_ref = next(r for r in data.refs if r.ref_id == 1)
    assert unicode_ref.sentences[1].raw == "le café à gauche, 左边的椅子"


def test_split_matching_follows_the_refer_toolkit(refer_root: Path) -> None:
    data = load_refer(refer_root, "refcoco", "unc")
    assert data.stored_splits() == ["train", "val", "testA", "testB"]
    assert data.available_splits() == ["train", "val", "test", "testA", "testB"]
    assert {r.ref_id for r in data.select("train")} == {1, 2, 3, 4, 5, 6, 16, 17}
    assert {r.ref_id for r in data.select("testA")} == {11, 12, 13, 14}
    # "test" matches by substring: testA and testB together.
    assert {r.ref_id for r in data.select("test")} == {11, 12, 13, 14, 15}


def test_unknown_split_lists_the_available_ones(refer_root: Path) -> None:
    data = load_refer(refer_root, "refcoco", "unc")
    with pytest.raises(ValueError, match=r"unknown split 'testC'.*train, val, test, testA, testB"):
        data.select("testC")
    with pytest.raises(ValueError, match="unknown split 'Train'"):
        data.select("Train")


def test_malicious_pickle_is_refused_and_not_run(refer_root: Path, evil_marker: Path) -> None:
    with pytest.raises(UnsafePickleError, match=r"refcoco\+/refs\(unc\)\.p.*system"):
        load_refer(refer_root, "refcoco+", "unc")
    assert not evil_marker.exists()


def test_builtin_sets_are_admitted_but_other_globals_are_not(tmp_path: Path) -> None:
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps([{"a": {1, 2}, "b": (1.5, "x", None)}], protocol=2))
    assert load_refs_pickle(path) == [{"a": {1, 2}, "b": (1.5, "x", None)}]
    path.write_bytes(pickle.dumps([Path("x")], protocol=2))
    with pytest.raises(UnsafePickleError, match="pathlib"):
        load_refs_pickle(path)


def test_non_text_expressions_are_kept_for_rejection_and_bytes_read_as_utf8(refer_root: Path) -> None:
    """The fixture's refs are a Python 3 protocol-2 pickle: its bytes arrive through
    `_codecs.encode`. UTF-8 bytes are text; None, numbers and other bytes are not made text."""
    sentences = {s.sent_id: s.raw for r in load_refer(refer_root, "refcoco", "unc").refs for s in r.sentences}
    assert sentences[28] == "the café table"
    assert sentences[25] is None and sentences[26] == 42 and sentences[27] == b"\xff\xfe not utf-8"
    assert sentences[29] == "😀😀"


def test_python3_bytes_pickle_is_read_but_only_through_latin1(tmp_path: Path) -> None:
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps([{"raw": b"caf\xc3\xa9", "empty": b""}], protocol=2))
    assert load_refs_pickle(path) == [{"raw": b"caf\xc3\xa9", "empty": b""}]

    class OtherCodec:
        def __reduce__(self):
            return (codecs.encode, ("x" * 10, "rot13"))

    class BigBytes:
        def __reduce__(self):
            return (bytes, (10**12,))

    for payload, refused in ((OtherCodec(), "rot13"), (BigBytes(), "bytes")):
        path.write_bytes(pickle.dumps([payload], protocol=2))
        with pytest.raises(UnsafePickleError, match=refused):
            load_refs_pickle(path)


def test_truncated_pickle_is_a_truncated_file_not_an_unsafe_one(tmp_path: Path) -> None:
    whole = pickle.dumps([{"raw": "the man", "sent_id": 1, "ids": {1, 2}}] * 3, protocol=2)
    path = tmp_path / "refs.p"
    for cut in range(len(whole)):  # every place a copy can stop
        path.write_bytes(whole[:cut])
        with pytest.raises(ReferFormatError, match=r"refs\.p: truncated file") as caught:
            load_refs_pickle(path)
        assert not isinstance(caught.value, UnsafePickleError)
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(ReferFormatError, match="not a readable refs pickle") as caught:
        load_refs_pickle(path)
    assert not isinstance(caught.value, UnsafePickleError)


def test_unknown_dataset_split_by_and_missing_files(refer_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'refclef'"):
        load_refer(refer_root, "refclef", "unc")
    with pytest.raises(ValueError, match="refcocog has no splitBy 'unc'"):
        load_refer(refer_root, "refcocog", "unc")
    with pytest.raises(FileNotFoundError, match=r"refs\(google\)\.p"):
        load_refer(refer_root, "refcoco", "google")
    with pytest.raises(FileNotFoundError, match="nowhere is not a directory"):
        load_refer(tmp_path / "nowhere", "refcoco", "unc")
