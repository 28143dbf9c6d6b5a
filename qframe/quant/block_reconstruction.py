"""Block reconstruction (BRECQ, Li et al. 2021): AdaRound on a block's output, not a layer's.

The roundings of all quantized layers of a block (a residual block, an inverted-residual block,
or a lone layer) are learned jointly, so that the block's output in the quantized model, with its
activation quantizers on, matches the float block's output; errors of one layer are then
compensated by the next one inside the block. Blocks are the coarsest sub-modules holding at most
``block_layers`` quantized layers, reconstructed in execution order, each on the input the
already-reconstructed quantized model gives it.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from qframe.errors import QFrameError
from qframe.quant.adaround import (ROUNDABLE, AdaRoundConfig, LearnedRounding, beta_schedule, check_adaround_config,
                                   learned_rounding, log_gain, reconstruction_hook, store_weight, warn_unroundable)
from qframe.quant.capture import check_remedy_inputs, execution_order, layerwise_pass, reference_outputs, run_hooked
from qframe.quant.modules import quantizers

log = logging.getLogger(__name__)


def _layers(module: nn.Module, prefix: str) -> list[str]:
    return [".".join(part for part in (prefix, n) if part) for n, m in module.named_modules()
            if isinstance(m, ROUNDABLE) and m.weight_quantizer is not None]


def blockable(model: nn.Module, example: torch.Tensor) -> set[str]:
    """Names of ``model``'s sub-modules that one forward pass on ``example`` calls exactly once, with one tensor
    and nothing else, returning one tensor: what a block must be to be run on its input and compared with
    its float output."""
    calls: dict[str, int] = {}
    bad: set[str] = set()

    def before(name):
        def hook(_module, args, kwargs):
            calls[name] = calls.get(name, 0) + 1
            if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
                bad.add(name)
        return hook

    def after(name):
        def hook(_module, _args, out):
            if not isinstance(out, torch.Tensor):
                bad.add(name)
        return hook

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(before(name), with_kwargs=True))
            handles.append(module.register_forward_hook(after(name)))
    run_hooked(model, example, handles)
    return {name for name, n in calls.items() if n == 1 and name not in bad}


def find_blocks(model: nn.Module, max_layers: int = 3, called: set[str] | None = None) -> list[str]:
    """Names of the coarsest sub-modules of ``model`` holding 1..``max_layers`` quantized layers
    (the model itself is never one), in the order the tree lists them. With ``called`` (:func:`blockable`'s
    names), a module outside it is no block and its children are looked at instead: a container the forward
    only iterates over (an ``nn.ModuleList``: ConvNeXt's downsampling layers) is never called, a module
    called twice has no one input and output, and one called with more than a tensor (CvT's self-output
    takes the residual too) or returning more cannot be rerun on its input alone."""
    blocks: list[str] = []

    def walk(name: str, module: nn.Module) -> None:
        count = len(_layers(module, name))
        if count == 0:
            return
        if name and count <= max_layers and (called is None or name in called):
            blocks.append(name)
            return
        if isinstance(module, ROUNDABLE):  # a quantized layer at the root of a large model, or one not blockable
            if called is None or not name or name in called:
                blocks.append(name)
            return
        for child_name, child in module.named_children():
            walk(f"{name}.{child_name}" if name else child_name, child)

    walk("", model)
    return blocks


@contextlib.contextmanager
def _soft_weights(layers: dict[str, nn.Module], roundings: dict[str, LearnedRounding]):
    """Within the block, each layer's weight quantizer returns its soft-rounded weight."""
    quantizers = [layers[n].weight_quantizer for n in roundings]
    for q, r in zip(quantizers, roundings.values()):
        q.forward = lambda _w, r=r: r.soft()
    try:
        yield
    finally:
        for q in quantizers:
            del q.forward


@contextlib.contextmanager
def _dropped_activations(block: nn.Module, prob: float, generator: torch.Generator | None):
    """Within, each enabled activation quantizer of ``block`` passes each value on unquantized with probability
    ``prob`` (QDrop): the roundings are then learned against a mix of quantized and float activations."""
    acts = [q for name, q in quantizers(block) if not name.endswith("weight_quantizer") and q.enabled] if prob else []
    for q in acts:
        def forward(x, q=q):
            out = type(q).forward(q, x)
            own = generator if generator is not None and generator.device == x.device else None
            return torch.where(torch.rand(x.shape, generator=own, device=x.device) < prob, x, out)
        q.forward = forward
    try:
        yield
    finally:
        for q in acts:
            del q.forward


@torch.no_grad()
def _block_error(block: nn.Module, x: torch.Tensor, target: torch.Tensor) -> float:
    return float((block(x) - target).double().pow(2).sum()) / _rows(target)


def _rows(t: torch.Tensor) -> int:
    """Rows of an output: everything but the channel dim (dim 1 of a map, the last of a Linear output)."""
    return max(1, t.numel() // (t.shape[1] if t.dim() > 3 else t.shape[-1]))


@contextlib.contextmanager
def _own_hooks_only(block: nn.Module):
    """Within, the forward hooks of ``block``'s modules are qframe's alone (placement's, which quantize what a
    block computes); the model's own are set aside. A block is rerun many times inside the pass's forward, and
    a model's hooks would take each rerun for part of that forward: transformers' backbones collect their
    stages' outputs with forward hooks, and the reruns' outputs joined the collected hidden states (UperNet's
    ConvNeXt then normalised a 16-channel map with its 32-channel norm)."""
    saved = []
    for module in block.modules():
        for attr in ("_forward_pre_hooks", "_forward_hooks"):
            hooks = getattr(module, attr)
            saved.append((hooks, dict(hooks)))
            for key, fn in list(hooks.items()):
                if not getattr(fn, "__module__", "").startswith("qframe."):
                    del hooks[key]
    try:
        yield
    finally:
        for hooks, original in saved:  # in their order
            hooks.clear()
            hooks.update(original)


def reconstruct_block(block: nn.Module, x: torch.Tensor, target: torch.Tensor, cfg: AdaRoundConfig, *,
                      generator: torch.Generator | None = None) -> tuple[float, float]:
    """Learn the roundings of the quantized layers in ``block`` in place, from its input
    ``x`` in the quantized model and ``target``, the float block's output; returns the (nearest, learned)
    output error per row. Keeps nearest rounding if the learned one does not do better."""
    with _own_hooks_only(block):
        return _reconstruct_block(block, x, target, cfg, generator)


def _reconstruct_block(block: nn.Module, x: torch.Tensor, target: torch.Tensor, cfg: AdaRoundConfig,
                       generator: torch.Generator | None) -> tuple[float, float]:
    names = _layers(block, "")
    layers = {n: block.get_submodule(n) for n in names}
    roundings = {n: learned_rounding(m) for n, m in layers.items()}
    target = target.to(x.dtype)
    nearest = _block_error(block, x, target)  # the weights are still float: the quantizers round to nearest
    opt = torch.optim.Adam([r.logits for r in roundings.values()], lr=cfg.lr)
    n = x.shape[0]
    with _soft_weights(layers, roundings), _dropped_activations(block, cfg.drop_prob, generator), torch.enable_grad():
        for step in range(cfg.iterations):
            idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=generator, device=x.device)
            out = block(x[idx])
            loss = (out - target[idx]).pow(2).sum() / _rows(out)
            beta = beta_schedule(step, cfg.iterations, cfg)
            if beta is not None and cfg.reg > 0:
                loss = loss + cfg.reg * sum(r.regulariser(beta) for r in roundings.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    originals = {n: m.weight.detach().clone() for n, m in layers.items()}
    for n, r in roundings.items():
        store_weight(layers[n], r.hard())
    learned = _block_error(block, x, target)
    if learned >= nearest:
        for n, w in originals.items():
            store_weight(layers[n], w)
        learned = nearest
    return nearest, learned


def reconstruct_blocks(qmodel: nn.Module, reference: nn.Module, images: torch.Tensor, cfg: AdaRoundConfig | None = None,
                       *, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Block-by-block AdaRound of every quantized layer of ``qmodel``, in place (see the module doc).

    ``reference``: the float model ``qmodel`` was quantized from (BN folded, same module names);
    ``images``: calibration images (run through ``qmodel`` as one batch). Returns per block the output
    error with nearest and with learned rounding.
    """
    check_remedy_inputs(qmodel, reference, images, "qframe.reconstruct_blocks")
    cfg = check_adaround_config(cfg)
    qmodel.eval()
    reference.eval()
    blocks = ordered_blocks(qmodel, images, cfg.block_layers)
    targets = reference_outputs(reference, blocks, images)
    generator = torch.Generator(device=images.device).manual_seed(seed)
    errors: dict[str, tuple[float, float]] = {}
    with tqdm(total=len(blocks), desc="adaround blocks", leave=False, disable=None) as bar:
        hook = block_hook(targets, cfg, errors, bar, generator)
        layerwise_pass(qmodel, images, before={b: hook for b in blocks})
    log_gain("adaround blocks", errors)
    return errors


def ordered_blocks(qmodel: nn.Module, images: torch.Tensor, max_layers: int) -> list[str]:
    """:func:`find_blocks` sorted by when a forward pass first reaches each."""
    warn_unroundable(qmodel, "adaround blocks")
    blocks = find_blocks(qmodel, max_layers, blockable(qmodel, images))
    if not blocks:
        raise QFrameError("block reconstruction found no quantized Conv1d / Conv2d / Linear layer in a module a forward pass "
                          "calls once with one tensor; run ptq first")
    covered = {n for b in blocks for n in _layers(qmodel.get_submodule(b), b)}
    left = [n for n in _layers(qmodel, "") if n not in covered]
    if left:
        log.warning("adaround blocks: %d layers keep nearest rounding, in no block a forward pass calls once with one "
                    "tensor (a layer called more than once: a head shared by the levels of a feature pyramid): %s",
                    len(left), ", ".join(left))
    order = {n: i for i, n in enumerate(execution_order(qmodel, images))}
    return sorted(blocks, key=lambda b: min(order.get(n, len(order)) for n in _layers(qmodel.get_submodule(b), b)))


def block_hook(targets: dict[str, torch.Tensor], cfg: AdaRoundConfig, errors: dict, bar=None, generator=None):
    """A :func:`~qframe.quant.capture.layerwise_pass` pre-hook that reconstructs each block it reaches."""
    return reconstruction_hook(reconstruct_block, targets, cfg, errors, bar, generator)
