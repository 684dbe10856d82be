"""A tiny sentencepiece model laid out like Gemma's, trained in-process in a few milliseconds.

Importable helper for the tests (not a test file). The settings mirror what reproduces the real Gemma tokenizer
(see GEMMA_NOTES.md): BPE with byte fallback, identity normalizer, no dummy prefix, extra whitespace kept, no split
on whitespace, and the chat markers as user-defined pieces, with Gemma's id order pad=0 eos=1 bos=2 unk=3.
"""

import io
import os

import sentencepiece as spm

# Mixed English, Chinese, code and whitespace, so the learned merges cover what the tests encode. Bytes the corpus
# lacks (emoji, rare characters) go through byte fallback, as they would in the real tokenizer.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?",
    "I am fine, thank you. And you?",
    "Gemma is a family of lightweight open models from Google.",
    "Fine-tuning with LoRA trains a small number of extra weights.",
    "The model answers questions about the weather, history and science.",
    "Please write a short poem about the sea and the moon.",
    "What is the capital of France? The capital of France is Paris.",
    "Translate the following sentence into Chinese.",
    "She sells sea shells by the sea shore.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "if x > 0:\n\treturn x\nelse:\n\treturn -x\n",
    "<h1>Title</h1>\n<p>A paragraph of text.</p>",
    "user\nmodel\nsystem\n",
    "Line one.\n\nLine two.\n\n\nLine three.",
    "Spaces   between    words  are   kept.",
    "今天天气很好，我们去公园散步吧。",
    "我喜欢学习机器学习和自然语言处理。",
    "这是一个小型的分词器，用于测试。",
    "你好！你今天过得怎么样？",
    "北京是中国的首都，上海是最大的城市。",
    "请把这句话翻译成英文。",
    "模型会回答关于天气、历史和科学的问题。",
    "人工智能正在改变世界。",
]

# Gemma keeps the chat markers (and a few others) as user-defined pieces, which sentencepiece matches in raw text.
# "<h1>", "\n\n" and "\u2581\u2581" (two spaces, written with U+2581 as in the real model file) stand in for Gemma's
# html-tag and whitespace pieces. Only the two-space run: with longer runs as user-defined pieces, transformers' merges
# (generated from this file) and sentencepiece's longest match disagree on runs longer than the longest piece.
USER_DEFINED = ["<mask>", "<start_of_turn>", "<end_of_turn>", "<h1>", "\n\n", "\u2581\u2581"]


def tiny_tokenizer_proto(**overrides) -> bytes:
    """Train and return the serialized model. `overrides` replace trainer options (ids, pieces) for variant models."""
    options = dict(
        model_type="bpe",
        vocab_size=640,
        # Gemma's special ids: pad 0, eos 1, bos 2, unk 3.
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=USER_DEFINED,
        byte_fallback=True,
        character_coverage=1.0,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_by_whitespace=False,
        allow_whitespace_only_pieces=True,
        # The corpus is small: let the vocabulary stop where the merges run out instead of failing.
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    options.update(overrides)
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_CORPUS), model_writer=out, **options)
    return out.getvalue()


def build_tiny_tokenizer(path, **overrides):
    """Write a tiny Gemma-layout `tokenizer.model` to `path` and return the path."""
    path = os.fspath(path)
    with open(path, "wb") as f:
        f.write(tiny_tokenizer_proto(**overrides))
    return path


def build_gemma4_tokenizer_json(folder):
    """Write a tiny Gemma-4-layout `tokenizer.json` (with transformers' `tokenizer_config.json`) into `folder`: the
    tiny sentencepiece model with Gemma 4's markers added, converted by transformers (BPE with byte fallback), the
    markers flagged special as Gemma 4's control tokens are. Returns the folder."""
    import json
    import tempfile
    from pathlib import Path

    import transformers

    from gemma.tokenizer.gemma4 import MARKERS

    media = ["<|image|>", "<|audio|>", "<|video|>"]
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as spm_dir:
        build_tiny_tokenizer(Path(spm_dir) / "tokenizer.model", user_defined_symbols=[*MARKERS, *media, *USER_DEFINED])
        transformers.GemmaTokenizer.from_pretrained(spm_dir).save_pretrained(folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    for token in data["added_tokens"]:
        if token["content"] in (*MARKERS, *media):
            token["special"] = True
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    return folder
