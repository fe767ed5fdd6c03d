"""Loading any causal LM by one name: a built-in model, a local directory, or a Hugging Face hub id.

Every config field that names a model goes through :func:`resolve_model_path`, so ``"rlfb-tiny"``,
``"./my-model"`` and ``"gpt2"`` are interchangeable wherever a model is expected:

* a built-in name (``rlfb-tiny``) resolves to the copy shipped inside the package (no build);
* an existing local directory resolves to itself, if it holds a ``config.json`` (and, for an rlfb build
  such as a cache entry, intact weights);
* anything else shaped like a hub id (``name`` or ``org/name``) is handed to transformers unchanged;
* a path-like string (``./x``, ``../x``, ``/x``, ``~/x``) that does not exist raises
  :class:`~rlfb.errors.ModelNotFoundError` saying so.

Example:
    >>> resolve_model_path("gpt2")
    'gpt2'
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from rlfb.errors import ModelNotFoundError
from rlfb.models import builtin

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BUILTIN_MODELS: dict[str, str] = {
    "rlfb-tiny": "GPT-2 (~1M parameters) pretrained offline by rlfb on its own review sentences and sums; "
                 "shipped inside the package (`rlfb models build rlfb-tiny` rebuilds it from its recipe)",
    "rlfb-tiny-multiturn": "rlfb-tiny's recipe plus transcripts of the multi-turn formats (calculator calls, "
                           "guess-the-number games, sums as questions); shipped inside the package",
}

# A hub id: "name" or "org/name", letters, digits and -_. only (see huggingface_hub's repo id rules).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _builtin_listing() -> str:
    return ", ".join(sorted(BUILTIN_MODELS))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turns a device name into a ``torch.device``; ``"auto"`` picks CUDA when available, else CPU.

    Args:
        device: "auto", "cpu", "cuda", "cuda:1", ... or a ``torch.device``.

    Returns:
        The device.
    """
    import torch

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from error


def resolve_model_path(name_or_path: str, *, progress: bool = True) -> str:
    """Resolves a model name to something ``from_pretrained`` accepts.

    Args:
        name_or_path: A built-in name, a local directory, or a hub id.
        progress: Show a progress bar if a built-in model has to be built.

    Returns:
        The directory of a built-in model (its shipped copy), the local directory itself, or the hub id
        unchanged.

    Raises:
        ModelNotFoundError: If ``name_or_path`` is empty, a path that does not exist, a directory that is
            not a model (no ``config.json``), or a damaged or unfinished rlfb build.
    """
    if name_or_path in BUILTIN_MODELS:
        return str(builtin.locate(name_or_path, progress=progress))
    if not name_or_path.strip():
        raise ModelNotFoundError(f"model {name_or_path!r} not found: the model name is empty; "
                                 f"built-in models: {_builtin_listing()}")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        _check_model_directory(name_or_path, path)
        return str(path)
    if looks_like_path(name_or_path):
        raise ModelNotFoundError(
            f"model path {name_or_path!r} does not exist (looked for {path.absolute()}); name an existing "
            f"model directory, a hub id (org/name) or a built-in model ({_builtin_listing()})")
    if _HUB_ID.match(name_or_path):
        return name_or_path
    raise ModelNotFoundError(
        f"model {name_or_path!r} not found: it is not a built-in model, an existing directory, or a hub id "
        f"(org/name); built-in models: {_builtin_listing()}")


def looks_like_path(name: str) -> bool:
    """A name that can only mean a file system path: it starts like one, or has a '/' no hub id has."""
    return name.startswith(("./", "../", "/", "~")) or name in (".", "..") or (
        "/" in name and not _HUB_ID.match(name))


def _check_model_directory(name: str, path: Path) -> None:
    """Raises unless ``path`` looks loadable: a ``config.json``, and if it is an rlfb build, an intact one."""
    if (path / builtin.MARKER_FILE).is_file():
        problem = builtin.verify_entry(path)
        if problem is not None:
            raise ModelNotFoundError(
                f"model directory {name!r} is a damaged rlfb build ({problem}); delete it and build it "
                f"again with `rlfb models build NAME` (built-in models: {_builtin_listing()})")
        return
    if _looks_like_partial_builtin(path):
        raise ModelNotFoundError(
            f"model directory {name!r} is an unfinished rlfb build (no {builtin.MARKER_FILE}); "
            f"delete it and use a built-in name ({_builtin_listing()}) to rebuild it")
    if not (path / "config.json").is_file():
        nested = sorted(str(config.parent) for config in path.glob("*/config.json"))[:3]
        hint = f"; these directories inside it are models: {', '.join(nested)}" if nested else ""
        raise ModelNotFoundError(
            f"model directory {name!r} has no config.json, so it is not a model; a model directory (as "
            f"written by save_pretrained) holds config.json, the weights (model.safetensors) and the "
            f"tokenizer files (tokenizer.json, tokenizer_config.json){hint}")


def _looks_like_partial_builtin(path: Path) -> bool:
    """A directory inside rlfb's model cache that lacks the completion marker is a half-written build."""
    try:
        return path.resolve().parent == (builtin.rlfb_home() / "models").resolve()
    except OSError:
        return False


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Loads a model's tokenizer, ready for batched generation.

    The pad token is set (to EOS when the tokenizer has none) and padding is on the left, so the prompts of
    a batch end at the same column and generation continues right after each of them.

    Args:
        name_or_path: A built-in name, a local directory, or a hub id.

    Returns:
        The tokenizer.

    Raises:
        ModelNotFoundError: If the model cannot be found.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:  # transformers raises either for a dir without model files
        raise _not_found(name_or_path, error) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    context = _context_length(path)
    if context is not None and context < tokenizer.model_max_length:
        # Tokenizers often save a placeholder (1024, or 1e30) rather than the model's real context; the
        # environments size their prompt window from this number, so it must not exceed the positions.
        tokenizer.model_max_length = context
    return tokenizer


def _context_length(path: str) -> int | None:
    """The number of positions the model's config allows, or None when the config does not say."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_model(name_or_path: str, device: str | torch.device = "auto", dtype: torch.dtype | None = None,
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a causal LM and its tokenizer, in eval mode, on ``device``.

    Args:
        name_or_path: A built-in name, a local directory, or a hub id.
        device: Where to put the model ("auto": CUDA if available, else CPU).
        dtype: Weight dtype; None keeps the checkpoint's (float32 for built-in models).

    Returns:
        (model, tokenizer); ``model.config.pad_token_id`` is set to the tokenizer's pad token.

    Raises:
        ModelNotFoundError: If the model cannot be found.

    Example:
        >>> model, tokenizer = load_model("rlfb-tiny", device="cpu")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(name_or_path)
    path = resolve_model_path(name_or_path)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:  # transformers raises either for a dir without model files
        raise _not_found(name_or_path, error) from error
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    fuse_tanh_gelu(model)
    model = model.to(resolve_device(device)).eval()  # type: ignore[arg-type]  # transformers wraps .to()
    return model, tokenizer


def fuse_tanh_gelu(model: torch.nn.Module) -> int:
    """Run the tanh approximation of GELU as PyTorch's fused kernel; returns the number of modules swapped.

    GPT-2's ``activation_function="gelu_new"`` (and ``"gelu_fast"``) is, in transformers, the formula
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) written as eight elementwise tensor operations, forward
    and backward. ``torch.nn.functional.gelu(x, approximate="tanh")`` computes the same function in one
    kernel (outputs agree to ~5e-7, float32 rounding), several times faster; on rlfb-tiny the activation
    was a fifth of every forward pass. Transformers calls this kernel ``"gelu_pytorch_tanh"``.
    """
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    swapped = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(parent, name, GELUTanh())
                swapped += 1
    return swapped


def _not_found(name_or_path: str, error: Exception) -> ModelNotFoundError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if Path(name_or_path).expanduser().is_dir():  # a local directory: the network has nothing to do with it
        return ModelNotFoundError(
            f"could not load model directory {name_or_path!r} ({reason}); it needs the files "
            "save_pretrained writes: config.json, the weights (model.safetensors) and the tokenizer files")
    return ModelNotFoundError(
        f"could not load model {name_or_path!r} ({reason}); built-in models: {_builtin_listing()}; "
        "a hub id needs network access or a copy in the Hugging Face cache")
