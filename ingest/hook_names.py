"""TransformerLens hook names: the keys under which the fast engine keeps what it captures.

The engine hooks the Hugging Face modules, not a TransformerLens model, but it names each
capture by the TransformerBridge hook that sees the same tensor, so a reader who knows
TransformerLens knows what `blocks.3.attn.hook_z` holds. A norm's capture is its input
(`hook_in`): the engine computes the scale from it.
"""

from __future__ import annotations


def z(layer: int) -> str:
    """Every head's z (the attention output projection's input), [batch, pos, head·d_head]."""
    return f"blocks.{layer}.attn.hook_z"


def attn_out(layer: int) -> str:
    """The attention output (before any post-norm)."""
    return f"blocks.{layer}.hook_attn_out"


def mlp_out(layer: int) -> str:
    """The MLP's write to the residual stream (after any post-norm)."""
    return f"blocks.{layer}.hook_mlp_out"


def mlp_module_out(layer: int) -> str:
    """The MLP module's own output (before a post-norm)."""
    return f"blocks.{layer}.mlp.hook_out"


def mlp_post(layer: int) -> str:
    """The MLP's neuron activations (the down projection's input)."""
    return f"blocks.{layer}.mlp.hook_post"


def resid_post(layer: int) -> str:
    """The residual stream leaving a block (the last one's is the final norm's input)."""
    return f"blocks.{layer}.hook_resid_post"


def norm_in(layer: int, role: str) -> str:
    """A block norm's input; `role` is `ln1`, `ln2`, `ln1_post` or `ln2_post` (`norm_roles`)."""
    return f"blocks.{layer}.{role}.hook_in"


UNEMBED_OUT = "unembed.hook_out"  # the unembedding's output, before any softcap


def norm_roles(children: list[str], attn_post: str | None, mlp_post: str | None) -> list[str]:
    """The TransformerLens names of a block's norms, given their module names in order: the
    family's post-norms are `ln1_post` and `ln2_post`, the others `ln1`, `ln2`, … in order."""
    roles, pre = [], 0
    for child in children:
        if child == attn_post:
            roles.append("ln1_post")
        elif child == mlp_post:
            roles.append("ln2_post")
        else:
            pre += 1
            roles.append(f"ln{pre}")
    return roles
