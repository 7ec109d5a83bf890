"""Whole-run validation of the SmartFRZ predictor (frzcompile.predictor.outcome) on a short real run."""
import math

import torch
from torch import nn

from frzcompile.predictor.collect import families
from frzcompile.predictor.outcome import compare


class Constant(nn.Module):
    """A predictor that always gives the same logit: +10 (converged) or -10 (not)."""

    def __init__(self, logit):
        super().__init__()
        self.logit = logit

    def forward(self, z, s):
        return torch.full((len(z),), float(self.logit))


def test_a_predictor_that_never_fires_leaves_the_run_identical_to_full_training():
    make = families(None)["mlp-digits"]
    r, = compare("mlp-digits", 0, make, {"never": Constant(-10)}, progress=False, steps=400)
    assert r["smartfrz"]["events"] == [] and r["smartfrz"]["frozen_at_end"] == []
    assert r["smartfrz"]["accuracy"] == r["full"]["accuracy"] > 0.8  # same weights, data order and steps
    assert r["flops_reduction"] == 1.0 and r["accuracy_points"] == 0.0


def test_a_predictor_that_always_fires_freezes_the_prefix_one_unit_per_decision_and_saves_flops(monkeypatch):
    from frzcompile.policies import SmartFRZ
    from frzcompile.predictor import outcome
    from frzcompile.safety import Safeguard
    # this recipe's loss is not half its start until late and keeps falling against itself to its end, which the
    # default rules hold against freezes: the older rules here (no min_drop of half, no look-back), where the point is what the harness records
    monkeypatch.setattr(outcome, "SmartFRZ", lambda predictor, **options: SmartFRZ(
        predictor=predictor, safeguard=Safeguard(min_drop=0.1, relative=math.inf), **options))
    make = families(None)["mlp-digits"]
    r, = compare("mlp-digits", 0, make, {"always": Constant(10)}, progress=False)  # 600 steps
    events = r["smartfrz"]["events"]
    assert events and all(len(frozen) == 1 and not thawed for _, frozen, thawed in events)
    assert events[0][0] >= 300  # the first judgement needs a full window of 30 snapshots, one every 10 steps
    assert r["smartfrz"]["frozen_at_end"] == r["smartfrz"]["units"][:len(events)]  # a prefix
    assert r["flops_reduction"] > 1.05
    assert 0.0 < r["smartfrz"]["accuracy"] <= 1.0


def test_the_command_needs_recorded_windows_only_for_held_out_predictors(monkeypatch, tmp_path, capsys):
    import sys

    import pytest

    from frzcompile.predictor import outcome
    monkeypatch.setattr(sys, "argv", ["outcome", "--predictors", "held-out", "--out", str(tmp_path / "o.json")])
    with pytest.raises(SystemExit, match="pass --runs"):
        outcome.main()
    ran = []
    monkeypatch.setattr(outcome, "compare", lambda family, seed, *a, **k: ran.append((family, seed)) or [])
    monkeypatch.setattr(sys, "argv", ["outcome", "--predictors", "shipped", "--seeds", "0,1",
                                      "--out", str(tmp_path / "o.json")])
    outcome.main()  # no --runs: every family's recipe, scored with the shipped predictor
    assert sorted({f for f, _ in ran}) == sorted(families(None)) and len(ran) == 2 * len(families(None))
