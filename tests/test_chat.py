"""Multi-turn chat: ChatSession reuses its KV cache (each turn prefills only its new tokens), drops the oldest turns
when the context is full, survives Ctrl-C; tools/chat.py prints exactly what gemma.generate gives."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gemma
from gemma.formats.checkpoint import save_native
from gemma.errors import GemmaError
from gemma.generation.chat import ChatSession
from gemma.generation.text import decode_text
from gemma.generation.batch import generate
from gen_models import real_270m, tiny_generator, tiny_generator_folder

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "tools" / "chat.py"
SYSTEM = {"role": "system", "content": "Be brief."}


def user(text):
    return {"role": "user", "content": text}


@pytest.fixture(autouse=True)
def inference(request):
    """No autograd; one thread for the tiny models (threads only add hand-off time to their tiny steps)."""
    threads = torch.get_num_threads()
    if not request.node.get_closest_marker("slow"):
        torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tok, tmp_path_factory):
    # Gemma 3 layout with a 5-token sliding window: the ring buffers wrap many times within a conversation.
    return tiny_generator("gemma3", tok, tmp_path_factory.mktemp("gemma3"))


def reply_of(session, text):
    """Send `text`; return (the prompt ids the reply continues, the reply text)."""
    pieces = session.send(text)
    prompt = list(session.tokens)
    return prompt, "".join(pieces)


# ---- the session ---------------------------------------------------------------------------------------------------


def test_second_turn_prefills_only_its_new_tokens(model, tok):
    s = ChatSession(model, tok, max_len=200, max_new_tokens=12, system=SYSTEM["content"])
    prompt, first = reply_of(s, "Hello there")
    assert prompt == tok.apply_chat([SYSTEM, user("Hello there")])
    assert s.last_prefill == len(prompt)
    assert first == decode_text(tok, generate(model, tok, [prompt], max_new_tokens=12)[0])

    cached, total = s.cache.length, len(s.tokens)
    unfed = total - cached  # the reply's last token, unless a stop id came after it
    assert unfed in (0, 1)
    pieces = s.send("How are you?")
    # Counted by hand from the template: <end_of_turn>\n<start_of_turn>user\nHow are you?<end_of_turn>\n
    # <start_of_turn>model\n, i.e. the closing of the model's turn and the new user turn without <bos>.
    new_turn = [tok.end_of_turn_id] + tok.encode("\n", bos=False) + tok.apply_chat([user("How are you?")])[1:]
    assert s.tokens[total:] == new_turn
    assert s.last_prefill == unfed + len(new_turn)
    assert s.cache.length == cached  # nothing fed yet: the iterator has not started
    prompt2 = list(s.tokens)
    second = "".join(pieces)
    # The reply continues the reused cache exactly as a fresh generation over the whole conversation would.
    ids = generate(model, tok, [prompt2], max_new_tokens=12)[0]
    assert s.tokens[len(prompt2) :] == ids and second == decode_text(tok, ids)


def test_every_turn_equals_a_fresh_generation(model, tok):
    s = ChatSession(model, tok, max_len=256, max_new_tokens=10)
    for text in ("Hi", "What is the capital of France?", "和中文", "Thank you. And you?"):
        prompt, reply = reply_of(s, text)
        assert reply == decode_text(tok, generate(model, tok, [prompt], max_new_tokens=10)[0])
        assert s.last_prefill < len(prompt) or len(s.messages) == 2


def test_seeded_sampling_session_is_reproducible(model, tok):
    settings = dict(max_len=256, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=5, repetition_penalty=1.2)
    runs = []
    for _ in range(2):
        s = ChatSession(model, tok, **settings)
        runs.append([reply_of(s, t)[1] for t in ("Hi", "And then?")])
    assert runs[0] == runs[1]


def test_a_session_takes_its_settings_as_one_object(model, tok):
    from gemma.generation.sampling import SamplingParams

    settings = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=5, repetition_penalty=1.2)
    runs = []
    for s in (
        ChatSession(model, tok, max_len=256, **settings),
        ChatSession(model, tok, max_len=256, params=SamplingParams(**settings)),
    ):
        runs.append([reply_of(s, t)[1] for t in ("Hi", "And then?")])
    assert runs[0] == runs[1]
    with pytest.raises(GemmaError, match="^max_new_tokens must be a positive integer, got 0$"):
        ChatSession(model, tok, params=SamplingParams(max_new_tokens=0))  # a reply needs one token at least


def test_overflow_drops_the_oldest_turns_with_a_notice(model, tok):
    notices = []
    s = ChatSession(model, tok, max_len=72, max_new_tokens=8, system=SYSTEM["content"], notify=notices.append)
    texts = ["Hello there", "How are you today?", "What is the capital of France?", "Please write a poem."]
    for text in texts:
        prompt, reply = reply_of(s, text)
        assert len(prompt) + 8 <= 72
        assert reply == decode_text(tok, generate(model, tok, [prompt], max_new_tokens=8)[0])
    assert notices and "dropped the oldest" in notices[0]
    # After a drop the conversation is re-encoded from its text, system prompt first, and prefilled afresh.
    assert prompt == tok.apply_chat([SYSTEM] + s.messages[:-2] + [user(texts[-1])])
    assert s.last_prefill == len(prompt)
    assert len(s.messages) < 2 * len(texts)


def test_a_message_too_long_for_the_context_changes_nothing(model, tok):
    s = ChatSession(model, tok, max_len=40, max_new_tokens=8)
    reply_of(s, "Hi")
    before = (list(s.tokens), s.cache.length, list(s.messages))
    with pytest.raises(GemmaError, match="do not fit"):
        s.send("The quick brown fox jumps over the lazy dog. " * 3)
    assert (s.tokens, s.cache.length, s.messages) == before


def test_reset_starts_over(model, tok):
    s = ChatSession(model, tok, max_len=128, max_new_tokens=6, system=SYSTEM["content"])
    reply_of(s, "Hello")
    reply_of(s, "Again")
    s.reset()
    prompt, _ = reply_of(s, "Hi")
    assert prompt == tok.apply_chat([SYSTEM, user("Hi")]) and s.last_prefill == len(prompt)


def test_ctrl_c_inside_a_forward_pass(model, tok, monkeypatch):
    s = ChatSession(model, tok, max_len=128, max_new_tokens=10)
    reply_of(s, "Hello there")
    calls = {"n": 0}
    block = model.layers[1]
    real = block.forward

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # prefill, two decode steps, then Ctrl-C halfway through the model
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(block, "forward", interrupted)
    pieces = s.send("How are you?")
    with pytest.raises(KeyboardInterrupt):
        for _ in pieces:
            pass
    monkeypatch.undo()
    assert s.messages[-2] == user("How are you?")  # the turn and its partial reply are kept
    assert s.cache.length == 0  # a half-written cache is dropped ...
    prompt, reply = reply_of(s, "Fine")
    assert s.last_prefill == len(prompt)  # ... and the next turn prefills the whole conversation, correctly
    assert reply == decode_text(tok, generate(model, tok, [prompt], max_new_tokens=10)[0])


def test_stopping_a_reply_between_tokens_keeps_the_cache(model, tok):
    s = ChatSession(model, tok, max_len=128, max_new_tokens=10)
    pieces = s.send("What is the capital of France?")
    shown = next(pieces)
    pieces.close()  # what the chat tool does when Ctrl-C lands while it prints
    assert s.messages[-1] == {"role": "model", "content": shown}
    cached = s.cache.length
    prompt, reply = reply_of(s, "Go on")
    assert s.last_prefill == len(prompt) - cached and cached > 0
    assert reply == decode_text(tok, generate(model, tok, [prompt], max_new_tokens=10)[0])


def test_raw_session_continues_the_text(model, tok):
    s = ChatSession(model, tok, max_len=128, max_new_tokens=6, raw=True)
    prompt, _ = reply_of(s, "The quick brown")
    assert prompt == tok.encode("The quick brown")
    total, cached = len(s.tokens), s.cache.length
    prompt2, _ = reply_of(s, " fox")
    assert prompt2[total:] == tok.encode(" fox", bos=False)
    assert s.last_prefill == len(prompt2) - cached


# ---- tools/chat.py -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tok, tmp_path_factory):
    return tiny_generator_folder("gemma3", tok, tmp_path_factory.mktemp("chat-model"))


def run_chat(*args, stdin: str = "", timeout: int = 120, threads: int = 1):
    env = dict(os.environ, PYTHONIOENCODING="utf-8", OMP_NUM_THREADS=str(threads))
    return subprocess.run(
        [sys.executable, str(CHAT), *map(str, args)],
        input=stdin.encode(),
        capture_output=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_prompt_prints_exactly_the_generated_text(folder):
    model, tok = gemma.load(folder, dtype=torch.bfloat16)  # the tool's default dtype
    flags = dict(max_new_tokens=20, temperature=0.9, top_k=100, top_p=0.95, min_p=0.01, repetition_penalty=1.1, seed=3)
    argv = [a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", v)]
    done = run_chat("--model", folder, "--prompt", "Hello, how are you?", "--system", "Be brief.", *argv)
    assert done.returncode == 0, done.stderr.decode()
    ids = generate(model, tok, [tok.apply_chat([SYSTEM, user("Hello, how are you?")])], **flags)[0]
    assert done.stdout.decode("utf-8") == decode_text(tok, ids) + "\n"
    assert done.stderr == b""


def test_prompt_raw_fp32_with_stats(folder, capsys):
    model, tok = gemma.load(folder)
    chat = load_chat_tool()
    assert (
        chat.main(
            [
                "--model",
                str(folder),
                "--prompt",
                "今天天气",
                "--raw",
                "--dtype",
                "fp32",
                "--max-new-tokens",
                "16",
                "--stats",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    ids = generate(model, tok, [tok.encode("今天天气")], max_new_tokens=16)[0]
    assert out == decode_text(tok, ids) + "\n"
    assert "tokens/s" in err


def test_piped_conversation_exits_0_and_matches_a_session(folder):
    model, tok = gemma.load(folder, dtype=torch.bfloat16)
    done = run_chat(
        "--model",
        folder,
        "--max-new-tokens",
        12,
        "--system",
        "Be brief.",
        "--stats",
        stdin="Hello there\nWhat is the capital of France?\n/exit\nnot read\n",
    )
    assert done.returncode == 0, done.stderr.decode()
    s = ChatSession(model, tok, max_new_tokens=12, system="Be brief.")
    want = "".join(reply_of(s, t)[1] + "\n" for t in ("Hello there", "What is the capital of France?"))
    assert done.stdout.decode("utf-8") == want
    err = done.stderr.decode()
    assert err.count("[prefill") == 2 and "Traceback" not in err


def test_commands_overflow_and_end_of_input(folder, capsys, monkeypatch):
    lines = [
        "/help",
        "Hello there",
        "/reset",
        "How are you today?",
        "/bogus",
        "What is the capital of France?",
        "Please write a short poem about the sea and the moon.",
        "Thank you.",
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines)))  # ends without /exit
    chat = load_chat_tool()
    assert chat.main(["--model", str(folder), "--max-new-tokens", "8", "--max-len", "64"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(chat.COMMANDS + "\n")
    assert "[new conversation]" in err and "unknown command /bogus" in err
    assert "dropped the oldest" in err


@pytest.mark.parametrize(
    "args, where",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "1.5"], "--top-p"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--max-len", "100000"], "context"),
        (["--model", "no/such/folder"], "no/such/folder"),
    ],
)
def test_bad_flags_are_one_line_errors(args, where, folder, capsys):
    chat = load_chat_tool()
    argv = ["--model", str(folder), *args]
    assert chat.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and where in err and "\n" not in err


def test_adapter_is_applied(folder, tmp_path, capsys):
    from lora import LoraConfig, inject, save_adapter

    model, tok = gemma.load(folder)
    inject(model, LoraConfig(r=4, alpha=8.0))
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))  # B starts at zero: make it act
    save_adapter(model, tmp_path / "adapter")
    base, _ = gemma.load(folder)
    tuned, _ = gemma.load(folder, adapter=tmp_path / "adapter")
    prompt = tok.apply_chat([user("Hello there")])
    ids = generate(tuned, tok, [prompt], max_new_tokens=12)[0]
    assert ids != generate(base, tok, [prompt], max_new_tokens=12)[0]
    chat = load_chat_tool()
    assert (
        chat.main(
            [
                "--model",
                str(folder),
                "--adapter",
                str(tmp_path / "adapter"),
                "--dtype",
                "fp32",
                "--prompt",
                "Hello there",
                "--max-new-tokens",
                "12",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == decode_text(tok, ids) + "\n"


def load_chat_tool():
    spec = importlib.util.spec_from_file_location("chat_tool", CHAT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ctrl_c_stops_the_reply_not_the_program(model, tok, monkeypatch):
    chat = load_chat_tool()
    s = ChatSession(model, tok, max_len=128, max_new_tokens=10)
    block, real, calls = model.layers[0], model.layers[0].forward, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(block, "forward", interrupted)
    out, err = io.StringIO(), io.StringIO()
    assert chat.chat_loop(s, ["Hello there", "Go on", "/exit"], out, err) == 0
    assert "[stopped]" in err.getvalue()
    assert out.getvalue().count("\n") == 2 and len(s.messages) == 4


# ---- the real model ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_270m_prompt_prints_exactly_the_generated_text():
    model, tok = real_270m()
    question = "What is the capital of France? Answer in one sentence."
    done = run_chat(
        "--model",
        "3-270m",
        "--prompt",
        question,
        "--dtype",
        "fp32",
        "--max-new-tokens",
        24,
        threads=torch.get_num_threads(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()
    ids = generate(model, tok, [tok.apply_chat([user(question)])], max_new_tokens=24)[0]
    assert done.stdout.decode("utf-8") == decode_text(tok, ids) + "\n"


@pytest.mark.slow
def test_real_270m_piped_conversation_exits_0(tmp_path):
    model, tok = real_270m()
    # A native bf16 copy loads in a second, where the GGUF takes tens.
    save_native(tmp_path / "270m", model.config, model.state_dict(), tok.model_proto, dtype=torch.bfloat16)
    done = run_chat(
        "--model",
        tmp_path / "270m",
        "--max-new-tokens",
        16,
        "--stats",
        stdin="Hi! Who are you?\nWhat is 2 + 2?\n/exit\n",
        threads=torch.get_num_threads(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode("utf-8").count("\n") >= 2
    assert done.stderr.decode().count("[prefill") == 2
