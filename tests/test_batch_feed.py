"""The run's batches uploaded a chunk at a time (engine/train/batch_feed.py): on by default where the step queue
looks ahead (CUDA), forced on here, on the CPU. A user must not be able to tell: the same batches in the same
order, across chunk, size-cap and epoch boundaries, the same losses with the real embedded model, and an exact
resume from a checkpoint saved mid-chunk."""

from types import SimpleNamespace

import numpy as np
import pytest

from engine.data import Encoded, Example
from engine.train import batch_feed, flat_update, step_queue
from engine.train.batches import epoch_batches
from engine.train.distributed import World
from engine.train.run import TrainingRun
from engine.train.trainer_state import TrainerState
from helpers import addition_chats, tiny_config, write_jsonl


def rows(n: int) -> list[Example]:
    """Rows of different lengths, each with its prompt (the first third) not trained."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        length = int(rng.integers(5, 40))
        trained = np.arange(length) >= length // 3
        out.append(Example(i, None, Encoded(rng.integers(0, 100, length).astype(np.int32), trained)))
    return out


def feeds(n_rows: int, batch: int, chunked_first: bool = True, world=World(0, 1)):
    train = rows(n_rows)
    setup = SimpleNamespace(lengths=[len(e.encoded) for e in train], global_batch=batch, pad_id=0,
                            data=SimpleNamespace(train=train))
    made = []
    for chunked in (chunked_first, not chunked_first):
        state = TrainerState(order=epoch_batches(setup.lengths, batch, 7, 0))
        made.append((batch_feed.BatchFeed(setup, state, world, 7, True, 48, chunked=chunked), state))
    return made


@pytest.mark.parametrize("chunk_batches, chunk_bytes, world", [
    (3, 64 << 20, World(0, 1)), (32, 64 << 20, World(0, 1)), (32, 1, World(0, 1)), (3, 64 << 20, World(2, 3))],
    ids=["chunks-of-3", "chunk-to-epoch-end", "byte-cap-of-one-batch", "rank-3-of-3"])
def test_chunked_batches_equal_the_batches_made_one_by_one(monkeypatch, chunk_batches, chunk_bytes, world):
    """Rank 3 of 3 has no row of the epoch's last batch (2 rows): it still takes a batch, with nothing trained."""
    import mlx.core as mx
    monkeypatch.setattr(batch_feed, "CHUNK_BATCHES", chunk_batches)
    monkeypatch.setattr(batch_feed, "CHUNK_BYTES", chunk_bytes)
    (chunked, state_c), (plain, state_p) = feeds(22, 4, world=world)  # 6 batches an epoch, the last of 2 rows
    uploads, made = [], []
    upload = chunked._upload
    monkeypatch.setattr(chunked, "_upload", lambda here: uploads.append(here) or upload(here))
    monkeypatch.setattr(batch_feed, "mx", SimpleNamespace(float32=mx.float32,
                                                          array=lambda x: made.append(x.shape) or mx.array(x)))
    empty = 0
    for _ in range(15):  # into the third epoch
        (got, got_tokens), (want, want_tokens) = chunked.next_batch(), plain.next_batch()
        assert got_tokens == want_tokens
        empty += got_tokens == 0
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_array_equal(np.array(g), np.array(w))
        assert (state_c.epoch, state_c.pos, state_c.order) == (state_p.epoch, state_p.pos, state_p.order)
    assert state_c.epoch == 2
    assert empty == (2 if world.size == 3 else 0)  # the last batch of epochs 0 and 1
    # one upload, one host-made array, per chunk; a chunk never crosses an epoch's end
    per_epoch = {3: [0, 3], 32: [0], 1: [0, 1, 2, 3, 4, 5]}[chunk_batches if chunk_bytes > 1 else 1]
    assert uploads == [(e, p) for e in (0, 1) for p in per_epoch] + [(2, p) for p in per_epoch if p < 3]
    assert len(made) == len(uploads)


def test_a_feed_picks_up_where_the_state_was_moved(monkeypatch):
    """A resumed run's state starts mid-epoch; the rows taken by next_rows (the preference objectives) move it
    too: each next batch is the state's, not the chunk's."""
    monkeypatch.setattr(batch_feed, "CHUNK_BATCHES", 4)
    (chunked, state_c), (plain, state_p) = feeds(40, 4)
    chunked.next_batch(), plain.next_batch()
    for feed in (chunked, plain):
        feed.next_rows()
    state_c.pos = state_p.pos = 6  # as a resume would set it
    for _ in range(6):
        (got, _), (want, _) = chunked.next_batch(), plain.next_batch()
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.array(g), np.array(w))


def test_chunks_are_on_only_where_the_loop_looks_ahead_unless_forced(monkeypatch):
    assert batch_feed.CHUNKED is None  # no LORA_TUI_BATCH_CHUNKS in the test environment
    assert not batch_feed.chunks_apply(False)
    assert not batch_feed.chunks_apply(True)  # the CPU: cuda_default leaves it off
    monkeypatch.setattr(batch_feed, "CHUNKED", True)
    assert batch_feed.chunks_apply(False)
    monkeypatch.setattr(batch_feed, "CHUNKED", False)
    assert not batch_feed.chunks_apply(True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "tiny.jsonl", addition_chats(40, seed=1, system="Add."))


def config(data, tmp_path):
    return tiny_config(tmp_path, data={"path": str(data)}, lora={"dropout": 0.1},
                       training={"iterations": 8, "grad_accumulation": 2, "warmup_steps": 2},
                       evaluation={"every_steps": 3, "val_batches": 2}, checkpoints={"every_steps": 3, "keep_last": 5})


def test_a_chunked_run_trains_the_same_and_resumes_exactly(data, tmp_path, monkeypatch, embedded_dir):
    monkeypatch.setattr(flat_update, "FLAT_UPDATE", True)
    monkeypatch.setattr(step_queue, "LOOK_AHEAD", True)  # the CUDA default's loop, here on the CPU
    monkeypatch.setattr(batch_feed, "CHUNK_BATCHES", 5)  # chunks end mid-step and across checkpoints
    uploads = []
    upload = batch_feed.BatchFeed._upload
    monkeypatch.setattr(batch_feed.BatchFeed, "_upload", lambda self, here: uploads.append(here) or
                        upload(self, here))
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(batch_feed, "CHUNKED", on)
        runs[on] = TrainingRun(config(data, tmp_path / str(on))).run()
    assert runs[True].status == runs[False].status == "finished" and runs[True].step == 8
    assert len(uploads) >= 4 and uploads[0] == (0, 0)  # 16 micro-batches, over an epoch's end
    np.testing.assert_allclose(runs[True].losses, runs[False].losses, rtol=1e-6)
    cfg = config(data, tmp_path / "resumed")
    first = TrainingRun(cfg, stop_after=3).run()  # stops after micro-batch 6, inside the second chunk
    resumed = TrainingRun(cfg, resume="latest").run()
    assert first.step == 3 and resumed.status == "finished" and resumed.step == 8
    np.testing.assert_allclose(first.losses + resumed.losses, runs[True].losses, rtol=1e-5)
