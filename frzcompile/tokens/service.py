"""The runtime side of the ALaST policy (`optimize(model, ..., policy="alast")`), carried out on the model's own
transformer layers through module hooks:

  - before a layer (forward pre-hook): its kept tokens are gathered from the hidden states, and its 4-d attention
    mask restricted to them (`frzcompile.tokens.select`);
  - with `skipped="forward"`, the skipped tokens then run through the layer too, among themselves and without
    gradient (nothing is saved for backward);
  - after it (forward hook): the layer's outputs are scattered back into the full hidden states, so skipped
    tokens reach the next layer unchanged (or as the layer's no-grad run left them, with an identity gradient),
    and the class token's change (the layer's importance) is recorded;
  - the layer's query, key and value projections (forward hooks) give the class token's attention to the tokens
    it ran on, weighted by the values' norms, which ranks tokens for the layers after it;
  - after each optimizer step the policy updates budgets and draws the layers trained next step; the others get
    `requires_grad=False` for one step (their optimizer state is kept).

With `compile=`, each layer's forward is compiled on its own (regional compilation; the gather, scatter and
ranking run eagerly between layers): the kept-token count becomes a dynamic dimension after its first change,
so budgets move without new graphs. The layers trained each step are then a runtime flag rather than a
`requires_grad` change (which Dynamo guards on: one graph per subset): every layer computes its weight
gradients, and those of the layers not drawn are dropped before the optimizer step. Compiled, ALaST saves the
dropped tokens' work and the optimizer's, not the weight gradients of the layers left out.

The hooks act only inside a training call of the FrozenModule (training mode, grad enabled); any other call of
the model, eval included, runs on every token. The `select_tokens` pass shows the same gather and scatter on
the analysis graph.
"""
from __future__ import annotations

import copy
import functools
import warnings
import weakref

import torch
from torch import nn

from .. import backend
from ..errors import ConfigError
from ..runtime.module import plain_forward, weak_method
from ..runtime.services import FORWARD_MARK, Service
from ..torch_private import forward_hooks_suspended, guarding_hooks
from .select import (cls_attention, forwarded, gather_mask, gather_tokens, keep_count, other_tokens, sampled_tokens,
                     scatter_tokens, top_tokens, valid_tokens)

QUERY_NAMES = ("query", "q_proj", "q_lin", "q", "wq")
KEY_NAMES = ("key", "k_proj", "k_lin", "k", "wk")
VALUE_NAMES = ("value", "v_proj", "v_lin", "v", "wv")
HEAD_ATTRIBUTES = ("num_attention_heads", "num_heads", "n_heads")
KEPT = "_frzcompile_output"  # where a projection's output waits for its layer's forward hook


def _keep_output(module, args, out):
    # One function for every projection, writing the module's own attribute: under compile= Dynamo traces this
    # hook without guarding on per-layer state. The layer's forward hook takes the value away right after.
    module.__dict__[KEPT] = out


def find_layers(unit_graph) -> list:
    """The transformer layers: the units whose one root module is of the class most units share (>= 2), among
    modules that hold submodules (a pooler and a classifier, two nn.Linear units, are not layers)."""
    by_class: dict = {}
    for u in unit_graph.names:
        roots = unit_graph.units[u].roots
        if len(roots) == 1 and next(roots[0].children(), None) is not None:
            by_class.setdefault(type(roots[0]), []).append(u)
    groups = sorted((g for g in by_class.values() if len(g) >= 2), key=len, reverse=True)
    return groups[0] if groups else []


def find_attention(layer: nn.Module, model: nn.Module):
    """(query Linear, key Linear, value Linear or None, heads) inside a layer, or None when there is not exactly
    one query and one key projection of the same width (grouped-query attention's narrower keys are not ranked).
    A PEFT LoRA wrapper of a projection (a module holding it as `base_layer`) counts as the projection: its
    output is the adapted one."""
    named = dict(layer.named_modules())

    def linears(names):
        return [m for n, m in named.items() if n.rsplit(".", 1)[-1] in names
                and (isinstance(m, nn.Linear) or isinstance(getattr(m, "base_layer", None), nn.Linear))]

    q, k, v = linears(QUERY_NAMES), linears(KEY_NAMES), linears(VALUE_NAMES)
    if len(q) != 1 or len(k) != 1 or q[0].out_features != k[0].out_features:
        return None
    v = v[0] if len(v) == 1 and v[0].out_features == k[0].out_features else None
    heads = next((n for m in named.values() for a in HEAD_ATTRIBUTES
                  if isinstance(n := vars(m).get(a), int) and n > 0), None)
    heads = heads or getattr(getattr(model, "config", None), "num_attention_heads", None) or 1
    if q[0].out_features % heads:
        heads = 1
    return q[0], k[0], v, heads


def token_order_problem(layer: nn.Module) -> str:
    """Why a layer's tokens cannot be ranked by the first token's attention or run on a subset, or ''. Causal
    attention (a module's `is_causal` or `is_decoder`, as Hugging Face's attention classes set them): the first
    token attends only to itself, so it ranks nothing (GPT-Neo and XGLM take no other tensor per token, and
    trained on tokens dropped at random). Windowed attention (Swin's, with a `shift_size`): the layer folds its tokens into a grid of
    windows, which a subset cannot fill (it failed inside the model); a relative position bias table (BEiT's)
    indexes the whole grid likewise."""
    for name, m in layer.named_modules():
        where = f"{type(m).__name__}{' (' + name + ')' if name else ''}"
        causal = next((a for a in ("is_causal", "is_decoder") if vars(m).get(a) is True), None)
        if causal:
            return (f"its attention is causal ({where}.{causal}): the first token attends only to itself, so there "
                    "is no class token whose attention ranks the others")
        if "shift_size" in vars(m):
            return (f"its attention is windowed ({where}.shift_size): the layer folds its tokens into a grid of "
                    "windows, which a subset of them cannot fill")
    for name, m in layer.named_modules():
        if "relative_position_bias_table" in m._parameters:
            return (f"its attention adds a relative position bias over the whole grid of tokens "
                    f"({type(m).__name__}.relative_position_bias_table), which a subset cannot index")
        why = _relative_attention_bias(m)
        if why:
            return why
    return ""


def _relative_attention_bias(m: nn.Module) -> str:
    if isinstance(m._modules.get("relative_attention_bias"), nn.Embedding):
        return (f"its attention adds a bias by relative position ({type(m).__name__}.relative_attention_bias, "
                "T5's), computed from the tokens' places in the sequence and handed from layer to layer, which a "
                "subset of the tokens would read by rank")
    if vars(m).get("relative_attention") is True:
        return (f"its attention adds terms by relative position ({type(m).__name__}.relative_attention, "
                "DeBERTa's disentangled attention), computed from the tokens' places in the sequence, which a "
                "subset of the tokens would read by rank")
    return ""


def _refuse_checkpointing(layers) -> None:
    """(At optimize(), and at each training call: it may be enabled later.) The recomputation in backward would
    run the layer again outside the call, on every token."""
    if any(getattr(m, "gradient_checkpointing", False) for m in layers):
        raise ConfigError("policy='alast' does not combine with gradient checkpointing yet: call "
                          "model.gradient_checkpointing_disable() (activation_checkpointing_disable in newer "
                          "transformers); dropped tokens already save activations")


class _Call:
    """What one training call of the model has seen so far."""

    def __init__(self):
        self.scores = None          # (B, n) class-token attention, the latest each token got
        self.valid = None           # (B, n) bool, or None: every token is real
        self.last = -1              # the last layer run: a lower one starts another pass of the encoder
        self.running = None         # (layer index, full hidden states, kept indices or None, class token in)
        self.skipped = None         # (skipped indices, their hidden states after the layer's no-grad run or None)

    def new_pass(self) -> None:
        self.scores, self.valid, self.last = None, None, -1


class _TokenForward:
    """A layer's forward with ALaST's token selection inside it: the kept tokens gathered before the layer's own
    forward (or its compiled one), scattered back after. Inside the forward, not in module hooks, so the user's
    hooks on the layer see it whole: every token in and out, as the plain layer maps them (hooks registered after
    ALaST's saw the gathered input with the scattered output). `own`: a forward set on the layer's instance before
    (a user's wrapper, accelerate's hooks), which runs inside it and comes back when ALaST lets go. A copy of the
    layer gets its plain forward (or a copy of its own). `inner`: what runs the layer (its own forward, or the
    class's; compiled under compile=)."""

    def __init__(self, layer, i, service, inner, own=None):
        self._layer = weakref.ref(layer)
        self._i = i
        self._before = weak_method(service._before_layer)
        self._after = weak_method(service._after_layer)
        self._skipped = weak_method(service._skipped_ran)
        self.own = own
        self.inner = inner
        setattr(self, FORWARD_MARK, True)

    def __call__(self, *args, **kwargs):
        changed = self._before(self._i, args, kwargs)
        if changed is not None:
            args, kwargs, skipped = changed
            if skipped is not None:  # skipped="forward": before the kept tokens, so the ranking reads theirs
                # hidden from hooks inside the layer (the user's, transformers' output_attentions collection):
                # they see the kept tokens' run alone, as when the skipped tokens are carried (a hook registering
                # a gradient hook on its output would fail under no_grad); global module hooks still see it, and
                # torch's own hooks run (pruning's sets the weight the module runs with)
                layer = self._layer()
                with torch.no_grad(), forward_hooks_suspended((m for m in layer.modules() if m is not layer),
                                                              keep=("torch.",)):
                    self._skipped(self._i, self.inner(*skipped[0], **skipped[1]))
        out = self.inner(*args, **kwargs)
        scattered = self._after(self._i, out)
        return out if scattered is None else scattered

    def __deepcopy__(self, memo):
        if self.own is not None:
            return copy.deepcopy(self.own, memo)
        copy_ = memo.get(id(self._layer()))
        return plain_forward(copy_) if copy_ is not None else None

    def __reduce__(self):  # its own forward, or its class's looked up when unpickled: loads without frzcompile
        if self.own is not None:
            return copy.copy, (self.own,)
        return getattr, (self._layer(), "forward")


def _restore_forward(forward: _TokenForward) -> None:
    """This ALaST forward off its layer, the one set on the instance before back (or none); left in place when
    something else was set over it since (a wrapper around it, which then runs the forward under it alone)."""
    layer = forward._layer()
    if layer is not None and layer.__dict__.get("forward") is forward:
        if forward.own is not None:
            layer.__dict__["forward"] = forward.own
        else:
            del layer.__dict__["forward"]


def _restricted(args, kwargs, hidden, masks, idx, n) -> tuple:
    """A layer's (args, kwargs) on the tokens at `idx`: the hidden states gathered, 4-d attention masks restricted."""
    args, kwargs = list(args), dict(kwargs)
    if args:
        args[0] = gather_tokens(hidden, idx)
    else:
        kwargs["hidden_states"] = gather_tokens(hidden, idx)
    for pos, mask in masks:
        if isinstance(pos, int):
            args[pos] = gather_mask(mask, idx, n)
        else:
            kwargs[pos] = gather_mask(mask, idx, n)
    return tuple(args), kwargs


def _release(handles, forwards, plan, params) -> None:
    """Hooks and compiled forwards off; the parameters ALaST switched off for a step back to their flags."""
    for h in handles:
        h.remove()
    for forward in forwards:
        _restore_forward(forward)
    for p in params:
        if p in plan.switched_off:
            p.requires_grad_(plan.switched_off.pop(p))
    plan.switched_off.clear()


class LayerBudgets(Service):
    name = "alast"

    def __init__(self, policy, model: nn.Module, unit_graph, plan, compile_config=None):
        self.policy = policy
        self.model = model
        self.unit_graph = unit_graph
        self.plan = plan
        self.compile_config = compile_config
        self.compile_log: list = []   # GraphCompile of every layer graph compiled (compile= only)
        self._backend = None
        names = list(policy.layers) if policy.layers else find_layers(unit_graph)
        if len(names) < 2:
            raise ConfigError("policy='alast' needs the model's transformer layers as units (two or more of one "
                              f"class); found {names or 'none'} among {unit_graph.names}. Pass "
                              "frzcompile.ALaST(layers=[...unit names...]) or units=[...]; a model that shares one "
                              "layer across its depth (ALBERT) has no layers of its own to give budgets to. ALaST is "
                              "for encoders with a class token first (ViT, DeiT, BERT, RoBERTa...); for other models "
                              "use policy='smartfrz' (the default) or 'linear'")
        unknown = [n for n in names if n not in unit_graph.units]
        if unknown:
            raise ConfigError(f"ALaST layers {unknown} are not units of this model (units: {unit_graph.names})")
        self.layers = names
        self._call = None
        self._applied = False  # whether layers not drawn for this iteration are set not to require grad
        self._handles, self.modules, self._finalizer = [], [], None
        self._forwards: dict = {}  # layer -> the ALaST forward set on it (kept across re-hooks)
        self._defaults = {}   # (layer index, parameter name) -> requires_grad before ALaST touched it
        self._warned_unsafe = False
        problem = next((f"layer {n}: {why}" for n in names if len(unit_graph.units[n].roots) == 1 and
                        (why := token_order_problem(unit_graph.units[n].roots[0]))), "")
        # (T5 computes its bias in the first layer only and hands it on: a model holding one anywhere is refused,
        # whichever layers ALaST was given)
        problem = problem or next((f"{path}: {why}" for path, m in model.named_modules()
                                   if (why := _relative_attention_bias(m))), "")
        if problem:
            raise ConfigError(f"policy='alast' cannot drop tokens in this model's layers ({problem}). ALaST is for "
                              "encoders with a class token first (ViT, DeiT, BERT, RoBERTa...); for other models use "
                              "policy='smartfrz' (the default) or 'linear'")
        _refuse_checkpointing([m for n in names for m in unit_graph.units[n].roots])  # (before any hook is set)
        self._reset_step()
        self._hook()
        if not any(a is not None for a in self.attention):
            raise ConfigError("policy='alast' ranks tokens by the class token's attention, but no layer has one "
                              f"query and one key projection of the same width (nn.Linear named one of {QUERY_NAMES} "
                              f"/ {KEY_NAMES}; grouped-query attention's narrower keys are not supported). ALaST is "
                              "for encoders with a class token first (ViT, DeiT, BERT, RoBERTa...); for other models "
                              "use policy='smartfrz' (the default) or 'linear'")
        inside = {id(m) for layer in self.modules for m in layer.modules()}
        policy.start(names, image_patches=any(isinstance(m, nn.Conv2d) and id(m) not in inside
                                              for m in model.modules()))
        self.trained = policy.trained  # the layers trained this iteration, as applied (all of them at first)

    # -- hooks ----------------------------------------------------------------------------------------------
    def _hook(self) -> None:
        self._unhook()
        self.modules, self.attention = [], []
        for i, name in enumerate(self.layers):
            roots = self.unit_graph.units[name].roots
            if len(roots) != 1:
                raise ConfigError(f"ALaST layer {name} must be one module (it has {len(roots)} roots)")
            layer = roots[0]
            self.modules.append(layer)
            for pname, p in layer.named_parameters():
                self._defaults.setdefault((i, pname), self.plan.trainable_by_default(p))
            attention = find_attention(layer, self.model)
            self.attention.append(attention)
            if attention is not None:  # the last layer's too: every layer's compiled graph sees the same hooks
                for projection in attention[:3]:
                    if projection is not None:
                        self._handles.append(projection.register_forward_hook(_keep_output))
            if layer not in self._forwards:  # (a layer hooked before keeps its forward: a wrapper may hold it)
                self._forwards[layer] = self._token_forward(layer, i)
            if self.compile_config is not None:
                # every layer computes weight gradients when compiled: drop the undrawn ones as they land (before
                # gradient clipping or accumulation sees them)
                drop = weak_method(self._drop_gradient)
                for p in layer.parameters():
                    self._handles.append(p.register_post_accumulate_grad_hook(lambda p, i=i: drop(i, p)))
        for layer in [m for m in self._forwards if all(m is not n for n in self.modules)]:  # (replaced layers)
            _restore_forward(self._forwards.pop(layer))
        params = [p for m in self.modules for p in m.parameters()]
        self._finalizer = weakref.finalize(self, _release, self._handles, list(self._forwards.values()), self.plan,
                                           params)

    def _token_forward(self, layer, i) -> _TokenForward:
        """ALaST's forward, set on the layer's instance, around the forward it had (the class's, or one set on the
        instance by the user or a library, which runs inside it; another FrozenModule's ALaST forward is not
        nested: the one under it runs)."""
        own = layer.__dict__.get("forward")
        if isinstance(own, _TokenForward):
            own = own.own
        inner = own if own is not None else plain_forward(layer)
        if self.compile_config is not None:
            if self._backend is None:  # one backend object for every layer: Dynamo reuses graphs across them
                self._backend = functools.partial(backend.frzcompile_backend, options=self.compile_config,
                                                  plan="alast", log=self.compile_log)
            # compiled; its graphs guard on its modules' hooks (the skipped run suspends them)
            inner = guarding_hooks(torch.compile(inner, backend=self._backend))
        forward = layer.__dict__["forward"] = _TokenForward(layer, i, self, inner, own)
        return forward

    def _unhook(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            for h in self._handles:
                h.remove()
        self._handles = []

    def _drop_gradient(self, i, p) -> None:
        if i not in self.trained:
            p.grad = None

    def call(self, run, args, kwargs):
        if not (self.model.training and torch.is_grad_enabled()):
            return run(args, kwargs)
        _refuse_checkpointing(self.modules)
        # the draw of the last step takes effect now, so every optimizer of that step stepped the same layers
        # (as the freeze plan's pending decision does)
        trained = tuple(i for i in self.policy.advance() if self.layers[i] not in self.plan.frozen)
        if trained != self.trained or (not self._applied and len(trained) < len(self.layers)):
            self.trained = trained
            self._apply_selection()
        self._call = _Call()
        try:
            return run(args, kwargs)
        finally:
            self._call = None

    def _before_layer(self, i, args, kwargs):
        c = self._call
        if c is None:
            return None
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            return None
        if i <= c.last:
            c.new_pass()  # the encoder runs again in this call (a siamese or contrastive pair)
        c.last = i
        n = hidden.shape[1]
        items = list(enumerate(args))[1:] + list(kwargs.items())  # every argument but the hidden states
        masks = [(pos, t) for pos, t in items if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[-1] == n]
        if c.valid is None and masks:
            c.valid = valid_tokens(masks[0][1], n, hidden.shape[0])
        keep = keep_count(self.policy.budgets[i], n)
        # any other tensor with a token dimension (rotary cos/sin in a tuple too): not safe to run on a subset
        flat = [t for _, v in items for t in (v if isinstance(v, (tuple, list)) else (v,))
                if isinstance(t, torch.Tensor) and t is not hidden]
        unsafe = any(n in t.shape[1:] for t in flat if all(t is not m for _, m in masks))
        scores_ok = c.scores is not None and c.scores.shape == hidden.shape[:2]
        idx = self._select(c, keep) if keep < n and scores_ok and not unsafe else None
        c.running, c.skipped = (i, hidden, idx, hidden[:, 0].detach()), None
        self._kept[i] += (keep if idx is not None else n) / max(n, 1)
        self._calls[i] += 1
        self._unsafe[i] += keep < n and unsafe
        if idx is None:
            return None
        skipped = None
        if self.policy.forwards_skipped:
            others = other_tokens(idx, n)
            c.skipped = (others, None)
            with torch.no_grad():
                skipped = _restricted(args, kwargs, hidden.detach(), masks, others, n)
        return _restricted(args, kwargs, hidden, masks, idx, n) + (skipped,)

    def _skipped_ran(self, i, out):
        c = self._call
        if c is not None and c.running is not None and c.running[0] == i and c.skipped is not None:
            c.skipped = (c.skipped[0], out if isinstance(out, torch.Tensor) else out[0])

    def _select(self, c, keep):
        if self.policy.drawn_at is None:
            return top_tokens(c.scores, keep, c.valid)
        return sampled_tokens(c.scores, keep, c.valid, self.policy.token_generator(c.scores.device),
                              self.policy.drawn_at)

    def _after_layer(self, i, out):
        attention = self.attention[i]
        q, k, v = [p.__dict__.pop(KEPT, None) if p is not None else None for p in attention[:3]] \
            if attention is not None else (None, None, None)
        c = self._call
        if c is None or c.running is None or c.running[0] != i:
            return None
        _, hidden, idx, cls_in = c.running
        (others, skipped_out), c.running, c.skipped = c.skipped or (None, None), None, None
        h = out if isinstance(out, torch.Tensor) else out[0]
        if idx is not None:
            if h.shape[:2] != idx.shape:
                raise ConfigError(f"ALaST layer {self.layers[i]} returned hidden states of shape {tuple(h.shape)} "
                                  f"for {idx.shape[1]} kept tokens: it must map (B, n, d) to (B, n, d)")
            if skipped_out is not None:
                hidden = forwarded(hidden, others, skipped_out, c.valid)
            h = scatter_tokens(hidden, idx, h)
            out = h if isinstance(out, torch.Tensor) else (h,) + tuple(out[1:])
        with torch.no_grad():
            delta = (h[:, 0].float() - cls_in.float()).pow(2).sum(-1).mean()
            self._delta[i] = delta if self._delta[i] is None else self._delta[i] + delta
            ran = h.shape[:2] if idx is None else idx.shape
            if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and k.shape[:2] == ran:
                valid = c.valid if c.valid is None or idx is None else c.valid.gather(1, idx)
                v = v if isinstance(v, torch.Tensor) and v.shape == k.shape else None
                attention = cls_attention(q, k, self.attention[i][3], valid, v)
                if idx is None:
                    c.scores = attention
                else:  # scaled to the attention mass these tokens had, so stale and fresh scores compare
                    mass = c.scores.gather(1, idx).sum(1, keepdim=True)
                    c.scores = c.scores.scatter(1, idx, attention * mass)
        return out if idx is not None else None

    # -- steps ----------------------------------------------------------------------------------------------
    def _reset_step(self) -> None:
        n = len(self.layers)
        self._delta = [None] * n
        self._kept = [0.0] * n
        self._calls = [0] * n
        self._unsafe = [0] * n  # calls where a layer ran on every token because another argument has a token axis

    def after_step(self, step: int) -> None:
        if not self._warned_unsafe and any(self._unsafe) and all(
                self._kept[i] == self._calls[i] for i in range(len(self.layers))):
            self._warned_unsafe = True
            warnings.warn("frzcompile: policy='alast' dropped no tokens this step: its layers get other tensors with "
                          "a token dimension (rotary cos/sin, position ids: a decoder's layers), which cannot run on "
                          "a subset of the tokens. ALaST is for encoders with a class token first (ViT, DeiT, BERT, "
                          "RoBERTa...); for other models use policy='smartfrz' (the default) or 'linear'",
                          UserWarning, stacklevel=2)
        known = [i for i, d in enumerate(self._delta) if d is not None]
        values = torch.stack([self._delta[i] for i in known]).tolist() if known else []  # one sync per step
        deltas = [None] * len(self.layers)
        for i, v in zip(known, values):
            deltas[i] = v / self._calls[i]
        kept = [self._kept[i] / self._calls[i] if self._calls[i] else None for i in range(len(self.layers))]
        self.policy.observe(step, deltas, kept, trained=self.trained, excluded=self.plan.frozen)
        self._reset_step()

    def _apply_selection(self) -> None:
        """Layers not drawn for this iteration stop requiring grad; drawn ones get back the flags they had
        before (the user's: one set by hand stays as set) (compiled: every layer keeps its setting, see the
        module's docstring)."""
        units, off = self.unit_graph.units, self.plan.switched_off
        for i, name in enumerate(self.layers):
            if name in self.plan.frozen:
                continue
            trained = i in self.trained or self.compile_config is not None
            for p in units[name].params:
                if trained and p in off:
                    p.requires_grad_(off.pop(p))
                elif not trained and p not in off:
                    off[p] = p.requires_grad
                    p.requires_grad_(False)
        self._applied = len(self.trained) < len(self.layers)

    def on_optimizer_step(self, optimizer) -> None:
        """After a step, the layers not drawn for it require grad again until the next training call applies the
        next draw: between steps (an optimizer made for a second phase that filters on requires_grad, the end of
        a Hugging Face Trainer run) the model looks as it would without ALaST."""
        if not self._applied:
            return
        units = self.unit_graph.units
        for i, name in enumerate(self.layers):
            if name not in self.plan.frozen and i not in self.trained:
                for p in units[name].params:
                    if p in self.plan.switched_off:
                        p.requires_grad_(self.plan.switched_off.pop(p))
        self.plan.switched_off.clear()
        self._applied = False

    def before_optimizer_step(self, optimizer) -> None:
        # a zero gradient left by zero_grad(set_to_none=False) would still move Adam's moments and weight decay
        # (a layer the plan froze keeps what the plan keeps: the gradients of the step in flight, as by hand)
        units = self.unit_graph.units
        for i, name in enumerate(self.layers):
            if i not in self.trained and name not in self.plan.frozen:
                for p in units[name].params:
                    p.grad = None

    def on_plan(self, change, analysis) -> None:
        # a unit the plan froze leaves this iteration's layers; one it thawed trains at once when every free layer
        # trains (k unset), else waits for the next draw; a draw still waiting that holds a layer frozen now, or
        # none (made while every layer was frozen), is made again (it would leave a step training fewer)
        free = tuple(i for i, name in enumerate(self.layers) if name not in self.plan.frozen)
        all_free = self.policy.layers_per_step >= len(free)
        if all_free:
            self.trained = free
        else:
            self.trained = tuple(i for i in self.trained if self.layers[i] not in self.plan.frozen)
        waiting = self.policy.next
        if waiting is not None and (any(self.layers[i] in self.plan.frozen for i in waiting) or all_free
                                    or (not waiting and free)):
            self.policy.next = self.policy.redraw(self.plan.frozen)
        if self._applied:  # (between steps every layer requires grad until the next training call applies a draw)
            self._apply_selection()

    def on_structure_change(self) -> None:
        # a parameter replaced (load_state_dict(assign=True), sharding) is new to the plan, which read its
        # requires_grad as its default: give it the default its predecessor had before ALaST touched it
        for i, layer in enumerate(self.modules):
            for pname, p in layer.named_parameters():
                if (i, pname) in self._defaults:
                    self.plan.set_trainable_by_default(p, self._defaults[(i, pname)])
        self._hook()
        if self._applied:
            self._apply_selection()

    def report(self):
        return {"layers": list(self.layers), "attention": [a is not None for a in self.attention],
                "compiled_graphs": len(self.compile_log) if self.compile_config is not None else None}

    def close(self) -> None:
        """Hooks and compiled forwards off, every layer back to its plan's setting (also done when the
        FrozenModule is garbage collected)."""
        if self._finalizer is not None:
            self._finalizer()
        self._handles, self._forwards = [], {}
