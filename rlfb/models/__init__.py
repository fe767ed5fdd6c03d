"""Models: the built-in offline models, loading any causal LM, the batched sampler and the Policy.

Example:
    >>> from rlfb.models import BUILTIN_MODELS
    >>> "rlfb-tiny" in BUILTIN_MODELS
    True
"""

from rlfb.models.builtin import TinyModelRecipe, ensure_built
from rlfb.models.loading import BUILTIN_MODELS, load_model, load_tokenizer, resolve_device, resolve_model_path

__all__ = ["BUILTIN_MODELS", "TinyModelRecipe", "ensure_built", "load_model", "load_tokenizer", "resolve_device",
           "resolve_model_path"]
