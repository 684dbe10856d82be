"""lm-eval against tools/serve.py: its `local-completions` model, sending token ids tokenized with the tokenizer of
our HF export (batched: four prompts a request), gives the scores that lm-eval's own `hf` model (transformers) gives
on that same folder, on a local multiple-choice task (loglikelihood: acc, acc_norm) and a greedy generation task
(generate_until: exact_match), both in tests/data/lm_eval/. Per sample too: each choice's log-likelihood to 1e-4
(our fp32 forward pass against transformers') with the same is-greedy flag, and the same generated text, except
where the text holds ill-formed UTF-8 (see `same_text`). The model is a tiny random Gemma 3, so the scores
themselves mean nothing; a degenerate run (no log-likelihoods that differ, no text generated) fails."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import lm_eval
import lm_eval.models.api_models
import pytest
from lm_eval.tasks import TaskManager

from gen_models import tiny_generator_folder
from test_serve import ROOT, Server

TASKS = Path(__file__).resolve().parent / "data" / "lm_eval"
KEY = "lm-eval-key"
BATCH = 4  # prompts per request from local-completions


@pytest.fixture(scope="module")
def hf_folder(tok, tmp_path_factory):
    """The tiny generation model exported by tools/convert.py as an HF folder (weights, config, tokenizer files)."""
    base = tmp_path_factory.mktemp("lm_eval")
    native = tiny_generator_folder("gemma3", tok, base / "gen")
    convert = [sys.executable, str(ROOT / "tools" / "convert.py"), str(native), str(base / "hf")]
    done = subprocess.run([*convert, "--to", "hf", "--dtype", "fp32"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return base / "hf"


@pytest.fixture(scope="module")
def server(hf_folder, tmp_path_factory):
    args = ["--model", str(hf_folder), "--dtype", "fp32", "--threads", "1", "--max-batch", "8"]
    args += ["--model-name", "tiny", "--log-level", "warning", "--api-key", KEY]
    srv = Server(args, tmp_path_factory.mktemp("log") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tasks(hf_folder, tmp_path_factory) -> tuple[Path, float]:
    """The two tasks, in a folder of their own, with the generation targets of half the prompts replaced by what the
    model itself generates greedily there (by gemma.generate, cut at the task's "\n"), so that exact_match scores
    something on both sides (a random model matches no written target) and a backend that generates otherwise
    scores less. Only texts that are valid UTF-8 are taken (see `same_text`)."""
    import json
    import shutil

    import torch

    import gemma
    from gemma.generation.text import decode_text

    folder = tmp_path_factory.mktemp("tasks")
    for f in TASKS.iterdir():
        shutil.copy(f, folder / f.name)
    model, tok = gemma.load(hf_folder, dtype=torch.float32)
    docs = [json.loads(line) for line in (TASKS / "gen.jsonl").read_text().splitlines()]
    replaced = 0
    for doc in docs:
        ids = gemma.generate(model, tok, [tok.encode(doc["prompt"])], max_new_tokens=8, stop_ids=())[0]
        text = decode_text(tok, ids, ["\n"])
        if text.strip() and "\ufffd" not in text and replaced < len(docs) // 2:
            doc["target"], replaced = text, replaced + 1
    assert replaced >= 2, docs
    (folder / "gen.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    return folder, replaced / len(docs)


def evaluate(model: str, model_args: str, tasks: Path) -> dict:
    """Both local tasks, zero-shot, every sample logged. No bootstrap (the stderrs are not compared) and no global
    seeding: decoding is greedy on both sides."""
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["tiny_mc", "tiny_gen"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),  # lm-eval's own: 15 s to index
        log_samples=True,
        bootstrap_iters=0,
        random_seed=None,
        numpy_random_seed=None,
        torch_random_seed=None,
    )


@pytest.fixture(scope="module")
def runs(hf_folder, server, tasks):
    tasks, _ = tasks
    """(hf results, server results, the JSON bodies local-completions posted)."""
    posted = []
    post = lm_eval.models.api_models.requests.post

    def recording_post(url, json=None, **kw):
        posted.append(json)
        return post(url, json=json, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tasks)  # the task files name their data files relative to the working directory
        mp.setenv("OPENAI_API_KEY", KEY)  # what local-completions sends as its bearer token
        mp.setattr(lm_eval.models.api_models.requests, "post", recording_post)  # its one way out when num_concurrent=1
        # add_bos_token on both sides: each asks the HF tokenizer to put <bos> first (which HFLM would do unasked, the
        # export's tokenizer_config saying add_bos_token; local-completions would not).
        hf = evaluate("hf", f"pretrained={hf_folder},dtype=float32,device=cpu,batch_size=1,add_bos_token=True", tasks)
        api = evaluate(
            "local-completions",
            f"model=tiny,base_url={server.url}/v1/completions,tokenizer={hf_folder},tokenizer_backend=huggingface,"
            f"tokenized_requests=True,add_bos_token=True,num_concurrent=1,max_retries=1,batch_size={BATCH},"
            "max_length=256",  # the model's context, which HFLM reads from its config
            tasks,
        )
    return hf, api, posted


def scores(results: dict) -> dict:
    return {
        task: {k: v for k, v in r.items() if k.endswith(",none") and "stderr" not in k}
        for task, r in results["results"].items()
    }


def samples(results: dict, task: str) -> list[dict]:
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def test_the_two_backends_give_the_same_scores(runs, tasks):
    hf, api, _ = runs
    assert set(scores(hf)) == {"tiny_mc", "tiny_gen"}
    assert set(scores(hf)["tiny_mc"]) == {"acc,none", "acc_norm,none"}
    assert set(scores(hf)["tiny_gen"]) == {"exact_match,none"}
    assert scores(api) == scores(hf)
    assert scores(api)["tiny_gen"]["exact_match,none"] == tasks[1]  # the share of targets its own greedy text set


def test_each_choice_log_likelihood_agrees(runs):
    hf, api, _ = runs
    ours, theirs = samples(api, "tiny_mc"), samples(hf, "tiny_mc")
    assert len(ours) == len(theirs) == 12
    lls = []
    for a, h in zip(ours, theirs):
        assert a["arguments"] == h["arguments"]  # the same (context, continuation) pairs
        assert (a["acc"], a["acc_norm"]) == (h["acc"], h["acc_norm"])
        for [(ll, greedy)], [(ref, ref_greedy)] in zip(a["resps"], h["resps"]):
            assert math.isfinite(ll) and ll < 0
            assert abs(ll - ref) < 1e-4, (a["arguments"], ll, ref)
            assert greedy == ref_greedy
            lls.append(ll)
    assert len({round(ll, 3) for ll in lls}) > len(lls) // 2  # not a constant answer


def same_text(ours: str, theirs: str) -> bool:
    """Whether the server's text is transformers' up to ill-formed UTF-8. Both decode the same token ids, but where
    a run of byte tokens is not valid UTF-8, transformers' byte-fallback decoder writes one U+FFFD per byte, while
    sentencepiece (the server's tokenizer) replaces only the ill-formed bytes and keeps the rest (<0x03> <0xD6> <0x78>:
    "\\x03\\ufffdx" against three U+FFFD). So each run of k U+FFFD on transformers' side stands for 1 to k characters
    on ours; the rest must be equal. exact_match cannot tell the two apart: a target is valid text."""
    parts = re.split("(\ufffd+)", theirs)
    pattern = "".join(f"[\\s\\S]{{1,{len(p)}}}" if i % 2 else re.escape(p) for i, p in enumerate(parts))
    return re.fullmatch(pattern, ours) is not None


def test_same_text_allows_only_the_replacement_runs():
    assert same_text("\x03\ufffdx", "\ufffd\ufffd\ufffd") and same_text("a\ufffdb", "a\ufffdb")
    assert not same_text("ab", "\ufffd") and not same_text("\x03\ufffdxy", "\ufffd\ufffd\ufffd")


def test_generations_agree(runs):
    hf, api, _ = runs
    ours, theirs = samples(api, "tiny_gen"), samples(hf, "tiny_gen")
    assert len(ours) == len(theirs) == 8
    for a, h in zip(ours, theirs):
        assert a["arguments"] == h["arguments"]
        [[text]], [[ref]] = a["resps"], h["resps"]
        assert same_text(text, ref), (a["arguments"], text, ref)
        assert "\n" not in text and "\n" not in ref  # both stopped at the task's `until`
    texts = [s["resps"][0][0] for s in ours]
    assert any(texts) and len(set(texts)) > 1, texts  # something generated, not one answer for every prompt
    assert any(a["resps"] == h["resps"] and a["resps"][0][0] for a, h in zip(ours, theirs))  # some texts equal


def test_requests_were_batched_token_ids(runs, tok):
    """What local-completions posted: lists of up to BATCH token-id prompts, each starting with <bos>; the
    loglikelihood requests with echo, max_tokens 1 and logprobs 1, the generation requests greedy with the task's
    stop string and lm-eval's EOS string."""
    _, _, posted = runs
    score = [b for b in posted if b.get("echo")]
    gen = [b for b in posted if not b.get("echo")]
    assert sum(len(b["prompt"]) for b in score) == 40  # 12 questions, 40 choices in all
    assert sum(len(b["prompt"]) for b in gen) == 8
    assert max(len(b["prompt"]) for b in posted) == BATCH
    for body in posted:
        assert all(p[0] == tok.bos_id and all(isinstance(i, int) for i in p) for p in body["prompt"])
    assert all((b["max_tokens"], b["logprobs"], b["temperature"]) == (1, 1, 0) for b in score)
    assert all((b["max_tokens"], b["temperature"], b["stop"]) == (8, 0, ["\n", "<eos>"]) for b in gen)
