"""safetensors: bit-exact round trips, BF16, memory-mapping, a clear CheckpointError for every kind of bad
file, and parity with the reference `safetensors` package when it is installed."""
import json
import os
import tracemalloc

import numpy as np
import pytest

from tinyllm.checkpoint import CheckpointError
from tinyllm.safetensors import load_file, read_header, save_file

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64"]
SHAPES = [(2, 3), (5,), (), (0, 3), (4, 0, 2)]


def sample(dtype, shape, seed=0):
    """Values that use every bit: random bit patterns (NaNs, infinities, -0.0 and subnormals included)."""
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    if dtype.kind == "b":
        return np.asarray(rng.random(shape) < 0.5)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def assert_bit_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def raw_file(path, header, data=b"", pad=True):
    """A safetensors file made by hand: header is a dict (dumped as JSON) or the header's exact text/bytes."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    if pad:
        header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# ----------------------------------------------------------------------------------------------------
# round trips

@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_bit_exact_for_every_dtype_and_shape(tmp_path, dtype, mmap):
    tensors = {f"t{i}": sample(dtype, shape, seed=i) for i, shape in enumerate(SHAPES)}
    save_file(tensors, tmp_path / "x.safetensors")
    loaded, metadata = load_file(tmp_path / "x.safetensors", mmap=mmap)
    assert metadata == {} and set(loaded) == set(tensors)
    for name, a in tensors.items():
        assert_bit_equal(loaded[name], a)


def test_many_dtypes_in_one_file_with_metadata(tmp_path):
    tensors = {f"{dtype}.weight": sample(dtype, (3, 2)) for dtype in DTYPES}
    tensors["h.0.ünïcode name\n"] = np.arange(3, dtype=np.float32)
    meta = {"format": "np", "note": "ünïcode, \"quotes\" and\nnew lines", "": ""}
    save_file(tensors, tmp_path / "x.safetensors", meta)
    loaded, metadata = load_file(tmp_path / "x.safetensors")
    assert metadata == meta
    for name, a in tensors.items():
        assert_bit_equal(loaded[name], a)
    assert read_header(tmp_path / "x.safetensors")[1] == meta


def test_no_tensors_and_empty_metadata(tmp_path):
    save_file({}, tmp_path / "none.safetensors")
    assert load_file(tmp_path / "none.safetensors") == ({}, {})
    save_file({}, tmp_path / "meta.safetensors", {})
    assert load_file(tmp_path / "meta.safetensors") == ({}, {})


def test_any_layout_or_byte_order_is_written_little_endian_c_order(tmp_path):
    a = np.arange(24, dtype=np.float32).reshape(4, 6)
    tensors = {"transposed": a.T, "strided": a[:, ::2], "big_endian": a.astype(">f4"), "be_int": a.astype(">i8")}
    save_file(tensors, tmp_path / "x.safetensors")
    loaded, _ = load_file(tmp_path / "x.safetensors")
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype.newbyteorder("<")
        np.testing.assert_array_equal(loaded[name], t)


def test_layout_aligned_header_then_largest_alignment_first_then_name(tmp_path):
    tensors = {"b": np.zeros(3, np.uint8), "a": np.zeros(1, np.uint8), "c": np.zeros(1, np.float16),
               "d": np.zeros(1, np.float64), "e": np.zeros(1, np.float32)}
    save_file(tensors, tmp_path / "x.safetensors", {"k": "v"})
    data = (tmp_path / "x.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n]
    assert n % 8 == 0 and header.rstrip(b" ").endswith(b"}") and len(header) - len(header.rstrip(b" ")) < 8
    info, _ = read_header(tmp_path / "x.safetensors")
    assert list(info) == ["d", "e", "c", "a", "b"]
    for name, t in info.items():
        assert t["data_offsets"][0] % tensors[name].itemsize == 0    # every tensor aligned in the file


# ----------------------------------------------------------------------------------------------------
# BF16 and memory-mapping

def test_bf16_is_widened_to_float32_exactly(tmp_path):
    bits = np.array([0x3F80, 0xC020, 0x4049, 0x0000, 0x8000, 0x7F80, 0xFF80, 0x0001, 0x7F7F], dtype="<u2")
    want = np.array([1.0, -2.5, 3.140625, 0.0, -0.0, np.inf, -np.inf, 2.0 ** -133, 3.3895313892515355e38],
                    dtype=np.float32)
    every = np.arange(2 ** 16, dtype="<u2")        # all 65536 bf16 bit patterns, NaNs included
    header = {"few": entry("BF16", [3, 3], 0, 18), "all": entry("BF16", [2 ** 16], 18, 18 + 2 ** 17)}
    raw_file(tmp_path / "bf16.safetensors", header, bits.tobytes() + every.tobytes())
    for mmap in (True, False):
        loaded, _ = load_file(tmp_path / "bf16.safetensors", mmap=mmap)
        assert loaded["few"].dtype == np.float32 and loaded["few"].shape == (3, 3)
        np.testing.assert_array_equal(loaded["few"].ravel(), want)
        assert np.signbit(loaded["few"].ravel()[4])
        assert (loaded["all"].view(np.uint32) == every.astype(np.uint32) << 16).all()   # bit for bit


def test_mmap_returns_read_only_views_of_the_file(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3), "ids": np.arange(4, dtype=np.int64)}, path)
    mapped, _ = load_file(path, mmap=True)
    copied, _ = load_file(path, mmap=False)
    assert not mapped["w"].flags.writeable and copied["w"].flags.writeable
    with pytest.raises(ValueError):
        mapped["w"][0, 0] = 1.0
    # writing the file in place shows through the mapped arrays, not the copied ones: the file is the memory
    start = 8 + int.from_bytes(path.read_bytes()[:8], "little") + read_header(path)[0]["w"]["data_offsets"][0]
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(np.float32(42.0).tobytes())
    assert mapped["w"][0, 0] == 42.0 and copied["w"][0, 0] == 0.0
    np.testing.assert_array_equal(mapped["w"].ravel()[1:], np.arange(1, 6))


def test_loading_costs_no_copy_with_mmap_and_one_without(tmp_path):
    path = tmp_path / "big.safetensors"
    nbytes = 8 * 2 ** 20
    save_file({"a": np.ones(nbytes // 8, np.float32), "b": np.ones(nbytes // 8, np.float32)}, path)
    for mmap, limit in ((True, 0.05 * nbytes), (False, 1.2 * nbytes)):
        tracemalloc.start()                         # NumPy reports its data allocations to tracemalloc
        try:
            tensors, _ = load_file(path, mmap=mmap)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < limit, (mmap, peak)
        assert tensors["b"].sum() == nbytes // 8


def test_saving_over_a_mapped_file_leaves_its_views_intact(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": np.zeros(4, np.float32)}, path)
    old, _ = load_file(path)
    save_file({"w": np.ones(4, np.float32)}, path)     # a new file renamed over the old: old pages remain
    np.testing.assert_array_equal(old["w"], 0.0)
    np.testing.assert_array_equal(load_file(path)[0]["w"], 1.0)


# ----------------------------------------------------------------------------------------------------
# what save_file refuses, before it touches the file

@pytest.mark.parametrize("tensors, metadata, match", [
    ({1: np.zeros(2)}, None, "name must be a str"),
    ({"__metadata__": np.zeros(2)}, None, "name must be a str other than '__metadata__'"),
    ({"w": [1.0, 2.0]}, None, "a list, not an ndarray"),
    ({"w": np.float32(1.0)}, None, "not an ndarray"),
    ({"w": np.zeros(2, np.complex64)}, None, "array of complex64"),
    ({"w": np.array(["a"])}, None, "array of <U1"),
    ({"w": np.array([None])}, None, "array of object"),
    ({"w": np.zeros(2, "datetime64[s]")}, None, "array of datetime64"),
    ({"w\ud800": np.zeros(2)}, None, "not valid Unicode"),
    ([("w", np.zeros(2))], None, "must be a dict"),
    ({"w": np.zeros(2)}, {"step": 3}, "str -> str"),
    ({"w": np.zeros(2)}, {3: "x"}, "str -> str"),
    ({"w": np.zeros(2)}, "x", "str -> str"),
])
def test_save_refuses_what_it_cannot_write_and_leaves_the_file(tmp_path, tensors, metadata, match):
    path = tmp_path / "x.safetensors"
    save_file({"old": np.arange(3.0)}, path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=match):
        save_file(tensors, path, metadata)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["x.safetensors"]


# ----------------------------------------------------------------------------------------------------
# damaged files: each one a CheckpointError that names the file and the problem

F32x1 = entry("F32", [1], 0, 4)
BAD_HEADERS = {   # name: (header, data, words the message must contain)
    "header length beyond the file": (None, b"\x10" + b"\0" * 7 + b"{}", "holds only 2 bytes"),
    "header above the limit": (None, (200_000_000).to_bytes(8, "little") + b"{}", "above the 100,000,000"),
    "not UTF-8": (b'{"\xff": 1}', b"", "not UTF-8"),
    "not an object": ("[1, 2]", b"", "not with '{'"),
    "leading space": (' {}', b"", "not with '{'"),
    "not JSON": ('{"a": ', b"", "not valid JSON"),
    "too deeply nested": ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", b"", "not valid JSON"),
    "duplicate tensor": ('{"a": %s, "a": %s}' % (json.dumps(F32x1), json.dumps(F32x1)), b"\0" * 4, "'a' twice"),
    "duplicate field": ('{"a": {"dtype": "F32", "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
                        b"\0" * 4, "'dtype' twice"),
    "unknown dtype": ({"a": entry("F8_E4M3", [4], 0, 4)}, b"\0" * 4, "dtype 'F8_E4M3'"),
    "dtype not a str": ({"a": entry(["F32"], [1], 0, 4)}, b"\0" * 4, "dtype ['F32']"),
    "shape not a list": ({"a": entry("F32", 1, 0, 4)}, b"\0" * 4, "shape 1, not a list"),
    "negative shape": ({"a": entry("F32", [-1], 0, 4)}, b"\0" * 4, "shape [-1]"),
    "float shape": ({"a": entry("F32", [1.0], 0, 4)}, b"\0" * 4, "shape [1.0]"),
    "bool shape": ({"a": entry("F32", [True], 0, 4)}, b"\0" * 4, "shape [True]"),
    "one offset": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4]}}, b"\0" * 4, "data_offsets [4]"),
    "offsets reversed": ({"a": entry("F32", [0], 4, 0)}, b"\0" * 4, "begin <= end"),
    "offsets not ints": ({"a": entry("F32", [1], "0", "4")}, b"\0" * 4, "data_offsets ['0', '4']"),
    "negative offset": ({"a": entry("F32", [1], -4, 0)}, b"\0" * 4, "data_offsets [-4, 0]"),
    "bytes != shape x dtype": ({"a": entry("F32", [2], 0, 4)}, b"\0" * 4,
                               "spans 4 bytes, but shape [2] of F32 needs 8"),
    "beyond the data": ({"a": entry("F32", [2], 0, 8)}, b"\0" * 4, "ends at byte 8 of the data, which is only 4"),
    "overlap": ({"a": F32x1, "b": entry("F32", [1], 0, 4)}, b"\0" * 4, "they overlap"),
    "empty tensor inside another": ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [0], 4, 4)}, b"\0" * 8,
                                    "they overlap"),
    "gap": ({"a": F32x1, "b": entry("F32", [1], 8, 12)}, b"\0" * 12, "a gap"),
    "gap at the start": ({"a": entry("F32", [1], 4, 8)}, b"\0" * 8, "a gap"),
    "trailing bytes": ({"a": F32x1}, b"\0" * 8, "4 bytes follow the last tensor"),
    "metadata not an object": ({"__metadata__": "x"}, b"", "'__metadata__' must be an object of str -> str"),
    "metadata value not a str": ({"__metadata__": {"step": 3}}, b"", "'__metadata__' must be an object"),
    "tensor not an object": ({"a": 3}, b"", "tensor 'a' must be an object"),
    "missing field": ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "exactly the fields"),
    "extra field": ({"a": {**F32x1, "strides": [1]}}, b"\0" * 4, "exactly the fields"),
    "bool bytes not 0/1": ({"m": entry("BOOL", [2], 0, 2)}, b"\x01\x02", "bytes other than 0 and 1"),
}


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_each_kind_of_damaged_file_is_refused_with_a_clear_message(tmp_path, case, mmap):
    header, data, words = BAD_HEADERS[case]
    path = tmp_path / "bad.safetensors"
    if header is None:
        path.write_bytes(data)
    else:
        raw_file(path, header, data)
    with pytest.raises(CheckpointError) as e:
        load_file(path, mmap=mmap)
    assert str(path) in str(e.value) and words in str(e.value), str(e.value)
    if case != "bool bytes not 0/1":                  # the header alone is wrong: read_header sees it too
        with pytest.raises(CheckpointError, match="not a valid safetensors file"):
            read_header(path)


@pytest.mark.parametrize("content, words", [(b"", "it is empty"), (b"\x08\0\0", "3 bytes long, too short"),
                                            (None, "does not exist")])
def test_empty_short_and_missing_files(tmp_path, content, words):
    path = tmp_path / "x.safetensors"
    if content is not None:
        path.write_bytes(content)
    for read in (load_file, read_header):
        with pytest.raises(CheckpointError, match=words):
            read(path)


def test_a_truncated_file_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": np.arange(100, dtype=np.float32)}, path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="ends at byte 400 of the data, which is only 390 bytes long"):
        load_file(path)


def test_paths_that_are_not_regular_files(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder"):
        load_file(tmp_path)
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe")
        with pytest.raises(CheckpointError, match="not a regular file"):
            load_file(tmp_path / "pipe")            # refused before it is opened: opening a pipe would block
    with pytest.raises(TypeError, match="file path"):
        load_file(3)


# ----------------------------------------------------------------------------------------------------
# parity with the reference implementation (skipped when it is not installed)

def parity_tensors():
    tensors = {f"h.{i}.{dtype}": sample(dtype, shape, seed=i)
               for i, (dtype, shape) in enumerate((d, s) for d in DTYPES for s in SHAPES)}
    tensors["ünïcode\tname"] = np.arange(5, dtype=np.float32)
    return tensors


def test_files_written_by_us_load_in_the_reference(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open
    tensors, meta = parity_tensors(), {"format": "np", "b": "ünï", "a": "2"}
    save_file(tensors, tmp_path / "ours.safetensors", meta)
    theirs = st.load_file(tmp_path / "ours.safetensors")
    assert set(theirs) == set(tensors)
    for name, a in tensors.items():
        assert_bit_equal(theirs[name], a)
    with safe_open(tmp_path / "ours.safetensors", framework="np") as f:
        assert f.metadata() == meta


def test_files_written_by_the_reference_load_in_ours(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    tensors, meta = parity_tensors(), {"format": "np", "b": "ünï", "a": "2"}
    st.save_file(tensors, tmp_path / "theirs.safetensors", metadata=meta)
    for mmap in (True, False):
        ours, metadata = load_file(tmp_path / "theirs.safetensors", mmap=mmap)
        assert metadata == meta and set(ours) == set(tensors)
        for name, a in tensors.items():
            assert_bit_equal(ours[name], a)


@pytest.mark.parametrize("meta", [None, {}, {"format": "np"}])
def test_we_write_the_same_bytes_as_the_reference(tmp_path, meta):
    st = pytest.importorskip("safetensors.numpy")    # same bytes only with <= 1 metadata key: theirs are hashed
    tensors = parity_tensors()
    tensors["weird \"name\"\n\x01\x7f/\\"] = np.zeros((2, 1), np.int16)
    save_file(tensors, tmp_path / "ours.safetensors", meta)
    assert (tmp_path / "ours.safetensors").read_bytes() == st.save(tensors, metadata=meta)


def test_bf16_written_by_torch_loads_as_float32(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    t = torch.randn(4, 5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    st_torch.save_file({"w": t, "s": torch.tensor(1.5, dtype=torch.bfloat16)}, str(tmp_path / "bf16.safetensors"))
    loaded, _ = load_file(tmp_path / "bf16.safetensors")
    assert loaded["w"].dtype == np.float32
    np.testing.assert_array_equal(loaded["w"], t.float().numpy())
    assert loaded["s"].shape == () and loaded["s"] == 1.5
