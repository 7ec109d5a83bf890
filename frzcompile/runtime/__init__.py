"""The runtime: what runs when a FrozenModule is called, and the freeze plan behind it.

    module.py    FrozenModule (FrozenContainer for an nn.Sequential), the module face: calls the model, keeps modes, attributes and state dicts its own
    loss.py      the training-loss signal the policies' safety rules read
    plan.py      the freeze plan and what applying it means for parameters, optimizers and modules
    steps.py     optimizer steps (any torch optimizer holding the model) drive the policy
    services.py  the hook points of the optional services (activation cache, sparse training)
    analysis.py  the captured graph, the passes' graph per plan, FLOPs per unit (what explain shows)
    compiled.py  the compiled path: torch.compile with the frzcompile backend, one compiled model per plan
    markers.py   optimize()'s marker on each module: the live FrozenModules its model is part of
"""
from .module import FrozenContainer, FrozenModule, NoLossWarning, NoStepWarning, ResumeWarning, attached_to

__all__ = ["FrozenModule", "FrozenContainer", "NoStepWarning", "NoLossWarning", "ResumeWarning", "attached_to"]
