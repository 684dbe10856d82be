"""train.metrics, train.evaluate and tools/evaluate.py: Chinese scored by characters and other text by words;
answers equal to their references score 1.0 everywhere; known values; the reference loss is the model's
cross-entropy on the trained tokens and the perplexity its exp; the command's files and its errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
import torch
import torch.nn.functional as F

import gemma
from gemma.generation.batch import generate
from gen_models import real_270m, tiny_generator_folder
from train.data import IGNORE, encode_messages
from train.evaluate import predictions_path, reply_text
from train.metrics import corpus_bleu, mean_loss, perplexity, reference_losses, score_record, text_scores, words

ROOT = Path(__file__).resolve().parents[1]
EVALUATE = ROOT / "tools" / "evaluate.py"


def run_evaluate(*args, block: str | None = None) -> subprocess.CompletedProcess:
    """python tools/evaluate.py ARGS as a user runs it, with one torch thread as the tests here run; `block` names
    a module that the command then cannot import, as if it were not installed."""
    cmd = [sys.executable, str(EVALUATE), *map(str, args)]
    if block is not None:
        cmd[1:2] = [
            "-c",
            f"import runpy, sys; sys.modules[{block!r}] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')",
            str(EVALUATE),
        ]
    return subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300
    )


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- tokenisation and scores ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,tokens",
    [
        ("The cat sat on the mat.", ["The", "cat", "sat", "on", "the", "mat", "."]),
        ("我爱北京天安门", ["我", "爱", "北", "京", "天", "安", "门"]),
        ("用Python写代码!", ["用", "Python", "写", "代", "码", "!"]),
        ("Hello，世界！ 共42个苹果。", ["Hello", "，", "世", "界", "！", "共", "42", "个", "苹", "果", "。"]),
        ("snake_case and it's", ["snake_case", "and", "it", "'", "s"]),
        ("nai\u0308ve  café\n", ["nai\u0308ve", "café"]),  # a combining mark stays in its word
        ("こんにちは世界", ["こ", "ん", "に", "ち", "は", "世", "界"]),
        ("", []),
    ],
)
def test_chinese_by_characters_other_text_by_words(text, tokens):
    assert words(text) == tokens


REFERENCES = [
    "Paris.",
    "北京。",
    "19",
    "The quick brown fox jumps over the lazy dog.",
    "我喜欢学习机器学习和自然语言处理。",
    "用Python写代码",
    "",
]


def test_answers_equal_to_references_score_one():
    summary, rows = text_scores(list(REFERENCES), list(REFERENCES))
    assert summary == {"exact_match": 1.0, "rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "bleu": 1.0}
    assert all(r.exact_match and r.rouge1 == r.rouge2 == r.rougeL == r.bleu == 1.0 for r in rows)
    # One-word answers alone still score 1 (BLEU's effective order), and surrounding whitespace does not count.
    assert text_scores(["19", " 42\n"], ["19", "42"])[0] == summary


def test_known_values():
    r = score_record("the cat", "the cat sat")
    assert r.rouge1 == pytest.approx(0.8) and r.rouge2 == pytest.approx(2 / 3) and not r.exact_match
    # Characters, not whitespace-separated words: "北京" shares two of the reference's five tokens.
    r = score_record("北京", "北京是首都")
    assert r.rouge1 == pytest.approx(2 * 0.4 / 1.4) and r.rougeL == pytest.approx(2 * 0.4 / 1.4)
    assert score_record("完全不同", "北京").rouge1 == 0.0
    assert score_record("Paris", "paris").rouge1 == 0.0  # case counts
    # BLEU is sacrebleu's corpus BLEU: on Chinese its own character tokenizer agrees with ours.
    hyp, ref = ["我爱北京天安门广场", "今天天气很好"], ["我爱北京天安门", "今天天气不错很好"]
    assert corpus_bleu(hyp, ref) == pytest.approx(sacrebleu.corpus_bleu(hyp, [ref], tokenize="zh").score / 100)
    assert text_scores(["a", "b"], ["a", "c"])[0]["exact_match"] == 0.5


def test_perplexity_is_exp_loss():
    assert perplexity(2.0) == pytest.approx(math.exp(2.0))
    assert perplexity(1e6) is None
    assert mean_loss([(3.0, 2), (1.0, 2)]) == (1.0, 4)


# ---- the model side ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tok, tmp_path_factory):
    return tiny_generator_folder("gemma3", tok, tmp_path_factory.mktemp("evaluated"))


@pytest.fixture(scope="module")
def model(folder):
    return gemma.load(folder, dtype=torch.float32)[0].eval()


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "model", "content": "Paris."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "你好！"},
        {"role": "model", "content": "你好，我很好。"},
        {"role": "user", "content": "再见"},
        {"role": "model", "content": "再见！"},
    ],
]


def test_reference_loss_is_the_cross_entropy_of_the_trained_tokens(model, tok):
    examples = [encode_messages(c, tok, 256)[0] for c in CONVERSATIONS]
    losses = reference_losses(model, examples, tok.pad_id, batch_size=2)
    with torch.no_grad():
        for example, (total, n) in zip(examples, losses):
            logits = model(torch.tensor([example.input_ids]))[0]
            targets = torch.tensor(example.targets)
            assert n == int((targets != IGNORE).sum()) > 0
            want = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
            assert total == pytest.approx(float(want), rel=1e-5)


def reply(model, tok, messages, max_new):
    return reply_text(tok, generate(model, tok, [tok.apply_chat(messages)], max_new_tokens=max_new)[0])


def test_answers_forced_equal_to_the_references_score_one(model, tok, folder, tmp_path):
    """The data file's references are the model's own greedy answers, in all three shapes: every score is 1.0."""
    questions = [
        "What is the capital of France?",
        "今天天气很好。",
        "Please write a short poem.",
        "Numbers: 1 2 3",
        "你好！你今天过得怎么样？",
        "The quick brown fox",
    ]
    max_new = 12
    answers = [reply(model, tok, [{"role": "user", "content": q}], max_new) for q in questions]
    earlier = [{"role": "user", "content": "earlier"}, {"role": "model", "content": "turn"}]
    answers[4] = reply(model, tok, earlier + [{"role": "user", "content": questions[4]}], max_new)
    system = "Be brief."
    sys_answer = reply(model, tok, [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}], max_new)
    records = [
        {"instruction": questions[0], "output": answers[0]},
        {"conversations": [{"from": "human", "value": questions[1]}, {"from": "gpt", "value": answers[1]}]},
        {"messages": [{"role": "user", "content": questions[2]}, {"role": "assistant", "content": answers[2]}]},
        {"messages": [{"role": "user", "content": questions[3]}]},  # no answer: skipped
        {
            "messages": [
                {"role": "user", "content": "earlier"},
                {"role": "assistant", "content": "turn"},
                {"role": "user", "content": questions[4]},
                {"role": "assistant", "content": answers[4]},
                {"role": "user", "content": "a trailing question"},
            ]
        },
        {
            "instruction": "The quick",
            "input": "brown fox",
            "output": reply(model, tok, [{"role": "user", "content": "The quick\n\nbrown fox"}], max_new),
        },
        {"instruction": "Hi", "system": system, "output": sys_answer},
    ]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "results" / "eval.json"
    r = subprocess.run(
        [
            sys.executable,
            str(EVALUATE),
            "--model",
            str(folder),
            "--data",
            str(data),
            "--out",
            str(out),
            "--max-new-tokens",
            str(max_new),
            "--batch-size",
            "3",
            "--dtype",
            "fp32",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(out.read_text(encoding="utf-8"))
    for key in ("exact_match", "rouge1", "rouge2", "rougeL", "bleu"):
        assert summary[key] == 1.0, key
    assert summary["records"] == 7 and summary["scored"] == 6 and summary["skipped_no_answer"] == 1
    assert summary["perplexity"] == pytest.approx(math.exp(summary["loss"]), rel=1e-12)

    # The loss is the mean cross-entropy over every trained token of the records scored.
    scored = [records[i] for i in (0, 1, 2, 4, 5, 6)]
    from train.data import record_messages

    total, count = 0.0, 0
    with torch.no_grad():
        for i, record in enumerate(scored):
            example, _ = encode_messages(record_messages(record, f"record {i}")[: 4 if i == 3 else None], tok, 256)
            logits = model(torch.tensor([example.input_ids]))[0]
            total += float(F.cross_entropy(logits, torch.tensor(example.targets), ignore_index=IGNORE, reduction="sum"))
            count += sum(t != IGNORE for t in example.targets)
    assert summary["loss_tokens"] == count and summary["loss"] == pytest.approx(total / count, rel=1e-4)

    lines = [
        json.loads(line)
        for line in (tmp_path / "results" / "eval.predictions.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert [x["prediction"] for x in lines] == [x["reference"] for x in lines]
    assert [x["where"] for x in lines] == [f"{data}:{n}" for n in (1, 2, 3, 5, 6, 7)]
    assert lines[3]["prompt"] == questions[4]
    special = ("<start_of_turn>", "<end_of_turn>", "<eos>", "<bos>", "<pad>")
    assert not any(s in x["prediction"] for x in lines for s in special)
    assert "exact_match" in r.stdout and "perplexity" in r.stdout
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_an_adapter_is_applied(model, tok, folder, tmp_path):
    """References are the answers of the model with a (random) LoRA adapter: with --adapter they match exactly."""
    import lora

    adapted = gemma.load(folder, dtype=torch.float32)[0]
    lora.inject(adapted, lora.LoraConfig(r=4, alpha=8, targets="q,v,down"))
    torch.manual_seed(0)
    for layer in lora.lora_layers(adapted).values():
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    lora.save_adapter(adapted, tmp_path / "adapter")
    adapted.eval()
    questions = ["Hello, world!", "今天天气很好。", "The quick brown fox"]
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps({"instruction": q, "output": reply(adapted, tok, [{"role": "user", "content": q}], 10)}) + "\n"
            for q in questions
        )
    )
    scores = {}
    for adapter in (tmp_path / "adapter", None):
        out = tmp_path / f"{adapter is not None}.json"
        args = [
            "--model",
            str(folder),
            "--data",
            str(data),
            "--out",
            str(out),
            "--max-new-tokens",
            "10",
            "--dtype",
            "fp32",
        ] + (["--adapter", str(adapter)] if adapter else [])
        r = run_evaluate(*args)
        assert r.returncode == 0, r.stderr
        scores[adapter is not None] = json.loads(out.read_text())["exact_match"]
    assert scores[True] == 1.0 and scores[False] < 1.0


def test_predictions_go_beside_the_summary():
    assert predictions_path(Path("runs/eval.json")) == Path("runs/eval.predictions.jsonl")
    assert predictions_path(Path("eval")) == Path("eval.predictions.jsonl")


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "no such data file"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": ', "bad.jsonl:2: malformed JSON"),
        ('{"messages": [{"role": "user", "content": "a"}]}\n', "no record has a model turn"),
        ('{"question": "a"}\n', "bad.jsonl:1: unknown record shape"),
    ],
)
def test_user_errors_exit_2_before_the_model_loads(tmp_path, content, message):
    data = tmp_path / "bad.jsonl"
    if content is not None:
        data.write_text(content)
    r = run_evaluate("--model", tmp_path / "no-model", "--data", data, "--out", tmp_path / "e.json")
    code, err = r.returncode, r.stderr
    assert code == 2 and err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1


def test_missing_scoring_library_is_a_clear_error(tmp_path):
    r = run_evaluate("--data", tmp_path / "x.jsonl", "--out", tmp_path / "e.json", block="sacrebleu")
    code = r.returncode
    assert code == 2 and "pip install -e '.[eval]'" in r.stderr


def test_an_unwritable_output_is_an_error_and_leaves_nothing(folder, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "Hi", "output": "Hello"}\n')
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run_evaluate(
        "--model", folder, "--data", data, "--out", blocker / "e.json", "--max-new-tokens", "2", "--dtype", "fp32"
    )
    code = r.returncode
    assert code == 2 and f"--out cannot be written there ({blocker} is a file" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "file"]


@pytest.mark.slow
def test_real_270m_evaluate_command(tmp_path):
    real_270m()  # fails here, with its own message, if the model package is missing
    out = tmp_path / "eval.json"
    r = subprocess.run(
        [
            sys.executable,
            str(EVALUATE),
            "--model",
            "3-270m",
            "--data",
            str(ROOT / "examples" / "general_zh_en.jsonl"),
            "--out",
            str(out),
            "--limit",
            "6",
            "--max-new-tokens",
            "16",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(out.read_text(encoding="utf-8"))
    assert summary["scored"] == 6 and 0 < summary["loss"] < 20
    assert summary["perplexity"] == pytest.approx(math.exp(summary["loss"]))
    assert all(0 <= summary[k] <= 1 for k in ("exact_match", "rouge1", "rouge2", "rougeL", "bleu"))
