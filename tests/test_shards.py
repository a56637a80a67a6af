"""The shard format: what the writer leaves behind (and does not, on a crash), and what readers get back."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from data_prep.manifest import token_dtype
from data_prep.shards import (
    META,
    ShardError,
    ShardWriter,
    combine_parts,
    load_record,
    meta_name,
    open_split,
    read_meta,
    stem,
)
from data_prep.tempfiles import write_json_atomic

BLOCKS = [[0, 5, 6, 2], [0, 7, 2], [0, 8, 9, 10, 2]]


def write_split(directory: Path, name: str, blocks=BLOCKS, pairs: bool = False) -> dict:
    with ShardWriter(directory, name, np.uint16, pairs=pairs) as w:
        for chunk in (blocks[:1], blocks[1:], []):  # in chunks, one of them empty
            tokens = np.array([t for b in chunk for t in b], np.uint16)
            lengths = np.array([len(b) for b in chunk], np.int64)
            nsp = np.arange(len(chunk), dtype=np.uint8) % 2 if pairs else None
            w.write(tokens, lengths, nsp, np.full(len(chunk), 3, np.int32) if pairs else None)
        return w.commit({"documents": len(blocks), "sentences": len(blocks)})


def meta_for(records: dict, **extra) -> dict:
    return {"format": 1, "dtype": "uint16", "vocab_size": 300, "seq_len": 8, "packing": "full_sentences",
            "special_ids": {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 299}, "splits": records, **extra}


def test_token_dtype_is_uint16_while_the_vocabulary_fits():
    assert token_dtype(50265) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_meta_describes_files_numpy_reads_back(tmp_path):
    record = write_split(tmp_path, "train")
    write_json_atomic(tmp_path / META, meta_for({"train": record}))
    # with numpy and json alone, as any other tool would
    meta = json.loads((tmp_path / META).read_text())
    r = meta["splits"]["train"]
    tokens = np.fromfile(tmp_path / r["tokens"], dtype=meta["dtype"])
    offsets = np.fromfile(tmp_path / r["offsets"], dtype=np.int64)
    assert len(offsets) == r["num_blocks"] + 1 == 4 and len(tokens) == r["num_tokens"] == 12
    assert [tokens[offsets[i] : offsets[i + 1]].tolist() for i in range(3)] == BLOCKS
    # and through the reader
    split = open_split(tmp_path / META, "train")
    assert [split.block(i).tolist() for i in range(len(split))] == BLOCKS
    assert split.block_lengths().tolist() == [4, 3, 5] and split.nsp_labels is None and split.b_start(0) is None
    assert open_split(tmp_path, "train").num_blocks == 3  # the directory works too
    with pytest.raises(IndexError):
        split.block(3)


def test_pair_splits_carry_labels_and_b_starts(tmp_path):
    write_json_atomic(tmp_path / META, meta_for({"train": write_split(tmp_path, "train", pairs=True)}))
    split = open_split(tmp_path / META, "train")
    assert split.nsp_labels.tolist() == [0, 0, 1] and split.b_start(2) == 3


def test_a_failed_write_leaves_nothing_a_reader_or_rerun_trusts(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, "train", np.uint16) as w:
        w.write(np.array([0, 5, 2], np.uint16), np.array([3]))
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert load_record(tmp_path, "train") is None


def test_leftovers_of_a_killed_run_are_ignored_and_removed(tmp_path):
    # a kill -9 leaves temporaries (and maybe final-named files without a record): none of it is trusted
    (tmp_path / "train.tokens.bin.tmp4242").write_bytes(b"\x00" * 10)
    (tmp_path / "train.offsets.bin").write_bytes(b"\x00" * 8)
    assert load_record(tmp_path, "train") is None
    write_split(tmp_path, "train")
    assert not list(tmp_path.glob("*.tmp*"))
    assert load_record(tmp_path, "train")["num_blocks"] == 3


def test_a_record_whose_files_do_not_match_is_not_trusted(tmp_path):
    record = write_split(tmp_path, "train")
    with open(tmp_path / record["tokens"], "r+b") as f:
        f.truncate(4)
    assert load_record(tmp_path, "train") is None


def test_an_empty_split_reads_as_empty(tmp_path):
    write_json_atomic(tmp_path / META, meta_for({"valid": write_split(tmp_path, "valid", blocks=[])}))
    split = open_split(tmp_path / META, "valid")
    assert split.num_blocks == 0 and split.block_lengths().tolist() == []


def test_slices_are_read_together_without_merging(tmp_path):
    for k, blocks in enumerate((BLOCKS, [[0, 11, 2]])):
        record = write_split(tmp_path, stem("train", k, 2), blocks)
        assert record["tokens"] == f"train-0000{k}-of-00002.tokens.bin"
        if k == 0:
            assert combine_parts(tmp_path) is None  # not all slices there yet
            with pytest.raises(ShardError, match="meta-\\*-of-\\*.json"):
                read_meta(tmp_path)
        write_json_atomic(tmp_path / meta_name(k, 2), meta_for({"train": record}, shard_index=k, num_shards=2))
    split = open_split(tmp_path, "train")  # no meta.json: the reader combines the parts
    assert [split.block(i).tolist() for i in range(len(split))] == [*BLOCKS, [0, 11, 2]]
    meta = combine_parts(tmp_path)
    assert meta["splits"]["train"]["num_blocks"] == 4 and meta["splits"]["train"]["documents"] == 4


def test_reader_pickles_without_its_memmaps(tmp_path):
    write_json_atomic(tmp_path / META, meta_for({"train": write_split(tmp_path, "train")}))
    split = open_split(tmp_path / META, "train")
    split.block(0)
    data = pickle.dumps(split)
    assert len(data) < 4000
    assert pickle.loads(data).block(2).tolist() == BLOCKS[2]


def test_missing_or_foreign_meta_is_a_clear_error(tmp_path):
    with pytest.raises(ShardError, match="does not exist: run `make data`"):
        read_meta(tmp_path / META)
    (tmp_path / META).write_text(json.dumps({"format": 99}))
    with pytest.raises(ShardError, match="format 99"):
        read_meta(tmp_path / META)
    write_json_atomic(tmp_path / META, meta_for({"train": write_split(tmp_path, "train")}))
    with pytest.raises(ShardError, match="no split 'valid'"):
        open_split(tmp_path / META, "valid")
