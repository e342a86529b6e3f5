"""The one path from uint8 pixels to logits, shared by training-time validation, evaluation, the CLI and the
web service, so what is served is exactly what was measured (no train/serve skew).

Every model saved by this project carries in its config the normalisation (``image_mean``/``image_std``), the
input size (``image_size``), the test-time augmentation level (``tta_level``) it expects, the confidence
below which an image gets those views (``tta_confidence``, fitted after training: :func:`fit_tta_confidence`)
and the softmax temperature fitted after training (``calibration_temperature``, read and written only through
:func:`calibration_temperature` and :func:`set_calibration_temperature`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedConfig, PreTrainedModel

from cifar10_pipeline import CALIBRATION_TEMPERATURE, IMAGE_SHAPE

# Decoding lives in core/images.py (no torch there); image_to_array stays importable from here, where the
# model card's snippet imports it.
from cifar10_pipeline.core.images import ImageInputError
from cifar10_pipeline.core.images import image_to_array as image_to_array


def normalize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) standardised, in channels_last memory layout."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255
    x = images.permute(0, 3, 1, 2).float()
    return ((x - mean_t) / std_t).contiguous(memory_format=torch.channels_last)


def fit_input_size(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resize on the device to the checkpoint's input size (e.g. 224 for ViT); a no-op at 32."""
    if x.shape[-1] == image_size and x.shape[-2] == image_size:
        return x
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)


def _logits(model: PreTrainedModel, x: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=fit_input_size(x, model.config.image_size)).logits.float()


# A small batch's test-time views go through the network together, as one batch: on a CPU one pass of 6
# images costs about 60% of six passes of one (the web service classifies one image at a time). Larger
# batches keep one pass per view (no gain there, and the views' activations would not fit as well).
STACK_VIEWS_UP_TO = 64  # images x views


def _views_logits(model: PreTrainedModel, x: torch.Tensor, level: int) -> torch.Tensor:
    """Every image's logits averaged over the views of ``level``: 0 = the image, 1 = + its mirror, 2 = + both
    shifted by one pixel (reflect padding), the shifted pair and the plain pair weighted equally."""
    views = [x]
    if level >= 1:
        views.append(x.flip(-1))
    if level >= 2:
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        h, w = x.shape[-2:]
        for shifted in (padded[..., :h, :w], padded[..., 2:, 2:]):
            views += [shifted, shifted.flip(-1)]
    # In eval mode each image's logits do not depend on its batch, so stacking changes only float rounding.
    if len(views) > 1 and len(x) * len(views) <= STACK_VIEWS_UP_TO and not model.training:
        logits = list(_logits(model, torch.cat(views)).split(len(x)))
    else:
        logits = [_logits(model, view) for view in views]
    if level == 0:
        return logits[0]
    plain = 0.5 * (logits[0] + logits[1])
    if level == 1:
        return plain
    shifted_logits = torch.stack([0.5 * (logits[2] + logits[3]), 0.5 * (logits[4] + logits[5])]).mean(0)
    return 0.5 * plain + 0.5 * shifted_logits


def plain_confidence(logits: torch.Tensor) -> torch.Tensor:
    """Each image's top softmax probability (no temperature): what selective TTA compares with a threshold."""
    return logits.float().softmax(-1).amax(-1)


def tta_logits(
    model: PreTrainedModel, x: torch.Tensor, level: int, below_confidence: float | None = None
) -> torch.Tensor:
    """Logits with test-time augmentation at ``level`` (see :func:`_views_logits`).

    ``below_confidence`` makes it selective (as in hiverge's CIFAR-10 speed run): every image goes through
    the network once, and only those whose top softmax probability is below the threshold get the other
    views; the rest keep their plain logits. The test is per image, so an image's result does not depend on
    the batch it came in (one image per web request or 500 in the CLI give the same class). None: every image
    gets every view.
    """
    if level == 0 or below_confidence is None:
        return _views_logits(model, x, level)
    if below_confidence >= 1.0:  # softmax can round to exactly 1.0, so >= 1 means "every image"
        return _views_logits(model, x, level)
    plain = _logits(model, x)
    uncertain = (plain_confidence(plain) < below_confidence).nonzero().squeeze(1)
    if len(uncertain) == 0:
        return plain
    out = plain.clone()
    out[uncertain] = _views_logits(model, x[uncertain], level)
    return out


def tta_confidence(config: PreTrainedConfig | Mapping[str, Any]) -> float | None:
    """The confidence below which an image gets test-time augmentation (``tta_confidence`` in config.json,
    written by the train stage); None for models saved without one: every image gets every view."""
    if isinstance(config, Mapping):
        value = config.get(TTA_CONFIDENCE)
    else:
        value = getattr(config, TTA_CONFIDENCE, None)
    return None if value is None else float(value)


def fit_tta_confidence(plain_logits: torch.Tensor, fraction: float) -> float | None:
    """The threshold that sends the least confident ``fraction`` of these images (held-out ones: the
    validation split, or training images where there is none) through test-time augmentation. None for
    ``fraction`` 1: every image, the whole TTA. Fitted once after training and stored in the config, so the
    test set never sets it."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train.tta_fraction must be in (0, 1], not {fraction}")
    if fraction >= 1.0 or len(plain_logits) == 0:
        return None
    confidence = plain_confidence(plain_logits).double()
    return float(torch.quantile(confidence, fraction))


def set_tta_confidence(model: PreTrainedModel, threshold: float | None) -> None:
    """Store the selective-TTA threshold in ``model.config`` (None: every image gets every view)."""
    if threshold is not None and not (math.isfinite(threshold) and 0.0 < threshold <= 1.0):
        raise ValueError(f"a confidence threshold must be in (0, 1], got {threshold}")
    setattr(model.config, TTA_CONFIDENCE, None if threshold is None else float(threshold))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature T minimising the NLL of softmax(logits / T) on held-out data (Guo et al., 2017).

    Label smoothing and a down-scaled head leave the network under-confident; one scalar fixes the
    probabilities without changing any prediction.
    """
    logits, labels = logits.detach().float(), labels.detach()
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(log_t.detach().exp())


TTA_CONFIDENCE = "tta_confidence"  # config.json key of selective TTA's threshold (tta_logits)
# Training images selective TTA's threshold is fitted on where there is no validation split (gpu profiles).
TTA_FIT_TRAIN_IMAGES = 5000


def calibration_temperature(config: PreTrainedConfig | Mapping[str, Any]) -> float:
    """The softmax temperature fitted on the validation split after training, from a model's config (or
    its config.json as a dict); 1.0 when none was fitted. Evaluation, the CLI, the web service, the model
    card and ``forward(calibrated=True)`` (hence ``transformers.pipeline``) all read it here."""
    if isinstance(config, Mapping):
        return float(config.get(CALIBRATION_TEMPERATURE, 1.0))
    return float(getattr(config, CALIBRATION_TEMPERATURE, 1.0))


def set_calibration_temperature(model: PreTrainedModel, temperature: float) -> None:
    """Store the fitted temperature in ``model.config`` (saved to config.json by ``save_pretrained``)."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"a softmax temperature must be a positive finite number, got {temperature}")
    setattr(model.config, CALIBRATION_TEMPERATURE, float(temperature))


def native_bf16(device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether ``device`` runs bf16 matrix kernels in hardware: a CUDA GPU that supports bf16, or a CPU with
    AVX-512 BF16 or AMX. Elsewhere (e.g. an AVX2-only CPU) torch emulates bf16, tens of times slower than
    fp32, so ``precision: auto`` falls back to fp32 there."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> "bf16" where the hardware has it, else "fp32"; "bf16" and "fp32" are kept as asked."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.no_grad()
def predict_logits(
    model: PreTrainedModel,
    images: np.ndarray | torch.Tensor,
    batch_size: int = 500,
    tta_level: int | None = None,
    precision: str = "auto",
    progress: bool = False,
    calibrated: bool = True,
    selective: bool = True,
) -> torch.Tensor:
    """Logits (N, num_labels) on the CPU for uint8 (N, 32, 32, 3) images, with the model's own TTA level,
    given only to images below the model's ``tta_confidence`` (``selective``; False: to every image).

    ``calibrated`` divides by the temperature fitted after training (:func:`calibration_temperature`, 1 if
    none), so softmax gives calibrated probabilities; predictions are the same either way.
    """
    device = next(model.parameters()).device
    level = model.config.tta_level if tta_level is None else tta_level
    temperature = calibration_temperature(model.config) if calibrated else 1.0
    threshold = tta_confidence(model.config) if selective else None
    images = torch.as_tensor(images)
    if images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE or images.dtype != torch.uint8:
        raise ImageInputError(
            f"expected uint8 images of shape (N, 32, 32, 3), got {images.dtype} {tuple(images.shape)}"
        )
    was_training = model.training
    model.eval()
    out = []
    for part in tqdm(
        list(batches(len(images), batch_size)), desc="predict", disable=not progress, leave=False
    ):
        x = normalize(
            images[part].to(device, non_blocking=True), model.config.image_mean, model.config.image_std
        )
        with autocast(device, precision):
            out.append(tta_logits(model, x, level, threshold).cpu() / temperature)
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, model.config.num_labels)


@dataclasses.dataclass(frozen=True)
class SelectiveTTA:
    """What :func:`fit_selective_tta` chose and measured on the held-out images it was given."""

    threshold: float | None  # None: every image gets every view
    fraction: float  # of the held-out images below the threshold
    accuracy_plain: float | None  # one view, no TTA (None: no labels given)
    accuracy_selective: float | None  # the threshold applied
    accuracy_full: float | None  # every view for every image
    selective_logits: torch.Tensor | None  # uncalibrated, on the CPU: what a temperature is fitted on


def fit_selective_tta(
    model: PreTrainedModel,
    images: np.ndarray,
    labels: np.ndarray | None,
    fraction: float,
    precision: str = "auto",
) -> SelectiveTTA:
    """Fit and store (``model.config.tta_confidence``) the threshold that gives the least confident
    ``fraction`` of these held-out images the model's test-time augmentation, and measure what it costs.

    With ``labels``, two passes: one plain view and the whole TTA, both of every image; the selective logits
    are composed from them (the same numbers ``tta_logits`` then computes, up to float rounding). Without,
    the plain pass alone (the threshold, nothing measured).
    """
    set_tta_confidence(model, None)
    plain = predict_logits(model, images, tta_level=0, precision=precision, calibrated=False)
    threshold = fit_tta_confidence(plain, fraction) if model.config.tta_level else None
    uncertain = plain_confidence(plain) < (threshold if threshold is not None else math.inf)
    set_tta_confidence(model, threshold)
    if labels is None:  # nothing to measure: the threshold is all the caller wants
        return SelectiveTTA(threshold, float(uncertain.double().mean()), None, None, None, None)
    full = plain
    if model.config.tta_level:
        full = predict_logits(model, images, precision=precision, calibrated=False, selective=False)
    selective = torch.where(uncertain[:, None], full, plain)
    labels_t = torch.as_tensor(labels).cpu()

    def accuracy(logits: torch.Tensor) -> float:
        return float((logits.argmax(1) == labels_t).double().mean())

    return SelectiveTTA(
        threshold=threshold,
        fraction=float(uncertain.double().mean()),
        accuracy_plain=accuracy(plain),
        accuracy_selective=accuracy(selective),
        accuracy_full=accuracy(full),
        selective_logits=selective,
    )
