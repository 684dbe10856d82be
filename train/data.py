"""Training data: file formats, Gemma's chat template with loss masks, packing and batching.

A record travels: `read_records` (a JSON list or JSONL) -> `record_messages` (alpaca, sharegpt or messages shape,
detected per record) -> `encode_messages` (template, loss mask, truncation) -> `Example`. `load_dataset` does all
three for a file. For training, `pack` (optional) joins short examples, `plan_epoch` picks the examples of each
optimizer step, `shard` gives each rank its micro-batches of a step, and `collate` turns one into tensors.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gemma.errors import GemmaError
from gemma.files import MAX_JSON_DEPTH, has_lone_surrogate, json_depth_ok, read_bytes
from train.loss import IGNORE


@dataclass
class Example:
    """One training sequence.

    `targets` is already shifted: targets[t] is the id of token t + 1 when that token is trained on, else IGNORE,
    so the loss is cross_entropy(logits, targets) with no further shifting; targets[-1] is always IGNORE.
    """

    input_ids: list[int]
    targets: list[int]
    positions: list[int] | None = None  # set by pack(): each token's position inside its own segment
    segments: list[int] | None = None  # set by pack(): 0, 1, 2, ... for the examples packed into this sequence

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DataStats:
    """What load_dataset made of a file."""

    records: int = 0  # records in the file
    examples: int = 0  # examples produced (one per record kept)
    truncated: int = 0  # examples whose content was trimmed or whose later turns were dropped to fit max_len
    dropped_no_model_turn: int = 0  # records with no model turn: nothing to train on
    dropped_too_long: int = 0  # records of which nothing trainable fits max_len
    target_tokens: int = 0  # positions that take loss
    tokens: int = 0  # all tokens of all examples

    def summary(self) -> str:
        """One line for the log."""
        return (
            f"{self.records} records -> {self.examples} examples, {self.tokens} tokens "
            f"({self.target_tokens} trained); {self.truncated} truncated, dropped: "
            f"{self.dropped_no_model_turn} without a model turn, {self.dropped_too_long} too long"
        )


# ---- files ----

_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800 to \udfff, half of a pair or alone


def read_records(path) -> list[dict]:
    """The records of a JSON file (a list of objects) or a JSONL file (one object per line; blank lines skipped).

    A missing or unreadable file, malformed JSON ("FILE:LINE: ..."), a record that is not an object, or a file with
    no record at all ("FILE: empty data set") raises GemmaError.
    """
    return [record for _, record in _read_located(path)]


def _read_located(path) -> list[tuple[str, dict]]:
    """Like read_records, each record with where it starts ("FILE:LINE") for error messages."""
    path = os.fspath(path)
    raw = read_bytes(path, "data file")  # a folder, a FIFO or /dev/zero is a one-line error, not a hang
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as some editors write, is not part of the JSON
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise GemmaError(f"{path}:{line}: not UTF-8 text") from None

    start = _JSON_SPACE.match(text).end()
    located = _parse_json_list(path, text, start) if text.startswith("[", start) else _parse_jsonl(path, text)
    escapes = _SURROGATE_ESCAPE.search(text) is not None  # the only way a lone surrogate gets into valid JSON
    for where, record in located:
        if not isinstance(record, dict):
            raise GemmaError(f"{where}: expected a record (a JSON object), got {_json_kind(record)}")
        if escapes and has_lone_surrogate(json.dumps(record, ensure_ascii=False)):
            raise GemmaError(
                f"{where}: holds a lone UTF-16 surrogate (an escape \\ud800 to \\udfff that is not "
                "half of a pair), which is not text"
            )
    if not located:
        raise GemmaError(f"{path}: empty data set")
    return located


def _parse_json_list(path: str, text: str, pos: int) -> list[tuple[str, object]]:
    """Parse a JSON list element by element, so that each record knows its line."""
    decoder = json.JSONDecoder()
    located, line, counted = [], 1, 0

    def line_at(i: int) -> int:
        nonlocal line, counted
        line, counted = line + text.count("\n", counted, i), i
        return line

    def skip(i: int) -> int:
        return _JSON_SPACE.match(text, i).end()

    if not json_depth_ok(text, MAX_JSON_DEPTH + 1):  # the list itself is one level
        raise GemmaError(f"{path}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    pos = skip(pos + 1)  # past "["
    if text.startswith("]", pos):
        pos = skip(pos + 1)
    else:
        while True:
            try:
                record, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise GemmaError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
            located.append((f"{path}:{line_at(pos)}", record))
            pos = skip(end)
            if text.startswith(",", pos):
                pos = skip(pos + 1)
            elif text.startswith("]", pos):
                pos = skip(pos + 1)
                break
            else:
                raise GemmaError(f"{path}:{line_at(pos)}: malformed JSON (expected ',' or ']' after a record)")
    if pos != len(text):
        raise GemmaError(f"{path}:{line_at(pos)}: malformed JSON (extra data after the list)")
    return located


def _parse_jsonl(path: str, text: str) -> list[tuple[str, object]]:
    located = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines() breaks at.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        if not json_depth_ok(line):
            raise GemmaError(f"{path}:{n}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        try:
            located.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            if not located and _is_one_object(text):
                raise GemmaError(
                    f"{path}: holds a single JSON object; expected a JSON list of records "
                    "or one record per line (JSONL)"
                ) from None
            raise GemmaError(f"{path}:{n}: malformed JSON line ({e.msg}, column {e.colno})") from None
    return located


def _is_one_object(text: str) -> bool:
    if not json_depth_ok(text):
        return False
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _json_kind(value) -> str:
    kinds = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number", dict: "an object"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


# ---- record shapes ----

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "model",
    "assistant": "model",
    "model": "model",
    "system": "system",
}
_ROLES = {"user": "user", "model": "model", "assistant": "model", "system": "system"}


def record_messages(record, where: str) -> list[dict]:
    """The conversation of one record as [{"role": "system"|"user"|"model", "content": str}].

    The shape is detected per record:
    - messages: {"messages": [{"role": "system"|"user"|"assistant"|"model", "content"}]}
    - sharegpt: {"conversations": [{"from": "system"|"human"|"gpt", "value"}], "system"?} ("user", "assistant"
      and "model" are accepted as `from` too; a top-level "system" is used when the conversation has none)
    - alpaca: {"instruction", "input"?, "output", "system"?}; a non-empty input follows the instruction after a
      blank line. {"prompt", "response"} and {"question", "answer"} (QA_PAIRS) are read as instruction and output.
    An empty top-level "system" (alpaca, sharegpt) counts as none. Roles must alternate user/model, starting with
    user, after an optional leading system message. Anything else raises GemmaError naming `where` ("data.jsonl:12").
    """
    if not isinstance(record, Mapping):
        raise GemmaError(f"{where}: expected a record (a JSON object), got {_json_kind(record)}")
    if "messages" in record:
        messages = [
            _message(m, i, where, "role", "content", _ROLES)
            for i, m in enumerate(_list_field(record, "messages", where), 1)
        ]
    elif "conversations" in record:
        messages = [
            _message(m, i, where, "from", "value", _SHAREGPT_ROLES)
            for i, m in enumerate(_list_field(record, "conversations", where), 1)
        ]
        system = _str_field(record, "system", where, optional=True)
        if system and system.strip() and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": system})
    elif "instruction" in record or _pair_of(record) is not None:
        question, answer = _pair_of(record) if "instruction" not in record else ("instruction", "output")
        instruction = _str_field(record, question, where)
        extra = _str_field(record, "input", where, optional=True)
        output = _str_field(record, answer, where)
        system = _str_field(record, "system", where, optional=True)
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        messages = ([{"role": "system", "content": system}] if system and system.strip() else []) + [
            {"role": "user", "content": user},
            {"role": "model", "content": output},
        ]
    else:
        keys = ", ".join(repr(k) for k in list(record)[:8]) + (", ..." if len(record) > 8 else "")
        raise GemmaError(
            f"{where}: unknown record shape (keys: {keys or 'none'}); expected alpaca "
            "('instruction', 'output'; or 'prompt'/'response', 'question'/'answer'), sharegpt ('conversations') "
            "or messages ('messages')"
        )
    _check_order(messages, where)
    return messages


# Column pairs that other instruction sets name their one-turn records by; read as alpaca's instruction / output.
QA_PAIRS = (("prompt", "response"), ("question", "answer"))


def _pair_of(record: Mapping) -> tuple[str, str] | None:
    """The (question, answer) keys of a one-turn record named by one of QA_PAIRS, or None."""
    return next((pair for pair in QA_PAIRS if pair[0] in record and pair[1] in record), None)


def _list_field(record: Mapping, key: str, where: str) -> list:
    value = record[key]
    if not isinstance(value, list):
        raise GemmaError(f"{where}: {key!r} must be a list, got {_json_kind(value)}")
    return value


def _str_field(record: Mapping, key: str, where: str, optional: bool = False) -> str | None:
    value = record.get(key)
    if value is None and optional:
        return None
    if key not in record:
        raise GemmaError(f"{where}: alpaca record has no {key!r}")
    if not isinstance(value, str):
        raise GemmaError(f"{where}: {key!r} must be a string, got {_json_kind(value)}")
    return value


def _message(m, i: int, where: str, role_key: str, content_key: str, roles: dict) -> dict:
    """One message normalised to {"role", "content"}; i counts from 1."""
    if not isinstance(m, Mapping) or role_key not in m or content_key not in m:
        raise GemmaError(f"{where}: message {i} must be an object with {role_key!r} and {content_key!r}")
    if m[role_key] not in roles:
        raise GemmaError(
            f"{where}: message {i} has unknown {role_key} {m[role_key]!r} (expected one of {', '.join(roles)})"
        )
    if not isinstance(m[content_key], str):
        raise GemmaError(f"{where}: message {i} {content_key} must be a string, got {_json_kind(m[content_key])}")
    return {"role": roles[m[role_key]], "content": m[content_key]}


def _check_order(messages: list[dict], where: str):
    """An optional system message first, then user, model, user, model, ... (the last may be either)."""
    first = 1 if messages and messages[0]["role"] == "system" else 0
    for i, m in enumerate(messages[first:], first):
        expected = "user" if (i - first) % 2 == 0 else "model"
        if m["role"] != expected:
            raise GemmaError(
                f"{where}: message {i + 1} is {m['role']!r} where {expected!r} was expected (turns "
                "alternate user/model, starting with user, after an optional first system message)"
            )


# ---- template, loss mask, truncation ----


def encode_messages(messages, tokenizer, max_len: int, train_on_prompt: bool = False) -> tuple[Example | None, bool]:
    """Token ids and shifted targets of a conversation in Gemma's chat format; returns (example, truncated).

    <bos>, then per user turn <start_of_turn> + "user\\n{content}" + <end_of_turn> + "\\n", per model turn
    <start_of_turn> + "model\\n" + content + <end_of_turn> + "\\n". The model header is encoded apart from its content,
    as generation sees it after the prompt `<start_of_turn>model\\n`, so the prompt part of an example equals
    `tokenizer.apply_chat(turns so far, add_generation_prompt=True)`. Content is stripped and encoded with
    `tokenizer.encode_content` (a literal "<end_of_turn>" in it stays text). A system message is folded into the
    first user turn (system + "\\n\\n" + user content); a trailing user turn has no answer and is left out.

    Loss goes on the model turns' content and their <end_of_turn>; with `train_on_prompt` on every token after
    <bos>. An <end_of_turn> that closes trimmed content is never trained on: the model must not learn to stop
    mid-answer.

    To fit `max_len`, whole user/model pairs are kept from the start while they fit; the first pair that does not
    fit has its contents trimmed from the end (the answer keeps at least half of the room left for content, or all
    of itself if shorter; the prompt gets the rest) and later turns are dropped. Template tokens are never cut.
    Returns (None, truncated) when nothing is left to train on: no model turn, or not even a trimmed answer fits.
    """
    start, end = tokenizer.start_of_turn_id, tokenizer.end_of_turn_id
    if start is None or end is None:
        raise GemmaError("tokenizer has no chat pieces (<start_of_turn>/<end_of_turn>); cannot encode conversations")
    # Room for <bos> and the targets of at least one token.
    if max_len < 2:
        raise GemmaError(f"max_len must be at least 2, got {max_len}")
    messages = [_message(m, i, "conversation", "role", "content", _ROLES) for i, m in enumerate(messages, 1)]
    _check_order(messages, "conversation")

    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    pairs = [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns) - 1, 2)]
    if not pairs:
        return None, False

    newline = tokenizer.encode("\n", bos=False)
    header = tokenizer.encode("model\n", bos=False)
    prompt_flag = bool(train_on_prompt)

    def user_turn(text: str, trimmed: bool = False) -> tuple[list[int], list[bool]]:
        # Role and content in one span, as apply_chat encodes them.
        ids = [start] + tokenizer.encode_content(f"user\n{text}") + [end] + newline
        trained = [prompt_flag] * len(ids)
        trained[-1 - len(newline)] = prompt_flag and not trimmed  # the <end_of_turn>
        return ids, trained

    def model_turn(text: str, trimmed: bool = False) -> tuple[list[int], list[bool]]:
        content = tokenizer.encode_content(text)
        ids = [start] + header + content + [end] + newline
        trained = (
            [prompt_flag] * (1 + len(header)) + [True] * len(content) + [not trimmed] + [prompt_flag] * len(newline)
        )
        return ids, trained

    ids, trained = [tokenizer.bos_id], [False]
    truncated = False
    for n, (question, answer) in enumerate(pairs):
        # The system text is not stripped, as in Gemma's official template (and apply_chat).
        prompt = (system + "\n\n" if n == 0 and system is not None else "") + question.strip()
        answer = answer.strip()
        user, model = user_turn(prompt), model_turn(answer)
        if len(ids) + len(user[0]) + len(model[0]) <= max_len:
            ids += user[0] + model[0]
            trained += user[1] + model[1]
            continue
        truncated = True
        fitted = _fit_pair(prompt, answer, max_len - len(ids), user_turn, model_turn, tokenizer)
        if fitted is not None:
            ids += fitted[0]
            trained += fitted[1]
        break

    targets = [t if keep else IGNORE for t, keep in zip(ids[1:], trained[1:])] + [IGNORE]
    if all(t == IGNORE for t in targets):
        return None, truncated
    return Example(ids, targets), truncated


def _fit_pair(prompt: str, answer: str, room: int, user_turn, model_turn, tokenizer):
    """The pair trimmed to `room` tokens as (ids, trained), or None when no answer content fits."""
    empty = len(user_turn("")[0]) + len(model_turn("")[0])
    budget = room - empty  # tokens for content
    if budget <= 0:
        return None
    # Sizes in tokens; the prompt's is measured inside its span, where "user\n" and the content are encoded together.
    prompt_size = len(user_turn(prompt)[0]) - len(user_turn("")[0])
    answer_size = len(tokenizer.encode_content(answer))
    keep = min(answer_size, max((budget + 1) // 2, budget - prompt_size))
    answer_cut = _longest_prefix(answer, lambda s: len(tokenizer.encode_content(s)) <= keep)
    if not answer_cut and answer:
        return None
    model = model_turn(answer_cut, trimmed=answer_cut != answer)
    prompt_cut = _longest_prefix(prompt, lambda s: len(user_turn(s)[0]) <= room - len(model[0]))
    user = user_turn(prompt_cut, trimmed=prompt_cut != prompt)
    return user[0] + model[0], user[1] + model[1]


def _longest_prefix(text: str, fits) -> str:
    """The longest prefix of `text` (cut between characters) that `fits`, by bisection; fits("") must hold.

    Token counts of prefixes are not strictly monotonic under BPE, so this finds a long prefix that fits, not
    always the longest; what it returns always fits.
    """
    if fits(text):
        return text
    lo, hi = 0, len(text)  # fits(text[:lo]) holds, fits(text[:hi]) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(text[:mid]):
            lo = mid
        else:
            hi = mid
    return text[:lo]


def encode_record(
    record, where: str, tokenizer, max_len: int, train_on_prompt: bool = False, train_on_thoughts: bool = True
) -> tuple[Example | None, str | None]:
    """One record as (example, None), (example, "truncated"), or (None, why): "no_model_turn" or "too_long"."""
    if tokenizer.chat_format == 4:  # Gemma 4's format: tools, tool calls and reasoning too
        from train.data_gemma4 import encode_gemma4, gemma4_record

        messages, tools = gemma4_record(record, where)
        if not any(m.get("role") in ("assistant", "model") for m in messages):
            return None, "no_model_turn"
        example, truncated = encode_gemma4(
            messages, tools, tokenizer, max_len, train_on_prompt, train_on_thoughts, where
        )
    else:
        _refuse_gemma4_fields(record, where)
        messages = record_messages(record, where)
        if not any(m["role"] == "model" for m in messages):
            return None, "no_model_turn"
        example, truncated = encode_messages(messages, tokenizer, max_len, train_on_prompt)
    if example is None:
        return None, "too_long"
    return example, "truncated" if truncated else None


def count_example(stats: DataStats, example: Example | None, note: str | None) -> None:
    """Add one encode_record result to `stats`."""
    stats.records += 1
    if example is None:
        if note == "no_model_turn":
            stats.dropped_no_model_turn += 1
        else:
            stats.dropped_too_long += 1
        return
    stats.examples += 1
    stats.truncated += note == "truncated"
    stats.tokens += len(example.input_ids)
    stats.target_tokens += sum(t != IGNORE for t in example.targets)


def load_dataset(
    path, tokenizer, max_len: int, train_on_prompt: bool = False, train_on_thoughts: bool = True
) -> tuple[list[Example], DataStats]:
    """Read, convert and encode every record of a data file; records with nothing to train on are counted and skipped.

    A file that yields no example at all raises GemmaError (with the counts saying why).
    """
    stats, examples = DataStats(), []
    for where, record in _read_located(path):
        example, note = encode_record(record, where, tokenizer, max_len, train_on_prompt, train_on_thoughts)
        count_example(stats, example, note)
        if example is not None:
            examples.append(example)
    if not examples:
        raise GemmaError(f"{os.fspath(path)}: no example to train on with max_len {max_len} ({stats.summary()})")
    return examples, stats


def _refuse_gemma4_fields(record, where: str) -> None:
    """Tools, tool calls and reasoning need Gemma 4's chat format: with a Gemma 1-3 tokenizer they would be lost."""
    if not isinstance(record, Mapping):
        return
    messages = record.get("messages") if isinstance(record.get("messages"), list) else []
    keys = {"tools"} & set(record) | {k for m in messages if isinstance(m, Mapping) for k in m} & {
        "tool_calls",
        "reasoning_content",
        "reasoning",
    }
    roles = {m.get("role") for m in messages if isinstance(m, Mapping)} & {"tool", "developer"}
    found = sorted(keys) or sorted(roles)
    if found:
        raise GemmaError(
            f"{where}: {found[0]!r} needs Gemma 4's chat format, and this model's tokenizer is Gemma 1-3's"
        )


# ---- packing and batching ----


def pack(examples: list[Example], max_len: int) -> list[Example]:
    """Join examples into sequences of at most `max_len` tokens, first-fit decreasing (see pack_plan).

    A packed sequence carries `positions` (restarting at 0 for each example) and `segments` (0, 1, ... in the order
    the examples went in), which attention uses to keep examples apart. Targets never cross a boundary: each
    example's last target is already IGNORE.
    """
    for e in examples:
        if e.positions is not None or e.segments is not None:
            raise ValueError("pack() takes unpacked examples")
    return [join_examples([examples[i] for i in members]) for members in pack_plan([len(e) for e in examples], max_len)]


def pack_plan(lengths, max_len: int) -> list[list[int]]:
    """The indices of the examples that go into each packed sequence, first-fit decreasing.

    Longest first (ties in the given order), each example goes into the first sequence with room, a new one when
    none has.
    """
    for n in lengths:
        if n > max_len:
            raise ValueError(f"an example of {n} tokens does not fit max_len {max_len}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])

    # A max-tree over the room left in each sequence slot; slots not yet opened have all of max_len, so the leftmost
    # slot with room is an open sequence that fits or else the next new one. O(n log n) rather than O(n^2).
    size = 1
    while size < len(lengths):
        size *= 2
    room = [max_len] * (2 * size)
    bins: list[list[int]] = []
    for i in order:
        need = int(lengths[i])
        node = 1
        while node < size:
            node = 2 * node if room[2 * node] >= need else 2 * node + 1
        slot = node - size
        if slot == len(bins):
            bins.append([])
        bins[slot].append(i)
        room[node] -= need
        while node > 1:
            node //= 2
            room[node] = max(room[2 * node], room[2 * node + 1])
    return bins


def join_examples(members: list[Example]) -> Example:
    """One packed sequence of `members`, in that order."""
    ids, targets, positions, segments = [], [], [], []
    for segment, e in enumerate(members):
        ids += e.input_ids
        targets += e.targets
        positions += range(len(e.input_ids))
        segments += [segment] * len(e.input_ids)
    return Example(ids, targets, positions, segments)


class EpochPlan(Sequence):
    """The example indices of each optimizer step of one epoch: group `step` is worked out when asked for.

    A shuffle seeded by (seed, epoch) alone, so a resumed run replays it exactly; then groups of `global_batch`
    in that order (the last, partial group is kept); inside a group the indices are sorted longest first (ties by
    index), so that shard()'s contiguous micro-batches hold similar lengths and waste little padding. What is kept is
    the shuffled order and the lengths as arrays (16 bytes an example), not a list per step.
    """

    def __init__(self, lengths: Sequence[int], global_batch: int, seed: int, epoch: int):
        if global_batch < 1:
            raise ValueError(f"global_batch must be at least 1, got {global_batch}")
        order = list(range(len(lengths)))
        # A string seed is hashed with SHA-512: the same order on every machine and Python run.
        random.Random(f"plan_epoch:{seed}:{epoch}").shuffle(order)
        self.order = np.array(order, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.global_batch = global_batch

    def __len__(self) -> int:
        return -(-len(self.order) // self.global_batch)

    def __getitem__(self, step: int) -> list[int]:
        if not 0 <= step < len(self):
            raise IndexError(step)
        group = self.order[step * self.global_batch : (step + 1) * self.global_batch]
        return group[np.lexsort((group, -self.lengths[group]))].tolist()  # longest first, ties by index

    def __eq__(self, other) -> bool:
        return isinstance(other, EpochPlan | list) and list(self) == list(other)

    __hash__ = None  # equal by value, and mutable in principle: not hashable

    def __repr__(self) -> str:
        return repr(list(self))


def plan_epoch(lengths: Sequence[int], global_batch: int, seed: int, epoch: int) -> EpochPlan:
    """The example indices of each optimizer step of one epoch (see EpochPlan)."""
    return EpochPlan(lengths, global_batch, seed, epoch)


def shard(group: list[int], rank: int, world: int, accum: int) -> list[list[int]]:
    """This rank's micro-batches for the optimizer step of `group` (a plan_epoch group).

    The group is cut into world * accum contiguous micro-batches j = 0, 1, ... of near-equal size (sizes differ by at
    most one, the larger first); rank r takes j = r, r + world, r + 2 * world, ..., so at each micro-step the ranks
    work on neighbouring lengths. The cut depends only on world * accum, and the union over ranks is the whole group
    for any world and accum. Empty micro-batches (only when len(group) < world * accum: those with j >= len(group))
    are left out, so rank r gets min(accum, ceil((len(group) - r) / world)) micro-batches; that is accum for every
    full group, and can be 0 for a rank when the last group is smaller than world.
    """
    if world < 1 or accum < 1 or not 0 <= rank < world:
        raise ValueError(f"bad shard: rank {rank}, world {world}, accum {accum}")
    count = world * accum
    small, extra = divmod(len(group), count)  # the first `extra` micro-batches get one more
    micro = []
    for step in range(accum):
        j = step * world + rank
        if j >= len(group):  # this one and all later ones are empty: stop, however large accum is
            break
        begin = j * small + min(j, extra)
        stop = begin + small + (j < extra)
        if stop > begin:
            micro.append(group[begin:stop])
    return micro


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded batch: "tokens" and "targets" (B, T) long, targets IGNORE on padding.

    When any example is packed, also "positions" and "segment_ids" (B, T): an unpacked example is one segment 0 at
    positions 0..n-1; padding is position 0 in segment -1, a segment of its own.
    """
    if not examples:
        raise ValueError("collate() needs at least one example")
    batch, length = len(examples), max(len(e.input_ids) for e in examples)
    tokens = torch.full((batch, length), pad_id, dtype=torch.long)
    targets = torch.full((batch, length), IGNORE, dtype=torch.long)
    packed = any(e.positions is not None for e in examples)
    positions = torch.zeros((batch, length), dtype=torch.long)
    segment_ids = torch.full((batch, length), -1, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        tokens[b, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        targets[b, :n] = torch.tensor(e.targets, dtype=torch.long)
        if packed:
            positions[b, :n] = torch.tensor(e.positions) if e.positions is not None else torch.arange(n)
            segment_ids[b, :n] = torch.tensor(e.segments) if e.segments is not None else 0
    out = {"tokens": tokens, "targets": targets}
    if packed:
        out.update(positions=positions, segment_ids=segment_ids)
    return out
