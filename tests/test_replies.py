"""Gemma 4 model turns split into thought, answer and tool calls (gemma.generation.replies): well-formed, malformed
and cut-short call blocks, the template's value notation both ways, and streaming that releases the same text."""

from __future__ import annotations

import random

import pytest

from gemma.generation.replies import ReplyStream, parse_reply

Q = '<|"|>'
CASES = {
    "plain": ("Hello there.", None, "Hello there.", []),
    "thought": (
        "<|channel>thought\nLet me think.\n<channel|>The answer is 4.",
        "Let me think.",
        "The answer is 4.",
        [],
    ),
    "call": (
        f"<|channel>thought\nneed it<channel|><|tool_call>call:get_weather{{city:{Q}Paris{Q},days:3,"
        f"where:{{lat:48.5,lon:-2}},ok:true,x:null,l:[1,{Q}a{Q}]}}<tool_call|>",
        "need it",
        "",
        [
            {
                "name": "get_weather",
                "arguments": {
                    "city": "Paris",
                    "days": 3,
                    "where": {"lat": 48.5, "lon": -2},
                    "ok": True,
                    "x": None,
                    "l": [1, "a"],
                },
            }
        ],
    ),
    "two calls after text": (
        "Let me check. <|tool_call>call:f{}<tool_call|><|tool_call>call:g{a:1e-3}<tool_call|>",
        None,
        "Let me check. ",
        [{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"a": 0.001}}],
    ),
    "malformed": (
        f"bad <|tool_call>call:f{{a:{Q}x}}<tool_call|> end",
        None,
        f"bad <|tool_call>call:f{{a:{Q}x}}<tool_call|> end",
        [],
    ),
    "cut short": ("cut <|tool_call>call:f{a:1", None, "cut <|tool_call>call:f{a:1", []),
    "unfinished thought": ("<|channel>thought\nunfinished", "unfinished", "", []),
    "marker-like text": ("a < b and <| not a marker <|tool", None, "a < b and <| not a marker <|tool", []),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_parse_reply(name):
    text, reasoning, content, calls = CASES[name]
    reply = parse_reply(text)
    assert (reply.reasoning, reply.content, reply.tool_calls) == (reasoning, content, calls)


@pytest.mark.parametrize("name", sorted(CASES))
def test_streaming_releases_what_the_whole_text_gives(name):
    text = CASES[name][0]
    whole = parse_reply(text)
    for seed in range(20):
        rng, stream, reasoning, content, i = random.Random(seed), ReplyStream(), "", "", 0
        while i < len(text):
            n = rng.randint(1, 5)
            r, c = stream.feed(text[i : i + n])
            reasoning, content, i = reasoning + r, content + c, i + n
        r, c, reply = stream.finish()
        assert (reasoning + r, content + c) == (whole.reasoning or "", whole.content)
        assert reply == whole


def test_calls_written_by_the_template_parse_back():
    """Arguments rendered in the template's notation (gemma.tokenizer.gemma4) come back as the same objects."""
    from gemma.tokenizer import gemma4

    pieces = {p: i for i, p in enumerate(gemma4.MARKERS)}
    names = {i: p for p, i in pieces.items()}
    arguments = {"Zeta": [1, 2.5, None, True, {"deep": "中文 text"}], "alpha": "a,b:{c}", "n": -7, "empty": {}}
    out = gemma4.Parts(pieces)
    gemma4._calls(out, [{"function": {"name": "do.it", "arguments": arguments}}], "message 1")
    text = "".join(p if isinstance(p, str) else names[p] for p in out.merged())
    assert parse_reply(text).tool_calls == [{"name": "do.it", "arguments": arguments}]
