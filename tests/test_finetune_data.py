"""Instruction records (tegaki/finetune/data.py): masks, bad lines named, long records reported, packing."""

import json

import pytest
from finetune_models import RECORDS, tiny_tokenizer, write_records

from tegaki.chat_template import DEFAULT_TEMPLATE, PLAIN_TEMPLATE, ChatTemplate
from tegaki.errors import TegakiError
from tegaki.finetune.data import (
    BUNDLED,
    IGNORE,
    PackedRows,
    describe_too_long,
    encode_record,
    encode_records,
    pack,
    read_records,
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


PLAIN = ChatTemplate(PLAIN_TEMPLATE, "plain")


def learned_text(tok, ids, labels):
    return tok.decode([i for i, label in zip(ids, labels) if label != IGNORE and i != tok.eot_id])


def test_alpaca_learns_only_the_response(tmp_path, tok):
    (record,) = read_records(write_records(tmp_path / "r.jsonl", [RECORDS[1]]))
    ids, labels = encode_record(record, PLAIN, tok)
    assert len(ids) == len(labels)
    assert learned_text(tok, ids, labels) == "猫\n\n"  # the reply and the blank line that ends it
    assert ids[-1] == labels[-1] == tok.eot_id  # the end is learned too
    prompt = tok.decode(ids[: labels.index(next(x for x in labels if x != IGNORE))])
    assert prompt == "USER:\nTranslate this word.\n\ncat\n\nASSISTANT:\n"


def test_every_assistant_turn_is_learned_and_no_user_turn(tmp_path, tok):
    (record,) = read_records(write_records(tmp_path / "r.jsonl", [RECORDS[2]]))
    ids, labels = encode_record(record, PLAIN, tok)
    assert learned_text(tok, ids, labels) == "Hello there.\n\nA small model.\n\n"
    chatml = ChatTemplate(DEFAULT_TEMPLATE, "chatml")
    ids, labels = encode_record(record, chatml, tok)
    assert learned_text(tok, ids, labels) == "Hello there.<|im_end|>\nA small model.<|im_end|>\n"


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"instruction": "x"}', "missing 'output'"),
        (b'{"messages": [{"role": "robot", "content": "hi"}]}', "role 'robot'"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
        (b'{"instruction": "caf\xe9", "output": "x"}', "not UTF-8"),
        (b'{"instruction": ', "not a JSON object"),
        (b"[1, 2]", "must be a JSON object"),
    ],
)
def test_a_bad_record_names_its_line(tmp_path, line, message):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n\n' + line + b"\n")
    with pytest.raises(TegakiError, match=message) as error:
        read_records(path)
    assert f"{path}:3:" in str(error.value)


def test_long_records_are_reported_not_cut(tmp_path, tok):
    long = {"instruction": "Say it.", "output": "word " * 80}
    records = read_records(write_records(tmp_path / "r.jsonl", [RECORDS[0], long, RECORDS[3]]))
    encoded = encode_records(records, PLAIN, tok, max_seq_len=40)
    assert len(encoded.pairs) == 2 and encoded.too_long == [2]
    assert all(len(ids) <= 41 for ids, _ in encoded.pairs)
    note = describe_too_long(encoded, 40)
    assert "1 record(s)" in note and "lines 2" in note and "--max-seq-len 40" in note


def test_packing_keeps_every_record_once_and_shifts_targets(tmp_path, tok):
    records = read_records(write_records(tmp_path / "r.jsonl"))
    encoded = encode_records(records, PLAIN, tok, max_seq_len=128)
    rows = pack(encoded.pairs, 129)
    assert sorted(k for row in rows for k in row) == list(range(len(encoded.pairs)))
    assert all(sum(len(encoded.pairs[k][0]) for k in row) <= 129 for row in rows)
    packed = PackedRows(encoded.pairs, 128, pad_id=tok.eot_id)
    assert len(packed) == len(rows) < len(encoded.pairs)  # several records share a row
    inputs, targets = packed.batch(range(len(packed)))
    assert inputs.shape == targets.shape == (len(rows), 128)
    assert (inputs[:, 1:] == packed.ids[:, 1:-1]).all() and (targets == packed.labels[:, 1:]).all()
    learned = sum(sum(label != IGNORE for label in labels[1:]) for _, labels in encoded.pairs)
    assert int((targets != IGNORE).sum()) == packed.response_tokens >= learned


def test_the_bundled_set_reads_and_has_both_languages():
    records = read_records("instructions") + read_records("instructions-heldout")
    assert len(records) >= 200
    text = json.dumps([r.messages for r in records], ensure_ascii=False)
    assert "猫" in text and "What" in text
    assert (BUNDLED["instructions"].parent / "README.md").read_text().count("CC0") >= 1
    train = {json.dumps(r.messages) for r in read_records("instructions")}
    assert not train & {json.dumps(r.messages) for r in read_records("instructions-heldout")}
