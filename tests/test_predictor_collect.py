"""The predictor's offline recording (frzcompile.predictor.collect): schedules, and one short source run end to end."""
import pytest
import torch

from frzcompile.predictor import WINDOW
from frzcompile.predictor.collect import DESCRIPTIONS, INTERVAL, SCHEDULES, families, record, schedule


def _rates(kind, steps=100):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    lr, out = schedule(opt, kind, steps), []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        lr.step()
    return out


def test_schedules_are_the_ones_users_run():
    assert set(_rates("constant")) == {1.0}
    cosine = _rates("cosine")
    assert cosine[0] == 1.0 and cosine[50] == pytest.approx(0.5) and cosine[-1] < 0.01
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))
    for kind in ("warmup-cosine", "warmup-linear"):
        r = _rates(kind)
        assert r[0] == pytest.approx(0.1) and r[9] == pytest.approx(1.0)  # 10% linear warm-up
        assert all(a <= b for a, b in zip(r[:10], r[1:10])) and all(a >= b for a, b in zip(r[9:], r[10:]))
        assert r[-1] < 0.05
    assert _rates("warmup-linear")[55] == pytest.approx(0.5, abs=0.01)
    assert set(SCHEDULES) == {"constant", "cosine", "warmup-cosine", "warmup-linear"}
    with pytest.raises(ValueError, match="choose from"):
        schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), "step", 10)


def test_a_short_source_run_records_labelled_windows_under_its_schedule():
    make = families(None)["mlp-digits-adamw-cosine"]
    steps = INTERVAL * (WINDOW + 2)
    run = record("mlp-digits-adamw-cosine", 0, make, progress=False, steps=steps)
    assert run["schedule"] == "cosine" and run["optimizer"] == "AdamW" and run["steps"] == steps
    rates = run["lr"]  # the schedule drove the optimizer: full rate at the start, near zero at the end
    assert rates[0] == 1e-3 and rates[len(rates) // 2] == pytest.approx(5e-4, rel=0.05) and rates[-1] < 1e-5
    snapshots = steps // INTERVAL + 1
    per_unit = snapshots - WINDOW + 1
    assert len(run["label"]) == per_unit * len(run["cka"]) and len(run["cka"]) >= 3
    assert run["z"].shape[0] == len(run["label"]) == len(run["where"])
    assert all(len(cka) == snapshots for cka in run["cka"].values())


def test_the_first_five_recipes_are_version_ones():
    """The shipped predictor (version 1) was trained on these recipes: constant rate, their optimizers, sizes."""
    makers = families(None)
    for name in ("mlp-digits", "cnn-digits"):
        recipe = makers[name](0)
        opt = recipe.make_opt(recipe.model.parameters())
        assert (recipe.schedule, recipe.batch, recipe.steps) == ("constant", 32, 600)
        assert isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == 0.05
        assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 5e-4
    assert list(families(None))[:5] == ["mlp-digits", "cnn-digits", "resnet-fashion", "transformer-sst2",
                                        "minilm-sst2"]


def test_every_family_is_described_for_the_model_card():
    assert set(DESCRIPTIONS) == set(families(None))
