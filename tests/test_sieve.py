import io

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from frzcompile.sparsity import IndexedDataset, SieveSampler

T, F = True, False


def _record_sequences(sampler, sequences):
    """Record {index: [correct flags in presentation order]}, one presentation of every index per batch."""
    for step in range(max(len(s) for s in sequences.values())):
        batch = [(i, s[step]) for i, s in sequences.items() if step < len(s)]
        sampler.record(torch.tensor([i for i, _ in batch]), torch.tensor([c for _, c in batch]))


def test_indexed_dataset_with_tensor_dataset_and_plain_items():
    x, y = torch.randn(6, 3), torch.arange(6) * 10
    ds = IndexedDataset(TensorDataset(x, y))
    assert len(ds) == 6
    i, xi, yi = ds[4]
    assert i == 4 and torch.equal(xi, x[4]) and yi == 40
    idx, xb, yb = next(iter(DataLoader(ds, batch_size=3, sampler=[5, 0, 2])))
    assert idx.tolist() == [5, 0, 2] and torch.equal(xb, x[[5, 0, 2]]) and yb.tolist() == [50, 0, 20]
    plain = IndexedDataset(["a", "b", "c"])
    assert len(plain) == 3 and plain[1] == (1, "b")
    assert IndexedDataset([[7, 8]])[0] == (0, 7, 8)


def test_sampler_yields_a_shuffled_active_subset():
    s = SieveSampler(100, keep_ratio=0.8, seed=3)
    order = list(s)
    assert len(s) == len(order) == 80 and sorted(order) == s.active_indices
    assert sorted(s.active_indices + s.removed_indices) == list(range(100))
    assert order != sorted(order)
    assert SieveSampler(TensorDataset(torch.zeros(10)), keep_ratio=0.25).__len__() == round(0.25 * 10)


def test_sampler_order_is_deterministic_per_seed_and_epoch():
    a, b = SieveSampler(50, seed=1), SieveSampler(50, seed=1)
    assert list(a) == list(b) and list(a) == list(a)
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) and list(a) != first
    assert list(SieveSampler(50, seed=2)) != first
    s = SieveSampler(50, refresh=0.0, seed=1)  # no refresh: the same epoch gives the same order again
    s.set_epoch(3)
    third = list(s)
    s.set_epoch(4)
    s.set_epoch(3)
    assert list(s) == third


def test_forgetting_counts_from_scripted_flags():
    s = SieveSampler(6, keep_ratio=1.0)
    _record_sequences(s, {0: [T, F, T, F], 1: [F, T, T], 2: [T, T, F], 3: [F, F], 4: [T, F, F, T, F]})
    assert s.forgetting_counts.tolist() == [2, 0, 1, 0, 2, 0]
    summary = s.summary()
    assert summary["forgetting_events"] == 5 and summary["seen"] == 5
    assert summary["unforgettable"] == 1 and summary["never_learned"] == 1  # sample 1 / sample 3


def test_repeated_indices_in_one_batch_are_applied_in_order():
    s = SieveSampler(4, keep_ratio=1.0)
    s.record([2, 2, 1, 2], torch.tensor([T, F, T, T]))  # sample 2: T, F, T -> one forgetting event
    s.record(torch.tensor([2]), torch.tensor([F]))
    assert s.forgetting_counts.tolist() == [0, 0, 2, 0]
    assert s.summary()["seen"] == 2


def test_refresh_swaps_least_informative_for_oldest_removed():
    s = SieveSampler(10, keep_ratio=0.5, refresh=0.4, seed=5)  # 5 active, swap round(0.4 * 5) = 2
    a, removed = s.active_indices, s.removed_indices
    _record_sequences(s, {a[0]: [T, T, T],  # unforgotten, learned longest: leaves first
                          a[1]: [F, F, T],  # unforgotten, learned recently: second
                          a[2]: [T, F, T],  # one forgetting event
                          a[3]: [F, F, F],  # never learned: most informative
                          a[4]: [T, F]})  # one forgetting event, currently wrong: kept before a[2]
    s.set_epoch(1)
    assert s.active_indices == sorted([a[2], a[3], a[4], removed[0], removed[1]])
    assert s.removed_indices == removed[2:] + [a[0], a[1]]
    assert len(s) == 5 and s.summary()["swapped"] == 2
    s.set_epoch(2)  # same forgetting count: the currently correct a[2] leaves before the wrong a[4]
    assert s.removed_indices[-2:] == [a[2], a[4]] and a[3] in s.active_indices


def test_ties_prefer_more_presentations_then_lower_index():
    s = SieveSampler(6, keep_ratio=0.5, refresh=0.34, seed=0)  # 3 active, swap 1
    a = s.active_indices
    _record_sequences(s, {a[0]: [T], a[1]: [F, T], a[2]: [F, T]})  # equal streaks; a[1], a[2] seen twice
    s.set_epoch(1)
    assert s.removed_indices[-1] == a[1]  # seen more than a[0]; lower index than a[2]


def test_removed_pool_is_reused_circularly():
    s = SieveSampler(10, keep_ratio=0.5, refresh=0.2, seed=9)  # swap 1 per epoch, nothing recorded
    initial_active, initial_removed = s.active_indices, s.removed_indices
    returned, evicted = [], []
    for epoch in range(1, 8):
        before = set(s.active_indices)
        s.set_epoch(epoch)
        after = set(s.active_indices)
        (came,), (went,) = after - before, before - after
        assert went == min(before)  # all tie (never learned): the lowest index leaves
        returned.append(came)
        evicted.append(went)
        assert len(s) == 5 and len(s.removed_indices) == 5
    # the initial pool comes back in order, then the first evicted samples, in the order they left
    assert returned == initial_removed + evicted[:2]
    full = SieveSampler(10, keep_ratio=0.5, refresh=1.0, seed=9)
    full.set_epoch(1)
    assert full.active_indices == sorted(initial_removed)
    full.set_epoch(2)
    assert full.active_indices == initial_active


def test_interval_and_repeated_set_epoch():
    s = SieveSampler(20, keep_ratio=0.5, refresh=0.2, interval=2)
    start = s.active_indices
    s.set_epoch(1)
    assert s.active_indices == start
    s.set_epoch(2)
    second = s.active_indices
    assert second != start and s.summary()["refreshes"] == 1
    s.set_epoch(2)
    s.set_epoch(3)
    assert s.active_indices == second and s.summary()["refreshes"] == 1
    s.set_epoch(6)  # skipped epochs: one refresh, not two
    assert s.summary()["refreshes"] == 2
    unchanged = SieveSampler(20, keep_ratio=1.0)
    unchanged.set_epoch(1)
    assert unchanged.active_indices == list(range(20)) and unchanged.summary()["swapped"] == 0


def _train_epoch(sampler, epoch):
    """Set the epoch, iterate it in batches of 4 and record a scripted correctness; returns the order."""
    sampler.set_epoch(epoch)
    order = list(sampler)
    for i in range(0, len(order), 4):
        idx = torch.tensor(order[i:i + 4])
        sampler.record(idx, (idx * (epoch + 3)) % 5 < 3)
    return order


def test_state_dict_round_trip_gives_the_same_future():
    ref = SieveSampler(40, keep_ratio=0.6, refresh=0.25, seed=4)
    for epoch in range(3):
        _train_epoch(ref, epoch)
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    buf.seek(0)
    resumed = SieveSampler(40, keep_ratio=0.6, refresh=0.25, seed=4)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert list(resumed) == list(ref)
    for epoch in range(3, 7):
        assert _train_epoch(resumed, epoch) == _train_epoch(ref, epoch)
        assert resumed.active_indices == ref.active_indices and resumed.removed_indices == ref.removed_indices
    assert torch.equal(resumed.forgetting_counts, ref.forgetting_counts)
    assert resumed.summary() == ref.summary() and ref.summary()["forgetting_events"] > 0
    with pytest.raises(ValueError, match="samples"):
        SieveSampler(41).load_state_dict(ref.state_dict())
    with pytest.raises(ValueError, match="keep_ratio"):
        SieveSampler(40, keep_ratio=0.5).load_state_dict(ref.state_dict())


def test_sampler_validates_inputs():
    for bad in (0, 1.5, -0.2):
        with pytest.raises(ValueError, match="keep_ratio"):
            SieveSampler(10, keep_ratio=bad)
    with pytest.raises(ValueError, match="refresh"):
        SieveSampler(10, refresh=2)
    with pytest.raises(ValueError, match="interval"):
        SieveSampler(10, interval=0)
    with pytest.raises(ValueError, match="at least one"):
        SieveSampler(0)
    s = SieveSampler(10)
    with pytest.raises(ValueError, match=r"in \[0, 10\)"):
        s.record(torch.tensor([3, 10]), torch.tensor([T, F]))
    with pytest.raises(ValueError, match="2 indices but 3"):
        s.record(torch.tensor([1, 2]), torch.tensor([T, F, T]))
    with pytest.raises(ValueError, match="bool"):
        s.record(torch.tensor([1, 2]), torch.tensor([1, 0]))
    assert s.summary()["seen"] == 0  # rejected batches leave no trace


def test_sieve_with_a_data_loader():
    ds = IndexedDataset(TensorDataset(torch.randn(30, 2), torch.arange(30)))
    sampler = SieveSampler(ds, keep_ratio=0.5, refresh=0.2)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        seen = []
        for idx, _, y in DataLoader(ds, batch_size=4, sampler=sampler):
            assert torch.equal(idx, y)
            sampler.record(idx, y % 2 == epoch % 2)
            seen += idx.tolist()
        assert sorted(seen) == sampler.active_indices
    assert sampler.summary()["swapped"] == 6 and sampler.summary()["forgetting_events"] > 0
