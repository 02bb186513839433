"""Data parallelism: the gradients of N workers equal one worker's (every method, uneven shards), the
randomness is reproducible, and BLAS gets its thread count back."""
import numpy as np
import pytest

from tinyllm.layers import IGNORE_INDEX
from tinyllm.model import GPT
from tinyllm.parallel import blas_threads, find_openblas, forward_backward, parallel_map, shards
from tinyllm.peft import LoraConfig, get_peft_model
from peft_helpers import CFG, METHODS, make_base, make_peft


def uneven_batch(B=5, T=8, seed=0):
    """Rows with very different numbers of targets (one with none): shards of rows hold uneven counts."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, CFG.vocab_size, (B, T))
    targets = rng.integers(0, CFG.vocab_size, (B, T))
    targets[0, :-1] = IGNORE_INDEX                      # one target
    targets[2, :] = IGNORE_INDEX                        # none
    targets[3, :3] = IGNORE_INDEX
    return idx, targets


def same(a, b, tol):
    return set(a) == set(b) and all(np.max(np.abs(a[k] - b[k])) <= tol * (1 + np.max(np.abs(b[k]))) for k in a)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("workers", [2, 3, 5])
def test_workers_give_one_workers_gradients(method, workers):
    pm = make_peft(method)                              # float64
    idx, targets = uneven_batch()
    loss1, grads1 = pm.forward_backward(idx, targets, workers=1)
    lossN, gradsN = pm.forward_backward(idx, targets, workers=workers)
    _, loss = pm.forward(idx, targets)
    assert loss1 == loss and abs(lossN - loss) < 1e-12
    assert same(gradsN, grads1, 1e-12) and same(grads1, pm.backward(), 0.0)


@pytest.mark.parametrize("method", ["lora c_attn", "prefix", "full", "adapters"])
def test_float32_gradients_agree_to_rounding(method):
    base = GPT(CFG, seed=0, dtype=np.float32)
    pm = get_peft_model(base, METHODS[method]())
    for v in pm.trainable_parameters().values():
        v += np.random.default_rng(1).normal(0, 0.05, v.shape).astype(np.float32)
    idx, targets = uneven_batch(B=6, seed=3)
    _, g1 = pm.forward_backward(idx, targets, workers=1)
    _, g2 = pm.forward_backward(idx, targets, workers=2)
    assert same(g2, g1, 2e-5)


def test_the_plain_gpt_too():
    model = make_base()
    idx, targets = uneven_batch()
    assert same(model.forward_backward(idx, targets, workers=4)[1], model.forward_backward(idx, targets, 1)[1], 1e-12)


def test_shards_balance_target_tokens_and_skip_empty_ones():
    targets = np.full((6, 4), IGNORE_INDEX)
    targets[0] = targets[1] = 1                          # 4 + 4 targets, then 1, 0, 0, 3
    targets[2, 0] = 1
    targets[5, 1:] = 1
    parts = shards(targets, 2)
    assert sum(n for _, n in parts) == 12 and [n for _, n in parts] == [4, 8]
    assert all(n > 0 for _, n in shards(targets, 6)) and len(shards(targets, 6)) == 4
    assert shards(targets, 1) == [(slice(0, 6), 12)]


def test_dropout_is_reproducible_for_a_seed_and_a_worker_count():
    cfg = lambda: LoraConfig(r=2, lora_alpha=4, lora_dropout=0.5, init_lora_weights=False)
    idx, targets = uneven_batch()
    runs = [get_peft_model(make_base(), cfg(), seed=7).forward_backward(idx, targets, workers=2) for _ in range(2)]
    assert runs[0][0] == runs[1][0] and same(runs[0][1], runs[1][1], 0.0)
    other = get_peft_model(make_base(), cfg(), seed=8).forward_backward(idx, targets, workers=2)
    assert other[0] != runs[0][0]                        # the masks are random: another seed, other masks


def test_bad_workers_and_bad_batches_say_what_is_wrong():
    pm = make_peft("lora c_attn")
    idx, targets = uneven_batch()
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="workers"):
            pm.forward_backward(idx, targets, workers=bad)
    with pytest.raises(ValueError, match="targets has shape"):
        pm.forward_backward(idx, targets[:, :3], workers=2)
    with pytest.raises(ValueError, match="every target is -100"):
        pm.forward_backward(idx, np.full_like(targets, IGNORE_INDEX), workers=2)


def test_blas_threads_are_restored():
    blas = find_openblas()
    if blas is None:
        pytest.skip("no OpenBLAS in this process")
    set_threads, get_threads = blas
    before = get_threads()
    with blas_threads(1):
        assert get_threads() == 1
    assert get_threads() == before
    with pytest.raises(ZeroDivisionError):
        with blas_threads(1):
            1 / 0
    assert get_threads() == before


def test_parallel_map_keeps_order_and_errors():
    assert parallel_map(lambda x: x * x, range(7), 3) == [x * x for x in range(7)]
    with pytest.raises(KeyError):
        parallel_map(lambda x: {}[x], [1, 2], 2)


def test_forward_backward_weights_each_shard_by_its_tokens():
    """Two shards with 1 and 3 targets and losses 2 and 6: the batch's loss is (1*2 + 3*6) / 4 = 5."""
    targets = np.array([[1, IGNORE_INDEX, IGNORE_INDEX], [1, 1, 1]])
    run = lambda x, y, shard: (2.0 if len(y) and y[0, 1] == IGNORE_INDEX else 6.0, {"w": np.ones(2) * shard})
    loss, grads = forward_backward(run, np.zeros_like(targets), targets, 2)
    assert loss == pytest.approx(5.0) and np.allclose(grads["w"], 0.75)
