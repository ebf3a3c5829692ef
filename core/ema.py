"""An exponential moving average of a network's weights, for validation and the saved model.

A short CPU training run ends while the weights still jump from step to step:
the validation figures of neighbouring epochs differ by several points of AP50,
and the best epoch is partly luck. The average of the last few hundred steps
is smoother and usually better (Polyak averaging, as timm and nnU-Net-like
pipelines use). Training itself still steps the raw weights.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Mapping

import torch
from torch import nn


class WeightAverage:
    """``average = decay * average + (1 - decay) * weights`` after every optimiser step.

    decay: per step, in (0, 1); the average spans about ``1 / (1 - decay)``
        steps. Early on the decay is lowered to ``(1 + n) / (10 + n)`` after n
        updates, so the average does not drag the random initial weights along.
    Buffers that are not floating point (batch norm's step counter) are copied.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights and buffers."""
        if getattr(self, "_source", None) is not model:  # pair the tensors once per model
            mine, theirs = self.model.state_dict(), model.state_dict()
            floats = [k for k, v in mine.items() if v.is_floating_point()]
            self._source = model
            self._float = ([mine[k] for k in floats], [theirs[k] for k in floats])
            self._other = [(mine[k], theirs[k]) for k in mine if k not in set(floats)]
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        torch._foreach_lerp_(self._float[0], self._float[1], 1.0 - d)
        for target, value in self._other:
            target.copy_(value)

    def state_dict(self) -> Dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "weights": self.model.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
