"""Every explanation method, by the name requests use."""

from __future__ import annotations

from salience_server.explain import catalog
from salience_server.explain.engine import Method
from salience_server.explain.methods.blur_ig import BlurIG
from salience_server.explain.methods.cam import GradCam, GradCamPlusPlus, GuidedGradCam
from salience_server.explain.methods.gradient_x_input import GradientXInput
from salience_server.explain.methods.guided_ig import GuidedIG
from salience_server.explain.methods.integrated_gradients import IntegratedGradients
from salience_server.explain.methods.layercam import LayerCam
from salience_server.explain.methods.occlusion import Occlusion
from salience_server.explain.methods.scorecam import FasterScoreCam, ScoreCam
from salience_server.explain.methods.smoothgrad import SmoothGrad
from salience_server.explain.methods.vanilla import Vanilla
from salience_server.explain.methods.xrai import Xrai

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
        ScoreCam(),
        FasterScoreCam(),
        LayerCam(),
        Occlusion(),
        BlurIG(),
        GuidedIG(),
        Xrai(),
    )
}
catalog.check_implemented("methods", METHODS, catalog.METHODS)
catalog.check_implemented(
    "default grad modifiers",
    [m.default_grad_modifier for m in METHODS.values()],
    catalog.METHODS.values(),
)
