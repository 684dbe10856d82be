"""tools/chat.py --think on a Gemma 4 model: the thought is shown apart (stderr), the answer on stdout, and the next
turn's history is the template's, without the earlier thought. The model is tiny and scripted (tests/scripted.py)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from scripted import Script, reply_ids, tiny_gemma4  # noqa: E402


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    tok, model = tiny_gemma4(tmp_path_factory.mktemp("tok"))
    return tok, model, Script(model)


def test_think_shows_the_thought_apart_and_drops_it_from_the_history(scripted):
    import chat

    from gemma.generation.chat import ChatSession

    tok, model, script = scripted
    session = ChatSession(model, tok, enable_thinking=True, max_new_tokens=32)
    out, err = io.StringIO(), io.StringIO()
    script.say(reply_ids(tok, "<|channel>", "thought\nThe user greets me.\n", "<channel|>", "Hello!"))
    chat.chat_loop(session, ["hi"], out, err, think=True)
    assert out.getvalue() == "Hello!\n" and err.getvalue() == "The user greets me.\n"
    script.say(reply_ids(tok, "<|channel>", "thought\nAgain.\n", "<channel|>", "Hi again."))
    chat.chat_loop(session, ["and again"], out, err, think=True)
    assert out.getvalue() == "Hello!\nHi again.\n"
    # The second turn was fed the template's rendering of the history: the first thought is gone from it.
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "and again"},
    ]
    prompt = tok.apply_chat(history, enable_thinking=True)
    assert session.tokens[: len(prompt)] == prompt


def test_one_shot_think_and_its_refusals(scripted, tmp_path):
    import chat

    from gemma.errors import GemmaError
    from gemma.generation.chat import ChatSession

    tok, model, script = scripted
    script.say(reply_ids(tok, "<|channel>", "thought\nTwo and two.\n", "<channel|>", "4"))
    args = chat.build_parser().parse_args(["--prompt", "2+2?", "--think"])
    params = chat.check_args(args)
    out, err = io.StringIO(), io.StringIO()
    assert chat.one_shot(model, tok, args, params, out, err) == 0
    assert out.getvalue() == "4\n" and err.getvalue() == "Two and two.\n"
    with pytest.raises(GemmaError, match="--think needs the chat template"):
        chat.check_args(chat.build_parser().parse_args(["--think", "--raw"]))
    from tiny_tokenizer import tiny_tokenizer_proto

    from gemma.tokenizer import Tokenizer

    with pytest.raises(GemmaError, match="thinking needs a Gemma 4 model"):
        ChatSession(model, Tokenizer.from_bytes(tiny_tokenizer_proto()), enable_thinking=True)
