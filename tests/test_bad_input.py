"""Broken, truncated and mislabelled inputs fail with a TorchgraftError that names the file.

Cases come from :func:`corpus.all_bad`; only the wrong-extension ones should load. A hypothesis
fuzz test mutates small valid files (torch zip, safetensors, legacy torch) and demands that
``tg.read`` either works (every tensor can be materialised) or raises a ``TorchgraftError``:
never another exception, a hang or a crash. ``TORCHGRAFT_FUZZ_EXAMPLES`` sets the number of
examples (default 50). Every test runs under a ``signal.alarm`` deadline.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import itertools
import os
import resource
import shutil
import signal
import struct
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import torchgraft as tg

try:
    from tests import corpus
except ImportError:  # tests/ not importable as a package
    import corpus  # type: ignore[no-redef]

TIMEOUT_S = int(os.environ.get("TORCHGRAFT_TEST_TIMEOUT", "60"))
FUZZ_EXAMPLES = int(os.environ.get("TORCHGRAFT_FUZZ_EXAMPLES", "50"))
FUZZ_EXAMPLE_TIMEOUT_S = 20
MEMORY_HEADROOM = int(os.environ.get("TORCHGRAFT_TEST_MEMORY_MB", "2048")) << 20


class Deadline(Exception):
    """Raised by SIGALRM: the code under test hung."""


@contextlib.contextmanager
def deadline(seconds: int, what: str) -> Iterator[None]:
    """Run the block under an alarm; restores any alarm that was pending around it."""

    def expire(signum: int, frame: Any) -> None:
        raise Deadline(f"{what} ran past {seconds}s")

    start = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, expire)
    previous_left = signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_left:
            signal.alarm(max(1, previous_left - int(time.monotonic() - start)))


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


@contextlib.contextmanager
def memory_cap(headroom: int) -> Iterator[None]:
    """Cap the address space at its current size + ``headroom`` (Linux), so that a reader
    trusting a size field fails with an exception instead of bringing in the OOM killer."""
    try:
        limit = _vm_size() + headroom
    except (OSError, RuntimeError):  # not Linux: run uncapped
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(autouse=True)
def _per_test_timeout(request: pytest.FixtureRequest) -> Iterator[None]:
    with deadline(TIMEOUT_S, request.node.name):
        yield


_BAD_DIR = Path(tempfile.mkdtemp(prefix="torchgraft_bad_"))
atexit.register(shutil.rmtree, _BAD_DIR, ignore_errors=True)
BAD = {case.name: case for case in corpus.all_bad(_BAD_DIR)}
FAILING = sorted(n for n, c in BAD.items() if not c.should_load)
LOADING = sorted(n for n, c in BAD.items() if c.should_load)


def materialise(state: Any) -> dict[str, torch.Tensor]:
    out = {}
    for key in state:
        value = state[key]
        assert isinstance(value, torch.Tensor), f"{key}: {type(value).__name__} is not a Tensor"
        out[key] = value.detach().cpu().contiguous().clone()
    return out


def model_for(tensors: dict[str, torch.Tensor]) -> nn.Module:
    root = nn.Module()
    for name, t in tensors.items():
        blank = torch.zeros(t.shape, dtype=t.dtype)
        if t.is_floating_point():
            root.register_parameter(name, nn.Parameter(blank.fill_(0.25)))
        else:
            root.register_buffer(name, blank)
    return root


@pytest.mark.parametrize("name", FAILING)
def test_bad_input_raises_torchgraft_error(name: str) -> None:
    case = BAD[name]
    # anything but a TorchgraftError escapes pytest.raises and fails the test with its traceback
    with pytest.raises(tg.TorchgraftError) as info, memory_cap(MEMORY_HEADROOM):
        materialise(tg.read(case.path))
    err = info.value
    msg = str(err)
    assert any(n in msg for n in case.names_any), (
        f"{type(err).__name__} message names none of {case.names_any}: {msg}"
    )
    for word in case.mentions:
        assert word.lower() in msg.lower(), f"message does not mention {word!r}: {msg}"
    if case.error:
        assert isinstance(err, getattr(tg, case.error)), (
            f"expected {case.error}, got {type(err).__name__}: {msg}"
        )


@pytest.mark.parametrize("name", FAILING)
def test_bad_input_leaves_model_untouched(name: str) -> None:
    case = BAD[name]
    model = model_for(corpus.seed_tensors())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(tg.TorchgraftError), memory_cap(MEMORY_HEADROOM):
        tg.load(model, case.path)
    for key, value in before.items():
        corpus.assert_bit_exact(model.state_dict()[key], value, key)


@pytest.mark.parametrize("name", LOADING)
def test_wrong_extension_is_sniffed_and_loads(name: str) -> None:
    case = BAD[name]
    tensors = materialise(tg.read(case.path))
    assert sorted(tensors) == sorted(case.expected)
    for key, want in case.expected.items():
        corpus.assert_bit_exact(tensors[key], want, key)
    model = model_for(case.expected)
    tg.load(model, case.path, strict=True)
    for key, want in case.expected.items():
        corpus.assert_bit_exact(model.state_dict()[key], want, key)


def test_bad_corpus_is_complete() -> None:
    """The corpus holds what the suite promises (guards against silently dropped builders)."""
    for required in (
        "zip_cut_in_data_pkl", "zip_cut_in_tensor_record", "zip_cut_in_central_directory",
        "zero_length", "lfs_pointer_bin", "html_page_pth", "st_header_len_exceeds_file",
        "st_overlapping", "st_offsets_out_of_range", "st_absurd_header_len",
        "st_duplicate_names", "hf_index_dotdot_shard", "hf_index_missing_shard",
        "zip_member_dotdot_record", "safetensors_named_pth", "torch_zip_named_safetensors",
    ):  # fmt: skip
        assert required in BAD, required


# --------------------------------------------------------------------------------------------
# Fuzzing
# --------------------------------------------------------------------------------------------

SEEDS = corpus.fuzz_seeds()

_INTERESTING = [
    0,
    1,
    0x7F,
    0x80,
    0xFF,
    0x7FFF,
    0xFFFF,
    0x7FFFFFFF,
    0xFFFFFFFF,
    2**60,
    2**63 - 1,
    2**64 - 1,
]
_WIDTHS = [1, 2, 4, 8]

_pos = st.integers(min_value=0, max_value=1 << 20)
_mutation = st.one_of(
    st.tuples(st.just("flip"), _pos, st.integers(min_value=1, max_value=255)),
    st.tuples(st.just("truncate"), _pos),
    st.tuples(st.just("insert"), _pos, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), _pos, st.integers(min_value=1, max_value=64)),
    st.tuples(st.just("copy"), _pos, _pos, st.integers(min_value=1, max_value=128)),
    st.tuples(st.just("poke"), _pos, st.sampled_from(_INTERESTING), st.sampled_from(_WIDTHS)),
)


def mutate(data: bytes, mutations: list[tuple[Any, ...]]) -> bytes:
    buf = bytearray(data)
    for m in mutations:
        n = len(buf)
        kind = m[0]
        if kind == "flip" and n:
            buf[m[1] % n] ^= m[2]
        elif kind == "truncate":
            del buf[m[1] % (n + 1) :]
        elif kind == "insert":
            at = m[1] % (n + 1)
            buf[at:at] = m[2]
        elif kind == "delete" and n:
            at = m[1] % n
            del buf[at : at + m[2]]
        elif kind == "copy" and n:
            src, dst = m[1] % n, m[2] % n
            chunk = bytes(buf[src : src + m[3]])
            buf[dst : dst + len(chunk)] = chunk
        elif kind == "poke" and n:
            width = m[3]
            value = m[2] & ((1 << (8 * width)) - 1)
            at = m[1] % n
            buf[at : at + width] = value.to_bytes(width, "little")
    return bytes(buf)


def mutate_inside(name: str, data: bytes, mutations: list[tuple[Any, ...]]) -> bytes:
    """Mutate the structured payload, keeping the container consistent (CRCs, length prefix)."""
    if name.endswith(".safetensors"):
        n = struct.unpack_from("<Q", data)[0]
        header = mutate(data[8 : 8 + n], mutations)
        return struct.pack("<Q", len(header)) + header + data[8 + n :]
    if data[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            pkl = corpus.member_ending(zf.namelist(), "/data.pkl")
            inner = zf.read(pkl)
        return corpus.rezip(data, replace={pkl: mutate(inner, mutations)})
    return mutate(data, mutations)


_counter = itertools.count()


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,  # the autouse deadline; one alarm per test is fine
    ],
)
@given(
    seed=st.sampled_from(sorted(SEEDS)),
    inside=st.booleans(),
    mutations=st.lists(_mutation, min_size=1, max_size=4),
)
def test_fuzzed_files_read_or_raise_torchgraft_error(
    seed: str, inside: bool, mutations: list[tuple[Any, ...]]
) -> None:
    data = SEEDS[seed]
    data = mutate_inside(seed, data, mutations) if inside else mutate(data, mutations)
    with tempfile.TemporaryDirectory(prefix="torchgraft_fuzz_") as d:
        path = Path(d) / f"{next(_counter)}_{seed}"  # fresh name: no cache can answer for it
        path.write_bytes(data)
        with (
            deadline(FUZZ_EXAMPLE_TIMEOUT_S, f"tg.read of a mutated {seed}"),
            memory_cap(MEMORY_HEADROOM),
        ):
            try:
                materialise(tg.read(path))
            except tg.TorchgraftError:
                pass


@pytest.mark.parametrize("seed", sorted(SEEDS))
def test_fuzz_seeds_are_valid(seed: str) -> None:
    with tempfile.TemporaryDirectory(prefix="torchgraft_seed_") as d:
        path = Path(d) / seed
        path.write_bytes(SEEDS[seed])
        tensors = materialise(tg.read(path))
    assert sorted(tensors) == ["h", "i", "w"]
