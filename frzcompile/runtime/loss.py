"""The training loss, one value per training step, for the policies' safety rules (frzcompile/safety.py).

Where it comes from, per step (the first that is there):
  1. `fm.observe_loss(loss)`: the loss your loop computed (the Lightning callback passes the training_step's);
  2. the loss the model returns (a Hugging Face output's `.loss` when labels are given, a dict's "loss");
  3. otherwise a proxy that needs nothing from the loop: the root-mean-square, per output row, of the gradient
     reaching the model's output (tensor hooks on its first few floating tensors; the first of them that gets a
     gradient counts). For cross-entropy with mean reduction that is the RMS
     of softmax(output) - one_hot(label), for a squared error it is proportional to the RMS error: it falls as
     the loss falls. (With a float16 GradScaler its scale moves it: give the loss with observe_loss.) Gradients
     taken with create_graph=True are left out: a gradient penalty's `autograd.grad(out.sum(), x)` is no loss.
Values on a GPU stay tensors until a policy reads them (`floats()`), so it is synchronised once per read, not per
step; on the CPU they are read at the end of each step.
"""
from __future__ import annotations

import math
import weakref

import torch

from ..safety import LossHistory
from ..torch_private import host_floats, traced_or_transformed, tree_flatten

KINDS = ("observed", "returned", "output gradient")
DESCRIPTIONS = {"observed": "the loss given to fm.observe_loss",
                "returned": "the loss the model returns",
                "output gradient": "a proxy: RMS per output row of the gradient reaching the model's output "
                                   "(fm.observe_loss(loss) gives the loss itself)",
                None: "none seen yet"}


def _is_scalar(t) -> bool:
    return isinstance(t, torch.Tensor) and t.numel() == 1 and t.is_floating_point()


def _returned_loss(out):
    """The loss in a model's output: `.loss` / ["loss"], the output itself when it is a scalar, or the scalar
    first element of a tuple (Hugging Face with return_dict=False)."""
    if _is_scalar(out):
        return out
    if isinstance(out, (tuple, list)) and out and _is_scalar(out[0]):
        return out[0]
    loss = getattr(out, "loss", None) if not isinstance(out, dict) else out.get("loss")
    return loss if _is_scalar(loss) else None


MAX_HOOKED = 4  # output tensors watched per call
MAX_READINGS = 256  # readings kept per step and source (accumulation over more micro-batches: the first 256;
# a loop whose steps are never counted, no torch optimizer and no fm.step(), kept one per call for good)


def _norm(grad):
    """The gradient's norm as a float32 scalar: accumulated in float32 for half precisions (a GradScaler's
    scaled gradients overflow float16), in the gradient's own dtype when it is wider (float64)."""
    if grad.dtype.itemsize < 4:
        return torch.linalg.vector_norm(grad, dtype=torch.float32)
    return torch.linalg.vector_norm(grad).float()


def _outputs(out) -> list:
    """The floating tensors of the output that need grad (logits, hidden states), the first MAX_HOOKED."""
    found = [t for t in tree_flatten(out)[0]
             if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad and t.numel() > 1]
    return found[:MAX_HOOKED]


def _finite_mean(readings):
    """The mean of a step's readings (gradient accumulation), over the finite ones when there are any: an
    iteration whose step was skipped for a non-finite loss (a GradScaler, `if torch.isfinite(loss)`) leaves its
    reading with the next step's. On the device: no synchronisation."""
    values = torch.stack([r.to(readings[0].device) for r in readings])
    finite = torch.isfinite(values)
    return torch.where(finite.any(), torch.where(finite, values, 0.0).sum() / finite.sum().clamp_min(1),
                       values.mean())


class LossSignal:
    def __init__(self):
        self._step = {kind: [] for kind in KINDS}   # this step's readings, by source
        self._gradients: list = []                  # (output position, reading) of this step's output gradients
        self._values = LossHistory()                # per finished step: a float or None (tensors until read)
        self._unread = 0                            # values from this index on may still be tensors
        self._on_device = 0                         # how many of them are (readings on a GPU, read in one copy)
        self.kind = None                            # the source of the last step's value
        self.enabled = True                         # False: nothing is read (no policy uses the loss)

    def observe_output(self, out) -> None:
        """A training call returned `out`: keep its loss, or hook its main output's gradient."""
        if torch.compiler.is_compiling():  # torch.compile(fm): read the real output, between Dynamo's graphs
            return torch.compiler.disable(self._observe_output)(out)  # (not at import: it imports Dynamo)
        return self._observe_output(out)

    def _observe_output(self, out) -> None:
        if not self.enabled or self.kind == "observed":  # only observe_loss's values are read from now on
            return
        loss = _returned_loss(out)
        if loss is not None:
            if not traced_or_transformed(loss):  # (torch.export, torch.func's vmap/grad: no step's loss)
                if len(self._step["returned"]) < MAX_READINGS:
                    self._step["returned"].append(loss.detach().float().mean())  # a copy: the caller may change it
            return
        if self.kind == "returned":  # the proxy is no longer read: no hooks
            return
        outputs = _outputs(out)
        if outputs and traced_or_transformed(outputs[0]):
            return
        me = weakref.ref(self)
        for position, t in enumerate(outputs):  # the first of them that gets a gradient counts
            rows = t.numel() // t.shape[-1] if t.dim() >= 2 else t.numel()

            def hook(grad, position=position, scale=math.sqrt(max(rows, 1))):
                signal = me()
                # (traced: a batched backward, a jacobian; grad mode on: a backward with create_graph=True, the
                # gradient of a gradient penalty's `autograd.grad(out.sum(), x)`, whose all-ones is no loss)
                if signal is not None and not torch.is_grad_enabled() and not traced_or_transformed(grad) and \
                        len(signal._gradients) < MAX_READINGS:
                    signal._gradients.append((position, _norm(grad.detach()) * scale))

            t.register_hook(hook)

    def observe_loss(self, loss) -> None:
        if not self.enabled:
            return
        value = loss.detach().float().mean() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        if len(self._step["observed"]) < MAX_READINGS:
            self._step["observed"].append(value)

    def end_step(self) -> None:
        if self._gradients:
            first = min(position for position, _ in self._gradients)
            self._step["output gradient"] = [r for position, r in self._gradients if position == first]
            self._gradients = []
        # once a better source was seen it is the only one read: a series never mixes a loss and the proxy
        best = KINDS.index(self.kind) if self.kind is not None else len(KINDS)
        for kind in KINDS[:best + 1]:
            readings = self._step[kind]
            if readings:
                value = readings[0] if len(readings) == 1 else _finite_mean(readings)
                if value.device.type == "cpu":  # (read now: there is no device to wait for, and `floats` has
                    value = value.item()        # nothing to copy at the next decision)
                else:
                    self._on_device += 1
                self._values.append(value)
                self.kind = kind
                break
        else:
            self._values.append(None)
        self._step = {kind: [] for kind in KINDS}

    def floats(self) -> LossHistory:
        """One value per training step so far (None where none was seen; the steps between the first thousand
        and the last few thousand are not kept: see LossHistory). The history itself, not a copy: read it, do not
        change it (a policy reads it every few steps over runs of any length)."""
        values = self._values
        if self._on_device:
            pending = [i for i in values.kept(self._unread, len(values), from_end=True)  # (the new steps alone)
                       if isinstance(values[i], torch.Tensor)][::-1]
            for i, v in zip(pending, host_floats([values[i] for i in pending])):
                values[i] = v
            self._on_device = 0
        self._unread = len(values)
        return values

    def state_dict(self) -> dict:
        return {"history": self.floats().state_dict(), "kind": self.kind}

    def load_state_dict(self, state: dict) -> None:
        self._values = LossHistory.from_state(state["history"] if "history" in state else state["values"])
        self._unread = self._on_device = 0
        self.kind = state["kind"]
