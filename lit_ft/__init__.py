"""lit-ft: fine-tune pretrained timm backbones with PyTorch Lightning."""

from lit_ft.errors import UserError
from lit_ft.models import ImageClassifier

__version__ = "0.1.0"
__all__ = ["ImageClassifier", "UserError", "__version__"]
