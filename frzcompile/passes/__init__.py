"""Graph passes, applied in the one order declared in `PASSES`: how a freeze plan becomes execution.

A pass is a plain function `(gm, ctx) -> gm` with `requires` and `provides` attributes stating its contract.
They run on two kinds of graph:
  - the analysis graph captured from the model, once per plan: the rewritten graph shows what the plan does
    (the no-grad frozen region, masked weights, the cached frontier), and the decisions the runtime carries out
    on the model's own modules are read from `ctx.decisions` (e.g. which frozen Linears take the block-sparse
    kernel);
  - each graph Dynamo hands the torch.compile backend: there the rewritten graph is what runs.
`run_passes` keeps every intermediate graph (labelled with the pass that made it and the time it took) on
`ctx.records`, and writes them as readable code to the folder named by the environment variable `FRZ_DEBUG`.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

from torch import fx

from .cache import cache
from .freeze import freeze
from .select_tokens import select_tokens
from .sparsify import sparsify

PASSES = [select_tokens, sparsify, freeze, cache]


@dataclass
class GraphRecord:
    label: str          # "captured", or "<pass>" for the graph a pass produced
    seconds: float
    code: str


@dataclass
class PassContext:
    """What a pass may read (the unit map by node name, the freeze plan, the services on) and where it writes."""

    node_unit: dict                 # node name -> unit name, for nodes of the graph
    frozen: frozenset
    prefix: tuple                   # frozen units that run without autograd, in topological order
    cache: bool = False             # whether the activation cache serves the frozen prefix
    sparsity: object = None         # the runtime's SparseTraining, or None when no weight is masked
    token_layers: tuple = ()        # transformer layers whose tokens the runtime selects (the ALaST policy)
    runs: bool = False              # whether the rewritten graph is what runs (Dynamo's), not one for analysis
    build: int = 0                  # how many graphs this module has built before, for dump file names
    model_name: str = "model"
    records: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)      # per pass: what it did, for explain and tests
    decisions: dict = field(default_factory=dict)  # what the runtime carries out on the model's modules

    def unit_of(self, node: fx.Node):
        return self.node_unit.get(node.name)


def readable(gm: fx.GraphModule) -> str:
    return gm.print_readable(print_output=False)


def _dump(ctx: PassContext, index: int, label: str, code: str) -> None:
    folder = os.environ.get("FRZ_DEBUG")
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", ctx.model_name)
    path = os.path.join(folder, f"{safe}.build{ctx.build:03d}.{index:02d}.{label}.py")
    with open(path, "w") as f:
        f.write(code)


def run_passes(gm: fx.GraphModule, ctx: PassContext, passes=None) -> fx.GraphModule:
    passes = PASSES if passes is None else passes
    code = readable(gm)
    ctx.records.append(GraphRecord("captured", 0.0, code))
    _dump(ctx, 0, "captured", code)
    for i, p in enumerate(passes, start=1):
        start = time.perf_counter()
        gm = p(gm, ctx)
        gm.graph.lint()
        gm.recompile()
        elapsed = time.perf_counter() - start
        code = readable(gm)
        ctx.records.append(GraphRecord(p.__name__, elapsed, code))
        _dump(ctx, i, p.__name__, code)
    return gm
