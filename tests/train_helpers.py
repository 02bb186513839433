"""What the training-loop tests share: a random corpus over 11 token ids, its batches, and a get_batch that
stops with Ctrl-C partway; changed(), a copy of checkpoint metadata with one field changed."""
import json

import numpy as np

from tinyllm.train import corpus_batches

DATA = np.random.default_rng(0).integers(0, 11, size=400)


def batches(block_size=8):
    return corpus_batches({"train": DATA[:300], "val": DATA[300:]}, batch_size=4, block_size=block_size)


def interrupt_at_train_batch(get_batch, n):
    """get_batch that raises KeyboardInterrupt after drawing its n-th training batch (the RNG has moved)."""
    calls = []

    def wrapped(split, rng):
        batch = get_batch(split, rng)
        if split == "train":
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
        return batch
    return wrapped


DELETE = object()        # a change that removes the field


def changed(meta, field, value):
    """A copy of meta with the dotted field ('history.train_loss') set to value, or removed (DELETE)."""
    meta = json.loads(json.dumps(meta))
    *parents, last = field.split(".")
    d = meta
    for p in parents:
        d = d[p]
    if value is DELETE:
        del d[last]
    else:
        d[last] = value
    return meta
