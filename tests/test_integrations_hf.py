"""The Hugging Face Trainer callback: an unchanged Trainer run freezes by policy, equals freezing by hand, saves and
restores the freeze state with Trainer checkpoints, and can use the activation cache."""
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import frzcompile  # noqa: E402
from frzcompile.integrations.hf import STATE_FILE, FreezeCallback  # noqa: E402


class Schedule(frzcompile.Policy):
    """Freezes the given units after the given steps (step -> the whole frozen set)."""

    name = "schedule"

    def __init__(self, plan):
        self.plan = plan

    def decide(self, view):
        return self.plan.get(view.step)


PLAN = {3: {"bert.embeddings", "bert.encoder.layer.0"},
        6: {"bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1"}}


class FreezeByHand(TrainerCallback):
    """What a user would write: after the optimizer step of step s, requires_grad=False, no gradient and no
    optimizer state for the parameters of the planned units."""

    def __init__(self, plan):
        self.plan = plan

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        units = self.plan.get(state.global_step)
        if units is None:
            return
        inner = getattr(optimizer, "optimizer", optimizer)
        for name, p in model.named_parameters():
            if any(name.startswith(u + ".") for u in units):
                p.requires_grad_(False)
                p.grad = None
                inner.state.pop(p, None)


def data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 10, (1,), generator=g))
        out.append({"input_ids": torch.randint(1, 100, (length,), generator=g),
                    "labels": int(torch.randint(0, 3, (1,), generator=g))})
    return out


def collate(batch):  # dynamic padding, as DataCollatorWithPadding does
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.zeros(len(batch), n, dtype=torch.long)
    mask = torch.zeros(len(batch), n, dtype=torch.long)
    for i, b in enumerate(batch):
        ids[i, :len(b["input_ids"])] = b["input_ids"]
        mask[i, :len(b["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([b["labels"] for b in batch])}


def model():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                     num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def run(tmp_path, callback, max_steps=10, resume=None, the_model=None, **args):
    m = the_model if the_model is not None else model()
    targs = TrainingArguments(str(tmp_path), max_steps=max_steps, per_device_train_batch_size=8, report_to=[],
                              use_cpu=True, seed=0, disable_tqdm=True, logging_steps=5, save_strategy="steps",
                              save_steps=5, **args)
    trainer = Trainer(model=m, args=targs, train_dataset=data(), data_collator=collate, callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def weights(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("cache", [False, True])
def test_callback_equals_freezing_by_hand(tmp_path, cache):
    by_hand = run(tmp_path / "hand", FreezeByHand(PLAN), gradient_accumulation_steps=2)
    # check_cost=False: whether the tiny model's cache pays is timed, and this test is about the numbers
    cb = FreezeCallback(policy=Schedule(PLAN), cache=frzcompile.CacheConfig(check_cost=False) if cache else False)
    ours = run(tmp_path / "ours", cb, gradient_accumulation_steps=2)
    assert cb.fm is not None and cb.fm.frozen == ("bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1")
    assert [step for step, *_ in cb.fm.plan.changes] == [3, 6]
    # the frozen unit count is in the Trainer's log history (logged at steps 5 and 10)
    assert [h.get("frozen_units") for h in ours.state.log_history if "loss" in h] == [2, 3]
    a, b = weights(by_hand.model), weights(ours.model)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    # the frozen weights did not move after their freeze, and the unfrozen ones did
    assert not ours.model.bert.encoder.layer[1].attention.self.query.weight.requires_grad
    assert ours.model.bert.encoder.layer[2].attention.self.query.weight.requires_grad
    assert "forward" not in ours.model.__dict__  # detached at the end of training: a plain model again
    if cache:
        report = cb.fm.cache.report()
        assert report["enabled"] and report["stored"] > 0


def test_resume_from_checkpoint_restores_the_plan(tmp_path):
    full_cb = FreezeCallback(policy="linear")
    full = run(tmp_path, full_cb)
    assert os.path.isfile(tmp_path / "checkpoint-5" / STATE_FILE)
    assert len(full_cb.fm.frozen) >= 2 and full_cb.fm.total_steps == 10
    resumed_cb = FreezeCallback(policy="linear")
    resumed = run(tmp_path, resumed_cb, resume=str(tmp_path / "checkpoint-5"))
    assert resumed_cb.fm.step_count == 10 and resumed_cb.fm.frozen == full_cb.fm.frozen
    a, b = weights(full.model), weights(resumed.model)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    # a checkpoint moved out of output_dir: the Trainer does not say where it resumed from, resume_from= does
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "checkpoint-5", moved)
    shutil.rmtree(tmp_path / "checkpoint-5")
    moved_cb = FreezeCallback(policy="linear", resume_from=str(moved))
    run(tmp_path / "again", moved_cb, resume=str(moved))
    assert moved_cb.fm.frozen == full_cb.fm.frozen


def test_alast_resumed_through_the_callback_equals_the_run_uninterrupted(tmp_path):
    """The callback's first training call (which runs optimize()) runs through the FrozenModule: under ALaST it
    drops tokens and moves the budgets like every other step, so a resumed run has no extra full-token step."""
    def callback():
        return FreezeCallback(policy=frzcompile.ALaST(k=2, temperature=2.0))

    full_cb = callback()
    full = run(tmp_path, full_cb)
    assert len(full_cb.fm.policy.log) == 10 and full_cb.fm.policy.log[0][2][1] < 1  # step 1 kept part of the tokens
    resumed_cb = callback()
    resumed = run(tmp_path, resumed_cb, resume=str(tmp_path / "checkpoint-5"))
    assert resumed_cb.fm.step_count == 10
    assert resumed_cb.fm.policy.log == full_cb.fm.policy.log
    a, b = weights(full.model), weights(resumed.model)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    # the safety rules read the loss of every step, the first call's (and a resumed run's first) included
    smart_cb = FreezeCallback(policy="smartfrz")
    run(tmp_path / "smart", smart_cb)
    resumed_smart_cb = FreezeCallback(policy="smartfrz")
    run(tmp_path / "smart", resumed_smart_cb, resume=str(tmp_path / "smart" / "checkpoint-5"))
    assert None not in list(smart_cb.fm.losses())
    assert list(resumed_smart_cb.fm.losses()) == list(smart_cb.fm.losses())


def test_unknown_option_is_refused():
    with pytest.raises(frzcompile.ConfigError, match="optimize"):
        FreezeCallback(polcy="linear")


@pytest.mark.parametrize("value", [True, frzcompile.CompileConfig(inner="aot_eager")])
def test_compile_option_is_refused_when_the_callback_is_made(value):
    """compile= passed the option check, then the first training step raised inside the loop (attach() does not
    combine with compile=); it is refused up front, saying how the loop compiles the model."""
    with pytest.raises(frzcompile.ConfigError, match="torch_compile=True"):
        FreezeCallback(policy="linear", compile=value)
    FreezeCallback(policy="linear", compile=False)  # (what the option means by default)


def test_trainer_takes_fm_itself(tmp_path):
    """Without the callback, fm itself as the Trainer's model: column pruning reads the model's signature, any
    batch (labels or not, another length) is accepted, and the Trainer's steps drive the policy."""
    m = model()
    fm = frzcompile.optimize(m, example_kwargs=collate(data()[:4]), policy="linear", total_steps=8)
    targs = TrainingArguments(str(tmp_path), max_steps=8, per_device_train_batch_size=8, report_to=[], use_cpu=True,
                              save_strategy="no", disable_tqdm=True)
    Trainer(model=fm, args=targs, train_dataset=data(), data_collator=collate).train()
    assert fm.step_count == 8 and len(fm.frozen) >= 3


def test_a_run_that_failed_leaves_no_trap(tmp_path):
    """A Trainer run that raised never reached on_train_end: the model is still attached. A new run with a new
    callback takes over (with a warning) instead of failing."""
    m = model()
    first = FreezeCallback(policy="linear")

    def broken(batch):
        out = collate(batch)
        if broken.calls == 2:
            raise RuntimeError("a bad batch")
        broken.calls += 1
        return out

    broken.calls = 0
    targs = TrainingArguments(str(tmp_path), max_steps=6, per_device_train_batch_size=8, report_to=[], use_cpu=True,
                              save_strategy="no", disable_tqdm=True)
    with pytest.raises(RuntimeError, match="a bad batch"):
        Trainer(model=m, args=targs, train_dataset=data(), data_collator=broken, callbacks=[first]).train()
    assert first.fm is not None and first.fm.attached
    second = FreezeCallback(policy="linear")
    with pytest.warns(UserWarning, match="still attached"):
        Trainer(model=m, args=targs, train_dataset=data(), data_collator=collate, callbacks=[second]).train()
    assert not first.fm.attached and second.fm.step_count == 6


def test_the_callback_under_the_trainers_torch_compile(tmp_path):
    """Trainer(torch_compile=True) compiles the model, and Dynamo traced the callback's first-call hook: optimize()
    ran inside the trace and failed ("'FrozenModule' object has no attribute '_model'"). It runs outside now."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
            self.head = torch.nn.Linear(16, 3)

        def forward(self, x, labels=None):
            logits = self.head(torch.relu(self.body(x)))
            return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}

    g = torch.Generator().manual_seed(0)
    rows = [{"x": torch.randn(8, generator=g), "labels": torch.tensor(i % 3)} for i in range(16)]
    losses = []
    for callbacks in ([], [FreezeCallback(policy="manual")]):
        torch.manual_seed(0)
        args = TrainingArguments(str(tmp_path / str(len(callbacks))), max_steps=2, per_device_train_batch_size=4,
                                 use_cpu=True, report_to=[], save_strategy="no", torch_compile=True,
                                 torch_compile_backend="aot_eager", disable_tqdm=True)
        trainer = Trainer(model=Net(), args=args, train_dataset=rows, callbacks=callbacks)
        losses.append(trainer.train().training_loss)
    assert callbacks[0].fm is not None and losses[0] == losses[1]

    class BodyAfterOneStep(frzcompile.Policy):
        reads_loss = False

        def decide(self, view):
            return {"body"} if view.step >= 1 else None

    class Weights(TrainerCallback):
        def __init__(self, model):
            self.model, self.seen = model, []

        def on_step_end(self, args, state, control, **kwargs):
            self.seen.append((self.model.body[0].weight.detach().clone(), self.model.head.weight.detach().clone()))

    torch.manual_seed(0)
    model = Net()
    watch = Weights(model)
    args = TrainingArguments(str(tmp_path / "freeze"), max_steps=4, per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], save_strategy="no", torch_compile=True, torch_compile_backend="aot_eager",
                             disable_tqdm=True)
    cb = FreezeCallback(policy=BodyAfterOneStep())
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[cb, watch]).train()
    assert cb.fm.frozen == ("body",) and len(watch.seen) == 4  # the compiled model runs the plan: the body stays
    assert all(torch.equal(body, watch.seen[0][0]) for body, _ in watch.seen[1:])
    assert not torch.equal(watch.seen[-1][1], watch.seen[0][1])  # (the head trains on)
