"""trainer.data: config validation, cached token files, corpora, and the sharded sampler."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import multiprocessing as mp
import os
import queue as queue_mod
import sys
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from trainer.data import DataConfig, ShardedBatches, TokenData, eval_batches, load_tokens
from trainer.data.corpus import SEPARATOR_BYTE, stdlib_files
from trainer.data.token_file import cache_key, open_or_build, open_token_file, val_count


def _files(cache_dir, suffix):
    return sorted(f for f in os.listdir(cache_dir) if f.endswith(suffix))


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("field,value", [
    ("kind", "wikipedia"),
    ("val_fraction", 1.0),
    ("val_fraction", -0.1),
    ("seed", -1),
    ("cache_dir", ""),
    ("tokenizer", ""),
    ("tokenizer", "gpt2"),          # stdlib is byte-level; a tokenizer there is a mistake
    ("extensions", ["txt"]),
    ("extensions", ".txt"),
    ("paths", "some/file.txt"),
])
def test_bad_config_names_the_key(tmp_path, field, value):
    cfg = DataConfig(cache_dir=str(tmp_path))
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=rf"data\.{field}"):
        cfg.validate()


@pytest.mark.parametrize("field,value", [
    ("synthetic_tokens", 1), ("synthetic_vocab_size", 1), ("synthetic_vocab_size", 2**32 + 1)])
def test_bad_synthetic_config(field, value):
    cfg = DataConfig(kind="synthetic")
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=rf"data\.{field}"):
        load_tokens(cfg)


def test_bad_text_config(tmp_path):
    with pytest.raises(ValueError, match=r"data\.paths"):
        DataConfig(kind="text", cache_dir=str(tmp_path)).validate()
    with pytest.raises(ValueError, match=r"data\.paths.*does not exist"):
        DataConfig(kind="text", paths=[str(tmp_path / "nope")], cache_dir=str(tmp_path)).validate()
    (tmp_path / "only.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"data\.paths: no files"):
        load_tokens(DataConfig(kind="text", paths=[str(tmp_path)], cache_dir=str(tmp_path / "c")))


def test_unavailable_tokenizer_is_a_clear_error(tmp_path):
    doc = tmp_path / "a.txt"
    doc.write_text("hello")
    cfg = DataConfig(kind="text", paths=[str(doc)], tokenizer="no-such-org/no-such-tokenizer",
                     cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"data\.tokenizer"):
        load_tokens(cfg)


class _StubTokenizer:
    """Word-level stand-in for a Hugging Face tokenizer: id = 10 + position in a fixed word list."""

    words = ["hello", "world", "again"]
    eos_token_id, sep_token_id = 1, None

    def __len__(self):
        return 300  # over 256, so the token file must be uint16

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return [10 + self.words.index(w) for w in text.split()]


def test_named_tokenizer_is_loaded_locally_and_joins_with_eos(tmp_path, monkeypatch):
    import types
    calls = []

    def from_pretrained(name, **kw):
        calls.append((name, kw))
        return _StubTokenizer()

    fake = types.ModuleType("transformers")
    fake.AutoTokenizer = types.SimpleNamespace(from_pretrained=from_pretrained)
    monkeypatch.setitem(sys.modules, "transformers", fake)
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.txt").write_text("again hello")
    data = load_tokens(DataConfig(kind="text", paths=[str(tmp_path)], tokenizer="stub/tok",
                                  cache_dir=str(tmp_path / "c"), val_fraction=0))
    assert calls == [("stub/tok", {"local_files_only": True})]
    assert data.vocab_size == 300 and data.train.dtype == np.uint16
    assert data.train.tolist() == [10, 11, 1, 12, 10]


def test_omegaconf_node_loads(tmp_path):
    # OmegaConf cannot hold Literal fields, so Hydra hands over `kind` as a plain str node.
    cfg = DataConfig(kind="synthetic", synthetic_tokens=1000, cache_dir=str(tmp_path))
    node = OmegaConf.create(dataclasses.asdict(cfg))
    data = load_tokens(node)
    assert data.vocab_size == 256 and len(data.train) + len(data.val) == 1000
    node.kind = "nonsense"
    with pytest.raises(ValueError, match=r"data\.kind"):
        load_tokens(node)


# ---------------------------------------------------------------- stdlib corpus

@pytest.fixture(scope="module")
def stdlib_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("stdlib_cache")
    return str(cache), load_tokens(DataConfig(kind="stdlib", cache_dir=str(cache)))


def test_stdlib_corpus_is_byte_level(stdlib_cache):
    _, data = stdlib_cache
    assert isinstance(data, TokenData) and data.built
    assert data.vocab_size == 256
    assert data.train.dtype == np.uint8 and data.val.dtype == np.uint8
    assert data.train.ndim == 1 and len(data.train) > 1_000_000
    n = len(data.train) + len(data.val)
    assert len(data.val) == val_count(n, 0.005) > 0
    assert "stdlib" in data.description
    # Documents appear in sorted-path order, separated by one separator byte.
    _, files = stdlib_files()
    first, second = open(files[0], "rb").read(), open(files[1], "rb").read()
    assert bytes(data.train[:len(first)]) == first
    assert data.train[len(first)] == SEPARATOR_BYTE
    assert bytes(data.train[len(first) + 1:len(first) + 1 + len(second)]) == second
    assert not any("site-packages" in f or "dist-packages" in f for f in files)


def test_stdlib_second_load_reuses_the_cache(stdlib_cache):
    cache, first = stdlib_cache
    st = os.stat(first.path)
    again = load_tokens(DataConfig(kind="stdlib", cache_dir=cache))
    assert not again.built and again.path == first.path
    st2 = os.stat(again.path)
    assert (st2.st_ino, st2.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert _files(cache, ".tokens") == [os.path.basename(first.path)]
    assert np.array_equal(again.val, first.val)


def test_stdlib_truncated_file_is_rebuilt(tmp_path):
    cfg = DataConfig(kind="stdlib", cache_dir=str(tmp_path))
    good = load_tokens(cfg)
    n, head = len(good.train) + len(good.val), bytes(good.train[:4096])
    del good
    path = os.path.join(tmp_path, _files(tmp_path, ".tokens")[0])
    with open(path, "r+b") as f:  # what an interrupted copy would leave
        f.truncate(n // 2)
    again = load_tokens(cfg)
    assert again.built and len(again.train) + len(again.val) == n
    assert bytes(again.train[:4096]) == head


# ---------------------------------------------------------------- text corpus and the cache

def test_text_single_file_round_trips(tmp_path):
    content = bytes(range(1, 256)) * 40 + "héllo wörld\n".encode()
    doc = tmp_path / "doc.bin"
    doc.write_bytes(content)
    data = load_tokens(DataConfig(kind="text", paths=[str(doc)], cache_dir=str(tmp_path / "c"), val_fraction=0.1))
    assert data.vocab_size == 256
    assert bytes(data.train) + bytes(data.val) == content
    assert len(data.val) == round(len(content) * 0.1)


def test_text_folder_walks_nested_files_sorted(tmp_path):
    root = tmp_path / "corpus"
    (root / "b" / "deep").mkdir(parents=True)
    (root / ".git").mkdir()
    docs = {"a.txt": b"alpha", "b/deep/z.md": b"zulu", "b/c.py": b"print(1)\n", "z.TXT": b"upper"}
    for rel, body in docs.items():
        (root / rel).write_bytes(body)
    (root / "skip.bin").write_bytes(b"binary")
    (root / ".git" / "HEAD.txt").write_bytes(b"hidden")
    data = load_tokens(DataConfig(kind="text", paths=[str(root)], cache_dir=str(tmp_path / "c"), val_fraction=0))
    expected = bytes([SEPARATOR_BYTE]).join(docs[k] for k in sorted(docs))
    assert len(data.val) == 0
    assert bytes(data.train) == expected


def test_text_change_gives_a_new_cache_entry(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_bytes(b"first version")
    cfg = DataConfig(kind="text", paths=[str(doc)], cache_dir=str(tmp_path / "c"), val_fraction=0)
    assert bytes(load_tokens(cfg).train) == b"first version"
    doc.write_bytes(b"second, longer version")
    data = load_tokens(cfg)
    assert data.built and bytes(data.train) == b"second, longer version"


def _text_cfg(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_bytes(b"some text to tokenize " * 100)
    return DataConfig(kind="text", paths=[str(doc)], cache_dir=str(tmp_path / "c")), doc.read_bytes()


@pytest.mark.parametrize("damage", ["truncate", "no_sidecar", "bad_sidecar", "tokens_only", "stale_tmp"])
def test_damaged_cache_is_rebuilt_not_loaded(tmp_path, damage):
    cfg, content = _text_cfg(tmp_path)
    first = load_tokens(cfg)
    cache = tmp_path / "c"
    tokens_path, meta_path = first.path, first.path[:-len(".tokens")] + ".json"
    del first
    if damage == "truncate":
        with open(tokens_path, "r+b") as f:
            f.truncate(10)
    elif damage == "no_sidecar":
        os.unlink(meta_path)
    elif damage == "bad_sidecar":
        with open(meta_path, "w") as f:
            f.write('{"vocab_size": 256, "n_tok')  # cut short mid-write
    elif damage == "tokens_only":  # a builder died after the tokens, before the sidecar
        os.unlink(meta_path)
        with open(tokens_path, "ab") as f:
            f.write(b"junk")
    elif damage == "stale_tmp":
        os.unlink(meta_path)
        key = os.path.basename(tokens_path)[:-len(".tokens")]
        (cache / f".{key}.tokens.abc123.tmp").write_bytes(b"partial")
    data = load_tokens(cfg)
    assert data.built
    assert bytes(data.train) + bytes(data.val) == content
    assert not [f for f in os.listdir(cache) if f.endswith(".tmp")]
    assert not load_tokens(cfg).built


def test_token_file_wide_vocab_and_range_check(tmp_path):
    ids = np.array([0, 1, 300, 65535, 7], dtype=np.int64)
    tf = open_or_build(str(tmp_path), cache_key(test="wide"), vocab_size=65536, val_fraction=0.2,
                       sources=["unit"], chunks=lambda: [ids[:2], ids[2:]])
    assert tf.tokens.dtype == np.uint16 and tf.n_val == 1 and tf.built
    assert np.array_equal(np.asarray(tf.tokens), ids)
    assert json.load(open(tf.path[:-len(".tokens")] + ".json"))["n_tokens"] == 5
    with pytest.raises(ValueError, match="out of range"):
        open_or_build(str(tmp_path), cache_key(test="bad"), vocab_size=256, val_fraction=0,
                      sources=[], chunks=lambda: [np.array([1, 256])])
    assert open_token_file(str(tmp_path), cache_key(test="bad")) is None


def test_builder_lock_times_out_instead_of_hanging(tmp_path):
    key = cache_key(test="locked")
    fd = os.open(os.path.join(tmp_path, key + ".lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another "builder" holds the key
    try:
        with pytest.raises(TimeoutError, match="lock"):
            open_or_build(str(tmp_path), key, vocab_size=256, val_fraction=0, sources=[],
                          chunks=lambda: [np.zeros(3, np.uint8)], lock_timeout_s=0.3)
    finally:
        os.close(fd)


def _concurrent_build(cache_dir, barrier, queue):
    barrier.wait(timeout=120)
    data = load_tokens(DataConfig(kind="stdlib", cache_dir=cache_dir))
    queue.put((data.built, data.path, len(data.train), len(data.val), bytes(data.train[-1000:])))


def test_concurrent_builders_make_one_valid_file(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_concurrent_build, args=(str(tmp_path), barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results, deadline = [], time.monotonic() + 180
    try:
        # Poll so a child that dies without answering fails the test at once, not at the deadline.
        while len(results) < len(procs) and time.monotonic() < deadline:
            try:
                results.append(queue.get(timeout=0.5))
            except queue_mod.Empty:
                if all(p.exitcode is not None for p in procs) and queue.empty():
                    break
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0] and len(results) == 2
    assert sorted(r[0] for r in results) == [False, True]  # one built, the other reused
    assert results[0][1:] == results[1][1:]
    assert len(_files(tmp_path, ".tokens")) == 1 and len(_files(tmp_path, ".json")) == 1
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    mine = load_tokens(DataConfig(kind="stdlib", cache_dir=str(tmp_path)))
    assert not mine.built and bytes(mine.train[-1000:]) == results[0][4]


# ---------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_by_seed():
    a = load_tokens(DataConfig(kind="synthetic", synthetic_tokens=50_000, seed=3))
    b = load_tokens(DataConfig(kind="synthetic", synthetic_tokens=50_000, seed=3))
    c = load_tokens(DataConfig(kind="synthetic", synthetic_tokens=50_000, seed=4))
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert not np.array_equal(a.train, c.train)
    assert a.path is None and len(a.train) + len(a.val) == 50_000 and len(a.val) == 250
    wide = load_tokens(DataConfig(kind="synthetic", synthetic_tokens=20_000, synthetic_vocab_size=1000))
    assert wide.vocab_size == 1000 and wide.train.dtype == np.uint16
    assert int(wide.train.max()) < 1000 and int(wide.train.max()) > 900


# ---------------------------------------------------------------- sampler

T, B = 8, 2


def _ramp(n_windows, seq_len=T):
    """Token i is i, so a window's index is x[:, 0] // seq_len."""
    return np.arange(n_windows * seq_len + 1, dtype=np.int64)


def _sampler(tokens, rank=0, size=1, **kw):
    args = dict(seq_len=T, micro_batch_size=B, dp_rank=rank, dp_size=size, seed=0)
    args.update(kw)
    return ShardedBatches(tokens, **args)


def _windows(x, seq_len=T):
    return (x[:, 0] // seq_len).tolist()


def test_batches_are_shifted_windows():
    s = _sampler(_ramp(40))
    x, y = s.next_batch()
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)
    assert all(int(row[0]) % T == 0 for row in x)  # windows start at multiples of seq_len


@pytest.mark.parametrize("dp_size", [1, 2, 3, 4])
@pytest.mark.parametrize("n_windows", [24, 29])
def test_ranks_are_disjoint_and_cover_the_epoch(dp_size, n_windows):
    tokens = _ramp(n_windows)
    samplers = [_sampler(tokens, r, dp_size) for r in range(dp_size)]
    per_rank = {s.batches_per_epoch for s in samplers}
    assert per_rank == {n_windows // (dp_size * B)}
    seen = []
    for s in samplers:
        mine = [w for _ in range(s.batches_per_epoch) for w in _windows(s.next_batch()[0])]
        assert s.epoch == 1 and s.position == 0
        seen.append(mine)
    flat = [w for m in seen for w in m]
    assert len(flat) == len(set(flat)) == dp_size * B * per_rank.pop()
    if n_windows % (dp_size * B) == 0:
        assert set(flat) == set(range(n_windows))


def test_sampler_is_deterministic_and_reshuffles_each_epoch():
    tokens = _ramp(64)
    a, b, c = _sampler(tokens, seed=5), _sampler(tokens, seed=5), _sampler(tokens, seed=6)
    n = a.batches_per_epoch
    run_a = [_windows(a.next_batch()[0]) for _ in range(2 * n)]
    run_b = [_windows(b.next_batch()[0]) for _ in range(2 * n)]
    run_c = [_windows(c.next_batch()[0]) for _ in range(2 * n)]
    assert run_a == run_b and run_a != run_c
    assert run_a[:n] != run_a[n:]
    assert sorted(sum(run_a[:n], [])) == sorted(sum(run_a[n:], [])) == list(range(64))


def test_no_shuffle_is_in_order():
    s = _sampler(_ramp(12), shuffle=False)
    assert [_windows(s.next_batch()[0]) for _ in range(3)] == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize("k", [0, 1, 4, 5, 6, 13])
def test_resume_matches_an_uninterrupted_run(k):
    tokens = _ramp(31)
    ref = _sampler(tokens, rank=1, size=3, seed=11)
    assert ref.batches_per_epoch == 5
    expected = [ref.next_batch() for _ in range(k + 8)]  # crosses epoch boundaries
    first = _sampler(tokens, rank=1, size=3, seed=11)
    for _ in range(k):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = _sampler(tokens, rank=1, size=3, seed=11)
    resumed.load_state_dict(state)
    for want in expected[k:]:
        got = resumed.next_batch()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("field,change", [
    ("dp_size", dict(size=4)), ("seq_len", dict(seq_len=4)), ("micro_batch_size", dict(micro_batch_size=1)),
    ("seed", dict(seed=1)), ("shuffle", dict(shuffle=False)), ("n_windows", dict(tokens_windows=40))])
def test_mismatched_resume_is_refused(field, change):
    saved = _sampler(_ramp(64), size=2)
    saved.next_batch()
    windows = change.pop("tokens_windows", 64)
    other = _sampler(_ramp(windows), **{"size": 2, **change})
    with pytest.raises(ValueError, match=field):
        other.load_state_dict(saved.state_dict())


def test_state_from_another_rank_restores_this_rank():
    tokens = _ramp(40)
    r0, r1 = _sampler(tokens, 0, 2), _sampler(tokens, 1, 2)
    for _ in range(3):
        r0.next_batch(), r1.next_batch()
    fresh = _sampler(tokens, 1, 2)
    fresh.load_state_dict(r0.state_dict())
    assert torch.equal(fresh.next_batch()[0], r1.next_batch()[0])


def test_too_small_data_names_the_keys():
    with pytest.raises(ValueError, match=r"data.*seq_len.*micro_batch_size") as err:
        ShardedBatches(np.zeros(100, np.uint8), seq_len=16, micro_batch_size=4, dp_rank=0, dp_size=2, seed=0)
    assert "129" in str(err.value)  # 16 * 4 * 2 + 1 tokens needed
    ShardedBatches(np.zeros(129, np.uint8), seq_len=16, micro_batch_size=4, dp_rank=0, dp_size=2, seed=0)
    with pytest.raises(ValueError, match="dp_rank"):
        _sampler(_ramp(10), rank=2, size=2)


def test_eval_batches_are_sharded_and_deterministic():
    tokens = _ramp(30)
    runs = [list(eval_batches(tokens, seq_len=T, micro_batch_size=B, dp_rank=r, dp_size=3, max_batches=None))
            for r in range(3)]
    assert [len(r) for r in runs] == [5, 5, 5]
    windows = [w for r in runs for x, _ in r for w in _windows(x)]
    assert sorted(windows) == list(range(30))
    assert _windows(runs[1][0][0]) == [1, 4]
    again = list(eval_batches(tokens, seq_len=T, micro_batch_size=B, dp_rank=1, dp_size=3, max_batches=2))
    assert len(again) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(again, runs[1]))
    with pytest.raises(ValueError, match=r"data\.val_fraction"):
        eval_batches(np.arange(2 * T), seq_len=T, micro_batch_size=B, dp_rank=0, dp_size=1, max_batches=4)
