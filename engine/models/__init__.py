"""Model layouts: what each tensor name of a DeepSeek V3, V4 or generic checkpoint is.

    from engine.models import detect_layout
    layout = detect_layout(config, names)          # DeepseekV3Layout | DeepseekV4Layout | GenericLayout
    info = layout.classify(name)                   # TensorInfo: role, kind, layer, expert, attention, mtp, fused_group
    layout.should_quantize(name, quantize_attention=False, include_mtp=False)
    layout.scale_name("model.layers.3.mlp.experts.7.up_proj.weight")  # '...up_proj.weight_scale_inv'

engine.models.inspect (not imported here) reports what a whole checkpoint holds, by its layout.
"""

from engine.models import deepseek_v3, deepseek_v4, generic  # noqa: F401  (register the layouts)
from engine.models.base import (
    Kind,
    ModelLayout,
    Role,
    TensorInfo,
    collapse_indices,
    config_experts,
    config_layers,
    expert_index,
    layer_index,
)
from engine.models.deepseek_v3 import DeepseekV3Layout
from engine.models.deepseek_v4 import DeepseekV4Layout
from engine.models.detect import (
    Mismatch,
    config_mismatches,
    detect_family,
    detect_layout,
    family_from_config,
    family_from_names,
    role_counts,
    tensor_experts,
    tensor_layers,
)
from engine.models.generic import GenericLayout

__all__ = [
    "DeepseekV3Layout",
    "DeepseekV4Layout",
    "GenericLayout",
    "Kind",
    "Mismatch",
    "ModelLayout",
    "Role",
    "TensorInfo",
    "collapse_indices",
    "config_experts",
    "config_layers",
    "config_mismatches",
    "detect_family",
    "detect_layout",
    "expert_index",
    "family_from_config",
    "family_from_names",
    "layer_index",
    "role_counts",
    "tensor_experts",
    "tensor_layers",
]
