"""quantdeck's engine: what a run is and does. Never imports textual, paramiko or remote.

quantdeck never reaches a network hub: models, tokenizers and kernels come from local files only. The variables
below are set before anything imports huggingface_hub or transformers (they read them at import), so neither
downloads a file nor asks the hub for kernels (transformers >= 5.2 would by default, and fail on an offline node).
"""

import os

__version__ = "0.1.0"

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "USE_HUB_KERNELS": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
os.environ.update(OFFLINE_ENV)
