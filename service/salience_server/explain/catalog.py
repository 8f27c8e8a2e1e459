"""The names the server offers, without their implementations: explanation
methods (with the grad modifier each defaults to) and grad modifiers.

The protocol layer validates, lists and labels by these names without importing
TensorFlow; the implementations (`explain.methods`, `explain.modifiers`) check at
import that they define exactly these, and plugins that register a grad modifier
add its name here too (`plugins`).
"""

from __future__ import annotations

from collections.abc import Iterable
from types import MappingProxyType

# Method name -> its default grad modifier, in the order metadata lists them.
_METHODS: dict[str, str] = {
    "vanilla": "absolute",
    "smoothgrad": "absolute",
    "integrated-gradients": "absolute",
    "gradient-x-input": "absolute",
    "gradcam": "none",
    "gradcam++": "none",
    "guided-gradcam": "absolute",
    "scorecam": "none",
    "faster-scorecam": "none",
    "layercam": "relu",
    "occlusion": "none",
    "blur-ig": "absolute",
    "guided-ig": "absolute",
    "xrai": "none",
}
METHODS = MappingProxyType(_METHODS)
# What a request that names no method gets (`explain.options.VANILLA`).
DEFAULT_METHOD = "vanilla"

# Grad modifier names, built-in ones first; plugins append (`add_grad_modifier`).
_GRAD_MODIFIERS: list[str] = ["absolute", "none", "negate", "relu", "invert", "small_values"]


def grad_modifiers() -> tuple[str, ...]:
    """Every grad modifier a request may name, now."""
    return tuple(_GRAD_MODIFIERS)


def add_grad_modifier(name: str) -> None:
    """A plugin's grad modifier joins the names requests may use."""
    if name not in _GRAD_MODIFIERS:
        _GRAD_MODIFIERS.append(name)


def check_implemented(what: str, implemented: Iterable[str], named: Iterable[str]) -> None:
    """Fails at import when an implementation registry and its names disagree."""
    if list(implemented) != list(named):
        raise RuntimeError(f"{what}: implemented {list(implemented)} but named {list(named)}")
