"""What the web service loads once at startup and shares between requests: the model (from a saved
directory, a Hub id or an MLflow registry URI), its description for /health, and the limits it enforces."""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cifar10_pipeline import IMAGE_SHAPE, __version__
from cifar10_pipeline.core.hashing import file_digest
from cifar10_pipeline.core.hub import parse_hub_id
from cifar10_pipeline.core.paths import saved_model_dir
from cifar10_pipeline.serving.batching import MicroBatcher
from cifar10_pipeline.serving.guards import DecodeSlots
from cifar10_pipeline.serving.schemas import Limits, ModelInfo, ServerInfo, WeightsFile
from cifar10_pipeline.serving.settings import ServeSettings

# The service's one logger, for the lifespan and the routes alike.
logger = logging.getLogger("cifar10_pipeline.serving.serve")

REGISTRY_PREFIX = "models:/"
MODEL_SETTING = "--model / CIFAR10_SERVE_MODEL"  # how a no-model message names the setting


@dataclass
class Runtime:
    """Everything loaded once at startup and shared by the requests."""

    model: Any  # a transformers PreTrainedModel
    labels: list[str]
    info: ModelInfo
    server: ServerInfo
    limits: Limits
    scratch: Path | None = None  # where a registry model was downloaded; removed at shutdown
    # Set when the app starts: the model's own thread behind a micro-batching queue (one forward pass at a
    # time: torch already spreads one batch over all cores), and the decode slots.
    batcher: MicroBatcher | None = field(default=None, repr=False)
    decode_slots: DecodeSlots | None = field(default=None, repr=False)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def server_git_commit(override: str | None = None) -> str:
    """The commit the server's code comes from: the setting, else git asked beside this file."""
    if override:
        return override
    from cifar10_pipeline.core.provenance import head_commit

    # Beside this file, not the working directory: the server may be started from anywhere.
    return head_commit(Path(__file__).resolve().parent)


def download_registry_model(uri: str, scratch: Path) -> tuple[Path, str | None]:
    """Fetch a registered model's files and return (the saved transformers model directory, its version).

    The registry stores the save_pretrained directory as an artifact of a pyfunc model (see
    tracking/model_registry.py); serving loads that directory directly, so it runs exactly the code
    evaluation ran.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from cifar10_pipeline.tracking.runs import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    reference = uri[len(REGISTRY_PREFIX) :]
    version: str | None = None
    client = MlflowClient()
    if "@" in reference:
        name, alias = reference.split("@", 1)
        version = str(client.get_model_version_by_alias(name, alias).version)
    elif "/" in reference:
        version = reference.rsplit("/", 1)[1]
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(scratch)))
    candidates = sorted({p.parent for p in local.rglob("config.json") if any(p.parent.glob("*.safetensors"))})
    if len(candidates) != 1:
        raise RuntimeError(
            f"{uri}: expected one saved model directory (config.json + *.safetensors) in the registered "
            f"artifacts, found {len(candidates)}; register models with "
            "cifar10_pipeline.tracking.model_registry."
        )
    return candidates[0], version


def load_runtime(settings: ServeSettings) -> Runtime:
    """Load the model named by the settings and describe it for /health."""
    from cifar10_pipeline.modeling.inference import predict_logits
    from cifar10_pipeline.modeling.model import load_model

    if settings.torch_threads is not None:
        import torch

        torch.set_num_threads(settings.torch_threads)
    scratch: Path | None = None
    version: str | None = None
    if settings.model.startswith(REGISTRY_PREFIX):
        scratch = Path(tempfile.mkdtemp(prefix="cifar10-serve-"))
        try:
            model_dir, version = download_registry_model(settings.model, scratch)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        name = settings.model[len(REGISTRY_PREFIX) :].split("@")[0].split("/")[0]
    else:
        model_dir = saved_model_dir(settings.model, MODEL_SETTING)
        hub_id = parse_hub_id(settings.model)
        # A Hub model is named by its repository and the commit it was downloaded at (the snapshot's folder).
        name = f"{hub_id[0]}@{model_dir.name}" if hub_id else model_dir.resolve().name
    model = load_model(model_dir)
    config = model.config
    labels = [config.id2label[i] for i in range(config.num_labels)]
    info = ModelInfo(
        name=name,
        source=settings.model,
        registry_version=version,
        architecture=(config.architectures or [type(model).__name__])[0],
        model_type=config.model_type,
        num_labels=config.num_labels,
        image_size=config.image_size,
        tta_level=config.tta_level,
        parameters=sum(p.numel() for p in model.parameters()),
        weights=[
            WeightsFile(file=p.name, sha256=file_digest(p), bytes=p.stat().st_size)
            for p in sorted(model_dir.glob("*.safetensors"))
        ],
    )
    server = ServerInfo(package_version=__version__, git_commit=server_git_commit(settings.git_commit))
    # /health reports the limits as the settings hold them: every field of Limits is a setting of that name.
    limits = Limits.model_validate(settings.model_dump(include=set(Limits.model_fields)))
    # One forward pass now, so the first user does not wait for torch's one-off kernel setup.
    predict_logits(model, np.zeros((1, *IMAGE_SHAPE), dtype=np.uint8))
    logger.info("serving %s (%s) from %s", info.name, info.architecture, settings.model)
    return Runtime(model=model, labels=labels, info=info, server=server, limits=limits, scratch=scratch)
