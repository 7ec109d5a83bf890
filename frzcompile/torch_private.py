"""Every private torch API frzcompile relies on, in one place, each with the torch version it was checked on.

Private APIs change between releases without notice. When moving to a new torch, check each entry below (the
tests exercise all of them) and update `CHECKED_ON`. Public APIs are used directly elsewhere. Dynamo and
Inductor are imported inside the functions that need them, so `import frzcompile` stays light.
"""
from __future__ import annotations

import contextlib
import dataclasses
import operator
import sys
from collections.abc import Mapping

import torch

CHECKED_ON = "2.13.0"

# -- torch.utils._pytree (checked on 2.13.0): nested outputs, Hugging Face ModelOutput included ------------
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten  # noqa: E402

__all__ = [
    "tree_flatten", "tree_leaves", "tree_map", "tree_unflatten", "open_tree", "open_tensors", "plain_mappings",
    "tensor_version", "storage_key", "traced_or_transformed", "host_floats",
    "inside_func_transform", "forward_ad_active", "compiled_wrapper", "remade_view", "forked_rng",
    "module_generators", "rng_states", "same_rng", "runs_nested_tensors",
    "share_module_state", "structure_ids", "self_compiling_calls", "inside_functional_call",
    "apply_to_tensors", "hook_ids", "has_call_hooks", "global_module_hooks", "forward_hooks_suspended",
    "has_forward_hooks",
    "fuse_by_partitions", "global_state_targets", "recompile_limit", "failing_on_recompile_limit",
    "dynamo_exceptions", "guarding_hooks", "hook_source",
    "current_compile_id", "placeholder_source", "saved_dynamo_sources", "restore_dynamo_sources",
    "inductor_compile", "aot_eager_compile", "compiled_callables", "record_aten_graph", "inline_context_regions",
    "autocast_kept"
]

# -- pytrees (checked on 2.13.0) ------------------------------------------------------------------------------
_WHOLE = (torch.Tensor, int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)
OPEN_DEPTH = 4  # objects inside objects opened by open_tree


def open_tree(tree, depth: int = 0) -> tuple:
    """The leaves and structure of a nested value, opening what torch's pytree keeps whole: a dataclass field by
    field, a mapping of another class (transformers' BatchEncoding, a UserDict) key by key, any other object by
    the attributes it holds (a torch.distributions object's parameters), to a depth of OPEN_DEPTH."""
    leaves, spec = tree_flatten(tree)
    out, structure = [], [spec]
    for leaf in leaves:
        inner = None
        if depth < OPEN_DEPTH and not isinstance(leaf, (_WHOLE, type)):
            if dataclasses.is_dataclass(leaf):
                inner = [getattr(leaf, f.name) for f in dataclasses.fields(leaf)]
            elif isinstance(leaf, Mapping):
                inner = dict(leaf)
            elif hasattr(leaf, "__dict__"):
                inner = dict(vars(leaf))
        if inner is None:
            out.append(leaf)
        else:
            opened, inner_structure = open_tree(inner, depth + 1)
            out += opened
            structure.append((type(leaf), inner_structure))
    return out, structure


def open_tensors(tree) -> list:
    """The tensors among `open_tree(tree)`'s leaves, in its order."""
    return [t for t in open_tree(tree)[0] if isinstance(t, torch.Tensor)]


def plain_mappings(tree):
    """`tree` with every mapping torch's pytree keeps whole (transformers' BatchEncoding, a UserDict) made a dict,
    so that a graph capture can take it apart."""
    return tree_map(lambda leaf: {k: plain_mappings(v) for k, v in leaf.items()} if isinstance(leaf, Mapping)
                    else leaf, tree)


# -- tensors (checked on 2.13.0) ------------------------------------------------------------------------------
def tensor_version(t: torch.Tensor) -> int:
    """The version counter autograd bumps on every in-place change (not on `.data` edits)."""
    return t._version


def storage_key(t):
    """An identity of the storage under tensor `t` (views share it; fake tensors, Dynamo's example values, too), or
    None for anything else."""
    if not isinstance(t, torch.Tensor):
        return None
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, AttributeError):  # (sparse, nested and other storage-less tensors)
        return None


def host_floats(tensors) -> list:
    """The values of 0-d tensors as floats, in order, with one copy to the host per device (on a GPU, one wait
    for the queued work per device, not one per value)."""
    out = [None] * len(tensors)
    by_device: dict = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for indices in by_device.values():
        for i, v in zip(indices, torch.stack([tensors[i].float() for i in indices]).tolist()):
            out[i] = v
    return out


def traced_or_transformed(t: torch.Tensor) -> bool:
    """Whether tensor `t` comes from a trace (torch.compile, torch.export: fake tensors) or a torch.func transform
    (vmap, grad: wrapped tensors; a batched backward, `autograd.grad(..., is_grads_batched=True)` and vectorized
    jacobians: legacy batched tensors) rather than from a real call: its values are not a training step's loss,
    and tensor hooks on it would fire inside the transform."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return True
    functorch = torch._C._functorch
    if functorch.is_functorch_wrapped_tensor(t) or functorch.is_legacy_batchedtensor(t):
        return True
    if type(t) in (torch.Tensor, torch.nn.Parameter):  # (a fake tensor is of a subclass: the check below costs
        return False                                   # more than the rest, at every training call)
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def inside_func_transform() -> bool:
    """Whether this code runs inside a torch.func transform (vmap, grad, jacrev...): tensors it sees, the model's
    parameters swapped in by `functional_call` included, may be wrapped, without storage of their own."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def inside_functional_call() -> bool:
    """Whether this code runs inside `torch.func.functional_call` (or `torch.nn.utils.stateless`'s): the tensors
    in the model's parameter slots are the caller's, swapped in for this call only. It sets no flag, so this looks
    for its frame on the stack (read only when the model's structure changed, not at every call)."""
    from torch.nn.utils import stateless

    code = getattr(getattr(stateless, "_functional_call", None), "__code__", None)
    frame = sys._getframe(1)
    while frame is not None and code is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (`with torch.autograd.forward_ad.dual_level():`, a forward-mode
    `torch.autograd.functional.jacobian`): inputs or parameters may carry tangents. (Read at every cache call.)"""
    return torch.autograd.forward_ad._current_level >= 0


def compiled_wrapper(model) -> bool:
    """Whether `model` is torch.compile's OptimizedModule wrapper (Dynamo is not imported to tell: a model
    compiled was compiled after it was imported)."""
    dynamo = sys.modules.get("torch._dynamo")
    return dynamo is not None and isinstance(model, dynamo.eval_frame.OptimizedModule)


def remade_view(t):
    """`t` if it is no view, else the same view of its base made again where this runs (Tensor._base). A view of
    another dtype (`view_as_complex`) or with a lazy conjugate or negation bit stays as it is: `as_strided` of the
    base would lose them."""
    if not isinstance(t, torch.Tensor) or t._base is None or t.dtype != t._base.dtype or t.is_conj() or t.is_neg():
        return t
    return t._base.as_strided(t.size(), t.stride(), t.storage_offset())


def module_generators(model) -> list:
    """The random number generators the model's modules hold as attributes (an augmentation's own stream):
    torch.Generators, Python's `random.Random`s, numpy's `Generator`s and `RandomState`s."""
    if model is None:
        return []
    import random
    np = sys.modules.get("numpy")
    kinds = {torch.Generator, random.Random} | ({np.random.Generator, np.random.RandomState} if np is not None
                                                  else set())
    # (by exact type: isinstance on torch.Generator goes through a Python metaclass check, 0.7 microseconds an
    # attribute, and this runs over every attribute of every module)
    return [v for m in model.modules() for v in vars(m).values() if type(v) in kinds]


def _generator_state(g):
    if type(g) is torch.Generator:
        return g.get_state()
    if hasattr(g, "bit_generator"):  # numpy's Generator
        return g.bit_generator.state
    return g.get_state() if hasattr(g, "get_state") else g.getstate()  # numpy's RandomState, random.Random


def _set_generator_state(g, state) -> None:
    if type(g) is torch.Generator:
        g.set_state(state)
    elif hasattr(g, "bit_generator"):
        g.bit_generator.state = state
    elif hasattr(g, "set_state"):
        g.set_state(state)
    else:
        g.setstate(state)


def _other_states(generators) -> list:
    """The random states beyond torch's: Python's `random`, numpy's global one (when numpy is loaded), and
    `generators`."""
    import random
    np = sys.modules.get("numpy")
    return ([random.getstate()] + ([np.random.get_state(legacy=False)] if np is not None else []) +
            [_generator_state(g) for g in generators])


def _set_other_states(states, generators) -> None:
    import random
    np = sys.modules.get("numpy")
    random.setstate(states[0])
    if np is not None:
        np.random.set_state(states[1])
    for g, state in zip(generators, states[-len(generators):] if generators else ()):
        _set_generator_state(g, state)


def rng_states(generators=()) -> list:
    """Every random state a forward may draw from that frzcompile can see: torch's (CPU and every initialised
    GPU), Python's `random`, numpy's global one (when numpy is loaded), and `generators`."""
    state = [torch.default_generator.get_state()]
    if torch.cuda.is_initialized():
        state += [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return state + _other_states(generators)


def same_rng(a, b) -> bool:
    def same(x, y):
        if isinstance(x, torch.Tensor):
            return torch.equal(x, y)
        if isinstance(x, dict):  # numpy's state: {"bit_generator", "state": {"key", "pos"}, "has_gauss", ...}
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if type(x).__name__ == "ndarray":
            return x.shape == y.shape and bool((x == y).all())
        if isinstance(x, tuple):  # numpy's legacy state, Python's: may hold arrays
            return isinstance(y, tuple) and len(x) == len(y) and all(same(a, b) for a, b in zip(x, y))
        return x == y
    return a is not None and b is not None and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


@contextlib.contextmanager
def forked_rng(generators=()):
    """A context in which random draws leave the user's generators as they were: torch's (CPU and every
    initialised GPU; torch.random.fork_rng), and those `rng_states` reads beyond them."""
    generators = list(generators)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    others = _other_states(generators)
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            _set_other_states(others, generators)


def runs_nested_tensors(module) -> bool:
    """Whether `module` is an nn.TransformerEncoder that runs on nested tensors in eval with a padding mask
    (`enable_nested_tensor=True`, PyTorch's fast path, which decides from its first layer), with the fast path
    on now (`torch.backends.mha.set_fastpath_enabled(False)` turns it off)."""
    return isinstance(module, torch.nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False) and \
        torch.backends.mha.get_fastpath_enabled()


# -- nn.Module internals (checked on 2.13.0) ------------------------------------------------------------------
def share_module_state(target: torch.nn.Module, model: torch.nn.Module) -> None:
    """Make `target` hold `model`'s own submodule, parameter and buffer dicts and its state-dict hooks (not
    copies): registering or replacing one through either is seen by both, state_dict keys are the model's, and a
    state-dict hook runs once, wherever it was registered (a module holding `target` loads through it)."""
    state = target.__dict__
    for name in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set", "_state_dict_hooks",
                 "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"):
        state[name] = getattr(model, name)


def is_dtensor(t) -> bool:
    """Whether `t` is a torch.distributed DTensor (an FSDP2 / tensor-parallel shard), without importing
    torch.distributed."""
    return any(c.__name__ == "DTensor" for c in type(t).__mro__)


def structure_ids(model: torch.nn.Module) -> tuple:
    """Ids of every module and parameter of the model: changes when a submodule or parameter is replaced.
    Walks the private dicts directly, collecting the objects and taking their ids in one `map` at the end (this
    runs before every call: about 70 microseconds for BERT-base's 231 modules and 201 parameters on this project's
    CPU, against 130-370 for a walk with a generator per module)."""
    found, stack = [], [model]
    pop, push, add, add_all = stack.pop, stack.extend, found.append, found.extend
    while stack:
        m = pop()
        if m is None:  # (a child slot set to None)
            continue
        try:  # (the instance dict: an attribute lookup walks the class's MRO first)
            state = m.__dict__
            params, children = state["_parameters"], state["_modules"]
        except KeyError:  # (a module keeping them elsewhere, as a ScriptModule does)
            params, children = m._parameters, m._modules
        add(m)
        add_all(params.values())  # (None where a parameter slot is None, as in bias=None)
        push(children.values())
    return tuple(map(id, found))


def tensor_impl(t: torch.Tensor) -> int:
    """The address of `t`'s C++ TensorImpl. torch.utils.swap_tensors (a conversion under
    swap_module_params_on_conversion) gives the same Python tensor another one, and the tensor hooks registered
    before stop running (checked on 2.13.0)."""
    return t._cdata


def restart_tensor_hooks(t: torch.Tensor) -> None:
    """After a swap, `t._backward_hooks` still lists the hooks that no longer run, and one added to that dict would
    not run either: a new dict makes the hooks registered from now on run."""
    t._backward_hooks = None


def export_keeping_no_parameter(model, args: tuple, kwargs: dict):
    """torch.export.export(model, args, kwargs, strict=False), leaving no weak reference to the model's
    parameters, which torch.utils.swap_tensors refuses (`.double()` under swap_module_params_on_conversion).
    Export (checked on 2.13.0) keeps every fake tensor it traced in a module-level map of
    torch.fx.experimental.proxy_tensor until the next export, and each fake mode keeps a weak table of the real
    tensors it converted (MetaTensorDescriber.lookup_tensor), used only while tracing: the map's new entries are
    removed and those tables emptied."""
    from torch.fx.experimental import proxy_tensor

    table = getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", None)
    before = set(table) if isinstance(table, dict) else None
    try:
        ep = torch.export.export(model, args, kwargs, strict=False)
    finally:
        if before is not None:
            for key in [k for k in table if k not in before]:
                del table[key]
    modes = {id(v.fake_mode): v.fake_mode for node in ep.graph.nodes
             for v in [node.meta.get("val")] if hasattr(v, "fake_mode")}
    for mode in modes.values():
        lookup = getattr(getattr(getattr(getattr(mode, "fake_tensor_converter", None), "meta_converter", None),
                                 "describer", None), "lookup_tensor", None)
        if lookup is not None:
            lookup.clear()
    return ep


def apply_to_tensors(model: torch.nn.Module, fn, recurse: bool = True) -> None:
    """nn.Module._apply: what .to(), .cuda(), .half() call on every parameter and buffer."""
    model._apply(fn, recurse)


# -- module hooks (checked on 2.13.0): nn.Module keeps them in these private dicts ----------------------------
_CALL_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_FORWARD_HOOKS = ("_forward_hooks", "_forward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")
_GLOBAL_FORWARD_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks")


def hook_ids(modules) -> tuple:
    """Ids of every call hook (forward, pre-forward, backward) registered on these modules."""
    return tuple(k for m in modules for name in _CALL_HOOKS for k in getattr(m, name, ()))


def has_call_hooks(module: torch.nn.Module) -> bool:
    return any(getattr(module, name, None) for name in _CALL_HOOKS)


def call_hook_sources(module: torch.nn.Module) -> set:
    """(Python module, function name) of each function hooked on `module`'s calls: transformers' own are
    ("transformers.utils.output_capturing", ...) and ("transformers.modeling_utils", "make_inputs_require_grads")."""
    out = set()
    for name in _CALL_HOOKS:
        for hook in (getattr(module, name, None) or {}).values():
            fn = getattr(hook, "func", hook)  # (a functools.partial)
            out.add((hook_source(hook), getattr(fn, "__name__", "")))
    return out


INPUT_REQUIRE_GRADS_HOOK = ("transformers.modeling_utils", "make_inputs_require_grads")


# torch's higher-order operators that run their body as it is when called eagerly (checked on 2.13.0): the others
# (torch.cond, while_loop, scan, map, flex_attention, invoke_subgraph...) compile it with Dynamo even then
# (torch._higher_order_ops.utils._hop_compile_and_call), tracing a TorchFunctionMode active around them too
EAGER_HOPS = ("wrap_with_autocast", "wrap_with_set_grad_enabled", "tag_activation_checkpoint",
              "wrap_activation_checkpoint", "autograd_function_apply", "auto_functionalized", "auto_functionalized_v2",
              "with_effects", "_export_tracepoint", "out_dtype", "hints_wrapper", "wrap", "run_const_graph")


def self_compiling_calls(gm: torch.fx.GraphModule) -> list:
    """The names of the higher-order operators a captured graph calls that compile themselves with Dynamo even
    when called eagerly (torch.cond's "cond", "while_loop", "flex_attention"...), in order."""
    return [node.target.name() for node in gm.graph.nodes
            if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator)
            and node.target.name() not in EAGER_HOPS]


def global_module_hooks() -> bool:
    """Whether a hook registered with torch.nn.modules.module.register_module_forward_hook (and friends) is active:
    it fires for every module call."""
    import torch.nn.modules.module as mod

    return any(getattr(mod, name, None) for name in _GLOBAL_HOOKS)


def hook_source(hook) -> str:
    """The Python module that defined a hook's function ("torch.nn.utils.prune" for a pruning method's hook)."""
    fn = getattr(hook, "func", hook)  # (a functools.partial)
    return getattr(fn, "__module__", None) or getattr(type(fn), "__module__", "") or ""


def _defined_in(hook, prefixes: tuple) -> bool:
    """Whether the hook's function comes from a module whose name starts with one of `prefixes` (none: False)."""
    return bool(prefixes) and hook_source(hook).startswith(prefixes)


def _forward_hook_dicts(modules, global_too: bool) -> list:
    import torch.nn.modules.module as mod

    dicts = [getattr(mod, name) for name in _GLOBAL_FORWARD_HOOKS] if global_too else []
    return dicts + [getattr(m, name) for m in modules for name in _FORWARD_HOOKS]


def has_forward_hooks(modules, but: tuple = (), global_too: bool = False) -> bool:
    """Whether a forward or pre-forward hook is registered on `modules` (and globally, with `global_too`), other
    than hooks defined in a module whose name starts with one of `but`."""
    return any(not _defined_in(h, but) for hooks in _forward_hook_dicts(modules, global_too) for h in hooks.values())


@contextlib.contextmanager
def forward_hooks_suspended(modules, keep: tuple = (), global_too: bool = False):
    """Forward and pre-forward hooks of `modules` (and the global ones, register_module_forward_hook's, with
    `global_too`) do not fire inside the block (they are restored after), for runs frzcompile makes for itself,
    which the user's hooks must not see. Hooks defined in a module whose name starts with one of `keep` (e.g.
    "torch.": pruning's and spectral norm's, which compute the weight the module runs with) still fire. The hook
    dictionaries stay the same objects: a hook registered during the block (a library installing its hooks at
    its first call) stays after it, and its handle removes it."""
    saved = []
    for hooks in _forward_hook_dicts(modules, global_too):
        if hooks:
            items = list(hooks.items())
            suspended = {k for k, h in items if not _defined_in(h, keep)}
            for k in suspended:
                del hooks[k]
            saved.append((hooks, items, suspended))
    try:
        yield
    finally:
        for hooks, items, suspended in saved:
            now = dict(hooks)
            hooks.clear()
            hooks.update((k, h) for k, h in items if k in suspended or k in now)  # (a kept one may be removed)
            hooks.update((k, h) for k, h in now.items() if k not in hooks)  # (registered meanwhile, after the others)


# -- torch.export's context regions (checked on 2.13.0) ---------------------------------------------------------
_REGION_WRAPPERS = {"wrap_with_autocast": 4, "wrap_with_set_grad_enabled": 1}  # name -> its context arguments


@contextlib.contextmanager
def autocast_kept(device_types=("cpu", "cuda")):
    """Autocast's state as it was before the block, also when the block fails: a graph whose autocast region was
    inlined (`inline_context_regions`) leaves it on when it raises between the region's enter and exit."""
    saved = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in device_types]
    cache = torch.is_autocast_cache_enabled()
    nesting = torch.autocast_increment_nesting() - 1
    torch.autocast_decrement_nesting()
    try:
        yield
    finally:
        for device, enabled, dtype in saved:
            torch.set_autocast_enabled(device, enabled)
            torch.set_autocast_dtype(device, dtype)
        torch.set_autocast_cache_enabled(cache)
        now = torch.autocast_increment_nesting() - 1
        torch.autocast_decrement_nesting()
        for _ in range(now - nesting):
            if torch.autocast_decrement_nesting() == 0:
                torch.clear_autocast_cache()


def inline_context_regions(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """torch.export puts a `with torch.autocast(...)` (or `torch.set_grad_enabled`) block of the forward in one
    higher-order node over a submodule, which hides the modules called inside it (their nodes' module stacks):
    each such block is put back in the graph, between enter and exit nodes (as Dynamo's graphs hold them), so
    every node keeps its own module and the graph runs as before, except that a failure inside the region leaves
    autocast on: run such a graph under `autocast_kept()`."""
    graph = gm.graph
    for node in list(graph.nodes):
        count = _REGION_WRAPPERS.get(getattr(node.target, "__name__", "")) if node.op == "call_function" else None
        if count is None or len(node.args) <= count or node.args[count].op != "get_attr":
            continue
        holder, operands = node.args[count], node.args[count + 1:]
        sub = getattr(gm, holder.target)
        if any(n.op == "get_attr" for n in sub.graph.nodes) or \
                any(u.op != "call_function" or u.target is not operator.getitem for u in node.users):
            continue  # (a region nested in it, or its outputs used as one tuple: left whole)
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        with graph.inserting_before(node):
            if count == 4:
                mode = graph.call_function(torch.amp.autocast_mode._enter_autocast, tuple(node.args[:count]))
            else:
                before = graph.call_function(torch.is_grad_enabled, ())
                graph.call_function(torch._C._set_grad_enabled, tuple(node.args[:count]))
            outputs = graph.graph_copy(sub.graph, dict(zip(placeholders, operands)))
            if count == 4:
                graph.call_function(torch.amp.autocast_mode._exit_autocast, (mode,))
            else:
                graph.call_function(torch._C._set_grad_enabled, (before,))
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        for user in list(node.users):
            user.replace_all_uses_with(outputs[user.args[1]])
            graph.erase_node(user)
        graph.erase_node(node)
        if not holder.users:
            graph.erase_node(holder)
            delattr(gm, holder.target)
    graph.lint()
    gm.recompile()
    return gm

# -- torch.fx (checked on 2.13.0) -----------------------------------------------------------------------------
def record_aten_graph(model: torch.nn.Module, args: tuple, kwargs: dict):
    """A GraphModule of the ATen operations one real call `model(*args, **kwargs)` runs (make_fx with real
    tensors, pre-dispatch): Python control flow, `.item()` and `pack_padded_sequence` take the example's values,
    so the graph is that call's path. Each node's `nn_module_stack` names the modules it was called in (recorded
    by hooks on the model's modules, as export does), and the GraphModule takes `(*args, **kwargs)` and returns
    the model's output structure, as an exported program's module does."""
    import torch.fx.traceback as fx_traceback
    from torch.export._unlift import _get_codegen
    from torch.fx.experimental.proxy_tensor import make_fx

    paths = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(module, path)
    stack = []

    def set_stack():
        fx_traceback.current_meta["nn_module_stack"] = {
            f"{i}:{paths[m]}": (paths[m], type(m)) for i, m in enumerate(stack)}

    def enter(module, _args):
        stack.append(module)
        set_stack()

    def leave(module, _args, _out):
        if stack and stack[-1] is module:
            stack.pop()
            set_stack()

    leaves, in_spec = tree_flatten((tuple(args), dict(kwargs)))
    out_specs, opened = [], []

    def call(*flat):
        a, k = tree_unflatten(list(flat), in_spec)
        out, spec = tree_flatten(model(*a, **k))
        if not all(isinstance(leaf, _WHOLE) for leaf in out):  # (a torch.distributions object: the graph
            out, spec = tree_flatten(open_tensors(out))  # returns
            opened.append(True)  # its tensors, in open_tree's order)
        out_specs.append(spec)
        return out

    handles = []
    try:
        for module in paths:
            handles.append(module.register_forward_pre_hook(enter, prepend=True))
            handles.append(module.register_forward_hook(leave, always_call=True))
        with fx_traceback.preserve_node_meta():
            gm = make_fx(call, tracing_mode="real", pre_dispatch=True, _error_on_data_dependent_ops=False)(*leaves)
    finally:
        for h in handles:
            h.remove()
    gm.graph._codegen = _get_codegen(in_spec, out_specs[-1])
    gm._in_spec, gm._out_spec = in_spec, out_specs[-1]
    gm.meta["opened_output"] = bool(opened)  # (its outputs are the tensors of the model's, see open_tree)
    gm.recompile()
    return gm


def fuse_by_partitions(gm, partitions, prefix):
    from torch.fx.passes.utils.fuser_utils import fuse_by_partitions as fuse

    return fuse(gm, partitions, prefix=prefix)


# -- Dynamo and Inductor (checked on 2.13.0) -------------------------------------------------------------------
# the calls Dynamo records for context managers that switch global state (variables/ctx_manager.py): grad and
# inference mode, autocast, saved-tensor hooks, functorch levels, the SDPA backend
GLOBAL_STATE_CALLS = (
    "torch._C._set_grad_enabled", "torch._C._set_fwd_grad_enabled",
    "torch.autograd.grad_mode._enter_inference_mode", "torch.autograd.grad_mode._exit_inference_mode",
    "torch.amp._enter_autocast", "torch.amp._exit_autocast",
    "torch._C._autograd._saved_tensors_hooks_disable", "torch._C._autograd._saved_tensors_hooks_enable",
    "torch._C._functorch._grad_increment_nesting", "torch._C._functorch._grad_decrement_nesting",
    "torch._C._functorch.push_dynamic_layer_stack", "torch._C._functorch.pop_dynamic_layer_stack",
    "torch._C._functorch.set_inplace_requires_grad_allowed",
    "torch._functorch.predispatch._enter_dual_level", "torch._functorch.predispatch._exit_dual_level",
    "torch._functorch.predispatch._jvp_increment_nesting", "torch._functorch.predispatch._jvp_decrement_nesting",
    "torch._functorch.predispatch._vmap_increment_nesting", "torch._functorch.predispatch._vmap_decrement_nesting",
    "torch.nn.attention._sdpa_kernel",
)


def global_state_targets() -> set:
    """The functions of GLOBAL_STATE_CALLS this torch has (a node calling one switches a global mode for the
    nodes after it: nothing may move across it)."""
    found = set()
    for dotted in GLOBAL_STATE_CALLS:
        obj = torch
        for part in dotted.split(".")[1:]:
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            found.add(obj)
    return found


def recompile_limit() -> int:
    import torch._dynamo

    return int(torch._dynamo.config.recompile_limit)


def guarding_hooks(compiled):
    """`compiled` (a torch.compile'd function) called so that its graphs guard on the hooks of the modules they
    run: Dynamo skips those guards by default (torch._dynamo.config.skip_nnmodule_hook_guards), so a graph traced
    while a module had no hook (or its hooks were suspended) would go on running without one registered later.
    With the guards, adding or removing a hook compiles a graph once more."""
    import torch._dynamo

    config = torch._dynamo.config

    def call(*args, **kwargs):
        was = config.skip_nnmodule_hook_guards
        config.skip_nnmodule_hook_guards = False  # (read when a graph's guards are built, inside the call)
        try:
            return compiled(*args, **kwargs)
        finally:
            config.skip_nnmodule_hook_guards = was

    return call


def failing_on_recompile_limit():
    """A context in which Dynamo raises instead of silently running a frame eagerly at its recompile limit."""
    import torch._dynamo

    return torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)


def dynamo_exceptions():
    """(BackendCompilerFailed, FailOnRecompileLimitHit)."""
    import torch._dynamo.exc as exc

    return exc.BackendCompilerFailed, exc.FailOnRecompileLimitHit


def current_compile_id() -> tuple[int, int] | None:
    """Dynamo's (frame id, compile attempt) of the graph being compiled, or None outside a compile."""
    from torch._guards import CompileContext

    cid = CompileContext.current_compile_id()
    if cid is None or cid.frame_id is None:
        return None
    return int(cid.frame_id), int(cid.frame_compile_id or 0)


def placeholder_source(node) -> str | None:
    """Dynamo's source of a graph input, e.g. "L['self']._modules['stem']._parameters['weight']"."""
    grapharg = node.meta.get("grapharg")
    return grapharg.source.name if grapharg is not None and grapharg.source is not None else None


def saved_dynamo_sources(gm) -> dict:
    """AOTAutograd reads each placeholder's `_dynamo_source`, a plain attribute that graph surgery does not carry
    over; save them by node name here and give them back with `restore_dynamo_sources`."""
    return {n.name: n._dynamo_source for n in gm.graph.nodes if hasattr(n, "_dynamo_source")}


def restore_dynamo_sources(gm, sources: dict) -> None:
    for node in gm.graph.find_nodes(op="placeholder"):
        if node.name in sources:
            node._dynamo_source = sources[node.name]


def inductor_compile(gm, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def aot_eager_compile(gm, example_inputs):
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend("aot_eager")(gm, example_inputs)


def compiled_callables(model: torch.nn.Module, attribute: str) -> list:
    """Objects carrying `attribute` among the graphs Dynamo compiled for `model`'s module classes.

    Dynamo installs each compiled graph in the globals of the frame it compiled, as `__compiled_fn_<n>_...`,
    wrapped (functools.wraps) around what the backend returned; so the backend's own objects are found by
    unwrapping those globals. A module whose forward is torch's own (`torch.compile(nn.Sequential(...))`) is
    compiled through a wrapper frame in torch._dynamo.external_utils (checked on 2.13.0): its globals too."""
    seen, found = set(), []
    wrapper = sys.modules.get("torch._dynamo.external_utils")
    namespaces = [getattr(getattr(type(m), "forward", None), "__globals__", None) for m in model.modules()]
    namespaces.append(getattr(wrapper, "__dict__", None))
    for namespace in namespaces:
        if namespace is None or id(namespace) in seen:
            continue
        seen.add(id(namespace))
        for name, value in list(namespace.items()):
            if not name.startswith("__compiled_fn"):
                continue
            for _ in range(8):
                if value is None or hasattr(value, attribute):
                    break
                value = getattr(value, "__wrapped__", None)
            if value is not None and hasattr(value, attribute):
                found.append(value)
    return found
