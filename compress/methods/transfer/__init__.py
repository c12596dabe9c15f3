"""Fine-tuning transfer between model versions: θ_target + λ·(θ_ft − θ_base), streamed from safetensors.

``transfer`` does it from three checkpoints; ``extract`` writes the diff (optionally low-rank) as a
small artifact and ``apply`` adds an artifact to a target base.
"""

from compress.methods.transfer.artifact import apply, extract
from compress.methods.transfer.options import TransferOptions
from compress.methods.transfer.report import CompatibilityReport
from compress.methods.transfer.streaming import transfer

__all__ = ["transfer", "extract", "apply", "TransferOptions", "CompatibilityReport"]
