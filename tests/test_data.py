"""Training data on the tiny tokenizer: record shapes, file formats, template and loss mask, truncation, packing,
epoch planning, sharding, collation, and the errors a user sees for bad files."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from gemma.errors import GemmaError
from train.data import (
    IGNORE,
    DataStats,
    Example,
    collate,
    encode_messages,
    load_dataset,
    pack,
    plan_epoch,
    read_records,
    record_messages,
    shard,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path, records):
    return write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def user(text):
    return {"role": "user", "content": text}


def model(text):
    return {"role": "model", "content": text}


def expected(tok, messages, train_on_prompt=False):
    """Ids and trained flags built from the spec, independently of train/data.py's code."""
    start, end, nl = tok.start_of_turn_id, tok.end_of_turn_id, tok.encode("\n", bos=False)
    ids, trained = [tok.bos_id], [False]
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    for i in range(0, len(messages) - 1, 2):
        q = messages[i]["content"].strip()
        if i == 0 and system is not None:
            q = system + "\n\n" + q
        part = [start] + tok.encode_content("user\n" + q) + [end] + nl
        ids += part
        trained += [train_on_prompt] * len(part)
        head = [start] + tok.encode("model\n", bos=False)
        body = tok.encode_content(messages[i + 1]["content"].strip()) + [end]
        ids += head + body + nl
        trained += [train_on_prompt] * len(head) + [True] * len(body) + [train_on_prompt] * len(nl)
    return ids, trained


def shifted(ids, trained):
    return [t if keep else IGNORE for t, keep in zip(ids[1:], trained[1:])] + [IGNORE]


# ---- shapes ----


def test_alpaca_shapes():
    assert record_messages({"instruction": "Say hi.", "output": "Hi."}, "f:1") == [user("Say hi."), model("Hi.")]
    assert record_messages({"instruction": "Translate.", "input": "你好", "output": "Hello."}, "f:1") == [
        user("Translate.\n\n你好"),
        model("Hello."),
    ]
    # An empty input and an empty system are absent.
    assert record_messages({"instruction": "Q", "input": "", "output": "A", "system": ""}, "f:1") == [
        user("Q"),
        model("A"),
    ]
    assert record_messages({"instruction": "Q", "output": "A", "system": "Be brief."}, "f:1") == [
        {"role": "system", "content": "Be brief."},
        user("Q"),
        model("A"),
    ]


def test_sharegpt_shapes():
    record = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Q1"},
            {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2"},
            {"from": "gpt", "value": "A2"},
        ]
    }
    assert record_messages(record, "f:1") == [
        {"role": "system", "content": "S"},
        user("Q1"),
        model("A1"),
        user("Q2"),
        model("A2"),
    ]
    # A top-level system, as some sharegpt files have it.
    record = {"system": "S", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    assert record_messages(record, "f:1") == [{"role": "system", "content": "S"}, user("Q"), model("A")]


def test_messages_shape():
    record = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A"},
        ]
    }
    assert record_messages(record, "f:1") == [{"role": "system", "content": "S"}, user("Q"), model("A")]


@pytest.mark.parametrize(
    "record, words",
    [
        ({"prompt": "Q", "completion": "A"}, "unknown record shape"),
        ({"messages": [{"role": "user", "content": "Q"}, {"role": "user", "content": "Q"}]}, "message 2 is 'user'"),
        ({"messages": [{"role": "model", "content": "A"}]}, "message 1 is 'model'"),
        ({"messages": [{"role": "user", "content": "Q"}, {"role": "system", "content": "S"}]}, "message 2"),
        ({"messages": [{"role": "bot", "content": "A"}]}, "unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": 3}]}, "must be a string"),
        ({"messages": "hi"}, "must be a list"),
        ({"conversations": [{"from": "alien", "value": "Q"}]}, "unknown from 'alien'"),
        ({"instruction": "Q"}, "no 'output'"),
        ({"instruction": "Q", "output": 19}, "'output' must be a string"),
    ],
)
def test_bad_records_name_where(record, words):
    with pytest.raises(GemmaError) as err:
        record_messages(record, "data.jsonl:7")
    message = str(err.value)
    assert message.startswith("data.jsonl:7: ") and words in message and "\n" not in message


# ---- files ----


def test_json_list_and_jsonl_read_the_same(tmp_path):
    records = [
        {"instruction": "Q1", "output": "A1"},
        {"conversations": [{"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]},
        {"messages": [user("Q3"), {"role": "assistant", "content": "A3"}]},
    ]
    as_list = write(tmp_path / "a.json", json.dumps(records, indent=2))
    as_lines = write(tmp_path / "a.jsonl", "\n" + "\n\n".join(json.dumps(r) for r in records) + "\n")
    assert read_records(as_list) == read_records(as_lines) == records


def test_json_list_errors_name_the_line(tmp_path, tok):
    path = write(tmp_path / "a.json", '[\n  {"instruction": "Q", "output": "A"},\n  {"question": "Q"}\n]\n')
    with pytest.raises(GemmaError, match=rf"^{path}:3: unknown record shape"):
        load_dataset(path, tok, 64)
    path = write(tmp_path / "b.json", '[\n  {"instruction": "Q", "output": "A"},\n  {"instruction": "Q",}\n]\n')
    with pytest.raises(GemmaError, match=rf"^{path}:3: malformed JSON"):
        read_records(path)
    path = write(tmp_path / "c.json", '[{"instruction": "Q", "output": "A"}, 5]')
    with pytest.raises(GemmaError, match=rf"^{path}:1: expected a record"):
        read_records(path)


def test_malformed_jsonl_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"instruction": "Q", "output": "A"}\n\n{"instruction": "Q", "output": \n')
    with pytest.raises(GemmaError) as err:
        read_records(path)
    assert str(err.value).startswith(f"{path}:3: malformed JSON line") and "\n" not in str(err.value)


def test_unknown_shape_names_the_record(tmp_path, tok):
    path = jsonl(tmp_path / "e.jsonl", [{"instruction": "Q", "output": "A"}, {"text": "raw"}])
    with pytest.raises(GemmaError, match=rf"^{path}:2: unknown record shape \(keys: 'text'\)"):
        load_dataset(path, tok, 64)


@pytest.mark.parametrize("text", ["", "\n\n  \n", "[]", " [ ]\n"])
def test_empty_data_set(tmp_path, text):
    path = write(tmp_path / "f.jsonl", text)
    with pytest.raises(GemmaError, match=rf"^{path}: empty data set$"):
        read_records(path)


def test_missing_file_and_other_file_errors(tmp_path):
    with pytest.raises(GemmaError, match=r"nope\.jsonl: no such data file$"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(GemmaError, match=rf"^{tmp_path}: is a folder, not a data file$"):
        read_records(tmp_path)
    path = tmp_path / "g.jsonl"
    path.write_bytes(b'{"instruction": "Q", "output": "A"}\n{"instruction": "\xff"}\n')
    with pytest.raises(GemmaError, match=rf"^{path}:2: not UTF-8 text$"):
        read_records(path)
    path = write(tmp_path / "h.json", '{\n  "instruction": "Q",\n  "output": "A"\n}\n')
    with pytest.raises(GemmaError, match="single JSON object"):
        read_records(path)


# ---- template and loss mask ----


def test_single_turn_ids_and_mask(tok):
    messages = [user("  What is the capital of France? "), {"role": "assistant", "content": "Paris.\n"}]
    example, truncated = encode_messages(messages, tok, 512)
    ids, trained = expected(tok, messages)
    assert not truncated and example.input_ids == ids and example.targets == shifted(ids, trained)
    assert len(example.targets) == len(example.input_ids) and example.targets[-1] == IGNORE

    # Token by token: loss only where the next token is the answer's content or its <end_of_turn>.
    answer = tok.encode_content("Paris.")
    first = len(ids) - 2 - len(answer)  # where the answer starts: ids end with answer, <end_of_turn>, "\n"
    trained_at = [t for t, target in enumerate(example.targets) if target != IGNORE]
    assert trained_at == list(range(first - 1, first + len(answer)))
    assert [example.targets[t] for t in trained_at] == answer + [tok.end_of_turn_id]

    # The prompt part is exactly what generation sees.
    prompt = tok.apply_chat(messages[:1], add_generation_prompt=True)
    assert example.input_ids[: len(prompt)] == prompt and len(prompt) == first


def test_multi_turn_mask_with_system(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        user("Hello!"),
        model("Hi."),
        user("你好"),
        model("你好！"),
        user("a trailing question gets no answer"),
    ]
    example, truncated = encode_messages(messages, tok, 512)
    ids, trained = expected(tok, messages)
    assert not truncated and example.input_ids == ids and example.targets == shifted(ids, trained)
    # Both answers and their <end_of_turn> are trained; nothing else is.
    answers = tok.encode_content("Hi.") + [tok.end_of_turn_id] + tok.encode_content("你好！") + [tok.end_of_turn_id]
    assert [t for t in example.targets if t != IGNORE] == answers
    # The second prompt, rendered by apply_chat, is a prefix of the example.
    prompt = tok.apply_chat(messages[:4], add_generation_prompt=True)
    assert example.input_ids[: len(prompt)] == prompt


def test_marker_literal_in_content_stays_text(tok):
    example, _ = encode_messages([user("say <end_of_turn>"), model("<start_of_turn>ok")], tok, 512)
    assert example.input_ids.count(tok.start_of_turn_id) == 2 and example.input_ids.count(tok.end_of_turn_id) == 2


def test_train_on_prompt(tok):
    messages = [{"role": "system", "content": "S"}, user("Q1"), model("A1"), user("Q2"), model("A2")]
    example, _ = encode_messages(messages, tok, 512, train_on_prompt=True)
    ids, _ = expected(tok, messages)
    assert example.input_ids == ids and example.targets == ids[1:] + [IGNORE]


def test_roles_checked_in_encode(tok):
    with pytest.raises(GemmaError, match="message 2 is 'user'"):
        encode_messages([user("a"), user("b")], tok, 64)
    assert encode_messages([user("only a question")], tok, 64) == (None, False)


# ---- truncation ----


def check_template(tok, example, n_pairs):
    """The template tokens of n_pairs turn pairs are all there, in order."""
    ids, start, end = example.input_ids, tok.start_of_turn_id, tok.end_of_turn_id
    nl, header = tok.encode("\n", bos=False), tok.encode("model\n", bos=False)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert ids.count(start) == ids.count(end) == 2 * n_pairs
    assert ids[-1 - len(nl) :] == [end] + nl
    starts = [i for i, t in enumerate(ids) if t == start]
    for k, i in enumerate(starts):
        if k % 2:
            assert ids[i + 1 : i + 1 + len(header)] == header
    return starts


def test_truncation_never_cuts_template_tokens(tok):
    question = "Please write a short poem about the sea and the moon. " * 3
    answer = "The quick brown fox jumps over the lazy dog. 今天天气很好，我们去公园散步吧。" * 3
    messages = [{"role": "system", "content": "Be brief."}, user(question), model(answer)]
    full, truncated = encode_messages(messages, tok, 10_000)
    assert not truncated
    empty = len(encode_messages([user(""), model("")], tok, 10_000)[0].input_ids)
    kept = 0
    for max_len in range(2, len(full.input_ids)):
        example, truncated = encode_messages(messages, tok, max_len)
        assert truncated
        if example is None:
            assert kept == 0  # once something fits, more room keeps it fitting
            continue
        kept += 1
        assert len(example.input_ids) <= max_len
        starts = check_template(tok, example, 1)
        # The answer is a prefix of the original, cut between characters; the <end_of_turn> of a cut answer takes
        # no loss (the model must not learn to stop mid-answer).
        nl = tok.encode("\n", bos=False)
        body = example.input_ids[starts[1] + 1 + len(tok.encode("model\n", bos=False)) : -1 - len(nl)]
        text = tok.decode(body)
        assert body and answer.strip().startswith(text)
        end_target = example.targets[-2 - len(nl)]
        assert end_target == (tok.end_of_turn_id if text == answer.strip() else IGNORE)
        assert example.targets[-3 - len(nl)] == body[-1]
        # The answer keeps at least half of the room left for content (a few tokens less where a character
        # takes several tokens).
        room = max_len - empty
        assert len(body) >= min(len(tok.encode_content(answer.strip())), (room + 1) // 2) - 3
    assert kept > 0


def test_truncation_drops_later_pairs(tok):
    messages = [user("Q1"), model("A1"), user("Second question is long. " * 10), model("Second answer. " * 10)]
    first = encode_messages(messages[:2], tok, 512)[0]
    empty = len(encode_messages([user(""), model("")], tok, 512)[0].input_ids) - 1  # a pair's template, no <bos>
    example, truncated = encode_messages(messages, tok, len(first.input_ids) + empty + 4)
    assert truncated and len(example.input_ids) <= len(first.input_ids) + empty + 4
    check_template(tok, example, 2)
    assert example.input_ids[: len(first.input_ids)] == first.input_ids
    # Too little room for any content of the second pair: it is dropped, the first kept whole.
    example, truncated = encode_messages(messages, tok, len(first.input_ids) + 3)
    assert truncated and example.input_ids == first.input_ids and example.targets == first.targets


def test_load_dataset_counts(tmp_path, tok):
    records = [
        {"instruction": "What is the capital of France?", "output": "Paris."},
        {"instruction": "Write a short poem. " * 20, "output": "The sea and the moon. " * 20},  # truncated
        {"messages": [user("no answer here")]},  # no model turn
        {"conversations": [{"from": "system", "value": "S"}]},  # no model turn
        {"messages": []},  # no model turn
    ]
    path = jsonl(tmp_path / "d.jsonl", records)
    examples, stats = load_dataset(path, tok, 48)
    assert (stats.records, stats.examples, stats.truncated, stats.dropped_no_model_turn, stats.dropped_too_long) == (
        5,
        2,
        1,
        3,
        0,
    )
    assert stats.tokens == sum(len(e.input_ids) for e in examples)
    assert stats.target_tokens == sum(t != IGNORE for e in examples for t in e.targets)
    assert "\n" not in stats.summary() and "5 records -> 2 examples" in stats.summary()

    # Room for the template and one token of content: an answer whose first character takes several tokens
    # (byte fallback) cannot keep anything, so its record is dropped.
    empty = len(encode_messages([user(""), model("")], tok, 10_000)[0].input_ids)
    path = jsonl(tmp_path / "e.jsonl", [records[0], {"instruction": "Q", "output": "\U0001f600 yes"}])
    examples, stats = load_dataset(path, tok, empty + 1)
    assert (stats.examples, stats.truncated, stats.dropped_too_long) == (1, 1, 1)
    kept = [t for t in examples[0].targets if t != IGNORE]  # one token of the answer; its <end_of_turn> untrained
    assert len(kept) == 1 and "Paris.".startswith(tok.decode(kept))
    with pytest.raises(GemmaError, match=rf"^{path}: no example to train on with max_len 8"):
        load_dataset(path, tok, 8)


# ---- packing, planning, sharding, collation ----


def make_examples(lengths):
    out = []
    for n, length in enumerate(lengths):
        ids = [2] + [100 + n] * (length - 1)
        out.append(Example(ids, ids[1:] + [IGNORE]))
    return out


def test_pack():
    examples = make_examples([5, 9, 3, 7, 2, 8, 4, 6, 2, 10])
    packed = pack(examples, 12)
    assert all(len(p.input_ids) <= 12 for p in packed)
    assert len(packed) == 5  # 56 tokens: first-fit decreasing fills four rows of 12 exactly, then one more
    seen = []
    for p in packed:
        assert len(p.positions) == len(p.segments) == len(p.targets) == len(p.input_ids)
        for k in range(len(p.input_ids)):
            new = k == 0 or p.segments[k] != p.segments[k - 1]
            assert p.positions[k] == (0 if new else p.positions[k - 1] + 1)
            if new:
                assert p.input_ids[k] == 2  # each segment starts with its own <bos>
            if k + 1 == len(p.input_ids) or p.segments[k + 1] != p.segments[k]:
                assert p.targets[k] == IGNORE  # no target crosses a boundary
        assert p.segments[0] == 0 and sorted(set(p.segments)) == list(range(p.segments[-1] + 1))
        for s in set(p.segments):
            seen.append([t for t, g in zip(p.input_ids, p.segments) if g == s])
    assert sorted(map(tuple, seen)) == sorted(tuple(e.input_ids) for e in examples)
    assert pack([], 12) == []
    with pytest.raises(ValueError):
        pack(make_examples([13]), 12)


def test_plan_epoch():
    lengths = [(n * 37) % 50 + 1 for n in range(103)]
    plan = plan_epoch(lengths, 8, seed=1, epoch=0)
    assert plan == plan_epoch(lengths, 8, seed=1, epoch=0)
    assert plan != plan_epoch(lengths, 8, seed=1, epoch=1) and plan != plan_epoch(lengths, 8, seed=2, epoch=0)
    assert sorted(i for group in plan for i in group) == list(range(103))
    assert [len(g) for g in plan] == [8] * 12 + [7]
    for group in plan:
        assert [lengths[i] for i in group] == sorted((lengths[i] for i in group), reverse=True)
    # The same in another process with another hash seed: a resumed run replays the epoch exactly.
    code = "import sys; from train.data import plan_epoch; print(plan_epoch(list(range(103)), 8, 1, 0))"
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert run.stdout == str(plan_epoch(list(range(103)), 8, seed=1, epoch=0)) + "\n"


@pytest.mark.parametrize("n, batch", [(0, 4), (1, 1), (1000, 1), (1000, 7), (999, 1000)])
def test_plan_epoch_is_the_shuffle_then_each_group_sorted(n, batch):
    # The plan as it was first defined, one list per step: a resumed run started before EpochPlan replays the same.
    rng = random.Random(n)
    lengths = [rng.randint(1, 40) for _ in range(n)]
    order = list(range(n))
    random.Random("plan_epoch:5:2").shuffle(order)
    groups = [sorted(order[i : i + batch], key=lambda i: (-lengths[i], i)) for i in range(0, n, batch)]
    plan = plan_epoch(lengths, batch, seed=5, epoch=2)
    assert len(plan) == len(groups) and list(plan) == groups
    assert plan_epoch(np.array(lengths, dtype=np.int64), batch, seed=5, epoch=2) == groups
    with pytest.raises(IndexError):
        plan[len(plan)]


def test_shard_same_steps_for_any_world():
    group = list(range(100, 111))  # 11 examples
    one = shard(group, 0, 1, 4)
    two = [shard(group, r, 2, 2) for r in range(2)]
    assert sorted(i for mb in one for i in mb) == group
    assert sorted(i for r in two for mb in r for i in mb) == group
    # Same world * accum: the very same micro-batches, rank r taking every world-th.
    assert one == [two[0][0], two[1][0], two[0][1], two[1][1]]
    assert [len(mb) for mb in one] == [3, 3, 3, 2]
    # World 4, accum 1 has the same step as well.
    assert sorted(i for r in range(4) for mb in shard(group, r, 4, 1) for i in mb) == group


def test_shard_tiny_group():
    group = [7, 8, 9]
    per_rank = [shard(group, r, 2, 4) for r in range(2)]
    assert per_rank == [[[7], [9]], [[8]]]  # rank r: min(accum, ceil((3 - r) / 2)) micro-batches
    assert shard([5], 1, 2, 1) == []
    with pytest.raises(ValueError):
        shard(group, 2, 2, 1)


def test_collate_pads_right():
    examples = make_examples([3, 5])
    batch = collate(examples, pad_id=0)
    assert set(batch) == {"tokens", "targets"}
    assert batch["tokens"].dtype == batch["targets"].dtype == torch.long
    assert batch["tokens"].tolist() == [[2, 100, 100, 0, 0], [2, 101, 101, 101, 101]]
    assert batch["targets"].tolist() == [[100, 100, IGNORE, IGNORE, IGNORE], [101, 101, 101, 101, IGNORE]]


def test_collate_packed():
    packed = pack(make_examples([3, 2]), 6)
    batch = collate(packed + make_examples([4]), pad_id=0)
    assert batch["tokens"].shape == (2, 5)
    assert batch["positions"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, -1]]
    assert batch["targets"][1, 4] == IGNORE and batch["tokens"][1, 4] == 0


# ---- the shipped examples ----


def test_examples_regenerate_and_load(tmp_path, tok):
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "make_data.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    names = ["arith_train.jsonl", "arith_eval.jsonl", "general_zh_en.jsonl"]
    for name in names:
        committed = os.path.join(ROOT, "examples", name)
        assert (tmp_path / name).read_bytes() == open(committed, "rb").read(), f"{name}: rerun make_data.py"
    train, held_out = (read_records(tmp_path / n) for n in names[:2])
    assert len(train) == 570 and len(held_out) == 60
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in held_out}
    assert all(r["output"].isdigit() for r in train + held_out)
    for name in names:
        examples, stats = load_dataset(tmp_path / name, tok, 256)
        assert stats.examples == stats.records and stats.truncated == 0
    assert DataStats().summary()
