"""Token budgets (the ALaST policy's runtime): which tokens each transformer layer runs on, and which layers
train each step. `select` holds the token arithmetic, `service` carries it out on the model's layers."""
from .select import (cls_attention, forwarded, gather_mask, gather_tokens, keep_count, other_tokens, sampled_tokens,
                     scatter_tokens, top_tokens)

__all__ = ["keep_count", "top_tokens", "sampled_tokens", "gather_tokens", "scatter_tokens", "gather_mask",
           "other_tokens", "forwarded", "cls_attention"]
