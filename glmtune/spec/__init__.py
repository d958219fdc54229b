"""The `GLMFineTune` spec: the single source of truth for what a user can set (torch-free).

The Kubernetes CRD (`glmtune.crd`), the CLI's YAML config and local `glmtune run` all derive from these
pydantic models. YAML and the CRD use camelCase names, Python uses snake_case attributes.
"""

from __future__ import annotations

from glmtune.spec.base import API_GROUP, API_VERSION, KIND, SpecFieldError, SpecModel, check_storage_uri
from glmtune.spec.cluster import (
    ImagesSpec,
    ResourcesSpec,
    RunPolicySpec,
    S3Spec,
    SecretKeyRef,
    SecretRef,
    ServingAdapter,
    ServingResources,
    ServingSpec,
    Toleration,
)
from glmtune.spec.data import DataSpec
from glmtune.spec.loading import SpecError, format_path, load_spec_file, spec_from_mapping, spec_from_yaml
from glmtune.spec.method import (
    METHOD_SECTIONS,
    AdaLoraSpec,
    FreezeSpec,
    LoraSpec,
    MethodSpec,
    PrefixTuningSpec,
)
from glmtune.spec.model import CreateSpec, ModelSpec, QuantizationSpec
from glmtune.spec.output import OutputSpec
from glmtune.spec.resource import GLMFineTune, GLMFineTuneSpec, ObjectMeta
from glmtune.spec.rules import RULES, Rule, rule
from glmtune.spec.status import PHASES, Condition, GLMFineTuneStatus, RunRecord
from glmtune.spec.training import CheckpointSpec, DeepSpeedSpec, EvaluationSpec, TrainingSpec

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "KIND",
    "METHOD_SECTIONS",
    "PHASES",
    "RULES",
    "AdaLoraSpec",
    "CheckpointSpec",
    "Condition",
    "CreateSpec",
    "DataSpec",
    "DeepSpeedSpec",
    "EvaluationSpec",
    "FreezeSpec",
    "GLMFineTune",
    "GLMFineTuneSpec",
    "GLMFineTuneStatus",
    "ImagesSpec",
    "LoraSpec",
    "MethodSpec",
    "ModelSpec",
    "ObjectMeta",
    "OutputSpec",
    "PrefixTuningSpec",
    "QuantizationSpec",
    "ResourcesSpec",
    "RunPolicySpec",
    "Rule",
    "RunRecord",
    "S3Spec",
    "SecretKeyRef",
    "SecretRef",
    "ServingAdapter",
    "ServingResources",
    "ServingSpec",
    "SpecError",
    "SpecFieldError",
    "SpecModel",
    "Toleration",
    "TrainingSpec",
    "check_storage_uri",
    "format_path",
    "load_spec_file",
    "rule",
    "spec_from_mapping",
    "spec_from_yaml",
]
