"""The self-perceptual objective (Lin & Yang 2024, "Diffusion Model with Perceptual Loss", arXiv 2401.00110,
§4): a frozen copy of an MSE-trained diffusion model is the perceptual network of its own fine-tuning.

Per sample: ``x = x0 + sigma n`` and the online prediction ``x0_hat = D_theta(x; sigma, c)``. A second
noise level ``sigma' ~ ln N(P_mean, P_std^2)`` and noise ``n'`` are drawn; the clean image and the
prediction are noised **identically**, ``x' = x0 + sigma' n'`` and ``x_hat' = x0_hat + sigma' n'``, and the
loss is the mean squared distance of the frozen network's hidden features at ``(., sigma', c)``::

    L_p = mean_l | phi_l(x_hat'; sigma', c) - phi_l(x'; sigma', c) |^2

(the paper's ``x_t' = alpha_t' x0 + sigma_t' eps'`` in the EDM parameterisation; its ``phi`` is the frozen
U-Net's mid-block output). ``weight`` mixes it with the EDM loss: ``(1 - weight) L_EDM + weight L_p``;
``weight = 0`` is the plain EDM loss exactly (the frozen network is not called), ``weight = 1`` the
paper's objective (no MSE term). The online network starts from the frozen one's weights (the paper
fine-tunes the MSE model). Features (:func:`feature_module`): the input of a named module, by default
PixelMLP's residual stream after the middle block (input of ``norms.<depth // 2>``), EDM2's input of
the first decoder block (the lowest-resolution features), guidelab's UNet's output of the middle block.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..denoisers import EDMPrecond, edm_loss
from ..errors import check


def default_layer(net: nn.Module) -> str:
    """The module whose input (PixelMLP, EDM2) or output (UNet ``mid.1``) is the feature map."""
    kind = type(net).__name__
    if kind == "PixelMLP":
        depth: Any = net.depth
        return f"norms.{int(depth) // 2}"
    if kind == "EDM2":
        return "unet.dec." + next(iter(net.unet.dec.keys()))  # type: ignore[union-attr, operator]
    if kind == "UNet":
        return "mid.1"
    check(False, f"the self-perceptual objective needs a PixelMLP, UNet or EDM2 network, got {kind}")
    return ""


def features(net: nn.Module, layer: str, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
    """``net``'s features [batch, -1] at ``layer`` (its input; UNet's ``mid.*``: its output) for (x, sigma, cond)."""
    modules = dict(net.named_modules())
    check(layer in modules, f"unknown perceptual layer {layer!r}; e.g. {default_layer(net)!r}")
    grab: dict[str, torch.Tensor] = {}
    output = type(net).__name__ == "UNet"

    def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        grab["f"] = (out if output else args[0]).flatten(1)

    h = modules[layer].register_forward_hook(hook)
    try:
        net(x, sigma, **cond)
    finally:
        h.remove()
    check("f" in grab, f"layer {layer!r} was not used in the forward pass")
    return grab["f"]


def self_perceptual_loss(
    net: nn.Module,
    frozen: nn.Module,
    x: torch.Tensor,
    sigma: torch.Tensor,
    x0: torch.Tensor,
    precond: EDMPrecond,
    *,
    weight: float,
    gen: torch.Generator,
    P_mean: float,
    P_std: float,
    layer: str | None = None,
    **cond: Any,
) -> torch.Tensor:
    """Per-sample loss [batch]: ``(1 - weight) L_EDM + weight L_p`` (module docstring); ``weight = 0``: edm_loss."""
    check(0 <= weight <= 1, f"perceptual weight must be in [0, 1], got {weight!r}")
    if weight == 0:
        return edm_loss(net, x, sigma, x0, precond, **cond)
    check(
        not any(p.requires_grad for p in frozen.parameters()),
        "the frozen perceptual network must not require gradients: pass frozen.requires_grad_(False)",
    )
    pred = net(x, sigma, **cond)
    B, dev = x.shape[0], x.device
    sigma2 = (torch.randn(B, generator=gen, device=dev) * P_std + P_mean).exp()
    n2 = torch.randn(x0.shape, generator=gen, device=dev)
    s2 = sigma2.reshape((-1,) + (1,) * (x0.ndim - 1))
    layer = layer or default_layer(frozen)
    with torch.no_grad():
        target = features(frozen, layer, x0 + s2 * n2, sigma2, cond)
    # the frozen network's parameters need no gradient; the prediction does (through the frozen net)
    loss_p = (features(frozen, layer, pred + s2 * n2, sigma2, cond) - target).square().mean(1)
    if weight == 1:
        return loss_p
    lam = precond.loss_weight(sigma).reshape(-1)
    loss_mse = lam * (pred - x0).square().flatten(1).mean(1)
    return (1 - weight) * loss_mse + weight * loss_p
