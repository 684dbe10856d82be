"""gemma.generation.engine: requests that share forward passes, joining and leaving the batch at any step, get what
gemma.generate gives each prompt alone (greedy and seeded sampling), token for token; the engine's cache's row
methods (gemma.generation.rows) keep the logits of a row exact while rows are loaded and columns move."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from gemma.generation.engine import Delta, Engine, EngineBusy, Finish
from gemma.errors import GemmaError
from gemma.generation.sampling import SamplingParams
from gemma.generation.text import decode_text
from gemma.generation.batch import generate, stream_generate
from gemma.generation.rows import RowCache
from gemma.generation.steps import prefill
from gen_models import real_270m, tiny_generator
from tiny_models import CASES


@pytest.fixture(autouse=True)
def inference(request):
    """No autograd; one thread for the tiny models (threads only add hand-off time to their tiny steps)."""
    threads = torch.get_num_threads()
    if not request.node.get_closest_marker("slow"):
        torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=CASES)
def model(request, tok, tmp_path_factory):
    # Gemma 2 and 3 have a 5-token sliding window: the ring buffers wrap constantly.
    return tiny_generator(request.param, tok, tmp_path_factory.mktemp(request.param)).eval()


@pytest.fixture(scope="module")
def gemma3(tok, tmp_path_factory):
    return tiny_generator("gemma3", tok, tmp_path_factory.mktemp("gemma3")).eval()


def random_prompts(tok, n, seed, longest=30):
    rng = random.Random(seed)
    return [
        [tok.bos_id] + [rng.randrange(4, tok.vocab_size) for _ in range(rng.randrange(1, longest))] for _ in range(n)
    ]


def alone(model, tok, prompt, max_new, context=None, **kw):
    """What gemma.generate gives for the prompt on its own (capped at `context` as the engine caps it)."""
    if context is not None:
        max_new = min(max_new, context - len(prompt))
    return generate(model, tok, [prompt], max_new_tokens=max_new, **kw)[0]


@pytest.fixture
def shifts(monkeypatch):
    """Counts RowCache.shift calls, so a test can check it moved columns both ways."""
    calls = []
    original = RowCache.shift

    def counting(self, d):
        calls.append(d)
        return original(self, d)

    monkeypatch.setattr(RowCache, "shift", counting)
    return calls


@pytest.mark.parametrize("max_batch,max_len", [(8, None), (3, 48), (5, 36)])
def test_staggered_requests_equal_each_alone(model, tok, shifts, max_batch, max_len):
    prompts = random_prompts(tok, 12, seed=max_batch)
    rng = random.Random(1)
    budgets = [rng.randrange(1, 40) for _ in prompts]
    with Engine(model, tok, max_batch=max_batch, max_len=max_len) as engine:
        first = engine.submit(prompts[0], max_new_tokens=40, stop_ids=())
        next(iter(first))  # the first request is decoding when the others arrive
        requests = [first]
        for i, (p, m) in enumerate(zip(prompts[1:], budgets[1:]), 1):
            requests.append(engine.submit(p, max_new_tokens=m, stop_ids=()))
            if i % 4 == 0:  # some arrive a few steps later
                next(iter(requests[-1]))
        got = [list(r.result(60).token_ids) for r in requests]
        stats = engine.stats
    budgets[0] = 40
    context = max_len or model.config.max_seq_len
    assert got == [alone(model, tok, p, m, context, stop_ids=()) for p, m in zip(prompts, budgets)]
    assert stats.rows_stepped > stats.steps  # forward passes were shared
    if max_len is not None:  # short contexts: rows came and went, and the columns moved both ways
        assert any(d > 0 for d in shifts) and any(d < 0 for d in shifts)


def test_stop_ids_end_a_request_and_its_row_is_reused(gemma3, tok):
    prompts = random_prompts(tok, 6, seed=3)
    free = [alone(gemma3, tok, p, 20, stop_ids=()) for p in prompts]
    stops = {free[0][4], free[1][2]}
    with Engine(gemma3, tok, max_batch=2) as engine:
        got = engine.generate(prompts, max_new_tokens=20, stop_ids=stops)
    assert got == [alone(gemma3, tok, p, 20, stop_ids=stops) for p in prompts]
    assert len(got[0]) <= 4


def test_seeded_sampling_equals_generate(model, tok):
    prompts = random_prompts(tok, 6, seed=4)
    settings = dict(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.3)
    with Engine(model, tok, max_batch=4) as engine:
        requests = [
            engine.submit(p, max_new_tokens=16, seed=10 + i, stop_ids=(), **settings) for i, p in enumerate(prompts)
        ]
        got = [list(r.result(60).token_ids) for r in requests]
    assert got == [alone(model, tok, p, 16, seed=10 + i, stop_ids=(), **settings) for i, p in enumerate(prompts)]


def test_settings_as_one_object_equal_the_keywords(gemma3, tok):
    prompts = random_prompts(tok, 3, seed=9)
    params = SamplingParams(temperature=0.9, top_k=40, repetition_penalty=1.3, max_new_tokens=12, seed=2)
    with Engine(gemma3, tok, max_batch=2) as engine:
        one = list(engine.submit(prompts[0], params=params, stop_ids=()).result(30).token_ids)
        every = engine.generate(prompts, params=params, stop_ids=())
        with pytest.raises(GemmaError, match="not both"):
            engine.submit(prompts[0], seed=3, params=params)
    want = [generate(gemma3, tok, [p], params=params, stop_ids=())[0] for p in prompts]
    assert [one] + every == want[:1] + want
    assert want[0] == alone(
        gemma3, tok, prompts[0], 12, temperature=0.9, top_k=40, repetition_penalty=1.3, seed=2, stop_ids=()
    )


def test_events_are_whole_characters_that_join_to_the_text(gemma3, tok):
    prompt = tok.apply_chat([{"role": "user", "content": "你好！今天天气很好。"}])
    ids = alone(gemma3, tok, prompt, 40, stop_ids=())
    stop = decode_text(tok, ids[8:12])  # a stop string the reply contains
    with Engine(gemma3, tok) as engine:
        events = list(engine.submit(prompt, max_new_tokens=40, stop_ids=(), stop_strings=[stop]))
    finish = events[-1]
    assert isinstance(finish, Finish) and finish.reason == "stop"
    assert all(isinstance(e, Delta) and e.text for e in events[:-1])
    pieces = [e.text for e in events[:-1]]
    # The same pieces as the library's own stream (which never splits a character), joining to the text.
    assert pieces == list(stream_generate(gemma3, tok, prompt, 40, stop_ids=(), stop_strings=[stop]))
    assert "".join(pieces) == finish.text == decode_text(tok, finish.token_ids, [stop])
    assert list(finish.token_ids) == alone(gemma3, tok, prompt, 40, stop_ids=(), stop_strings=[stop])


def test_cancel_stops_a_request_and_the_engine_goes_on(gemma3, tok):
    prompts = random_prompts(tok, 2, seed=5)
    with Engine(gemma3, tok, max_batch=2) as engine:
        long = engine.submit(prompts[0], max_new_tokens=200, stop_ids=())
        events = iter(long)
        next(events)
        long.cancel()
        finish = long.result(30)
        assert finish.reason == "cancelled" and finish.completion_tokens < 200
        assert engine.generate([prompts[1]], max_new_tokens=12, stop_ids=()) == [
            alone(gemma3, tok, prompts[1], 12, stop_ids=())
        ]
        assert engine.stats.cancelled == 1 and engine.active == 0


def test_generation_ends_at_the_context_end(gemma3, tok):
    prompt = random_prompts(tok, 1, seed=6, longest=30)[0]
    with Engine(gemma3, tok, max_len=len(prompt) + 3) as engine:
        finish = engine.submit(prompt, max_new_tokens=50, stop_ids=()).result(30)
    assert finish.reason == "length" and finish.completion_tokens == 3


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(max_new_tokens=-1),
        dict(seed=1 << 64),
        dict(stop_strings=[""]),
        dict(prompt=[]),
        dict(prompt=[10**6]),
        dict(prompt=list(range(5, 300))),
        dict(logprobs=-1),
        dict(logprobs=21),
        dict(prompt_logprobs=True),
    ],
)
def test_bad_requests_are_refused_at_submit(gemma3, tok, bad):
    settings = dict(prompt=[tok.bos_id, 10], max_new_tokens=4) | bad
    with Engine(gemma3, tok) as engine:
        with pytest.raises(GemmaError):
            engine.submit(settings.pop("prompt"), **settings)
        assert engine.generate([[tok.bos_id, 10]], max_new_tokens=4, stop_ids=()) == [
            alone(gemma3, tok, [tok.bos_id, 10], 4, stop_ids=())
        ]


def full_forward_logprobs(model, ids, vocab):
    """log_softmax of one forward pass over `ids` without a cache: (len(ids), vocab)."""
    return torch.log_softmax(model(torch.tensor([ids]))[0].float()[:, :vocab], dim=-1)


def test_log_probabilities_are_a_full_forward_passs(model, tok):
    """A scored prompt's figures equal a full forward pass's bit for bit in fp32, also while other rows generate and
    in any batch of prompts; the sampled tokens' figures come from the cached decode steps, whose attention sums
    in another order than a full pass's (a difference of a few float32 ulps, so 1e-5)."""
    rng = random.Random(5)
    prompts = random_prompts(tok, 5, seed=11, longest=40)
    with Engine(model, tok, max_batch=3) as engine:
        busy = engine.submit(prompts[0], max_new_tokens=30, stop_ids=())  # rows generating around the scored ones
        scored = [
            engine.submit(p, max_new_tokens=rng.choice([0, 1, 6]), prompt_logprobs=3, logprobs=2) for p in prompts
        ]
        plain = engine.submit(prompts[1], max_new_tokens=6, logprobs=0)
        finishes = [r.result() for r in scored]
        assert list(busy.result().token_ids) == alone(model, tok, prompts[0], 30, stop_ids=())
        assert plain.result().prompt_logprobs is None and [x.top for x in plain.result().logprobs] == [()] * len(
            plain.result().logprobs
        )
    for prompt, finish in zip(prompts, finishes):
        sampled = [x.token for x in finish.logprobs]
        ref = full_forward_logprobs(model, prompt, tok.vocab_size)  # the pass a harness would run over the prompt
        assert finish.prompt_logprobs[0] is None and len(finish.prompt_logprobs) == len(prompt)
        for p in range(1, len(prompt)):
            entry = finish.prompt_logprobs[p]
            assert entry.token == prompt[p] and entry.logprob == ref[p - 1, prompt[p]].item()
            values, ids = ref[p - 1].topk(3)
            assert entry.top == tuple(zip(ids.tolist(), values.tolist()))
        assert sampled[: len(finish.token_ids)] == list(finish.token_ids)  # the stop id, if any, is scored too
        assert sampled == alone(model, tok, prompt, len(sampled), stop_ids=())
        ref = full_forward_logprobs(model, prompt + sampled, tok.vocab_size)
        for i, entry in enumerate(finish.logprobs):
            row = ref[len(prompt) - 1 + i]
            assert abs(entry.logprob - row[entry.token].item()) < 1e-5
            assert entry.top[0][0] == entry.token and entry.top[0][1] == entry.logprob  # greedy: the likeliest
            assert len(entry.top) == 2 and entry.top[0][1] >= entry.top[1][1]


def test_a_prompt_alone_is_scored_without_a_reply(gemma3, tok):
    with Engine(gemma3, tok) as engine:
        finish = engine.submit([tok.bos_id, 10, 11, 12], max_new_tokens=0, prompt_logprobs=0).result()
        unscored = engine.submit([tok.bos_id, 10], max_new_tokens=0).result()
    assert (finish.reason, finish.token_ids, finish.logprobs) == ("length", (), None)
    assert [x.token for x in finish.prompt_logprobs[1:]] == [10, 11, 12] and finish.prompt_logprobs[1].top == ()
    assert (unscored.reason, unscored.prompt_logprobs) == ("length", None)


def test_a_full_queue_says_busy(gemma3, tok):
    with Engine(gemma3, tok, max_batch=1, max_waiting=1) as engine:
        with pytest.raises(EngineBusy):
            for _ in range(3):
                engine.submit([tok.bos_id, 10], max_new_tokens=200, stop_ids=())


def test_a_failed_step_fails_its_requests_and_the_next_ones_succeed(gemma3, tok, monkeypatch):
    import gemma.generation.engine as engine_module

    failing = threading.Event()
    failing.set()
    real = engine_module.decode_one_token

    def flaky(*args):
        if failing.is_set():
            failing.clear()
            raise RuntimeError("simulated device error")
        return real(*args)

    monkeypatch.setattr(engine_module, "decode_one_token", flaky)
    prompts = random_prompts(tok, 2, seed=7)
    with Engine(gemma3, tok) as engine:
        finish = engine.submit(prompts[0], max_new_tokens=10, stop_ids=()).result(30)
        assert finish.reason == "error" and "simulated" in finish.error
        assert engine.generate([prompts[1]], max_new_tokens=10, stop_ids=()) == [
            alone(gemma3, tok, prompts[1], 10, stop_ids=())
        ]


def test_a_request_whose_sampling_fails_ends_alone(gemma3, tok, monkeypatch):
    import gemma.generation.engine

    real = gemma.generation.engine.sample

    def sample(logits, params, *args):  # settings can no longer make sampling fail: fail the marked request
        if params.top_k == 7:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, params, *args)

    monkeypatch.setattr(gemma.generation.engine, "sample", sample)
    prompts = random_prompts(tok, 2, seed=8)
    with Engine(gemma3, tok) as engine:
        good = engine.submit(prompts[0], max_new_tokens=16, stop_ids=())
        bad = engine.submit(prompts[1], max_new_tokens=16, temperature=1.0, top_k=7, stop_ids=())
        assert bad.result(30).reason == "error" and "sampling failed" in bad.result().error
        assert list(good.result(30).token_ids) == alone(gemma3, tok, prompts[0], 16, stop_ids=())


def test_close_finishes_what_is_left(gemma3, tok):
    engine = Engine(gemma3, tok, max_batch=1)
    requests = [engine.submit([tok.bos_id, 10 + i], max_new_tokens=200, stop_ids=()) for i in range(3)]
    engine.close()
    assert all(r.result(30).reason in ("error", "length") for r in requests)
    assert any(r.result().reason == "error" for r in requests)


# ---- the row cache (gemma.generation.rows) ---------------------------------------------------------------------------


def row_cache(model, batch: int, max_len: int) -> RowCache:
    return RowCache(model.config, batch, max_len, model.dtype, model.device)


def test_the_engines_cache_spans_twice_the_context(model, tok):
    """Columns are not positions: the shared cache holds more columns than the context, which a cache for one
    sequence may not (Gemma.new_cache)."""
    context = model.config.max_seq_len
    with Engine(model, tok, max_batch=2) as engine:
        assert isinstance(engine.cache, RowCache) and engine.cache.max_len == 2 * context
    with pytest.raises(GemmaError, match="exceeds the model's context"):
        model.new_cache(1, context + 1)


def test_load_row_and_shift_keep_a_rows_logits_exact(model):
    """A prompt prefilled on its own, loaded into a row at some offset, decoded while the columns move left and
    right: the logits equal a full forward pass over the sequence."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(4, cfg.vocab_size, (1, 20), generator=g)
    P = 9
    full = model(seq)[0]  # (20, V)
    staging = model.new_cache(1, P)
    prefill(model, staging, seq[:, :P], torch.arange(P)[None])
    cache = row_cache(model, 3, 48)
    cache.length = 15  # other rows had run 15 columns
    cache.load_row(1, staging, 0, cache.length - P)
    moves = {3: 4, 6: -7, 8: 2}  # after these decode steps, shift the columns by these amounts
    for step, p in enumerate(range(P, 20)):
        tokens = torch.tensor([0, int(seq[0, p]), 0])
        positions = torch.tensor([-1, p, -1])
        logits = model(tokens[:, None], positions[:, None], cache=cache)[1, 0]
        if p + 1 < 20:
            torch.testing.assert_close(logits, full[p], atol=1e-5, rtol=1e-5)
        if step in moves:
            cache.shift(moves[step])


def test_first_rows_writes_through_to_the_cache(model):
    cache = row_cache(model, 4, 16)
    view = cache.first_rows(2)
    x = torch.randint(4, model.config.vocab_size, (2, 3))
    model(x, torch.arange(3).expand(2, 3), cache=view)
    cache.length = view.length
    assert cache.length == 3
    for table in cache.slot_pos.values():
        assert (table[:2, :3] >= 0).all() and (table[2:] == -1).all()


# ---- the real model ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_270m_concurrent_greedy_equals_generate_alone():
    model, tok = real_270m()
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "1+1=?", "你好，请介绍一下你自己。"]
    prompts = [tok.apply_chat([{"role": "user", "content": q}]) for q in questions]
    with Engine(model, tok, max_batch=4) as engine:
        got = engine.generate(prompts, max_new_tokens=10)
    assert got == [generate(model, tok, [p], max_new_tokens=10)[0] for p in prompts]
