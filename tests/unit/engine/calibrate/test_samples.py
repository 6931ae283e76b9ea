import json

import pytest

from engine.calibrate.samples import load_samples, read_samples_file, validate_samples_file
from engine.core.errors import SamplesError


def _w(tmp_path, text, name="s.json"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_json_list_ok(tmp_path):
    p = _w(tmp_path, json.dumps(["a b", "c"]))
    validate_samples_file(p, 2)
    raw = read_samples_file(p, 1)
    assert raw.kind == "json-list" and raw.items == ["a b"] and len(raw.sha256) == 64


@pytest.mark.parametrize("text,needle", [
    ('{"a": 1}', "expected a JSON list of strings, found an object"),
    ('"just a string"', "found a string"),
    ('["ok", 3]', "item 1 is a number, expected a string"),
    ('["ok", null]', "item 1 is null"),
    ('["ok", "  "]', "item 1 is an empty string"),
    ('["ok",\n  "x",\n  oops]', "unreadable JSON at line 3, column 3"),
    ('', "empty"),
    ('{"text": "a"}\n{"text": 5}\n', "line 2: \"text\" is a number"),
    ('{"text": "a"}\n{"text": ""}\n', "line 2: \"text\" is an empty string"),
    ('{"text": "a"}\n{"txt": "b"}\n', "line 2: object has neither"),
    ('{"text": "a"}\n{"text": "b"\n', "unreadable JSON at line 2, column"),
    ('{"text": "a"}\n{"messages": [{"role": "user", "content": "b"}]}\n', "line 2 uses 'messages'"),
    ('{"messages": "hi"}\n', "\"messages\" must be a non-empty list"),
    ('{"messages": [{"content": "x"}]}\n', "message 0 must be an object with \"role\""),
])
def test_malformed_files_fail_with_their_message(tmp_path, text, needle):
    p = _w(tmp_path, text)
    with pytest.raises(SamplesError) as ei:
        validate_samples_file(p, 1)
    assert needle in ei.value.msg, ei.value.msg
    assert ei.value.at == str(p) and ei.value.hint


def test_fewer_samples_than_asked(tmp_path):
    p = _w(tmp_path, json.dumps(["a", "b", "c"]))
    with pytest.raises(SamplesError, match="holds 3 samples, 5 asked") as ei:
        validate_samples_file(p, 5)
    assert "at most 3" in ei.value.hint


def test_missing_file(tmp_path):
    with pytest.raises(SamplesError, match="not found"):
        validate_samples_file(tmp_path / "nope.json", 1)


def test_tokenize_truncates_and_counts(tmp_path, v3_dir):
    p = _w(tmp_path, json.dumps(["x" * 100, "short"]))
    s = load_samples(p, 2, tokenizer=v3_dir, seq_len=10)
    assert [len(i) for i in s.input_ids] == [10, 5]
    assert s.truncated == 1 and s.tokens == 15 and s.summary()["truncated"] == 1


def test_jsonl_text_and_messages(tmp_path, v3_dir):
    p = _w(tmp_path, '{"text": "hello"}\n\n{"text": "world"}\n', "t.jsonl")
    s = load_samples(p, None, tokenizer=v3_dir, seq_len=64)
    assert s.kind == "jsonl-text" and s.texts == ["hello", "world"]
    m = _w(tmp_path, json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n", "m.jsonl")
    s = load_samples(m, 1, tokenizer=v3_dir, seq_len=64)
    assert s.kind == "jsonl-messages" and s.texts == ["<|user|>hi\n<|assistant|>yo\n"]
    with pytest.raises(SamplesError, match="chat template"):
        load_samples(m, 1, tokenizer=None, seq_len=64)
