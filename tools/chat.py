"""Chat with a Gemma model in the terminal.

    python tools/chat.py [--model SRC] [--adapter DIR] [--system TEXT] [--prompt TEXT] [--raw] [--think] [sampling]

Interactive by default: type a message, the reply streams back; the conversation's KV cache is kept between
turns, so each turn only feeds the model its new tokens. When the conversation outgrows the context (--max-len),
the oldest turns are dropped, with a notice. Commands: /reset (new conversation), /help, /exit (or Ctrl-D).
Ctrl-C stops a reply, not the program. Input is read line by line, so it can be piped.

With --prompt TEXT it answers once, prints only the reply and exits; the text is exactly what `gemma.generate`
gives for the same settings. --raw feeds the text as is, with no chat template (a base model continues it).
Notices, statistics (--stats) and errors go to stderr, replies to stdout. With --think (Gemma 4) the model thinks
before it answers: its thought is shown apart, on stderr (dimmed at a terminal), and the answer on stdout.
"""

from __future__ import annotations

import argparse
import sys
from typing import Iterable, TextIO

from gemma.cli import add_model_args, load_model, main_guard
from gemma.errors import GemmaError
from gemma.files import check_source_file, has_lone_surrogate

COMMANDS = """\
/reset   start a new conversation (the system prompt stays)
/help    show this help
/exit    quit (also Ctrl-D, or end of input)
Ctrl-C stops a reply."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/chat.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(p)
    p.add_argument("--prompt", metavar="TEXT", default=None, help="answer this once, print the reply, exit")
    p.add_argument("--system", metavar="TEXT", default=None, help="a system prompt (folded into the first turn)")
    p.add_argument("--raw", action="store_true", help="no chat template: the model continues the text")
    p.add_argument("--think", action="store_true", help="Gemma 4: think before answering (thought shown on stderr)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="reply length limit (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default; so is anything below 1e-5)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set reaching probability p")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min-p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument(
        "--stop",
        metavar="TEXT",
        action="append",
        default=[],
        help="stop the reply at this text (not printed); repeatable",
    )
    p.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="context kept for a conversation, in tokens (default: the model's, at most 8192)",
    )
    p.add_argument("--stats", action="store_true", help="print token counts and tokens/s after each reply")
    return p


def thoughts_apart(pieces: Iterable[str], err: TextIO) -> Iterable[str]:
    """The answer's pieces of a Gemma 4 reply, its thought written to `err` as it comes (dimmed at a terminal)."""
    from gemma.generation.replies import ReplyStream

    dim = err.isatty() if hasattr(err, "isatty") else False
    stream, thought = ReplyStream(), False

    def show(text: str) -> None:
        nonlocal thought
        if text:
            err.write(("\x1b[2m" if dim and not thought else "") + text)
            err.flush()
            thought = True

    def end_thought() -> None:
        nonlocal thought
        if thought:
            err.write(("\x1b[0m" if dim else "") + "\n")
            err.flush()
            thought = False

    try:
        for piece in pieces:
            reasoning, answer = stream.feed(piece)
            show(reasoning)
            if answer:
                end_thought()
                yield answer
        reasoning, answer, _ = stream.finish()
        show(reasoning)
        end_thought()
        if answer:
            yield answer
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()
        end_thought()


def write_stream(pieces: Iterable[str], out: TextIO) -> bool:
    """Print the pieces as they come and end the line; False if Ctrl-C stopped them."""
    try:
        for piece in pieces:
            out.write(piece)
            out.flush()
        return True
    except KeyboardInterrupt:
        return False
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()  # a reply stopped by Ctrl-C keeps what was shown
        out.write("\n")
        out.flush()


def one_shot(model, tokenizer, args, params, out: TextIO, err: TextIO) -> int:
    from gemma.generation.steps import GenerationStats
    from gemma.generation.batch import stream_generate

    if args.raw:
        if args.system:
            raise GemmaError("--system needs the chat template (not --raw)")
        ids = tokenizer.encode(args.prompt)
    else:
        system = [{"role": "system", "content": args.system}] if args.system else []
        thinking = {"enable_thinking": True} if args.think else {}
        ids = tokenizer.apply_chat(system + [{"role": "user", "content": args.prompt}], **thinking)
    stats = GenerationStats()
    pieces = stream_generate(model, tokenizer, ids, params=params, stats=stats)
    if args.think:
        pieces = thoughts_apart(pieces, err)
    finished = write_stream(pieces, out)
    if args.stats:
        print(stats.summary(), file=err)
    return 0 if finished else 130


# Characters in one line of input, far past any context: a longer line (a file with no newlines, /dev/zero) ends the
# program instead of filling the memory.
MAX_LINE = 1 << 20


def read_lines(stdin: TextIO, err: TextIO) -> Iterable[str]:
    """The user's lines: with line editing at a terminal, plain reads from a pipe. Ctrl-C at the prompt is a hint,
    not an exit."""
    interactive = stdin.isatty()
    while True:
        try:
            if interactive:
                line = input("> ")
            else:
                line = stdin.readline(MAX_LINE + 1)
                if not line:
                    return
                if len(line.rstrip("\n")) > MAX_LINE:
                    raise GemmaError(
                        f"standard input: a line longer than {MAX_LINE} characters (not a "
                        "conversation: a binary file or a device?)"
                    )
        except EOFError:
            return
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D quits)", file=err)
            continue
        yield line.rstrip("\r\n")


def chat_loop(session, lines: Iterable[str], out: TextIO, err: TextIO, stats: bool = False, think: bool = False) -> int:
    """Run the interactive conversation over `lines`; returns the exit status."""
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0].lower()
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                session.reset()
                print("[new conversation]", file=err)
            elif command == "/help":
                print(COMMANDS, file=out)
            else:
                print(f"unknown command {command}; /help lists them", file=err)
            continue
        try:
            reply = session.send(line)
        except GemmaError as exc:  # e.g. a message longer than the context: say so and carry on
            print(f"error: {exc}", file=err)
            continue
        if not write_stream(thoughts_apart(reply, err) if think else reply, out):
            print("[stopped]", file=err)
        if stats:
            print(f"[{session.stats.summary()}]", file=err)
    return 0


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def sampling_params(args):
    """The sampling flags as one SamplingParams. Each value is checked under its flag's name first (`--top-p must
    be ...`, where the object's own check would say `top_p`), and a reply needs one new token at least."""
    from gemma.generation.sampling import SamplingParams, check_settings

    settings = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    check_settings(**settings, min_new_tokens=1, spell=flag)
    return SamplingParams(**settings, stop_strings=args.stop)


def check_args(args):
    """Every flag value checked, before the (slow) load: one line naming the flag. Returns the sampling flags as
    one SamplingParams."""
    if args.max_len is not None and args.max_len < 1:
        raise GemmaError(f"--max-len must be a positive integer, got {args.max_len}")
    if args.think and args.raw:
        raise GemmaError("--think needs the chat template (not --raw)")
    params = sampling_params(args)
    # Bytes that are not UTF-8 reach Python as lone surrogates (`--prompt $'\xff'`): no tokenizer can take them.
    for name, texts in (("--prompt", [args.prompt]), ("--system", [args.system]), ("--stop", args.stop)):
        if any(t is not None and has_lone_surrogate(t) for t in texts):
            raise GemmaError(f"{name}: not valid text (it holds bytes that are not UTF-8)")
    check_source_file(args.size or args.model)
    return params


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = check_args(args)

    from gemma.generation.chat import ChatSession

    # Replies are text in any language: never fail on a character the terminal's encoding lacks.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")

    model, tokenizer, loaded = load_model(args)
    loaded = f"[{loaded}]"

    if args.prompt is not None:
        if args.stats:
            print(loaded, file=sys.stderr)
        return one_shot(model, tokenizer, args, params, sys.stdout, sys.stderr)

    session = ChatSession(
        model,
        tokenizer,
        max_len=args.max_len,
        system=args.system,
        raw=args.raw,
        params=params,
        enable_thinking=args.think,
        notify=lambda message: print(f"[{message}]", file=sys.stderr),
    )
    print(f"{loaded}\n[/help for commands, /exit to quit]", file=sys.stderr)
    if sys.stdin is None:  # started with standard input closed: nothing to read
        return 0
    # Input that is not UTF-8 arrives as lone surrogates, which the session refuses line by line, instead of a
    # UnicodeDecodeError that would end the program.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    return chat_loop(session, read_lines(sys.stdin, sys.stderr), sys.stdout, sys.stderr, args.stats, args.think)


if __name__ == "__main__":
    sys.exit(main())
