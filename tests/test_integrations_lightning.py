"""The Lightning callback: freezing by policy inside an unchanged LightningModule equals freezing by hand, the
freeze state travels in Lightning checkpoints, and a module that training_step never calls is reported."""
import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

import frzcompile  # noqa: E402
from frzcompile.integrations.lightning import FreezeCallback  # noqa: E402


class Schedule(frzcompile.Policy):
    name = "schedule"

    def decide(self, view):
        return {3: set(view.units[:2]), 6: set(view.units[:3])}.get(view.step)


class Classifier(pl.LightningModule):
    def __init__(self, call_self=True):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(4)], nn.Linear(16, 3))
        self.call_self = call_self

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x) if self.call_self else self.model(x)
        return nn.functional.cross_entropy(out, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class FreezeByHand(pl.Callback):
    """BaseFinetuning's way, by hand: requires_grad=False and no optimizer state after the planned steps."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        count = {3: 2, 6: 3}.get(trainer.global_step)
        if count is None:
            return
        opt = trainer.optimizers[0]
        for block in pl_module.model[:count]:
            for p in block.parameters():
                p.requires_grad_(False)
                p.grad = None
                opt.state.pop(p, None)


def loader():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(80, 16, generator=g), torch.randint(0, 3, (80,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True,
                                       generator=torch.Generator().manual_seed(1))


def fit(module, callback, max_steps=10, **kwargs):
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback], **kwargs)
    trainer.fit(module, loader())
    return trainer


@pytest.mark.parametrize("module_path", [None, "model"])
def test_callback_equals_freezing_by_hand(tmp_path, module_path):
    by_hand = Classifier()
    fit(by_hand, FreezeByHand(), enable_checkpointing=False)
    cb = FreezeCallback(policy=Schedule(), module=module_path)
    ours = Classifier(call_self=module_path is None)
    fit(ours, cb, enable_checkpointing=False)
    assert cb.fm.frozen == (("0", "1", "2") if module_path else ("model.0", "model.1", "model.2"))
    assert [step for step, *_ in cb.fm.plan.changes] == [3, 6]
    for (k, a), b in zip(by_hand.state_dict().items(), ours.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=k)
    assert "forward" not in cb.fm.model.__dict__


def test_checkpoint_restores_the_plan(tmp_path):
    cb = FreezeCallback(policy="linear", module="model")
    full = Classifier(call_self=False)
    trainer = pl.Trainer(max_steps=10, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb], default_root_dir=tmp_path,
                         enable_checkpointing=False)
    trainer.fit(full, loader())
    assert len(cb.fm.frozen) >= 2
    # the same run, stopped at step 6 with a checkpoint, then resumed in a fresh trainer, callback and module
    half = Classifier(call_self=False)
    first = FreezeCallback(policy="linear", module="model", total_steps=10)
    t1 = pl.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                    enable_model_summary=False, callbacks=[first], enable_checkpointing=False)
    t1.fit(half, loader())
    t1.save_checkpoint(tmp_path / "half.ckpt")
    resumed_cb = FreezeCallback(policy="linear", module="model", total_steps=10)
    resumed = Classifier(call_self=False)
    t2 = pl.Trainer(max_steps=10, accelerator="cpu", logger=False, enable_progress_bar=False,
                    enable_model_summary=False, callbacks=[resumed_cb], enable_checkpointing=False)
    t2.fit(resumed, loader(), ckpt_path=tmp_path / "half.ckpt")
    assert resumed_cb.fm.step_count == 10 and resumed_cb.fm.frozen == cb.fm.frozen


def test_resuming_a_checkpoint_without_the_freeze_state_warns(tmp_path):
    """A checkpoint saved without the callback (optimizer state, no freeze state): the policy starts over, and
    says so, though under automatic optimization fm is made inside the first step, after that step's hooks."""
    plain = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                       enable_model_summary=False, enable_checkpointing=False)
    plain.fit(Classifier(call_self=False), loader())
    plain.save_checkpoint(tmp_path / "plain.ckpt")
    cb = FreezeCallback(policy="linear", module="model", total_steps=10)
    trainer = pl.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb], enable_checkpointing=False)
    with pytest.warns(frzcompile.ResumeWarning, match="load_freeze_state_dict") as seen:
        trainer.fit(Classifier(call_self=False), loader(), ckpt_path=tmp_path / "plain.ckpt")
    said = [w for w in seen if issubclass(w.category, frzcompile.ResumeWarning)]
    assert len(said) == 1 and said[0].filename == __file__  # the training_step's call of the model


def test_a_module_never_called_is_reported():
    cb = FreezeCallback(policy="linear")  # the LightningModule, but training_step calls self.model
    with pytest.raises(frzcompile.ConfigError, match="module='model'"):
        fit(Classifier(call_self=False), cb, enable_checkpointing=False)


def test_compile_option_is_refused_when_the_callback_is_made():
    """compile= passed the option check, then the first training batch raised (attach() does not combine with
    compile=); it is refused up front, saying how to compile the module instead."""
    with pytest.raises(frzcompile.ConfigError, match="torch.compile the module"):
        FreezeCallback(policy="linear", module="model", compile=True)


def test_the_training_step_loss_reaches_the_policy():
    cb = FreezeCallback(module="model")  # SmartFRZ, whose safety rules read the loss
    module = Classifier(call_self=False)
    fit(module, cb, max_steps=6, enable_checkpointing=False)
    losses = cb.fm.losses()
    assert len(losses) == 6 and cb.fm._loss.kind == "observed"
    assert 0.5 < losses[0] < 3.0  # a cross-entropy over 3 classes, not the gradient proxy


class TwoOptimizers(Classifier):
    """Manual optimization, the body and the head each with its optimizer, both stepped after one backward:
    Lightning's global_step counts two per batch, frzcompile one."""

    def __init__(self):
        super().__init__(call_self=False)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.model(x), y)
        body, head = self.optimizers()
        self.manual_backward(loss)
        body.step()
        head.step()
        body.zero_grad()
        head.zero_grad()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.model[:4].parameters(), lr=0.1), torch.optim.SGD(self.model[4].parameters(), lr=0.1)]


def test_the_default_total_steps_is_in_frzcompiles_steps_under_manual_optimization():
    """The callback's default total_steps (the estimated stepping batches: 16 optimizer steps for 8 batches) was
    twice frzcompile's count, so a linear ramp from half-way froze nothing; it is converted after the first
    batch, and the ramp ends as it does under automatic optimization."""
    cb = FreezeCallback(policy="linear", module="model")
    trainer = fit(TwoOptimizers(), cb, max_steps=16, enable_checkpointing=False)
    assert trainer.global_step == 16 and cb.fm.step_count == 8 and cb.fm.total_steps == 8
    auto = FreezeCallback(policy="linear", module="model")
    fit(Classifier(call_self=False), auto, max_steps=8, enable_checkpointing=False)
    assert cb.fm.frozen == auto.fm.frozen and len(cb.fm.frozen) == 4  # all but the head
    # bounded by epochs, the estimate counts batches, which are frzcompile's steps already: left as it is
    by_epochs = FreezeCallback(policy="linear", module="model")
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[by_epochs])
    trainer.fit(TwoOptimizers(), loader())
    assert by_epochs.fm.step_count == by_epochs.fm.total_steps == 20 and trainer.global_step == 40


class FreezeFirstGeneratorBlock(frzcompile.Policy):
    name = "first generator block"
    reads_loss = False

    def decide(self, view):
        return {"0"} if view.step >= 1 else None  # (from the end of the first iteration)


class GAN(pl.LightningModule):
    """Lightning's GAN example: manual optimization, each player's step inside toggle_optimizer, which sets
    requires_grad=False on every parameter its optimizer does not hold until untoggle_optimizer."""

    def __init__(self, by_hand=False):
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.generator = nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.ReLU()),
                                       nn.Sequential(nn.Linear(16, 16), nn.ReLU()), nn.Linear(16, 4))
        self.discriminator = nn.Sequential(nn.Sequential(nn.Linear(4, 16), nn.ReLU()), nn.Linear(16, 1))
        self.by_hand = by_hand

    def training_step(self, batch, batch_idx):
        (x,) = batch
        opt_g, opt_d = self.optimizers()
        z, bce = torch.randn(len(x), 8), nn.functional.binary_cross_entropy_with_logits
        ones, zeros = torch.ones(len(x), 1), torch.zeros(len(x), 1)
        self.toggle_optimizer(opt_d)  # (the generator's first call under the toggle: where a plan was applied)
        loss = bce(self.discriminator(x), ones) + bce(self.discriminator(self.generator(z).detach()), zeros)
        opt_d.zero_grad()
        self.manual_backward(loss)
        opt_d.step()
        self.untoggle_optimizer(opt_d)
        self.toggle_optimizer(opt_g)
        loss = bce(self.discriminator(self.generator(z)), ones)
        opt_g.zero_grad()
        self.manual_backward(loss)
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        if self.by_hand and batch_idx == 0:  # between iterations, as the policy decides at the second step
            for p in self.generator[0].parameters():
                p.requires_grad_(False)
                p.grad = None
                opt_g.optimizer.state.pop(p, None)

    def configure_optimizers(self):
        return [torch.optim.Adam(self.generator.parameters(), 1e-2),
                torch.optim.Adam(self.discriminator.parameters(), 1e-2)]


def test_a_gan_under_toggle_optimizer_equals_freezing_by_hand():
    """The plan decided at an optimizer step was applied at the next call, inside toggle_optimizer(opt_d): it read
    Lightning's temporary requires_grad=False as the generator's own flags, so it refused the plan ("leaves nothing
    to train"), or the block it froze trained again after untoggle_optimizer (0.05 off freezing by hand). Under
    manual optimization the callback applies plans at the end of each batch. The callback also gave frzcompile
    both players' optimizers, and optimize() refused the discriminator's as holding none of the generator's."""
    def run(module, callbacks):
        torch.manual_seed(1)
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(48, 4)), batch_size=8)
        pl.Trainer(max_steps=12, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                   enable_model_summary=False, callbacks=callbacks).fit(module, data)
        return module

    by_hand = run(GAN(by_hand=True), [])
    cb = FreezeCallback(policy=FreezeFirstGeneratorBlock(), module="generator")
    ours = run(GAN(), [cb])
    assert cb.fm.frozen == ("0",) and not ours.generator[0][0].weight.requires_grad
    for (k, a), b in zip(by_hand.state_dict().items(), ours.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=k)


def test_a_resumed_manual_optimization_run_converts_its_total_steps_before_its_first_decision(tmp_path):
    """Under manual optimization with two optimizers the default total_steps is converted to frzcompile's count
    after the first batch; a run resumed from a checkpoint made its first decision before that (a linear ramp's
    freeze one step off, weights 3e-3 off the uninterrupted run). The conversion's ratio is in the checkpoint."""
    def in_order():  # (a resumed epoch draws its shuffle afresh)
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(72, 16, generator=g), torch.randint(0, 3, (72,), generator=g))
        return torch.utils.data.DataLoader(data, batch_size=8)

    cb, full = FreezeCallback(policy="linear", module="model"), TwoOptimizers()
    pl.Trainer(max_steps=32, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
               callbacks=[cb], enable_checkpointing=False).fit(full, in_order())
    first = FreezeCallback(policy="linear", module="model")
    t1 = pl.Trainer(max_steps=32, accelerator="cpu", logger=False, enable_progress_bar=False,
                    enable_model_summary=False,
                    callbacks=[first, pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=18,
                                                                   save_top_k=-1)])
    t1.fit(TwoOptimizers(), in_order())
    resumed_cb, resumed = FreezeCallback(policy="linear", module="model"), TwoOptimizers()
    t2 = pl.Trainer(max_steps=32, accelerator="cpu", logger=False, enable_progress_bar=False,
                    enable_model_summary=False, callbacks=[resumed_cb], enable_checkpointing=False)
    t2.fit(resumed, in_order(), ckpt_path=next(tmp_path.glob("*.ckpt")))
    assert resumed_cb.fm.total_steps == cb.fm.total_steps == 16
    # (9 batches an epoch: the checkpoint at the end of the first, iteration 9, just before the ramp's first freeze)
    assert [c[:2] for c in resumed_cb.fm.plan.changes if c[0] > 9] == [c[:2] for c in cb.fm.plan.changes]
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_a_callback_used_again_for_another_module_measures_its_step_ratio_anew():
    """The ratio of Lightning's steps to frzcompile's (two optimizers: 2 to 1) is kept for a resume; a callback used
    again to fit another module (one optimizer) must not convert that module's total_steps with it."""
    cb = FreezeCallback(policy="linear", module="model")
    fit(TwoOptimizers(), cb, max_steps=16, enable_checkpointing=False)
    assert cb.fm.total_steps == 8
    fit(Classifier(call_self=False), cb, max_steps=8, enable_checkpointing=False)
    assert cb.fm.total_steps == 8 and cb.fm.step_count == 8
