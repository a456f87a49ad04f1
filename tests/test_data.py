import pytest

from conftest import write_jsonl
from ntkmirror.data import collate, encode_example, example_from_row, load_jsonl_examples
from ntkmirror.errors import DataError


def test_every_row_schema(tmp_path, tok):
    rows = [{"prompt": "p", "completion": " c"}, {"instruction": "i", "response": " r"},
            {"question": "q", "answer": " a"}, {"text": "plain text"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    exs = load_jsonl_examples(write_jsonl(tmp_path / "d.jsonl", rows), tok)
    assert [e.completion for e in exs] == [" c", " r", " a", "plain text", "hello"]
    assert exs[3].prompt == ""
    # the chat template is applied to the context, with the generation prompt
    assert exs[4].prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert exs[0].source.endswith("d.jsonl:1")


def test_loss_mask_is_completion_only_and_eos_appended(tok):
    ex = example_from_row({"prompt": "Question: 1 + 2 = ?\nAnswer:", "completion": " 3"})
    ids, n_prompt = encode_example(tok, ex, max_length=64)
    assert ids[-1] == tok.eos_token_id
    b = collate([(ids, n_prompt), (ids[:-1], n_prompt)], pad=tok.pad_token_id)
    assert (b.labels[0, :n_prompt] == -100).all() and (b.labels[0, n_prompt:len(ids)] >= 0).all()
    # the attention mask comes from lengths: the pad (== eos) at the end of row 1 is masked
    assert b.attention_mask[1].tolist() == [1] * (len(ids) - 1) + [0]
    assert b.attention_mask[0].sum() == len(ids)
    ids2, _ = encode_example(tok, ex, max_length=64, add_eos=False)
    assert ids2 == ids[:-1]


def test_left_truncation_keeps_completion(tok):
    ex = example_from_row({"prompt": "word " * 50, "completion": " 42"})
    ids, n_prompt = encode_example(tok, ex, max_length=8)
    assert len(ids) == 8 and ids[-1] == tok.eos_token_id and n_prompt == 8 - (len(tok(" 42")["input_ids"]) + 1)


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion"\n', "d.jsonl:2: malformed JSON"),
    ('{"foo": 1}\n', "d.jsonl:1: unknown row schema"),
    ('{"prompt": "a", "completion": "   "}\n', "d.jsonl:1: empty completion"),
    ('{"prompt": 3, "completion": "b"}\n', "must both be strings"),
    ('[1, 2]\n', "expected a JSON object"),
    ('\n\n', "no examples"),
    ('{"messages": [{"role": "user", "content": "x"}]}\n', "last message must have role 'assistant'"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    p = tmp_path / "d.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=message.replace("?", r"\?")):
        load_jsonl_examples(p)


def test_invalid_utf8_and_missing_file(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')
    with pytest.raises(DataError, match="d.jsonl:2: invalid UTF-8"):
        load_jsonl_examples(p)
    with pytest.raises(DataError, match="no such file"):
        load_jsonl_examples(tmp_path / "missing.jsonl")


def test_no_supervised_token_after_truncation(tok):
    # a completion made only of EOS-less whitespace tokens is caught earlier; here max_length=1
    ex = example_from_row({"prompt": "Question:", "completion": " 3"}, where="f.jsonl:7")
    with pytest.raises(DataError, match="f.jsonl:7: no supervised token left"):
        encode_example(tok, ex, max_length=1)
