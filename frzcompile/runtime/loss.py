"""The training loss, one value per training step, for the policies' safety rules (frzcompile/safety.py).

Where it comes from, per step (the first that is there):
  1. `fm.observe_loss(loss)`: the loss your loop computed (the Lightning callback passes the training_step's);
  2. the loss the model returns (a Hugging Face output's `.loss` when labels are given, a dict's "loss");
  3. otherwise, from the gradient reaching the model's output (tensor hooks on its first few floating tensors; the
     first of them that gets a gradient counts), which needs nothing from the loop:
     a. the cross-entropy itself, when that gradient is a cross-entropy's: for `F.cross_entropy(logits, labels)`
        (mean or sum, `ignore_index` rows included) the gradient of each row of logits is
        (softmax(row) - one_hot(label)) / n, so the label is the row's one negative entry and n the same for every
        row; where that holds for every reading (checked within the gradient's precision), the mean over rows of
        -log softmax(row)[label] is the loss, exactly (a sum's mean per row; a GradScaler's scale, a constant n,
        cancels). Rows with no gradient at all are left out (ignore_index; also a row so confident that every
        entry of its gradient rounds to 0). A loss of p_label alone (a focal loss) has gradients of that form
        row by row, with n differing between rows: it is told apart on batches of two or more. The readings
        are kept (outputs of up to CE_MAX_CLASSES classes; of a larger batch, every k-th row up to
        CE_MAX_ELEMENTS values: the mean over those rows) and worked out together when a policy reads the loss,
        a few operations per read rather than per step;
     b. else a proxy: the root-mean-square, per output row, of that gradient. For cross-entropy with label
        smoothing or class weights it is about the RMS of softmax(output) - target, for a squared error it is
        proportional to the RMS error: it falls as the loss falls, but near zero the hardest samples lead it (on
        a run that had fit its data it read 1% of its start where the loss read 0.3%). With a float16
        GradScaler its scale moves it: give the loss with observe_loss.
     Both series are kept from the first step and never mixed: the cross-entropy is read while every reading so
     far was one, the proxy from the first that was not. Gradients taken with create_graph=True are left out: a
     gradient penalty's `autograd.grad(out.sum(), x)` is no loss.
Values on a GPU stay tensors until a policy reads them (`floats()`), so it is synchronised once per read, not per
step; on the CPU they are read at the end of each step.
"""
from __future__ import annotations

import functools
import math
import weakref

import torch
from torch.nn.utils.rnn import pad_sequence

from ..safety import LossHistory
from ..torch_private import host_floats, traced_or_transformed, tree_flatten

KINDS = ("observed", "returned", "output gradient")
DESCRIPTIONS = {"observed": "the loss given to fm.observe_loss",
                "returned": "the loss the model returns",
                "cross-entropy": "the cross-entropy of the model's output, worked out from the gradient reaching it "
                                 "(the loss is F.cross_entropy of the logits)",
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
CE_MAX_CLASSES = 4096      # the most classes (last dimension) of an output whose cross-entropy is worked out
CE_MAX_ELEMENTS = 1 << 16  # values kept of each (every k-th row of a larger one): they are kept until read
CE_MAX_PENDING = 1 << 22   # values of kept readings (output and gradient) that make them worked out at once
MAX_PENDING_STEPS = 1000   # or steps kept (a loop whose policy reads the loss rarely)
MAX_READINGS = 256  # readings kept per step and source (accumulation over more micro-batches: the first 256;
# a loop whose steps are never counted, no torch optimizer and no fm.step(), kept one per call for good)


def _norm(grad):
    """The gradient's norm as a float32 scalar: accumulated in float32 for half precisions (a GradScaler's
    scaled gradients overflow float16), in the gradient's own dtype when it is wider (float64)."""
    if grad.dtype.itemsize < 4:
        return torch.linalg.vector_norm(grad, dtype=torch.float32)
    return torch.linalg.vector_norm(grad).float()


def cross_entropies(readings):
    """Per reading (logits, gradient reaching them; each 2-d or more, classes last), the mean cross-entropy of its
    rows that got a gradient when the gradient is that of a cross-entropy of the logits, else -1.0 (another
    loss), or NaN (nothing to tell: no row got a finite gradient, or every label's probability rounds to 1), as
    one tensor on the readings' device, worked out together (a policy reads the loss every few steps; per step
    this would be a few dozen small operations).

    For F.cross_entropy (mean over n rows, or sum: n = 1) a row's gradient is (softmax(z) - one_hot(y)) / n: y is
    its one negative entry and n = (p_y - 1) / g_y, the same for every row of a reading. n is taken from the row
    whose label has the largest gradient (its p_y - 1 is furthest from rounding), and every row must then give
    back a one-hot target: |softmax(z) - n g - one_hot(y)| within the gradient's precision."""
    if not readings:
        return torch.zeros(0)
    device, k = readings[0][1].device, len(readings)
    value = None
    for classes in sorted({z.shape[-1] for z, _ in readings}):  # (one class count: one pass over all of them)
        pick = [i for i, (z, _) in enumerate(readings) if z.shape[-1] == classes]
        # (readings, rows, classes); the rows a shorter reading lacks are zeros: rows with no gradient
        sizes = {readings[i][0].numel() for i in pick}
        z, g = ((torch.stack if len(sizes) == 1 else functools.partial(pad_sequence, batch_first=True))(
            [readings[i][j].reshape(-1, classes).to(device, torch.float32) for i in pick]) for j in (0, 1))
        top, first = z.max(2, keepdim=True)
        # a row with a NaN or +inf logit (or all -inf), or a non-finite gradient, spoils its reading (an overflowed
        # step: nothing to tell, as a skipped one); a logit of -inf alone (a masked class) is a probability of 0
        bad = ~torch.isfinite(top.squeeze(2) + g.sum(2))
        z, g = (z - top).masked_fill_(bad[..., None], 0.0), g.masked_fill(bad[..., None], 0.0)
        e = z.exp()  # (softmax by hand: CPU's log_softmax took 100 us on 640 x 10 values)
        live = (g != 0).any(2)  # (rows with no gradient: ignore_index, a shifted LM's last position)
        # the label: the row's negative entry, or where the label's probability rounds to 1 (its entry is 0, as
        # a masked column's may be), the most probable class
        low, y = g.min(2, keepdim=True)
        y = torch.where(low < 0, y, first)
        gy, d = g.gather(2, y).squeeze(2), z.gather(2, y).squeeze(2)
        # -log p_y = log1p(the others' share + e^d - 1) - d: exact near 0 (a fitted row, d = 0)
        nll = torch.log1p(e.scatter(2, y, 0.0).sum(2) + torch.expm1(d)) - d
        # n = (p_y - 1) / g_y from the row whose label has the largest gradient (furthest from rounding)
        weight = gy.neg().masked_fill_(~live, -1.0)
        best = weight.amax(1, keepdim=True)
        n = (torch.expm1(-nll) / gy.clamp_max(-torch.finfo(torch.float32).tiny)).masked_fill_(weight != best, 0.0)
        n = n.amax(1)
        # every row must give back a one-hot target: softmax(z) - n g - one_hot(y) = 0 within the precision
        target = (e / e.sum(2, keepdim=True) - g * n[:, None, None]).scatter_add_(2, y, low.new_full(y.shape, -1.0))
        error = target.abs().amax(2).masked_fill_(~live, 0.0).amax(1)
        rows, total = live.sum(1), nll.masked_fill_(~live, 0.0).sum(1)
        # (float32 0.001, bfloat16 0.017, float16 0.003: the gradient's rounding and n's; a label smoothing's
        # targets, or class weights' row scales, are beyond it)
        tolerance = 1e-3 + 2 * max(torch.finfo(readings[i][1].dtype).eps for i in pick)
        # (a reading whose every label's probability rounds to 1 has no negative entry to check: nothing to tell)
        checked = (rows > 0) & (best.squeeze(1) > 0) & (n > 0) & ~bad.any(1)
        found = torch.where(error <= tolerance, total / rows.clamp_min(1), -1.0).masked_fill_(~checked, math.nan)
        if len(pick) == k:
            return found
        if value is None:
            value = torch.full((k,), math.nan, device=device)
        value[torch.tensor(pick, device=device)] = found
    return value


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
        self._ce = LossHistory()                    # per finished step: the cross-entropy worked out (3a), or None
        self._ce_ok = True                          # every reading so far was a cross-entropy's (3a applies)
        self._ce_pending: list = []                 # per step not worked out yet: its [(logits, gradient)]
        self._ce_size = 0                           # and how many values they hold

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
            stride = max(1, -(-t.numel() // CE_MAX_ELEMENTS))  # (rows kept: every stride-th)
            logits = None
            if self._ce_ok and t.dim() >= 2 and 2 <= t.shape[-1] <= CE_MAX_CLASSES:
                # (a copy now: a compiled model's output buffers, CUDA graphs', are reused by the next call)
                logits = t.detach().clone() if stride == 1 else t.detach().flatten(0, -2)[::stride].clone()

            def hook(grad, position=position, scale=math.sqrt(max(rows, 1)), logits=logits, stride=stride):
                signal = me()
                # (traced: a batched backward, a jacobian; grad mode on: a backward with create_graph=True, the
                # gradient of a gradient penalty's `autograd.grad(out.sum(), x)`, whose all-ones is no loss)
                if signal is not None and not torch.is_grad_enabled() and not traced_or_transformed(grad) and \
                        len(signal._gradients) < MAX_READINGS:
                    grad = grad.detach()
                    pair = None if logits is None or not signal._ce_ok else \
                        (logits, grad.clone() if stride == 1 else grad.flatten(0, -2)[::stride].clone())
                    signal._gradients.append((position, _norm(grad) * scale, pair))

            t.register_hook(hook)

    def observe_loss(self, loss) -> None:
        if not self.enabled:
            return
        value = loss.detach().float().mean() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        if len(self._step["observed"]) < MAX_READINGS:
            self._step["observed"].append(value)

    def end_step(self) -> None:
        pairs = []
        if self._gradients:
            first = min(position for position, _, _ in self._gradients)
            self._step["output gradient"] = [r for position, r, _ in self._gradients if position == first]
            pairs = [pair for position, _, pair in self._gradients if position == first]
            self._gradients = []
        if self._ce_ok:  # (disabled, no readings come: each step's None keeps the series as long as the other)
            if any(pair is None for pair in pairs) or self.kind in ("observed", "returned") or \
                    self._step["observed"] or self._step["returned"]:
                # (an output of one column or of more classes: 3b from the start; a loss given or returned)
                self._ce_ok, self._ce, self._ce_pending, self._ce_size = False, LossHistory(), [], 0
            else:
                self._ce_pending.append(pairs)
                self._ce_size += sum(z.numel() + g.numel() for z, g in pairs)
                if self._ce_size > CE_MAX_PENDING or len(self._ce_pending) > MAX_PENDING_STEPS:
                    self._work_out()
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

    def _work_out(self) -> None:
        """The cross-entropies of the pending steps, appended to their series (3a), or the series given up."""
        if not self._ce_pending:
            return
        pending, self._ce_pending, self._ce_size = self._ce_pending, [], 0
        flat = [pair for pairs in pending for pair in pairs]
        values = iter(cross_entropies(flat).tolist())  # (on a GPU: one wait, at a policy's read)
        for pairs in pending:
            step = [next(values) for _ in pairs]
            if any(v < 0 for v in step):  # (another loss: NaN compares False)
                self._ce_ok, self._ce = False, LossHistory()
                return
            finite = [v for v in step if math.isfinite(v)]  # (NaN: an overflowed gradient, every probability 1)
            self._ce.append(sum(finite) / len(finite) if finite else None)

    @property
    def source(self) -> str | None:
        """Where the values `floats()` gives come from: a KINDS entry, or "cross-entropy"."""
        if self.kind == "output gradient" and self._ce_ok:
            self._work_out()
            if self._ce_ok:
                return "cross-entropy"
        return self.kind

    def floats(self) -> LossHistory:
        """One value per training step so far (None where none was seen; the steps between the first thousand
        and the last few thousand are not kept: see LossHistory). The history itself, not a copy: read it, do not
        change it (a policy reads it every few steps over runs of any length)."""
        return self._ce if self.source == "cross-entropy" else self._read()

    def _read(self) -> LossHistory:
        """The series of the readings by source (1, 2, 3b), its values on a device read to floats."""
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
        self._work_out()  # (nothing pending once the series is given up)
        return {"history": self._read().state_dict(), "kind": self.kind,
                "cross_entropy": self._ce.state_dict() if self._ce_ok else None}

    def load_state_dict(self, state: dict) -> None:
        self._values = LossHistory.from_state(state["history"] if "history" in state else state["values"])
        self._unread = self._on_device = 0
        self.kind = state["kind"]
        self._ce_pending, self._ce_size = [], 0
        ce = state.get("cross_entropy")
        # (a state saved before 3a: its proxy series goes on, unless it has no reading to go on from)
        self._ce_ok = ce is not None or self.kind is None
        self._ce = LossHistory.from_state(ce) if ce is not None else LossHistory([None] * len(self._values))
