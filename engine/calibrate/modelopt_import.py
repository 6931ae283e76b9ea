"""modelopt's quantization package, imported without its plugins for libraries a calibration does not use.

`import modelopt.torch.quantization` imports a plugin for each optional library it finds installed (vLLM,
Transformer Engine, Megatron, PyTorch Geometric, TRL, ...), and each plugin imports its library. On a machine that
has them (GPU containers ship several) that is seconds of one core before the first layer, and none of it serves
calibrating transformers' decoder layers. `quantization()` imports the package with those libraries looking absent,
a setup modelopt supports (each of its plugins is optional and skipped quietly), then makes them importable again
for the rest of the process. A library already imported is left as it is.

Not hidden: the libraries whose presence transformers checks once and remembers (PEFT, diffusers, apex: its cached
`is_*_available`), which would then be absent for transformers for the rest of the process, or present while an
import of them fails; and accelerate, which transformers may import itself. While modelopt imports, the other
threads of a calibration (reading the first layer, preparing its inputs) import none of the hidden libraries.
"""

from __future__ import annotations

import sys
from types import ModuleType

# the libraries behind modelopt's optional plugins that quantizing transformers' DeepSeek layers never touches and
# transformers keeps no record of (see the module doc)
UNUSED_PLUGIN_LIBRARIES = ("fairscale", "fastvideo", "megatron", "torch_geometric", "transformer_engine", "trl",
                           "vllm")


def quantization() -> ModuleType:
    """`modelopt.torch.quantization`, imported without the plugins of UNUSED_PLUGIN_LIBRARIES the first time."""
    if "modelopt.torch.quantization" not in sys.modules:
        hidden = [n for n in UNUSED_PLUGIN_LIBRARIES if n not in sys.modules]
        for name in hidden:
            sys.modules[name] = None  # type: ignore[assignment]  # `import name` now fails as if not installed
        try:
            import modelopt.torch.quantization  # noqa: F401
        finally:
            for name in hidden:
                if name in sys.modules and sys.modules[name] is None:
                    del sys.modules[name]
    import modelopt.torch.quantization as mtq

    return mtq
