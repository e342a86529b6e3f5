"""The image processor saved beside every trained model, so standard tools preprocess exactly as we do.

``transformers.pipeline("image-classification", model=<model dir>)`` and ``AutoImageProcessor`` load it from
``preprocessor_config.json``. It runs the project's own preprocessing functions (core/images.py and
inference.py), not a look-alike: Pillow's bicubic resize to 32x32 (a no-op for CIFAR-sized images), the
uint8 -> float normalisation with the model's ``image_mean``/``image_std`` and the on-device resize to the
model's ``image_size``. So ``pixel_values`` are bit-identical to what ``predict_logits`` feeds the network.

With ``calibrated_output`` (built-in architectures), the processor also asks the model for the logits of our
inference path (``calibrated``: test-time augmentation at ``config.tta_level``, divided by the fitted
temperature, ``inference.calibration_temperature``), so the pipeline's softmax gives the calibrated
probabilities our CLI reports.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedConfig
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from cifar10_pipeline.core.images import pil_to_array
from cifar10_pipeline.modeling.inference import fit_input_size, normalize


class CifarImageProcessor(BaseImageProcessor):
    """Images (PIL, or uint8 HWC arrays/tensors) -> normalised ``pixel_values`` at the model's input size."""

    model_input_names: ClassVar[list[str]] = ["pixel_values"]

    def __init__(
        self,
        image_mean: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5),
        image_std: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5),
        image_size: int = 32,
        calibrated_output: bool = False,
        **kwargs: Any,
    ):
        # BaseImageProcessor's own kwargs machinery (resize/rescale/normalize flags) is bypassed on purpose:
        # preprocess below calls the project's functions, and these four values are all it needs.
        super().__init__(**kwargs)
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.image_size = int(image_size)
        self.calibrated_output = bool(calibrated_output)

    @classmethod
    def for_config(cls, config: PreTrainedConfig, calibrated_output: bool) -> CifarImageProcessor:
        """The processor for a model saved by this project (its config carries the normalisation)."""
        return cls(
            image_mean=config.image_mean,
            image_std=config.image_std,
            image_size=config.image_size,
            calibrated_output=calibrated_output,
        )

    @staticmethod
    def _to_array(image: Any) -> np.ndarray:
        if isinstance(image, torch.Tensor):
            image = image.numpy()
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
                raise ValueError(
                    f"CifarImageProcessor takes uint8 (H, W, 3) arrays or PIL images, got {image.dtype} "
                    f"{image.shape}; decode files with PIL.Image.open first"
                )
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise TypeError(
                f"CifarImageProcessor takes PIL images or uint8 arrays, got {type(image).__name__}"
            )
        return pil_to_array(image)

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        batch = images if isinstance(images, list | tuple) else [images]
        uint8 = torch.from_numpy(np.stack([self._to_array(image) for image in batch]))
        pixel_values = fit_input_size(normalize(uint8, self.image_mean, self.image_std), self.image_size)
        data: dict[str, torch.Tensor] = {"pixel_values": pixel_values}
        if self.calibrated_output:
            # One flag per image, so the pipeline's batching (it concatenates every key) keeps it.
            data["calibrated"] = torch.ones(len(batch), dtype=torch.bool)
        return BatchFeature(data=data, tensor_type=return_tensors)
