"""gemma.generation: cached generation equals full forward passes, batches equal single prompts, each sampling filter
does what it says (and what transformers does), seeds reproduce, streams never split a character."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

import gemma
from gemma.errors import GemmaError
from gemma.generation.text import IncrementalDecoder, TextStream, decode_text, find_stop
from gemma.generation.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    logits_to_probs,
    min_p_filter,
    sample,
    seen_mask,
    top_k_filter,
    top_p_filter,
)
from gemma.generation.steps import decode_one_token, prefill
from gemma.generation.batch import generate, stream_generate
from gen_models import real_270m, tiny_generator
from tiny_models import CASES, hf_model


@pytest.fixture(autouse=True)
def inference(request):
    """No autograd; and one thread for the tiny models, which gain nothing from threads (on a busy machine, thread
    hand-offs dominate their step time)."""
    threads = torch.get_num_threads()
    if not request.node.get_closest_marker("slow"):
        torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(threads)


# The tiny models' sliding window is 5: the long prompt and the 24 new tokens both run past it.
PROMPTS = ("The quick brown fox", "Hello, world! How are you today? I am fine, thank you.", "今天")


@pytest.fixture(scope="module", params=CASES)
def model(request, tok, tmp_path_factory):
    return tiny_generator(request.param, tok, tmp_path_factory.mktemp(request.param))


def greedy_without_cache(model, prompt, max_new_tokens, stop_ids=()):
    """Step-by-step argmax of full forward passes over the whole sequence, no cache."""
    seq = list(prompt)
    for _ in range(max_new_tokens):
        t = int(model(torch.tensor([seq]))[0, -1].argmax())
        if t in stop_ids:
            break
        seq.append(t)
    return seq[len(prompt) :]


# ---- cached generation equals uncached -----------------------------------------------------------------------------


@pytest.mark.parametrize("text", PROMPTS)
def test_greedy_with_cache_equals_argmax_of_full_forward(model, tok, text):
    prompt = tok.encode(text)
    want = greedy_without_cache(model, prompt, 24)
    assert len(set(want)) > 3  # the test model really moves
    assert generate(model, tok, [prompt], max_new_tokens=24, stop_ids=()) == [want]


def test_greedy_stops_at_stop_ids(model, tok):
    prompt = tok.encode(PROMPTS[1])
    full = greedy_without_cache(model, prompt, 24)
    stop = full[7]  # pretend the 8th token is a stop id
    got = generate(model, tok, [prompt], max_new_tokens=24, stop_ids=[stop])[0]
    assert got == full[: full.index(stop)]


def test_batch_of_unequal_prompts_equals_each_alone(model, tok):
    prompts = [tok.encode(t) for t in PROMPTS] + [tok.encode("Fine-tuning with LoRA")]
    assert len({len(p) for p in prompts}) == len(prompts)
    batch = generate(model, tok, prompts, max_new_tokens=16, stop_ids=())
    alone = [generate(model, tok, [p], max_new_tokens=16, stop_ids=())[0] for p in prompts]
    assert batch == alone
    # With the default stop ids too: rows that stop early must not disturb the others.
    stops = {batch[0][3], batch[1][5]}
    batch = generate(model, tok, prompts, max_new_tokens=16, stop_ids=stops)
    assert batch == [generate(model, tok, [p], max_new_tokens=16, stop_ids=stops)[0] for p in prompts]
    assert len(batch[0]) == 3


def test_cached_logits_equal_uncached(model, tok):
    # A left-padded batch: prefill, then one token at a time, against full forward passes of each row alone.
    prompts = [tok.encode(PROMPTS[0]), tok.encode(PROMPTS[1])]
    nxt = [[17, 300, 42, 511, 7, 99, 250, 8], [64, 33, 600, 5, 401, 12, 77, 18]]
    width = max(map(len, prompts))
    tokens = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    positions = torch.tensor([[-1] * (width - len(p)) + list(range(len(p))) for p in prompts])
    cache = model.new_cache(2, width + len(nxt[0]))
    got = [prefill(model, cache, tokens, positions)]
    for i in range(len(nxt[0])):
        got.append(decode_one_token(model, cache, torch.tensor([nxt[0][i], nxt[1][i]]), positions[:, -1] + 1 + i))
    got = torch.stack(got, dim=1)  # (B, 1 + steps, V)
    for row, p in enumerate(prompts):
        full = model(torch.tensor([p + nxt[row]]))[0, len(p) - 1 :]
        torch.testing.assert_close(got[row], full, atol=1e-5, rtol=1e-5)


def test_ids_without_a_tokenizer_piece_are_never_sampled(tok, tmp_path):
    # The parity models have 1024 embedding rows, the tokenizer 640 pieces.
    from gemma.formats.checkpoint import build_model, load_hf_folder

    hf_model("gemma1-mqa").save_pretrained(tmp_path)
    model = build_model(*load_hf_folder(tmp_path))
    assert model.config.vocab_size > tok.vocab_size
    out = generate(model, tok, [tok.encode("Hello")], max_new_tokens=32, temperature=5.0, seed=0, stop_ids=())
    assert len(out[0]) == 32 and max(out[0]) < tok.vocab_size


def test_generation_ends_at_the_context_end(tok):
    prompt = tok.encode("Hello")
    model = Scripted([400] * 100, tok.vocab_size, max_seq_len=20)
    out = generate(model, tok, [prompt], max_new_tokens=50)
    assert len(out[0]) == 20 - len(prompt)
    with pytest.raises(GemmaError, match="no room"):
        generate(model, tok, [[2] * 20], max_new_tokens=5)


# ---- the filters on known distributions --------------------------------------------------------------------------

PROBS = torch.tensor([[0.1, 0.5, 0.15, 0.25]])  # sorted: 1 (0.5), 3 (0.25), 2 (0.15), 0 (0.1)


def kept(logits):
    return sorted(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


def test_top_k_keeps_k():
    logits = PROBS.log()
    assert kept(top_k_filter(logits, 1)) == [1]
    assert kept(top_k_filter(logits, 2)) == [1, 3]
    assert kept(top_k_filter(logits, 3)) == [1, 2, 3]
    assert kept(top_k_filter(logits, 10)) == [0, 1, 2, 3]
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(probs, torch.tensor([[0, 2 / 3, 0, 1 / 3]]))


@pytest.mark.parametrize(
    "p, want",
    [
        (0.3, [1]),
        (0.5, [1]),
        (0.6, [1, 3]),
        (0.74, [1, 3]),
        (0.8, [1, 2, 3]),
        (0.95, [0, 1, 2, 3]),
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(p, want):
    assert kept(top_p_filter(PROBS.log(), p)) == want


@pytest.mark.parametrize(
    "min_p, want",
    [(0.0, [0, 1, 2, 3]), (0.19, [0, 1, 2, 3]), (0.21, [1, 2, 3]), (0.45, [1, 3]), (0.55, [1]), (1.0, [1])],
)
def test_min_p_is_relative_to_the_most_likely_token(min_p, want):
    assert kept(min_p_filter(PROBS.log(), min_p)) == want
    # Relative, not absolute: the same ratios at a different scale keep the same tokens.
    assert kept(min_p_filter(PROBS.log() + 3.0, min_p)) == want


def test_temperature_sharpens_and_flattens():
    logits = PROBS.log()
    for t in (0.5, 2.0):
        want = PROBS ** (1 / t) / (PROBS ** (1 / t)).sum()
        torch.testing.assert_close(logits_to_probs(logits, SamplingParams(temperature=t)), want)


def test_repetition_penalty_as_transformers_defines_it():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 2.0), torch.tensor([[1.0, -2.0, 0.5, -0.5, 0.0]]))


def test_filters_match_transformers_processors():
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 500, generator=g) * 3
    context = torch.randint(0, 500, (3, 40), generator=g)
    params = SamplingParams(temperature=0.7, top_k=100, top_p=0.8, min_p=0.02, repetition_penalty=1.3)
    theirs = logits
    for proc in (
        RepetitionPenaltyLogitsProcessor(1.3),
        TemperatureLogitsWarper(0.7),
        TopKLogitsWarper(100),
        TopPLogitsWarper(0.8),
        MinPLogitsWarper(0.02),
    ):
        theirs = proc(context, theirs)
    ours = logits_to_probs(apply_repetition_penalty(logits, seen_mask(context.tolist(), 500), 1.3), params)
    torch.testing.assert_close(ours, theirs.softmax(-1))
    assert (ours > 0).sum(-1).tolist() == (theirs > float("-inf")).sum(-1).tolist()


def test_greedy_takes_the_penalized_argmax():
    logits = torch.tensor([[3.0, 2.0, -1.0]])
    seen = torch.tensor([[True, False, False]])
    assert sample(logits, SamplingParams(), seen=seen).tolist() == [0]
    assert sample(logits, SamplingParams(repetition_penalty=2.0), seen=seen).tolist() == [1]


def test_samples_follow_the_filtered_distribution():
    g = torch.Generator().manual_seed(1)
    logits = PROBS.log().expand(4000, 4)
    draws = sample(logits, SamplingParams(temperature=1.0, top_k=3), g)
    freq = torch.bincount(draws, minlength=4) / len(draws)
    assert freq[0] == 0
    torch.testing.assert_close(freq, torch.tensor([0, 0.5, 0.15, 0.25]) / 0.9, atol=0.03, rtol=0)


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1.0),
        dict(temperature=math.nan),
        dict(temperature=math.inf),
        dict(top_k=0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_p=math.nan),
        dict(min_p=-0.1),
        dict(min_p=2.0),
        dict(repetition_penalty=0.0),
        dict(repetition_penalty=math.inf),
        dict(max_new_tokens=-1),
        dict(seed=1 << 70),
    ],
)
def test_bad_settings_are_user_errors(model, tok, bad):
    with pytest.raises(GemmaError):
        generate(model, tok, [tok.encode("Hi")], **{"max_new_tokens": 2, **bad})


@pytest.mark.parametrize("prompts", [[], [[]], [2, 3], [[2, 99999]], "text"])
def test_bad_prompts_are_user_errors(model, tok, prompts):
    with pytest.raises(GemmaError):
        generate(model, tok, prompts, max_new_tokens=2)


def test_settings_travel_as_one_object(model, tok):
    prompt = tok.encode(PROMPTS[1])
    settings = dict(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.9, min_p=0.01, repetition_penalty=1.2, seed=4)
    params = SamplingParams(**settings, stop_strings=["zz"])
    assert generate(model, tok, [prompt], params=params, stop_ids=()) == generate(
        model, tok, [prompt], stop_strings=["zz"], stop_ids=(), **settings
    )
    assert list(stream_generate(model, tok, prompt, params=params, stop_ids=())) == list(
        stream_generate(model, tok, prompt, stop_strings=["zz"], stop_ids=(), **settings)
    )
    with pytest.raises(GemmaError, match="not both"):
        generate(model, tok, [prompt], temperature=0.5, params=params)
    with pytest.raises(GemmaError, match="^stop strings must be non-empty strings$"):
        SamplingParams(stop_strings=[""])  # checked once, when the object is made


def test_prompt_checks_and_padding_are_shared():
    from gemma.generation.batch import _check_prompts, check_prompt, left_pad

    assert check_prompt(torch.tensor([2, 5]), 10, 3) == [2, 5]
    for prompt, context, says in (
        ([], None, "^a prompt must be a non-empty list of token ids$"),
        ([2, 10], None, r"^a prompt holds something other than token ids in \[0, 10\)$"),
        ([2, True], None, "holds something other"),
        ([2, 5], 2, "^a prompt of 2 tokens leaves no room in the context of 2$"),
    ):
        with pytest.raises(GemmaError, match=says):
            check_prompt(prompt, 10, context)
    with pytest.raises(GemmaError, match="^prompt 1 is empty$"):  # generate's words for a batch
        _check_prompts([[2], []], 10)
    tokens, positions = left_pad([[7, 8, 9], [5]], pad_id=0)
    assert tokens.tolist() == [[7, 8, 9], [0, 0, 5]] and positions.tolist() == [[0, 1, 2], [-1, -1, 0]]


# ---- seeds -------------------------------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_text(model, tok):
    prompts = [tok.encode(PROMPTS[0]), tok.encode(PROMPTS[1])]
    settings = dict(
        max_new_tokens=16, temperature=1.0, top_p=0.95, min_p=0.01, top_k=200, repetition_penalty=1.2, stop_ids=()
    )
    torch.manual_seed(123)
    a = generate(model, tok, prompts, seed=7, **settings)
    torch.manual_seed(456)  # the global RNG plays no part
    torch.rand(10)
    b = generate(model, tok, prompts, seed=7, **settings)
    c = generate(model, tok, prompts, seed=8, **settings)
    assert a == b and a != c
    assert [decode_text(tok, x) for x in a] == [decode_text(tok, x) for x in b]


# ---- text: stop strings and streaming ----------------------------------------------------------------------------


class Scripted:
    """Stands in for a model whose greedy output is `script`, to push known ids (byte-fallback pieces of emoji and
    Chinese, stop ids) through `generate` and `stream_generate`."""

    def __init__(self, script, vocab, max_seq_len=512):
        self.script, self.vocab = list(script), vocab
        self.config = SimpleNamespace(vocab_size=vocab, max_seq_len=max_seq_len)
        self.device = torch.device("cpu")
        self.fed = 0

    def new_cache(self, batch, max_len):
        return SimpleNamespace(length=0)

    def hidden_states(self, tokens, positions, cache=None, last_only=False):
        cache.length += tokens.shape[1]
        return torch.zeros(tokens.shape[0], 1 if last_only else tokens.shape[1], 1)

    def logits(self, h):
        step = self.fed
        self.fed += 1
        out = torch.zeros(h.shape[0], h.shape[1], self.vocab)
        out[..., self.script[step] if step < len(self.script) else 0] = 1.0
        return out

    def __call__(self, tokens, positions=None, cache=None):
        return self.logits(self.hidden_states(tokens, positions, cache))


TEXT = "Hi 😀 今天 龘, 你好！ é ✓ 🚀🚀 end"


def test_text_has_byte_fallback_pieces(tok):
    ids = tok.encode(TEXT, bos=False)
    assert sum(tok.is_byte(i) for i in ids) >= 12  # emoji and rare characters go through byte fallback


def test_stream_pieces_are_whole_characters_and_join_to_the_text(tok):
    ids = tok.encode(TEXT, bos=False)
    pieces = list(stream_generate(Scripted(ids + [tok.eos_id], tok.vocab_size), tok, [tok.bos_id], max_new_tokens=100))
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in p for p in pieces)
    assert all(p.encode("utf-8").decode("utf-8") == p for p in pieces)
    assert generate(Scripted(ids + [tok.eos_id], tok.vocab_size), tok, [[tok.bos_id]], max_new_tokens=100) == [ids]
    assert "".join(pieces) == decode_text(tok, ids)


def test_incremental_decoder_joins_to_decode_on_any_ids(tok):
    # Random ids (byte pieces, controls, markers, broken UTF-8): the pieces still join to decode() of the whole.
    rng = random.Random(0)
    byte_ids = [i for i in range(tok.vocab_size) if tok.is_byte(i)]
    for _ in range(200):
        ids = [
            rng.choice(byte_ids) if rng.random() < 0.5 else rng.randrange(tok.vocab_size)
            for _ in range(rng.randrange(1, 30))
        ]
        dec = IncrementalDecoder(tok)
        text = "".join(dec.push(i) for i in ids) + dec.flush()
        assert text == tok.decode(ids)


def test_stream_equals_generated_text(model, tok):
    prompt = tok.encode(PROMPTS[1])
    for settings in (dict(), dict(temperature=1.0, seed=3, top_k=50, repetition_penalty=1.1)):
        ids = generate(model, tok, [prompt], max_new_tokens=24, **settings)[0]
        pieces = list(stream_generate(model, tok, prompt, max_new_tokens=24, **settings))
        assert "".join(pieces) == tok.decode(ids) == decode_text(tok, ids)


def test_stop_strings_cut_the_text_and_end_generation(tok):
    ids = tok.encode(TEXT, bos=False)
    for stop, want in (
        ("今天", "Hi 😀 "),
        ("🚀", "Hi 😀 今天 龘, 你好！ é ✓ "),
        (", 你", "Hi 😀 今天 龘"),
        ("nope", TEXT),
    ):
        got = generate(
            Scripted(ids + [tok.eos_id], tok.vocab_size), tok, [[tok.bos_id]], max_new_tokens=100, stop_strings=[stop]
        )[0]
        assert decode_text(tok, got, [stop]) == want
        # Generation ends with the token that completed the stop string.
        assert got == ids[: len(got)] and (stop not in tok.decode(got[:-1]) or stop == "nope")
        if stop != "nope":
            assert stop in tok.decode(got)
        pieces = list(
            stream_generate(
                Scripted(ids + [tok.eos_id], tok.vocab_size),
                tok,
                [tok.bos_id],
                max_new_tokens=100,
                stop_strings=[stop, "never"],
            )
        )
        assert "".join(pieces) == want
        assert not any(stop[0] in p for p in pieces if stop != "nope")  # no part of the stop string is shown


def test_stop_string_that_completes_first_wins():
    assert find_stop("xxabcd", ["abcd", "bc"]) == 3  # "bc" is complete before "abcd"
    assert find_stop("xxabcd", ["abc", "bc"]) == 2  # both complete with "c": the longer
    assert find_stop("xx", ["a"]) is None


def test_text_stream_holds_back_possible_stop_starts(tok):
    stream = TextStream(tok, ["end_of"])
    out = [stream.push(i) for i in tok.encode("Hi end end", bos=False)]
    assert "".join(out) + stream.finish() == "Hi end end"
    assert not stream.stopped


# ---- the real model ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_270m_greedy_with_cache_equals_full_forward():
    model, tok = real_270m()
    # A chat prompt, and a prompt longer than the 512-token sliding window (generation runs past it too).
    short = tok.apply_chat([{"role": "user", "content": "Name three colours of the rainbow."}])
    long = tok.encode(" ".join(f"{i} apples," for i in range(150)))
    assert len(long) > model.config.sliding_window
    for prompt, n in ((short, 24), (long, 12)):
        got = generate(model, tok, [prompt], max_new_tokens=n, stop_ids=())[0]
        # One uncached forward pass over the result: its argmax at each step must be the token generated next
        # (the model is causal, so this is step-by-step greedy decoding without a cache). The output head is
        # applied only where it is compared.
        h = model.hidden_states(torch.tensor([prompt + got]))[:, len(prompt) - 1 : -1]
        assert model.logits(h)[0].argmax(-1).tolist() == got


@pytest.mark.slow
def test_real_270m_batch_equals_each_alone_and_logits_match():
    model, tok = real_270m()
    prompts = [
        tok.encode("The capital of France is"),
        tok.apply_chat([{"role": "user", "content": "Write one sentence about the sea."}]),
    ]
    batch = generate(model, tok, prompts, max_new_tokens=12, stop_ids=())
    assert batch == [generate(model, tok, [p], max_new_tokens=12, stop_ids=())[0] for p in prompts]
    p = prompts[1]
    cache = model.new_cache(1, len(p) + 1)
    cached = prefill(model, cache, torch.tensor([p]), torch.arange(len(p))[None])
    torch.testing.assert_close(cached[0], model(torch.tensor([p]))[0, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_real_270m_stream_of_chinese_and_emoji():
    model, tok = real_270m()
    prompt = tok.encode("中文和表情符号：你好世界 😀🎉🚀 今天天气很好，我们")
    ids = generate(model, tok, [prompt], max_new_tokens=24, temperature=0.8, seed=0, stop_ids=())[0]
    pieces = list(stream_generate(model, tok, prompt, max_new_tokens=24, temperature=0.8, seed=0, stop_ids=()))
    assert "".join(pieces) == tok.decode(ids)
    if "\ufffd" not in tok.decode(ids):
        assert all("\ufffd" not in p for p in pieces)
    text = "今天 龘 🦩 𠜎 😀 emoji"  # the rare characters and 🦩 are byte-fallback pieces in Gemma 3's vocabulary
    scripted = tok.encode(text, bos=False)
    assert sum(tok.is_byte(i) for i in scripted) >= 10
    pieces = list(
        stream_generate(Scripted(scripted + [tok.eos_id], tok.vocab_size), tok, [tok.bos_id], max_new_tokens=50)
    )
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


def test_generate_is_exported():
    assert gemma.generate is generate
