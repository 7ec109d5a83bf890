import ast
import io
import math
import sys
from pathlib import Path

import pytest
import torch

from frzcompile.sparsity import (EarlyBird, density, magnitude_masks, mask_distance, per_tensor_sparsity,
                                 prune_and_grow, update_fraction)


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"fc": torch.randn(12, 20, generator=g), "conv": torch.randn(8, 3, 3, 3, generator=g) * 0.5,
            "out": torch.randn(5, 16, generator=g) * 2}


def _pruned(masks):
    return sum(int((~m).sum()) for m in masks.values())


# ---------------------------------------------------------------- unstructured

@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.37, 0.5, 0.9, 0.999])
def test_unstructured_global_prunes_exact_count_of_smallest(sparsity):
    w = _weights()
    masks = magnitude_masks(w, sparsity)
    total = sum(t.numel() for t in w.values())
    assert _pruned(masks) == round(sparsity * total)
    assert all(m.dtype == torch.bool and m.shape == w[k].shape for k, m in masks.items())
    kept = torch.cat([w[k].abs()[m] for k, m in masks.items()])
    gone = torch.cat([w[k].abs()[~m] for k, m in masks.items()])
    if gone.numel() and kept.numel():
        assert gone.max() <= kept.min()


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.83])
def test_unstructured_layer_prunes_each_tensor_to_target(sparsity):
    w = _weights()
    masks = magnitude_masks(w, sparsity, scope="layer")
    for k, m in masks.items():
        assert int((~m).sum()) == round(sparsity * m.numel())
        assert w[k].abs()[~m].max() <= w[k].abs()[m].min()


def test_global_scope_compares_layers_and_layer_scope_does_not():
    w = {"small": torch.rand(10, 10) * 0.01, "big": torch.rand(10, 10) + 1}
    glob = magnitude_masks(w, 0.5)
    assert not glob["small"].any() and glob["big"].all()
    layer = per_tensor_sparsity(magnitude_masks(w, 0.5, scope="layer"))
    assert layer == {"small": 0.5, "big": 0.5}


def test_ties_are_broken_deterministically_by_index():
    w = {"a": torch.ones(4, 5), "b": torch.ones(3)}
    masks = magnitude_masks(w, 0.4)  # 0.4 * 23 -> 9 of the equal weights: the first 9 in flat order
    assert int((~masks["a"]).sum()) == 9 and masks["b"].all()
    assert not masks["a"].reshape(-1)[:9].any() and masks["a"].reshape(-1)[9:].all()
    assert all(torch.equal(masks[k], m) for k, m in magnitude_masks(w, 0.4).items())


def test_scores_replace_magnitude():
    w = {"a": torch.arange(1.0, 11.0)}
    scores = {"a": torch.arange(10.0, 0.0, -1.0)}  # the largest weights get the lowest scores
    masks = magnitude_masks(w, 0.3, scores=scores)
    assert torch.equal(masks["a"], torch.arange(10) < 7)


# ---------------------------------------------------------------- block / head / channel

def _block_views(mask2d, r, c):
    rows, cols = mask2d.shape
    return [mask2d[i:i + r, j:j + c] for i in range(0, rows, r) for j in range(0, cols, c)]


def _reference_block_mask(w, sparsity, r, c):
    """Independent loop implementation of one-tensor block pruning: lowest-RMS blocks, closest element count."""
    mat = w.reshape(w.shape[0], -1)
    blocks = [(i, j, mat[i:i + r, j:j + c]) for i in range(0, mat.shape[0], r) for j in range(0, mat.shape[1], c)]
    ranked = sorted(range(len(blocks)), key=lambda b: (blocks[b][2].square().mean().sqrt().item(), b))
    target, best, cum = round(sparsity * mat.numel()), (abs(round(sparsity * mat.numel())), 0), 0
    for n, b in enumerate(ranked, 1):
        cum += blocks[b][2].numel()
        best = min(best, (abs(cum - target), n))
    keep = torch.ones_like(mat, dtype=torch.bool)
    for b in ranked[:best[1]]:
        i, j, blk = blocks[b]
        keep[i:i + blk.shape[0], j:j + blk.shape[1]] = False
    return keep.reshape(w.shape)


def test_block_masks_are_made_of_whole_blocks_with_exact_count():
    w = {"a": torch.randn(16, 24), "b": torch.randn(8, 2, 2, 4)}  # b's 2-D view is (8, 16)
    for scope in ("global", "layer"):
        masks = magnitude_masks(w, 0.5, structure="block", block=(4, 4), scope=scope)
        for m in masks.values():
            tiles = m.reshape(m.shape[0] // 4, 4, -1, 4)  # every 4x4 tile is all kept or all pruned
            assert (tiles.all(dim=(1, 3)) | ~tiles.any(dim=(1, 3))).all()
        # all blocks have 16 elements, so half the elements is exactly half the blocks
        assert _pruned(masks) == (16 * 24 + 8 * 16) // 2
        if scope == "layer":
            assert per_tensor_sparsity(masks) == {"a": 0.5, "b": 0.5}


def test_block_partial_edges_match_reference():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(10, 14, generator=g)
    for sparsity in (0.2, 0.45, 0.7):
        got = magnitude_masks({"w": w}, sparsity, structure="block", block=(4, 4), scope="layer")["w"]
        assert torch.equal(got, _reference_block_mask(w, sparsity, 4, 4))
        for tile in _block_views(got, 4, 4):
            assert tile.all() or not tile.any()


def test_block_global_uses_per_element_scale():
    # Layer "big" has large blocks of small weights; per-element RMS must still rank it below layer "hot".
    w = {"big": torch.full((8, 8), 0.3), "hot": torch.full((2, 2), 1.0)}  # L2 norms 2.4 and 2.0
    masks = magnitude_masks(w, 0.5, structure="block", block=(-1, -1))
    assert not masks["big"].any() and masks["hot"].all()


def test_block_prunes_the_lowest_norm_block():
    w = torch.ones(8, 8)
    w[4:, :4] = 0.1
    mask = magnitude_masks({"w": w}, 0.25, structure="block", block=(4, 4))["w"]
    assert not mask[4:, :4].any() and int(mask.sum()) == 48


def test_head_blocks_prune_whole_head_rows():
    head_dim, heads, d = 4, 6, 10
    w = torch.randn(heads * head_dim, d)
    w[2 * head_dim:3 * head_dim] *= 0.01  # head 2 is the weakest
    mask = magnitude_masks({"qkv": w}, 1 / heads, structure="block", block=(head_dim, -1))["qkv"]
    per_head = mask.reshape(heads, head_dim, d)
    assert (per_head.all(dim=(1, 2)) | ~per_head.any(dim=(1, 2))).all()
    assert per_head.all(dim=(1, 2)).tolist() == [True, True, False, True, True, True]


def test_channel_masks_prune_whole_output_rows():
    g = torch.Generator().manual_seed(1)
    w = {"conv": torch.randn(10, 3, 3, 3, generator=g), "fc": torch.randn(7, 9, generator=g)}
    masks = magnitude_masks(w, 0.3, structure="channel", scope="layer")
    for k, m in masks.items():
        rows = m.reshape(m.shape[0], -1)
        assert (rows.all(1) | ~rows.any(1)).all()
        assert int((~rows.all(1)).sum()) == round(0.3 * m.shape[0])
        norms = w[k].reshape(w[k].shape[0], -1).norm(dim=1)
        assert norms[~rows.all(1)].max() < norms[rows.all(1)].min()


def test_channel_equals_block_of_full_rows():
    w = _weights(4)
    a = magnitude_masks(w, 0.4, structure="channel")
    b = magnitude_masks(w, 0.4, structure="block", block=(1, -1))
    assert all(torch.equal(a[k], b[k]) for k in w)


# ---------------------------------------------------------------- N:M

@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_keeps_n_largest_of_every_m(n, m):
    g = torch.Generator().manual_seed(2)
    w = {"fc": torch.randn(6, 32, generator=g), "conv": torch.randn(4, 8, 2, 2, generator=g)}
    masks = magnitude_masks(w, None, structure="nm", nm=(n, m))
    for k, mask in masks.items():
        groups = mask.reshape(mask.shape[0], -1, m)
        assert (groups.sum(-1) == n).all()
        vals = w[k].abs().reshape(groups.shape)
        kept_min = torch.where(groups, vals, math.inf).min(-1).values
        pruned_max = torch.where(groups, -math.inf, vals).max(-1).values
        assert (pruned_max <= kept_min).all()
    assert density(masks) == n / m
    assert all(torch.equal(a, b) for a, b in zip(masks.values(),
                                                 magnitude_masks(w, 1 - n / m, structure="nm", nm=(n, m)).values()))


def test_nm_rejects_conflicts_and_bad_shapes():
    w = {"fc": torch.randn(4, 8)}
    with pytest.raises(ValueError, match="conflicts"):
        magnitude_masks(w, 0.3, structure="nm", nm=(2, 4))
    with pytest.raises(ValueError, match="multiple of 4"):
        magnitude_masks({"fc": torch.randn(4, 6)}, None, structure="nm")
    with pytest.raises(ValueError, match="0 < N <= M"):
        magnitude_masks(w, None, structure="nm", nm=(5, 4))


def test_magnitude_masks_validates_inputs():
    w = {"a": torch.randn(4, 4)}
    for bad in (1.0, -0.1, None, 1.5):
        with pytest.raises(ValueError, match="sparsity"):
            magnitude_masks(w, bad)
    with pytest.raises(ValueError, match="unknown structure"):
        magnitude_masks(w, 0.5, structure="diagonal")
    with pytest.raises(ValueError, match="unknown scope"):
        magnitude_masks(w, 0.5, scope="model")
    with pytest.raises(ValueError, match="shape"):
        magnitude_masks(w, 0.5, scores={"a": torch.randn(4, 5)})
    with pytest.raises(ValueError, match="different names"):
        magnitude_masks(w, 0.5, scores={"b": torch.randn(4, 4)})
    with pytest.raises(ValueError, match="block must be"):
        magnitude_masks(w, 0.5, structure="block", block=(0, 4))
    with pytest.raises(ValueError, match="2 or more dims"):
        magnitude_masks({"bias": torch.randn(4)}, 0.5, structure="channel")
    with pytest.raises(ValueError, match="non-empty"):
        magnitude_masks({}, 0.5)


# ---------------------------------------------------------------- statistics

def test_mask_distance_density_and_sparsity_on_constructed_masks():
    a = {"x": torch.ones(10, dtype=torch.bool), "y": torch.zeros(2, 3, dtype=torch.bool)}
    b = {"x": a["x"].clone(), "y": a["y"].clone()}
    assert mask_distance(a, b) == 0.0
    b["x"][:3] = False
    b["y"][1, 2] = True
    assert mask_distance(a, b) == mask_distance(b, a) == 4 / 16
    assert density(a) == 10 / 16
    assert per_tensor_sparsity(b) == {"x": 0.3, "y": 5 / 6}
    with pytest.raises(ValueError, match="shape"):
        mask_distance(a, {"x": a["x"], "y": torch.zeros(6, dtype=torch.bool)})
    with pytest.raises(ValueError, match="different names"):
        mask_distance(a, {"x": a["x"]})


# ---------------------------------------------------------------- prune and grow

def test_mest_keeps_counts_exactly_over_many_updates():
    g = torch.Generator().manual_seed(0)
    w = _weights(5)
    masks = magnitude_masks(w, 0.8, scope="layer")
    counts = {k: int(m.sum()) for k, m in masks.items()}
    for step in range(60):
        w = {k: t + 0.1 * torch.randn(t.shape, generator=g) for k, t in w.items()}
        fraction = update_fraction(step, 60, initial=0.5)
        new, grown = prune_and_grow(w, masks, fraction, generator=g)
        for k in w:
            assert int(new[k].sum()) == counts[k]
            assert int(grown[k].sum()) == round(fraction * counts[k])
            assert not (grown[k] & masks[k]).any()  # enough inactive positions: none just dropped comes back
            assert new[k][grown[k]].all()
        masks = new


def test_prune_drops_smallest_active_weights():
    w = {"a": torch.tensor([5.0, 0.1, 3.0, 0.2, 4.0, 9.0, 0.0, 0.0])}
    mask = {"a": torch.tensor([True, True, True, True, True, True, False, False])}
    new, grown = prune_and_grow(w, mask, 2 / 6)  # k = 2: drops 0.1 and 0.2, grows both inactive slots
    assert new["a"].tolist() == [True, False, True, False, True, True, True, True]
    assert grown["a"].tolist() == [False] * 6 + [True, True]


def test_mest_regrows_just_dropped_only_when_it_must():
    w = {"a": torch.arange(1.0, 11.0)}
    mask = {"a": torch.arange(10) != 9}  # 9 active, one inactive slot
    new, grown = prune_and_grow(w, mask, 4 / 9, generator=torch.Generator().manual_seed(0))  # k = 4
    assert int(new["a"].sum()) == 9 and int(grown["a"].sum()) == 4
    assert grown["a"][9]  # the slot inactive before the drop is always taken
    assert int(grown["a"][:4].sum()) == 3  # the rest come from the 4 just dropped (weights 1..4)


def test_mest_is_reproducible_with_a_generator():
    w, masks = _weights(), magnitude_masks(_weights(), 0.7)
    a = prune_and_grow(w, masks, 0.3, generator=torch.Generator().manual_seed(7))
    b = prune_and_grow(w, masks, 0.3, generator=torch.Generator().manual_seed(7))
    c = prune_and_grow(w, masks, 0.3, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(a[1][k], b[1][k]) for k in w)
    assert not all(torch.equal(a[1][k], c[1][k]) for k in w)


def test_rigl_grows_where_gradient_is_largest():
    w = {"a": torch.tensor([[1.0, 2.0, 0.0, 0.0], [3.0, 0.5, 0.0, 0.0]])}
    mask = {"a": w["a"] != 0}
    grads = {"a": torch.tensor([[9.0, 0.0, 0.1, 5.0], [0.0, 0.0, 7.0, 0.2]])}
    new, grown = prune_and_grow(w, mask, 0.5, method="rigl", grads=grads)  # k = 2: drops 0.5 and 1.0
    # Candidates: inactive after the drop, including the just-dropped (0,0), which has the largest gradient.
    assert grown["a"].tolist() == [[True, False, False, False], [False, False, True, False]]
    assert new["a"].tolist() == [[True, True, False, False], [True, False, True, False]]


def test_rigl_keeps_counts_exactly_and_follows_gradient():
    g = torch.Generator().manual_seed(1)
    w = _weights(6)
    masks = magnitude_masks(w, 0.9)
    counts = {k: int(m.sum()) for k, m in masks.items()}
    for step in range(40):
        grads = {k: torch.randn(t.shape, generator=g) for k, t in w.items()}
        new, grown = prune_and_grow(w, masks, update_fraction(step, 40), method="rigl", grads=grads)
        for k in w:
            assert int(new[k].sum()) == counts[k]
            candidates = ~(new[k] & ~grown[k])  # inactive once the drop was done
            not_grown = grads[k].abs()[candidates & ~grown[k]]
            if grown[k].any() and not_grown.numel():
                assert grads[k].abs()[grown[k]].min() >= not_grown.max()
        w = {k: torch.where(grown[k], 0.0, t + 0.05 * torch.randn(t.shape, generator=g)) for k, t in w.items()}
        masks = new


def test_prune_and_grow_validates_inputs():
    w, masks = {"a": torch.randn(3, 3)}, {"a": torch.ones(3, 3, dtype=torch.bool)}
    with pytest.raises(ValueError, match="grads"):
        prune_and_grow(w, masks, 0.1, method="rigl")
    with pytest.raises(ValueError, match="unknown method"):
        prune_and_grow(w, masks, 0.1, method="set")
    with pytest.raises(ValueError, match="fraction"):
        prune_and_grow(w, masks, 1.5)
    with pytest.raises(ValueError, match="bool"):
        prune_and_grow(w, {"a": torch.ones(3, 3)}, 0.1)
    with pytest.raises(ValueError, match="no entry"):
        prune_and_grow({}, masks, 0.1)
    with pytest.raises(ValueError, match="shape"):
        prune_and_grow(w, masks, 0.1, method="rigl", grads={"a": torch.randn(9)})


def test_update_fraction_schedules():
    assert update_fraction(0, 100) == pytest.approx(0.3)
    assert update_fraction(50, 100) == pytest.approx(0.15)
    assert update_fraction(25, 100, initial=0.4) == pytest.approx(0.2 * (1 + math.cos(math.pi / 4)))
    assert update_fraction(100, 100) == 0.0 and update_fraction(150, 100) == 0.0
    assert update_fraction(25, 100, initial=0.2, schedule="linear") == pytest.approx(0.15)
    assert update_fraction(99, 100, initial=0.2, schedule="constant") == 0.2
    assert update_fraction(100, 100, schedule="constant") == 0.0
    values = [update_fraction(s, 100) for s in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="unknown schedule"):
        update_fraction(0, 10, schedule="step")
    with pytest.raises(ValueError, match="total_steps"):
        update_fraction(0, 0)


# ---------------------------------------------------------------- early bird

def _flipped(k, n=100):
    """A mask of n entries whose first k are flipped: distance(_flipped(i), _flipped(j)) = |i - j| / n."""
    m = torch.ones(n, dtype=torch.bool)
    m[:k] = False
    return {"w": m.reshape(10, n // 10)}


def test_early_bird_settles_exactly_when_expected():
    eb = EarlyBird(fifo=3, threshold=0.1)
    flips = [0, 30, 60, 61, 62, 63]
    found = [eb.observe(_flipped(f)) for f in flips]
    assert found == [False, False, False, False, True, True]
    assert eb.found and eb.found_at == 5
    assert eb.last_distances == pytest.approx([0.02, 0.01])  # the newest (63) vs 61 and 62


def test_early_bird_threshold_is_strict():
    above = EarlyBird(fifo=2, threshold=0.1)
    assert not any(above.observe(_flipped(10 * i)) for i in range(8))  # distance exactly 0.1 each step
    assert above.last_distances == pytest.approx([0.1]) and above.found_at is None
    below = EarlyBird(fifo=2, threshold=0.1)
    assert [below.observe(_flipped(9 * i)) for i in range(3)] == [False, True, True]


def test_early_bird_waits_for_a_full_fifo_and_forgets_old_masks():
    eb = EarlyBird(fifo=4, threshold=0.05)
    assert [eb.observe(_flipped(0), step=s) for s in (10, 20, 30, 40)] == [False, False, False, True]
    assert eb.found_at == 40
    eb = EarlyBird(fifo=3, threshold=0.05)
    assert [eb.observe(_flipped(f)) for f in (50, 0, 0, 0)] == [False, False, False, True]
    assert len(eb.last_distances) == 2
    eb.observe(_flipped(90))
    assert eb.found and eb.found_at == 4  # sticky
    assert eb.last_distances == pytest.approx([0.9, 0.9])


def test_early_bird_on_structured_masks_from_converging_weights():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(32, 16, generator=g)
    eb = EarlyBird(fifo=4, threshold=0.1)
    for epoch in range(1, 40):
        w = {"w": target + torch.randn(32, 16, generator=g) * 2 / epoch}
        if eb.observe(magnitude_masks(w, 0.5, structure="channel"), step=epoch):
            break
    assert eb.found and 4 <= eb.found_at < 39


def test_early_bird_state_dict_resumes_exactly():
    flips = [0, 40, 20, 25, 27, 28, 29, 29]
    ref = EarlyBird(fifo=4, threshold=0.06)
    for f in flips[:3]:
        ref.observe(_flipped(f))
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    buf.seek(0)
    resumed = EarlyBird(fifo=4, threshold=0.06)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for f in flips[3:]:
        assert resumed.observe(_flipped(f)) == ref.observe(_flipped(f))
        assert resumed.last_distances == ref.last_distances
    assert resumed.found and resumed.found_at == ref.found_at == 7
    with pytest.raises(ValueError, match="fifo"):
        EarlyBird(fifo=2).load_state_dict(ref.state_dict())


def test_early_bird_validates_config():
    with pytest.raises(ValueError, match="fifo"):
        EarlyBird(fifo=1)
    with pytest.raises(ValueError, match="threshold"):
        EarlyBird(threshold=0)


def test_sparsity_package_imports_only_torch_and_the_standard_library():
    allowed = set(sys.stdlib_module_names) | {"torch"}
    for path in (Path(__file__).parents[1] / "frzcompile" / "sparsity").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, (path.name, roots)


def test_the_lowest_entries_by_sort_as_on_a_gpu_equal_the_kthvalue_route():
    """On CUDA the k lowest scores are taken by a stable sort (kthvalue is slow there); ties go to the lower index
    on both routes, so a mask does not depend on the device."""
    from frzcompile.sparsity.masks import _lowest

    for seed in range(3):
        scores = torch.randint(0, 5, (1000,), generator=torch.Generator().manual_seed(seed)).float()  # many ties
        for k in (1, 10, 333, 999, 1000):
            by_kth, by_sort = _lowest(scores, k, by_sort=False), _lowest(scores, k, by_sort=True)
            assert int(by_kth.sum()) == k and torch.equal(by_kth, by_sort), (seed, k)
