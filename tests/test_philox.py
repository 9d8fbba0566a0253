"""engine/model/philox.py: the CUDA dropout masks are Philox-4x32-10 (checked against Random123's published
answers through a host implementation), and off CUDA the mask is mlx-lm's own draw."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from engine.model.philox import dropout_mask, keep_threshold, on_cuda, philox_mask

FULL = 0xFFFFFFFF


def philox4x32_10(counter, key):
    """Random123's Philox-4x32-10 on the host: 10 rounds of two 32x32->64 multiplies and a key bump."""
    c, k = list(counter), list(key)
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & FULL, (p0 >> 32) ^ c[3] ^ k[1], p0 & FULL]
        k = [(k[0] + 0x9E3779B9) & FULL, (k[1] + 0xBB67AE85) & FULL]
    return c


def test_host_philox_gives_random123s_known_answers():
    assert philox4x32_10([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert philox4x32_10([FULL] * 4, [FULL, FULL]) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert philox4x32_10([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.skipif(on_cuda(), reason="on CUDA the mask is Philox's (the tests below)")
def test_off_cuda_the_mask_is_mlx_lm_dropouts_own_draw():
    x = mx.ones((4, 33))
    mx.random.seed(3)
    mask = dropout_mask(0.9, x)
    mx.random.seed(3)
    dropped = nn.Dropout(0.1)(x)  # nn.Dropout scales the kept values by 1/0.9
    assert mx.array_equal(mask, dropped != 0).item()
    assert keep_threshold(0.95, per_call=4) == round(0.95 * 2 ** 24) and keep_threshold(1.0, per_call=4) == 2 ** 24
    assert keep_threshold(0.95, per_call=8) == round(0.95 * 2 ** 16) and keep_threshold(1.0, per_call=8) == 2 ** 16


def host_mask(seed, size, keep, per_call):
    """The mask philox_mask should draw: Philox call t gives values t * per_call ...; with 8 a call each 32-bit
    word gives two 16-bit draws (low half first), with 4 one draw of its top 24 bits."""
    threshold = keep_threshold(keep, per_call)
    draws = []
    for t in range(-(-size // per_call)):
        for w in philox4x32_10([t, 0, 0, 0], seed):
            draws += [w & 0xFFFF, w >> 16] if per_call == 8 else [w >> 8]
    return np.array([d < threshold for d in draws[:size]])


@pytest.mark.skipif(not on_cuda(), reason="the kernel runs on CUDA only (bench/probe_gpu.py runs it there)")
@pytest.mark.parametrize("per_call", [8, 4])
def test_cuda_kernel_matches_the_host_philox_and_keeps_the_right_share(monkeypatch, per_call):
    from engine.model import philox
    monkeypatch.setattr(philox, "PER_CALL", per_call)
    seed = mx.array([12345, 678], dtype=mx.int32)
    like = mx.zeros((3, 111))  # 333 values: whole calls and one partial call, for either width
    got = np.array(philox_mask(seed, like, 0.5)).reshape(-1)
    assert (got == host_mask([12345, 678], 333, 0.5, per_call)).all()
    big = philox_mask(seed, mx.zeros((2, 2048, 4096), dtype=mx.bfloat16), 0.95)
    assert abs(big.astype(mx.float32).mean().item() - 0.95) < 1e-3
    assert (philox_mask(seed + 1, like, 0.5) != philox_mask(seed, like, 0.5)).any().item()


def test_the_host_mask_keeps_the_right_share_for_either_width():
    for per_call in (8, 4):
        assert abs(host_mask([1, 2], 4000, 0.9, per_call).mean() - 0.9) < 0.02
