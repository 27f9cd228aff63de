"""Token ids and their cache, the step plan across ranks, eval batches, padding."""
import numpy as np

import tiny
from engine.batching import Tokenized, collate, eval_batches, tokenize, train_steps
from engine.sources import Examples


def _lengths(n=400, seed=0):
    return np.random.default_rng(seed).integers(5, 300, size=n)


def test_one_process_and_two_ranks_see_the_same_examples_per_step():
    lengths = _lengths()
    single = train_steps(lengths, batch_size=8, grad_accum=2, epoch=0, seed=1, world=1, rank=0)
    r0 = train_steps(lengths, batch_size=4, grad_accum=2, epoch=0, seed=1, world=2, rank=0)
    r1 = train_steps(lengths, batch_size=4, grad_accum=2, epoch=0, seed=1, world=2, rank=1)
    # global step size 16 in both: same steps, same examples, ranks disjoint
    assert len(single) == len(r0) == len(r1) == 400 // 16
    for s, a, b in zip(single, r0, r1, strict=True):
        mine = np.concatenate(a), np.concatenate(b)
        assert not set(mine[0].tolist()) & set(mine[1].tolist())
        assert sorted(np.concatenate(s).tolist()) == sorted(np.concatenate(mine).tolist())


def test_epochs_reshuffle_and_drop_only_the_incomplete_step():
    lengths = _lengths(100)
    e0 = np.concatenate([np.concatenate(m) for m in train_steps(lengths, 8, 1, epoch=0, seed=1)])
    e1 = np.concatenate([np.concatenate(m) for m in train_steps(lengths, 8, 1, epoch=1, seed=1)])
    assert len(e0) == len(set(e0.tolist())) == 96
    assert e0.tolist() != e1.tolist()


def test_length_grouping_cuts_padding():
    lengths = _lengths(2000)

    def padding(group):
        plan = train_steps(lengths, 16, 1, epoch=0, seed=0, group_by_length=group)
        padded = sum(len(b) * lengths[b].max() for m in plan for b in m)
        return 1 - lengths[np.concatenate([b for m in plan for b in m])].sum() / padded

    assert padding(True) < 0.1 < padding(False)


def test_length_grouped_steps_come_in_shuffled_order():
    # grouped by length, but not longest first: the order of lengths over an epoch stays random
    lengths = _lengths(2000)
    plan = train_steps(lengths, 16, 1, epoch=0, seed=0)
    longest = [int(lengths[m[0]].max()) for m in plan[:64]]
    assert longest != sorted(longest, reverse=True) and longest != sorted(longest)


def test_eval_batches_cover_every_example_once_across_ranks():
    lengths = _lengths(101)
    got = np.concatenate([np.concatenate(eval_batches(lengths, 8, world=3, rank=r)) for r in range(3)])
    assert sorted(got.tolist()) == list(range(101))


def test_collate_pads_right_or_left():
    data = Tokenized([np.array([5, 6, 7], np.int32), np.array([9], np.int32)], np.array([1, 0]))
    b = collate(data, np.array([0, 1]), pad_id=0, multiple_of=4)
    assert b["input_ids"].tolist() == [[5, 6, 7, 0], [9, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    b = collate(data, np.array([0, 1]), pad_id=0, pad_left=True, multiple_of=1)
    assert b["input_ids"].tolist() == [[5, 6, 7], [0, 0, 9]] and b["labels"].tolist() == [1, 0]
    # positions count from each row's first real token, as they would without padding
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert collate(data, np.array([1, 0]), pad_id=0)["labels"].tolist() == [0, 1]  # each row its own label


def test_tokenize_is_cached(tmp_path):
    tok = tiny.make_tokenizer()
    ex = Examples(["good movie", "bad film indeed"], np.array([1, 0]), "x")
    first = tokenize(ex, tok, 16, str(tmp_path))
    assert len(list(tmp_path.glob("*.json"))) == 1  # one token store (its header)
    calls = []
    tok_call = tok.__class__.__call__
    tok.__class__.__call__ = lambda self, *a, **k: calls.append(1) or tok_call(self, *a, **k)
    try:
        second = tokenize(ex, tok, 16, str(tmp_path))
    finally:
        tok.__class__.__call__ = tok_call
    assert calls == []  # served from the cache
    assert [x.tolist() for x in first.ids] == [x.tolist() for x in second.ids]
    assert tokenize(ex, tok, 2, str(tmp_path)).ids[1].tolist() != first.ids[1].tolist()  # max_length is in the key
