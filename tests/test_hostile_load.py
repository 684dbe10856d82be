"""Hostile model sources, tokenizers and adapters: each is refused with one line that names the field, tensor or
file, never a traceback, a hang or a load that grows until the machine kills it (issue 13).

Tiny checkpoints are built in tmp_path and broken on purpose. Anything that could hang or eat memory if the guard
were missing runs in a subprocess with a wall-clock timeout (and an address-space limit), so that a regression
fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import gemma
import lora
from gemma.__main__ import main as gemma_main
from gemma.formats.checkpoint import load_hf_folder, save_native
from gemma.formats.hf_config import from_hf_config
from gemma.model.config import MAX_LAYERS, GemmaConfig
from gemma.errors import GemmaError
from gemma.files import MAX_JSON_DEPTH
from gemma.tokenizer import Tokenizer
from tiny_gguf import write_tiny_gguf
from tiny_models import save_hf_model

ROOT = Path(__file__).resolve().parents[1]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MEMORY_LIMIT = 3 * 2**30  # address space for the subprocesses: a few times what loading a tiny model takes


# ---- sources -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory, tiny_tokenizer_path):
    """A tiny Gemma 3 HF folder (3 layers, vocabulary 1024, width 64) with a tokenizer; copied, never edited."""
    folder = tmp_path_factory.mktemp("hf")
    save_hf_model("gemma3", folder)
    shutil.copy(tiny_tokenizer_path, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def adapter_source(hf_source, tmp_path_factory):
    """A PEFT adapter for hf_source (every projection, r=2) with a non-zero update; copied, never edited."""
    model, _ = gemma.load(hf_source)
    lora.inject(model, lora.LoraConfig(r=2, alpha=4))
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.normal_(0, 0.1)
    return lora.save_adapter(model, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture
def hf(hf_source, tmp_path):
    return Path(shutil.copytree(hf_source, tmp_path / "hf"))


@pytest.fixture
def native(hf_source, tmp_path):
    cfg, state = load_hf_folder(hf_source)
    save_native(tmp_path / "native", cfg, state, (hf_source / "tokenizer.model").read_bytes())
    return tmp_path / "native"


@pytest.fixture
def adapter(adapter_source, tmp_path):
    return Path(shutil.copytree(adapter_source, tmp_path / "adapter"))


def edit_json(path: Path, raw: dict[str, str] | None = None, **changes) -> None:
    """Change keys of a JSON file; `raw` values are written as given (1e400, NaN), not as JSON."""
    data = json.loads(path.read_text())
    data.update(changes)
    data.update({k: f"@raw{i}@" for i, k in enumerate(raw or {})})
    text = json.dumps(data)
    for i, value in enumerate((raw or {}).values()):
        text = text.replace(f'"@raw{i}@"', value)
    path.write_text(text)


def one_line(fn, *needles) -> str:
    """The GemmaError `fn` raises: one line, holding every needle."""
    with pytest.raises(GemmaError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert str(needle) in message, message
    return message


def cli_error(capsys, argv, *needles) -> str:
    """`python -m gemma ARGV`, in process: exit status 2 and exactly one `error:` line on stderr."""
    assert gemma_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in err, err
    return err


def run_python(*args, timeout: int = 240) -> subprocess.CompletedProcess:
    """A Python subprocess under MEMORY_LIMIT of address space and a wall-clock timeout."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout, preexec_fn=limit, cwd=ROOT
    )


def assert_cli_error(run: subprocess.CompletedProcess, *needles) -> None:
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    for needle in needles:
        assert str(needle) in run.stderr, run.stderr


# ---- 1. a config that claims more than the file holds: refused before anything is built ---------------------------


def test_huge_layer_count_fails_fast_within_a_memory_limit(hf, tmp_path):
    # Unbounded, a million layers were laid out on the meta device until the machine ran out of memory.
    edit_json(hf / "config.json", num_hidden_layers=10**7, layer_types=None)
    gguf = write_tiny_gguf(tmp_path / "layers.gguf", "gemma3", meta={"gemma3.block_count": 2**32 - 1}).path
    run = run_python(
        "-c",
        "import sys; from gemma.__main__ import main\nsys.exit(max(main([sys.argv[1]]), main([sys.argv[2]])))",
        str(hf),
        str(gguf),
    )
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines), run.stderr
    assert "config.json: field 'num_hidden_layers' must be between 1 and 1024, got 10000000" in lines[0]
    assert f"{gguf}: metadata 'gemma3.block_count' must be between 1 and 1024" in lines[1]


def test_layer_count_is_compared_with_the_tensors_before_building(hf, native, tmp_path):
    edit_json(hf / "config.json", num_hidden_layers=MAX_LAYERS, layer_types=None)
    one_line(
        lambda: gemma.load(hf),
        f"{hf / 'config.json'}: 'num_hidden_layers' is 1024, but",
        hf / "model.safetensors",
        "holds tensors of 3 layers (none of layer 3)",
    )
    edit_json(native / "config.json", num_layers=500, layer_types=["full"] * 500)
    one_line(lambda: gemma.load(native), f"{native / 'config.json'}: 'num_layers' is 500", "tensors of 3 layers")
    gguf = write_tiny_gguf(tmp_path / "layers.gguf", "gemma3", meta={"gemma3.block_count": 1000}).path
    one_line(
        lambda: gemma.load(gguf),
        f"{gguf}: 'gemma3.block_count' is 1000, but the file holds tensors of 6 layers (none of layer 6)",
    )


def test_embedding_is_compared_with_vocab_and_width(hf, tmp_path):
    edit_json(hf / "config.json", vocab_size=4096)
    one_line(
        lambda: gemma.load(hf),
        "config.json",
        "'model.embed_tokens.weight'",
        "(1024, 64)",
        "'vocab_size' and 'hidden_size' make it (4096, 64)",
    )
    gguf = write_tiny_gguf(tmp_path / "wide.gguf", "gemma3", meta={"gemma3.embedding_length": 128}).path
    one_line(
        lambda: gemma.load(gguf),
        f"{gguf}: the embedding 'token_embd.weight' in the file has shape (420, 64)",
        "'tokenizer.ggml.tokens' and 'gemma3.embedding_length' make it (420, 128)",
    )


@pytest.mark.parametrize(
    "field, value",
    [
        ("vocab_size", 1e40),
        ("vocab_size", 2**31),
        ("hidden_size", 2**21),
        ("intermediate_size", 2**40),
        ("num_attention_heads", 2**13),
        ("num_key_value_heads", 2**13),
        ("head_dim", 2**22),
        ("num_hidden_layers", 1025),
        ("max_position_embeddings", 2**25),
        ("sliding_window", 2**25),
    ],
)
def test_every_size_field_is_bounded(hf, field, value):
    edit_json(hf / "config.json", **{field: value})
    one_line(lambda: gemma.load(hf), f"{hf / 'config.json'}: field {field!r} must be between 1 and")


def test_native_size_fields_are_bounded(native):
    edit_json(native / "config.json", vocab_size=10**40)
    one_line(lambda: gemma.load(native), f"{native / 'config.json'}: field 'vocab_size' must be between 1 and")


# ---- 2. non-finite and impossible values -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, raw, needle",
    [
        ({"rms_norm_eps": -1e-6}, None, "field 'rms_norm_eps' must be a positive finite number"),
        ({}, {"rms_norm_eps": "1e400"}, "field 'rms_norm_eps' must be a finite number, got inf"),
        ({}, {"rms_norm_eps": "NaN"}, "not valid JSON (NaN is not JSON)"),
        ({}, {"vocab_size": "-Infinity"}, "not valid JSON (-Infinity is not JSON)"),
        ({"query_pre_attn_scalar": -20}, None, "field 'query_pre_attn_scalar' must be a positive finite number"),
        ({"sliding_window": -5}, None, "field 'sliding_window' must be between 1 and"),
        ({"attn_logit_softcapping": 0}, None, "field 'attn_logit_softcapping' must be a positive finite number"),
        ({"final_logit_softcapping": -30.0}, None, "field 'final_logit_softcapping' must be a positive"),
        (
            {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 0}}},
            None,
            "field 'rope_theta' must be a positive finite number",
        ),
        (
            {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": "8"}}},
            None,
            "field 'rope_parameters.full_attention.factor' must be a number",
        ),
        (
            {"num_key_value_heads": 3},
            None,
            "field 'num_attention_heads' (4) is not a multiple of 'num_key_value_heads'",
        ),
        ({"num_attention_heads": 0, "head_dim": None}, None, "field 'num_attention_heads' must be between 1 and"),
        ({"head_dim": 15}, None, "field 'head_dim' must be even"),
        ({"hidden_size": "64"}, None, "field 'hidden_size' must be a number"),
        ({"vocab_size": True}, None, "field 'vocab_size' must be a number"),
        ({"layer_types": "sliding_attention"}, None, "field 'layer_types' must be a list of strings"),
        ({"_sliding_window_pattern": -6, "layer_types": None}, None, "field '_sliding_window_pattern' must be"),
    ],
)
def test_impossible_hf_values_name_the_field(hf, changes, raw, needle):
    edit_json(hf / "config.json", raw, **changes)
    one_line(lambda: gemma.load(hf), f"{hf / 'config.json'}: {needle}")


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("norm_eps", "1e-6", "must be a number"),
        ("norm_eps", 0, "must be a positive finite number"),
        ("norm_eps", {"a": "{0}"}, "must be a number, got {'a': '{0}'}"),  # braces in a value stay text
        ("rope_theta", True, "must be a number"),
        ("rope_scaling", -8.0, "must be a positive finite number"),
        ("num_heads", "4", "must be an integer"),
        ("head_dim", 16.0, "must be an integer"),
        ("use_qk_norm", "yes", "must be true or false"),
        ("attn_softcap", 0.0, "must be a positive finite number"),
        ("sliding_window", None, "must be a positive integer: the model has sliding layers"),
        ("layer_types", "sliding", "must be a list"),
        ("layer_types", ["sliding", "global", "full"], "holds unknown layer type 'global'"),
        ("hf_repo", 7, "must be a string"),
    ],
)
def test_impossible_native_values_name_the_field(native, field, value, needle):
    edit_json(native / "config.json", **{field: value})
    one_line(lambda: gemma.load(native), f"{native / 'config.json'}: field {field!r} {needle}")


def test_non_finite_values_refused_in_config_validation():
    good = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8)
    for field in (
        "norm_eps",
        "rope_theta",
        "rope_local_theta",
        "rope_scaling",
        "query_pre_attn_scalar",
        "attn_softcap",
        "final_softcap",
    ):
        for value in (float("nan"), float("inf"), -1.0):
            one_line(lambda kw={field: value}: GemmaConfig(**good, **kw), f"config: field {field!r}")
    # From an HF dict (not a file), NaN reaches the validation and is named as config.json spells it.
    hf = {
        "model_type": "gemma2",
        "vocab_size": 8,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 2,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "final_logit_softcapping": float("nan"),
    }
    one_line(lambda: from_hf_config(hf), "config.json: field 'final_logit_softcapping' must be a finite number")


@pytest.mark.parametrize(
    "meta, needle",
    [
        ({"gemma3.attention.layer_norm_rms_epsilon": float("nan")}, "'gemma3.attention.layer_norm_rms_epsilon'"),
        ({"gemma3.rope.freq_base": 0.0}, "'gemma3.rope.freq_base' must be a positive finite number"),
        ({"gemma3.rope.scaling.factor": float("inf")}, "'gemma3.rope.scaling.factor'"),
        (
            {"gemma3.attention.head_count_kv": 3},
            "'gemma3.attention.head_count' (4) is not a multiple of 'gemma3.attention.head_count_kv'",
        ),
        ({"gemma3.attention.head_count": 0}, "'gemma3.attention.head_count' must be between 1 and"),
        ({"gemma3.context_length": 2**31}, "'gemma3.context_length' must be between 1 and"),
        ({"gemma3.attention.sliding_window": 0}, "'gemma3.attention.sliding_window' must be between 1 and"),
    ],
)
def test_impossible_gguf_metadata_names_the_key(tmp_path, meta, needle):
    path = write_tiny_gguf(tmp_path / "bad.gguf", "gemma3", meta=meta, with_tensors=False).path
    one_line(lambda: gemma.load(path), f"{path}: metadata {needle}")


def test_python_m_gemma_names_the_first_non_finite_weight(hf, native, capsys):
    for folder, key, name in (
        (hf, "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"),
        (native, "layers.2.attn.k.weight", "layers.2.attn.k.weight"),
    ):
        state = load_file(folder / "model.safetensors")
        state[key][0, 3] = float("nan") if folder is hf else float("-inf")
        save_file(state, folder / "model.safetensors")
        cli_error(capsys, [str(folder)], f"{folder}: tensor {name!r} holds NaN or infinite values")
    # A finite weight beyond fp16's range is infinite once read as fp16: the message says which precision.
    state = load_file(native / "model.safetensors")
    state["layers.2.attn.k.weight"] = torch.full_like(state["layers.2.attn.k.weight"], 1e5)
    save_file(state, native / "model.safetensors")
    cli_error(capsys, [str(native), "--dtype", "fp16"], "'layers.2.attn.k.weight'", "(read as fp16)")
    assert gemma_main([str(native)]) == 0 and '"parameters"' in capsys.readouterr().out


def test_non_finite_adapter_tensors_are_refused_at_load(hf_source, adapter, tmp_path):
    path = adapter / "adapter_model.safetensors"
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    state = load_file(path)
    state[key][2, 1] = float("inf")
    save_file(state, path)
    needles = (path, repr(key), "holds NaN or infinite values")
    one_line(lambda: gemma.load(hf_source, adapter=adapter), *needles)
    one_line(lambda: gemma.load(hf_source, adapter=adapter, quantize="int8"), *needles)  # the merging path
    from gemma.formats.convert import convert

    one_line(lambda: convert(hf_source, tmp_path / "merged", "native", adapter=adapter), *needles)
    assert not (tmp_path / "merged").exists()


def test_an_adapter_whose_merge_overflows_is_refused(hf_source, adapter, tmp_path):
    edit_json(adapter / "adapter_config.json", lora_alpha=1e300)  # finite, but scale * B @ A is not
    from gemma.formats.convert import convert

    one_line(
        lambda: convert(hf_source, tmp_path / "merged", "hf", adapter=adapter),
        str(adapter),
        "merging the adapter into layers.0.attn.q gives NaN or infinite weights",
    )
    assert not (tmp_path / "merged").exists()


# ---- 3. one line where a traceback was -----------------------------------------------------------------------------


def test_config_json_that_is_a_folder(hf, native):
    for folder in (hf, native):
        (folder / "config.json").unlink()
        (folder / "config.json").mkdir()
        one_line(lambda folder=folder: gemma.load(folder), f"{folder / 'config.json'}: is a folder, not a config file")


def test_deeply_nested_json_is_one_line(hf, adapter, hf_source):
    deep = "[" * 100_000 + "]" * 100_000
    (adapter / "adapter_config.json").write_text(deep)
    one_line(
        lambda: gemma.load(hf_source, adapter=adapter),
        f"{adapter / 'adapter_config.json'}: JSON nested deeper than {MAX_JSON_DEPTH} levels",
    )
    (hf / "model.safetensors.index.json").write_text('{"weight_map": ' + "{" * 100_000 + "}" * 100_000 + "}")
    one_line(lambda: gemma.load(hf), f"{hf / 'model.safetensors.index.json'}: JSON nested deeper")
    (hf / "config.json").write_text('{"a": ' + deep + "}")
    one_line(lambda: gemma.load(hf), f"{hf / 'config.json'}: JSON nested deeper")


def test_index_listing_a_path_outside_the_folder(hf):
    index = {"weight_map": {"model.embed_tokens.weight": "../elsewhere.safetensors"}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    one_line(lambda: gemma.load(hf), "weight_map lists '../elsewhere.safetensors', which is not a file name")
    index["weight_map"]["model.embed_tokens.weight"] = ["model.safetensors"]
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    one_line(lambda: gemma.load(hf), "weight_map lists ['model.safetensors']")


@pytest.mark.parametrize(
    "repo_id", ["google--x/gemma", "google/gemma..2b", "g/" + "x" * 97, "a" * 300 + "/b", "org/na\x00me"]
)
def test_repo_ids_the_hub_refuses(repo_id, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = one_line(
        lambda: gemma.load(repo_id), "not a valid HF repo id" if "\x00" not in repo_id else "no such file or folder"
    )
    assert message.count(repo_id) == 1, message  # named once, not echoed again by the hub's message
    cli_error(capsys, [repo_id])


def test_unknown_home_folder_is_no_traceback():
    one_line(lambda: gemma.load("~nobody-such-user/model"), "~nobody-such-user/model: no such file or folder")


FIFO_SCRIPT = """
import json, sys
import gemma
from gemma.errors import GemmaError
from gemma.tokenizer import Tokenizer

out = {}
for name, (source, adapter) in json.loads(sys.argv[1]).items():
    try:
        Tokenizer(source) if name.startswith("tokenizer ") else gemma.load(source, adapter=adapter)
        out[name] = "loaded"
    except GemmaError as exc:
        out[name] = str(exc)
print(json.dumps(out))
"""


def test_fifos_and_devices_are_refused_not_read(hf_source, adapter_source, tmp_path):
    cases, expected = {}, {}

    def case(name, folder, file, adapter=None, source=None):
        # A copy of `folder` whose `file` is a FIFO: reading it would wait for a writer forever.
        copy = Path(shutil.copytree(folder, tmp_path / name.replace(" ", "_")))
        (copy / file).unlink()
        os.mkfifo(copy / file)
        if adapter is None:
            cases[name] = (str(source or copy), None)
        else:
            cases[name] = (str(hf_source), str(copy))
        expected[name] = f"{copy / file}: is a FIFO"

    case("safetensors", hf_source, "model.safetensors")
    case("tokenizer.model", hf_source, "tokenizer.model")
    case("config.json", hf_source, "config.json")
    case("adapter weights", adapter_source, "adapter_model.safetensors", adapter=True)
    case("adapter config", adapter_source, "adapter_config.json", adapter=True)
    os.mkfifo(tmp_path / "model.gguf")
    cases["gguf"], expected["gguf"] = (str(tmp_path / "model.gguf"), None), f"{tmp_path / 'model.gguf'}: is a FIFO"
    cases["device"], expected["device"] = ("/dev/zero", None), "/dev/zero: is a device"
    cases["tokenizer device"], expected["tokenizer device"] = ("/dev/zero", None), "/dev/zero: is a device"
    run = run_python("-c", FIFO_SCRIPT, json.dumps(cases), timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout)
    for name, needle in expected.items():
        assert needle in got[name], (name, got[name])
        assert "\n" not in got[name]


def test_errors_name_the_file_once(hf, tmp_path):
    (hf / "config.json").write_text("{not json")
    assert one_line(lambda: gemma.load(hf)).count(str(hf / "config.json")) == 1
    gguf = tmp_path / "bad.gguf"
    gguf.write_bytes(b"GGUF" + b"\xff" * 64)
    assert one_line(lambda: gemma.load(gguf)).count(str(gguf)) == 1


def test_safetensors_and_adapter_errors_name_the_file_once(hf, hf_source, adapter):
    model = hf / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    assert one_line(lambda: gemma.load(hf), "corrupt or truncated").count(str(model)) == 1
    (adapter / "adapter_model.safetensors").unlink()
    legacy = adapter / "adapter_model.bin"
    legacy.write_bytes(b"not a pickle")
    assert one_line(lambda: gemma.load(hf_source, adapter=adapter)).count(str(legacy)) == 1


def test_lone_surrogates_are_a_gemma_error(tiny_tokenizer_path):
    tok = Tokenizer(tiny_tokenizer_path)
    for call in (
        lambda: tok.encode("ab\ud800c"),
        lambda: tok.encode_content("x<end_of_turn>\udfff"),
        lambda: tok.apply_chat([{"role": "user", "content": "hi \udc80"}]),
    ):
        one_line(call, "text holds a lone surrogate (U+")
    assert tok.decode(tok.encode("ok", bos=False)) == "ok"


# ---- 4. a target_modules regex that backtracks catastrophically ---------------------------------------------------


@pytest.mark.parametrize(
    "pattern, needle",
    [
        (r"(\w|[a-z.]|.)+\d\d\d", "takes longer than 2 s to match"),  # exponential in the regex package too
        (r"([a-z._0-9]+)+X", "matches no module"),  # exponential in re; the regex package sees through it
        (r"(.*)*X", "matches no module"),
        (r"(a+)+$", "matches no module"),
        ("a" * 1001, "a regex of 1001 characters (at most 1000)"),
        (r"(?<=a+)q_proj", "is not a valid regex"),
    ],
)
def test_target_modules_regex_ends_promptly(hf_source, adapter, pattern, needle):
    edit_json(adapter / "adapter_config.json", target_modules=pattern)
    one_line(lambda: gemma.load(hf_source, adapter=adapter), str(adapter / "adapter_config.json"), needle)


def test_target_modules_that_match_still_load(hf_source, adapter):
    edit_json(adapter / "adapter_config.json", target_modules=r".*\.(q|k|v|o|gate|up|down)_proj")
    model, _ = gemma.load(hf_source, adapter=adapter)
    assert model.lora_config.targets == lora.LoraConfig().targets
    edit_json(adapter / "adapter_config.json", target_modules=HF_TARGETS * 50_000)  # long lists stay linear
    model, _ = gemma.load(hf_source, adapter=adapter)
    assert len(lora.lora_layers(model)) == 7 * 3


# ---- 5. devices ----------------------------------------------------------------------------------------------------


def test_load_refuses_unknown_or_missing_devices(hf_source):
    one_line(lambda: gemma.load(hf_source, device="bogus"), "device='bogus': not a device")
    one_line(lambda: gemma.load(hf_source, device="cuda:99"), "device='cuda:99'")
    if not torch.cuda.is_available():
        one_line(lambda: gemma.load(hf_source, device="cuda"), "device='cuda': CUDA is not available")
    model, _ = gemma.load(hf_source, device=torch.device("cpu"))
    assert model.device.type == "cpu"


@pytest.mark.parametrize("device", ["bogus", "cuda"])
def test_chat_tool_device_errors_are_one_line(hf_source, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = run_python("tools/chat.py", "--model", str(hf_source), "--device", device, "--prompt", "hi")
    assert_cli_error(run, f"--device {device}")
