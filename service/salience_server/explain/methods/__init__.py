"""Every explanation method, by the name requests use."""

from __future__ import annotations

from salience_server.explain.engine import Method
from salience_server.explain.methods.cam import GradCam, GradCamPlusPlus, GuidedGradCam
from salience_server.explain.methods.gradient_x_input import GradientXInput
from salience_server.explain.methods.integrated_gradients import IntegratedGradients
from salience_server.explain.methods.smoothgrad import SmoothGrad
from salience_server.explain.methods.vanilla import Vanilla

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Vanilla(),
        SmoothGrad(),
        IntegratedGradients(),
        GradientXInput(),
        GradCam(),
        GradCamPlusPlus(),
        GuidedGradCam(),
    )
}
