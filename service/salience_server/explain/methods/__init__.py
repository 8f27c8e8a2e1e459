"""Every explanation method, by the name requests use."""

from __future__ import annotations

from salience_server.explain.engine import Method
from salience_server.explain.methods.vanilla import Vanilla

METHODS: dict[str, Method] = {m.name: m for m in (Vanilla(),)}
