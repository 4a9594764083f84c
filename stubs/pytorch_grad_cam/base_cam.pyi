from collections.abc import Callable
from typing import Any

import numpy as np
import torch

class ActivationsAndGradients:
    def release(self) -> None: ...

class BaseCAM:
    model: torch.nn.Module
    target_layers: list[torch.nn.Module]
    activations_and_grads: ActivationsAndGradients
    #: The model's output of the last call (set by forward).
    outputs: torch.Tensor
    def __init__(
        self,
        model: torch.nn.Module,
        target_layers: list[torch.nn.Module],
        reshape_transform: Callable[..., Any] | None = None,
        compute_input_gradient: bool = False,
        uses_gradients: bool = True,
        tta_transforms: Any | None = None,
        detach: bool = True,
    ) -> None: ...
    def __call__(
        self,
        input_tensor: torch.Tensor,
        targets: list[torch.nn.Module] | None,
        aug_smooth: bool = False,
        eigen_smooth: bool = False,
    ) -> np.ndarray: ...
