"""Backbone registry: ``@register_backbone`` on a tiny factory, one ``create_backbone()`` way in.

Modelled on timm's ``models/_registry.py``. A factory receives the resolved spec and weights and
returns a network with the fine-tuning interface every medtl backbone exposes:

- ``forward(x) -> logits (N, num_classes)``;
- ``forward_features(x)`` (un-pooled feature map) and ``forward_head(feats, pre_logits=True)``
  ``-> (N, F)`` pooled embedding, so a linear probe can cache features;
- ``get_classifier()`` and ``reset_classifier(num_classes)``;
- parameter groups ordered stem -> ... -> head, via :func:`param_groups`; :func:`freeze` keeps only
  the last groups trainable.

``create_backbone`` attaches ``model.backbone_spec`` (the :class:`~models.spec.BackboneSpec` adapted
to the requested channels) and ``model.pretrained_weights`` (a
:class:`~models.weights.ResolvedWeights` or None) for the training summary.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import nn

from models.errors import WeightsError
from models.spec import BackboneSpec
from models.weights import ResolvedWeights, resolve_weights

__all__ = [
    "BackboneFactory",
    "register_backbone",
    "register_prefix",
    "get_spec",
    "list_backbones",
    "create_backbone",
    "param_groups",
    "freeze",
    "GradualUnfreezing",
]


class BackboneFactory(Protocol):
    """Signature of a registered factory."""

    def __call__(
        self, spec: BackboneSpec, num_classes: int, in_chans: int, weights: ResolvedWeights | None
    ) -> nn.Module: ...


_REGISTRY: dict[str, tuple[BackboneSpec, BackboneFactory]] = {}
_PREFIXES: dict[str, Callable[[str], tuple[BackboneSpec, BackboneFactory]]] = {}


def register_backbone(spec: BackboneSpec) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator registering a factory under ``spec.name``.

    Args:
        spec: Input conventions and weight source of the backbone.

    Returns:
        A decorator that records the factory and returns it unchanged.
    """

    def deco(fn: BackboneFactory) -> BackboneFactory:
        if spec.name in _REGISTRY:
            raise ValueError(f"backbone name {spec.name!r} is already registered")
        _REGISTRY[spec.name] = (spec, fn)
        return fn

    return deco


def register_prefix(prefix: str, resolver: Callable[[str], tuple[BackboneSpec, BackboneFactory]]) -> None:
    """Register a resolver for dynamic names such as ``"timm/<model name>"``.

    Args:
        prefix: Name prefix including its separator (e.g. ``"timm/"``).
        resolver: Called with the part after the prefix; returns ``(spec, factory)`` or raises
            ValueError for a name it does not know.
    """
    _PREFIXES[prefix] = resolver


def _builtins() -> None:
    """Register the built-in backbones before any lookup (``import models.registry`` alone does not)."""
    from models import register_builtin_backbones

    register_builtin_backbones()


def _lookup(name: str) -> tuple[BackboneSpec, BackboneFactory]:
    _builtins()
    if not isinstance(name, str):
        raise ValueError(f"backbone name {name!r} is a {type(name).__name__}; expected a string")
    if name in _REGISTRY:
        return _REGISTRY[name]
    for prefix, resolver in _PREFIXES.items():
        if name.startswith(prefix):
            return resolver(name[len(prefix) :])
    raise ValueError(
        f"unknown backbone {name!r}; registered: {sorted(_REGISTRY)}; "
        f"or one of the prefixes {sorted(_PREFIXES)} followed by a model name (e.g. 'timm/resnet18')"
    )


def get_spec(name: str) -> BackboneSpec:
    """Return the :class:`BackboneSpec` of a registered (or prefix-resolved) backbone.

    Raises:
        ValueError: Unknown name (the message lists the registered names).
    """
    return _lookup(name)[0]


def list_backbones(pattern: str | None = None, spatial_dims: int | None = None) -> list[str]:
    """List registered backbone names (prefix-resolved names such as ``timm/*`` are not enumerated).

    Args:
        pattern: Optional shell-style wildcard filter (e.g. ``"medicalnet_*"``).
        spatial_dims: Keep only 2D or 3D backbones.
    """
    _builtins()
    names = sorted(_REGISTRY)
    if pattern is not None:
        names = fnmatch.filter(names, pattern)
    if spatial_dims is not None:
        names = [n for n in names if _REGISTRY[n][0].spatial_dims == spatial_dims]
    return names


def create_backbone(
    name: str,
    num_classes: int,
    in_chans: int | None = None,
    spatial_dims: int | None = None,
    pretrained: bool = True,
    weights: str | None = None,
    weights_sha256: str | None = None,
    allow_unpinned: bool | None = None,
) -> nn.Module:
    """Build a backbone with a fresh ``num_classes`` head, loading pretrained weights offline.

    Args:
        name: Registered name (see :func:`list_backbones`) or ``"timm/<timm model name>"``.
        num_classes: Number of output logits. When it equals the pretrained head's size the pretrained
            head is kept (e.g. 1000 for ImageNet); otherwise a new head is initialised.
        in_chans: Input channels; default the spec's native channels. 1 with RGB weights adapts the
            first conv by summing its RGB kernels (timm's ``adapt_input_conv``).
        spatial_dims: Expected dimensionality (2 or 3); a 2D name asked for 3D resolves to its
            ``inflated_<name>`` twin when one is registered, otherwise ValueError.
        pretrained: Load pretrained weights (resolved offline by :func:`models.weights.resolve_weights`).
        weights: Explicit checkpoint path; overrides resolution (implies ``pretrained``).
        weights_sha256: A digest the caller pins (the config's ``model.weights_sha256``): only a file
            with that content is loaded.
        allow_unpinned: Accept a file with no pinned digest (``model.allow_unpinned``). None (the
            default for Python callers) accepts an unpinned ``weights`` path passed here, never an
            unpinned file found by the offline search (see :func:`models.locate.locate_weights`).

    Returns:
        The network, input ``(N, C, H, W)`` or ``(N, C, D, H, W)`` per ``model.backbone_spec.axis_order``,
        output logits ``(N, num_classes)``.

    Raises:
        ValueError: Unknown name, or bad ``num_classes``/``in_chans``/``spatial_dims``.
        WeightsError: Weights not found, corrupt, or not fitting the network.
    """
    spec, factory = _lookup(name)
    if spatial_dims is not None and spatial_dims != spec.spatial_dims:
        twin = f"inflated_{name}"
        if spatial_dims == 3 and twin in _REGISTRY:
            spec, factory = _REGISTRY[twin]
        else:
            raise ValueError(
                f"backbone {name!r} is {spec.spatial_dims}D but spatial_dims={spatial_dims} was requested; "
                f"3D backbones: {list_backbones(spatial_dims=3)}"
            )
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}; expected a positive integer")
    chans = spec.in_chans if in_chans is None else in_chans
    if not isinstance(chans, int) or isinstance(chans, bool) or chans < 1:
        raise ValueError(f"in_chans={in_chans!r}; expected a positive integer")
    resolved: ResolvedWeights | None = None
    if weights is not None or pretrained:
        if spec.weights is None:
            raise WeightsError(
                f"backbone {spec.name!r} has no known pretrained weights; pass pretrained=False "
                f"or an explicit weights path"
            )
        resolved = resolve_weights(
            spec.weights, weights, weights_sha256=weights_sha256, allow_unpinned=allow_unpinned
        )
    model = factory(spec, num_classes, chans, resolved)
    model.backbone_spec = spec.with_in_chans(chans)
    model.pretrained_weights = resolved
    return model


def param_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """Parameters in ordered groups, stem first, classifier head last.

    Used for partial fine-tuning of the last blocks, gradual unfreezing and discriminative learning
    rates. Uses the model's own ``param_groups()`` when it has one (medtl's MONAI wrappers), else
    timm's coarse ``group_matcher``, else one group per top-level child module.

    Args:
        model: A network from :func:`create_backbone` (or any ``nn.Module``).

    Returns:
        Non-empty groups; every parameter appears in exactly one group.
    """
    if hasattr(model, "param_groups") and callable(model.param_groups):
        groups = model.param_groups()
    elif hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        named = dict(model.named_parameters())
        by_id = group_parameters(model, model.group_matcher(coarse=True))
        groups = [[named[n] for n in by_id[k]] for k in sorted(by_id)]
    else:
        groups = [list(child.parameters()) for child in model.children()]
    groups = [g for g in groups if g]
    n_total = sum(1 for _ in model.parameters())
    n_grouped = len({id(p) for g in groups for p in g})
    if n_grouped != n_total:
        raise RuntimeError(
            f"param_groups({type(model).__name__}) covers {n_grouped} of {n_total} parameters; "
            "every parameter must belong to exactly one group"
        )
    return groups


def freeze(model: nn.Module, n_trainable_groups: int) -> list[list[nn.Parameter]]:
    """Freeze all parameter groups except the last ``n_trainable_groups`` (head is the last group).

    ``n_trainable_groups=1`` trains the head only (linear probe); ``len(param_groups(model))`` trains
    everything. BatchNorm running statistics are not frozen here: put frozen BatchNorm layers in eval
    mode in the training loop if wanted.

    Args:
        model: The network.
        n_trainable_groups: Number of trailing groups left trainable, 0..number of groups.

    Returns:
        The parameter groups (as :func:`param_groups`), with ``requires_grad`` set.
    """
    groups = param_groups(model)
    if not isinstance(n_trainable_groups, int) or not 0 <= n_trainable_groups <= len(groups):
        raise ValueError(
            f"n_trainable_groups={n_trainable_groups!r}; expected an integer in 0..{len(groups)} "
            f"for {type(model).__name__} ({len(groups)} parameter groups)"
        )
    first_trainable = len(groups) - n_trainable_groups
    for i, group in enumerate(groups):
        for p in group:
            p.requires_grad_(i >= first_trainable)
    return groups


@dataclass(frozen=True)
class GradualUnfreezing:
    """Freeze schedule as its own object (like Lightning's ``MilestonesFinetuning``).

    Training starts with the last ``initial_groups`` parameter groups trainable (1 = head only); at each
    epoch in ``milestones`` another ``groups_per_step`` groups, walking back from the head to the stem,
    become trainable. Create the optimizer over all parameters: frozen ones get no gradient and are
    skipped by the optimizer until they are unfrozen.

    Args:
        initial_groups: Trainable groups at epoch 0 (>= 1).
        milestones: Strictly increasing epochs at which more groups are unfrozen.
        groups_per_step: Groups unfrozen at each milestone (>= 1).
    """

    initial_groups: int = 1
    milestones: Sequence[int] = ()
    groups_per_step: int = 1

    def __post_init__(self) -> None:
        if self.initial_groups < 1 or self.groups_per_step < 1:
            raise ValueError(
                f"GradualUnfreezing: initial_groups={self.initial_groups}, groups_per_step="
                f"{self.groups_per_step}; expected both >= 1"
            )
        ms = list(self.milestones)
        if any(b <= a for a, b in zip(ms, ms[1:], strict=False)) or any(m < 0 for m in ms):
            raise ValueError(f"GradualUnfreezing: milestones={ms}; expected strictly increasing epochs >= 0")

    def n_trainable(self, epoch: int, n_groups: int) -> int:
        """Number of trailing groups trainable at ``epoch`` (capped at ``n_groups``)."""
        passed = sum(1 for m in self.milestones if epoch >= m)
        return min(n_groups, self.initial_groups + passed * self.groups_per_step)

    def apply(self, model: nn.Module, epoch: int) -> int:
        """Set ``requires_grad`` for ``epoch``; returns the number of trainable groups."""
        n = self.n_trainable(epoch, len(param_groups(model)))
        freeze(model, n)
        return n
