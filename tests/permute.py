"""The same function with its units renumbered: a model's conv channels permuted, for ground-truth tests of
matching (atlas compare, atlas evolution --follow matched)."""
import numpy as np
import torch


def conv_and_linear_names(net) -> tuple[list[str], str]:
    """A features/classifier model's conv modules' state names and its first Linear's (what reads conv5)."""
    convs = [f"features.{i}" for i, m in enumerate(net.features) if isinstance(m, torch.nn.Conv2d)]
    linear = next(f"classifier.{i}" for i, m in enumerate(net.classifier) if isinstance(m, torch.nn.Linear))
    return convs, linear


def permuted(state: dict, convs: list[str], linear: str, seed: int = 3) -> tuple[dict, dict[int, np.ndarray]]:
    """The state of the same function with every conv layer's channels permuted: {conv index: perm}, where
    channel j of the permuted model is channel perm[j] of the original."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in state.items()}
    perms, prev = {}, None
    for n, name in enumerate(convs):
        w = state[f"{name}.weight"]
        p = torch.randperm(w.shape[0], generator=g)
        w = w[p]
        if prev is not None:
            w = w[:, prev]
        out[f"{name}.weight"], out[f"{name}.bias"] = w.contiguous(), state[f"{name}.bias"][p].contiguous()
        perms[n], prev = p.numpy(), p
    w = state[f"{linear}.weight"]
    c = len(prev)
    out[f"{linear}.weight"] = w.reshape(w.shape[0], c, -1)[:, prev, :].reshape(w.shape[0], -1).contiguous()
    return out, perms
