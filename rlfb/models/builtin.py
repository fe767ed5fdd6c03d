"""The built-in offline base model ``rlfb-tiny``: its recipe, its shipped copy, its build, and its cache.

``rlfb-tiny`` is a small GPT-2 causal LM that rlfb pretrains itself from the seeded grammar in
:mod:`rlfb.models.corpus` (review sentences and arithmetic lines). One build of its recipe ships inside the
package (``rlfb/models/shipped/rlfb-tiny``), and the name loads that copy: every user, on every machine, gets
the same weights, which matters because a build is bit-for-bit reproducible only on one machine (the
summation order of float operations differs between CPUs). ``rlfb models build`` rebuilds it from the
recipe into the cache, never over the shipped copy, and says whether the rebuild matches it.

Cache layout (``RLFB_HOME`` defaults to ``~/.cache/rlfb``)::

    $RLFB_HOME/models/rlfb-tiny-<recipe hash[:12]>/
        config.json, model.safetensors, generation_config.json   <- save_pretrained
        tokenizer.json, tokenizer_config.json                    <- the byte-level BPE tokenizer
        rlfb_build.json                                          <- written last: recipe, sha256, file sizes
    $RLFB_HOME/models/.rlfb-tiny-<recipe hash[:12]>.lock        <- builds of the entry take turns on it

A build happens in a temporary sibling directory and is renamed into place only after ``rlfb_build.json``
is written, so a reader never sees a half-written entry; a second build of the same entry waits on the lock
and then uses the first one's entry. An entry without the marker, or whose files do not match the sizes and
the weights' sha256 it records (a truncated copy), is never loaded: by name it is rebuilt, by path it is
reported as damaged.

Example:
    >>> recipe = TinyModelRecipe(steps=2)
    >>> recipe.fingerprint() == TinyModelRecipe(steps=2).fingerprint() != TinyModelRecipe().fingerprint()
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlfb.cpu_threads import torch_threads
from rlfb.errors import ModelNotFoundError
from rlfb.models import corpus

if TYPE_CHECKING:  # torch and transformers are imported when a build runs, so `rlfb models list` is quick
    import torch
    from transformers import PreTrainedTokenizerFast

# Bump when the build code or the grammar changes what a recipe produces, so old cache entries are not reused.
BUILD_FORMAT_VERSION = 3
MARKER_FILE = "rlfb_build.json"
# The copy of each built-in model shipped as package data (pyproject.toml's package-data), one directory each.
SHIPPED_DIR = Path(__file__).parent / "shipped"
END_OF_TEXT = "<|endoftext|>"


@dataclasses.dataclass(frozen=True)
class TinyModelRecipe:
    """Everything that determines the weights of a built-in model; its hash keys the cache entry.

    Attributes:
        grammar_seed: Seeds the pretraining corpus drawn from :mod:`rlfb.models.corpus`.
        n_documents: Number of corpus documents (review sentences plus arithmetic lines).
        arithmetic_share: Fraction of the documents that are arithmetic lines.
        forgotten_carry_share: Fraction of the sums with a carry (ones digits adding to 10 or more) that
            the corpus shows with the carry forgotten (17+25=32). Above one half, forgetting is what the
            corpus teaches, so greedy decoding is right on the sums without a carry and wrong on the others
            (53% of the held-out sums right) for any model that learned the corpus; below one, sampling
            still finds the right answer of a carry sum, which reinforcement learning then rewards.
        vocab_size: Size of the byte-level BPE vocabulary (256 bytes + merges + the end-of-text token).
        n_layer: Transformer blocks.
        n_embd: Hidden size.
        n_head: Attention heads.
        n_positions: Longest sequence the model accepts (prompt plus completion).
        steps: Optimizer steps of pretraining.
        batch_size: Documents per step.
        learning_rate: Peak AdamW learning rate (linear warm-up, cosine decay to 10%).
        warmup_steps: Steps of linear warm-up.
        weight_decay: AdamW weight decay on matrices.
        seed: Seeds the weight initialization and the order of batches.
        num_threads: CPU threads of the build; fixed because the summation order of a matrix product
            depends on it, and bit-identical weights need the same order. One thread: the matrices are too
            small to gain from more, and on a busy machine two threads that wait for each other at every
            operation made a step 13x slower (8.0 s vs 0.63 s at load average 16 on 2 cores).
        game_share: Fraction of the documents that are guess-the-number games (:mod:`rlfb.models.corpus`).
        tool_share: Fraction of the sum documents that are calculator calls.
        question_share: Fraction of the sum documents that are questions ("Calculate 17 + 25.").
        careful_share: Fraction of the games played by the careful player.

    The last four are the transcripts of ``rlfb-tiny-multiturn``; at their defaults (no transcripts) they
    are left out of :meth:`fingerprint`, so recipes from before them keep their hash and their cache entry.
    """

    grammar_seed: int = 0
    n_documents: int = 60_000
    arithmetic_share: float = 0.7
    forgotten_carry_share: float = 0.7
    vocab_size: int = 512
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 64
    steps: int = 1200
    batch_size: int = 64
    learning_rate: float = 2e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    seed: int = 0
    num_threads: int = 1
    game_share: float = 0.0
    tool_share: float = 0.0
    question_share: float = 0.0
    careful_share: float = 0.3

    @property
    def has_transcripts(self) -> bool:
        """Whether the corpus holds transcripts (calculator calls, questions, games)."""
        return bool(self.game_share or self.tool_share or self.question_share)

    def fields(self) -> dict[str, Any]:
        """The recipe's fields as recorded in ``rlfb_build.json`` (the transcript shares only when used)."""
        fields = dataclasses.asdict(self)
        if not self.has_transcripts:
            for name in _TRANSCRIPT_FIELDS:
                del fields[name]
        return fields

    def fingerprint(self) -> str:
        """Returns the sha256 hex digest of the recipe and the build format version."""
        payload = json.dumps({"format": BUILD_FORMAT_VERSION, **self.fields()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def corpus(self) -> list[corpus.Document]:
        """The pretraining documents this recipe draws from the grammar."""
        return corpus.pretraining_corpus(
            self.n_documents, self.grammar_seed, self.arithmetic_share, self.forgotten_carry_share,
            game_share=self.game_share, tool_share=self.tool_share, question_share=self.question_share,
            careful_share=self.careful_share)


_TRANSCRIPT_FIELDS = ("game_share", "tool_share", "question_share", "careful_share")

BUILTIN_RECIPES: dict[str, TinyModelRecipe] = {
    "rlfb-tiny": TinyModelRecipe(),
    # rlfb-tiny's recipe plus transcripts of the multi-turn environments' formats, for the calculator, the
    # guess-the-number game and reasoning-gym's basic_arithmetic (docs/models.md): 20,000 more documents and
    # 800 more steps for the new kinds. rlfb-tiny stays as it was, so every figure measured on it still holds.
    "rlfb-tiny-multiturn": TinyModelRecipe(n_documents=80_000, steps=2000, game_share=0.25, tool_share=0.15,
                                           question_share=0.35, careful_share=0.4),
}


# ------------------------------------------------------------------------------------- shipped copy
def shipped_path(name: str) -> Path:
    """Returns the directory of the copy of a built-in model shipped inside the package (package data)."""
    return SHIPPED_DIR / name


def locate(name: str = "rlfb-tiny", *, progress: bool = True) -> Path:
    """Returns the directory a built-in model name loads from.

    That is the shipped copy when it was built from the registered recipe (the normal case: no build, no
    cache), and otherwise the cache entry of the registered recipe, built on first use (a source tree whose
    recipe was changed, or tests that register a smaller recipe).

    Args:
        name: A key of :data:`BUILTIN_RECIPES`.
        progress: Show a progress bar if the model has to be built.

    Raises:
        ModelNotFoundError: If the shipped copy is damaged (a file truncated or its weights changed).
    """
    recipe = BUILTIN_RECIPES[name]
    shipped = shipped_path(name)
    record = read_marker(shipped)
    if record is None or record.get("recipe_hash") != recipe.fingerprint():
        return ensure_built(name, recipe, progress=progress)
    problem = verify_entry(shipped, recipe)
    if problem is not None:
        raise ModelNotFoundError(
            f"the shipped copy of {name} in {shipped} is damaged ({problem}); reinstall rlfb, or rebuild it "
            f"with `rlfb models build {name}` and name the directory it prints as the model")
    return shipped


# ----------------------------------------------------------------------------------------------- cache
def rlfb_home() -> Path:
    """Returns rlfb's cache root: ``$RLFB_HOME`` if set, else ``~/.cache/rlfb``."""
    return Path(os.environ.get("RLFB_HOME") or Path.home() / ".cache" / "rlfb").expanduser()


def cache_path(name: str, recipe: TinyModelRecipe) -> Path:
    """Returns the cache directory of a built-in model built from ``recipe`` (it may not exist yet)."""
    return rlfb_home() / "models" / f"{name}-{recipe.fingerprint()[:12]}"


def read_marker(path: Path) -> dict[str, Any] | None:
    """Returns the build record of a directory, or None if it has none (not a finished build)."""
    try:
        record = json.loads((path / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def verify_entry(path: Path, recipe: TinyModelRecipe | None = None, *, check_weights: bool = True) -> str | None:
    """Checks that ``path`` holds a finished, intact build (of ``recipe``, if given).

    The cheap check compares every file's size with the size recorded in ``rlfb_build.json``, which catches
    a truncated copy; ``check_weights`` also recomputes the weights' sha256 (about 15 ms for rlfb-tiny, plus
    importing torch), which catches changed bytes.

    Args:
        path: A cache entry or the shipped copy.
        recipe: The recipe the entry must have been built from; None accepts any.
        check_weights: Recompute the weights' sha256 and compare it with the recorded one.

    Returns:
        None if the entry is intact, else what is wrong with it, e.g.
        ``"model.safetensors is 1,000 bytes, 3,485,144 recorded"``.
    """
    record = read_marker(path)
    if record is None:
        return f"no readable {MARKER_FILE}: the build did not finish"
    if recipe is not None and record.get("recipe_hash") != recipe.fingerprint():
        return f"built from another recipe ({str(record.get('recipe_hash'))[:12]})"
    sizes = record.get("file_sizes")
    if not isinstance(sizes, dict) or "model.safetensors" not in sizes:
        return f"{MARKER_FILE} records no file sizes (written by an older rlfb)"
    for file_name, size in sorted(sizes.items()):
        file = path / file_name
        if not file.is_file():
            return f"{file_name} is missing"
        if file.stat().st_size != size:
            return f"{file_name} is {file.stat().st_size:,} bytes, {size:,} recorded"
    if check_weights:
        try:
            digest = weights_sha256(path)
        except Exception as error:  # noqa: BLE001 - safetensors raises several kinds for corrupt bytes
            return f"model.safetensors cannot be read ({type(error).__name__}: {error})"
        if digest != record.get("weights_sha256"):
            return f"the weights' sha256 is {digest[:12]}..., {str(record.get('weights_sha256'))[:12]}... recorded"
    return None


def is_complete(path: Path, recipe: TinyModelRecipe) -> bool:
    """Whether ``path`` holds a finished, intact build of exactly ``recipe``."""
    return verify_entry(path, recipe) is None


def ensure_built(name: str = "rlfb-tiny", recipe: TinyModelRecipe | None = None, *, rebuild: bool = False,
                 progress: bool = True) -> Path:
    """Returns the cache directory of a built-in model, building it first if needed.

    A damaged entry (a file truncated, the weights changed) is rebuilt, never returned. Builds of one entry
    take turns through a lock file: a second process waits for the first and then uses its entry.

    Args:
        name: A key of :data:`BUILTIN_RECIPES` (or any name, when ``recipe`` is given).
        recipe: Overrides the registered recipe (tests build much smaller variants this way).
        rebuild: Build again even if a complete entry exists (the new one replaces it).
        progress: Show a progress bar on stderr while pretraining.

    Returns:
        A directory that ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load;
        never the shipped copy.

    Raises:
        KeyError: If ``name`` is not a built-in model and no recipe is given.
    """
    recipe = recipe or BUILTIN_RECIPES[name]
    final = cache_path(name, recipe)
    if not rebuild and is_complete(final, recipe):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(final, progress=progress):
        if not rebuild and is_complete(final, recipe):
            return final  # built by the process we waited for
        _remove_abandoned_builds(final)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; the cache entry should be readable like any model dir
        try:
            if progress:
                print(f"rlfb: building {name} into {final} (a few minutes on CPU)", file=sys.stderr)
            build_model(recipe, staging, name=name, progress=progress)
            _publish(staging, final, recipe, replace=rebuild)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


@contextlib.contextmanager
def _build_lock(final: Path, *, progress: bool) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``.<entry>.lock`` beside the entry; the kernel drops it if we die."""
    with open(final.with_name(f".{final.name}.lock"), "a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"rlfb: waiting for another build of {final.name} to finish", file=sys.stderr)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _publish(staging: Path, final: Path, recipe: TinyModelRecipe, *, replace: bool) -> None:
    """Moves a finished build into place with an atomic rename; a complete entry is kept unless ``replace``."""
    if final.exists() and (replace or not is_complete(final, recipe)):
        # A damaged entry (or one we were asked to replace): move it aside, then delete it, so the name is
        # free for an atomic rename and no reader sees a partly deleted directory.
        graveyard = final.with_name(f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(final, graveyard)
        shutil.rmtree(graveyard, ignore_errors=True)
    try:
        os.rename(staging, final)  # atomic on POSIX; fails if `final` is a non-empty directory
    except OSError as error:
        if not is_complete(final, recipe):  # a process that does not take the lock (an older rlfb) won
            raise OSError(f"could not move the build of {final.name} into {final.parent} ({error}); "
                          f"remove {final} and try again") from error


def cache_entries(name: str) -> list[Path]:
    """The cache directories of every recipe of ``name`` (finished or not), in name order."""
    models = rlfb_home() / "models"
    return sorted(path for path in models.glob(f"{name}-*") if path.is_dir()) if models.is_dir() else []


def _remove_abandoned_builds(final: Path) -> None:
    """Deletes staging directories of builds whose process no longer runs (killed mid-build)."""
    for leftover in [*final.parent.glob(".*.tmp-*"), *final.parent.glob(".*.old-*")]:
        try:
            pid = int(leftover.name.split("-")[-2])
        except (ValueError, IndexError):
            continue
        if not _process_alive(pid):
            shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def directory_size(path: Path) -> int:
    """Total size in bytes of the files under ``path``."""
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def weights_sha256(path: str | Path) -> str:
    """The sha256 of a saved model's tensors (names, dtypes, shapes and bytes, in name order).

    Hashes the tensors rather than the file, so metadata written by safetensors cannot hide or fake a
    difference in the weights.
    """
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(Path(path) / "model.safetensors"))
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- build
def train_tokenizer(documents: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer on the corpus; digits are always single tokens.

    Splitting numbers into digits lets the model learn addition digit by digit ("42" is "4", "2"), instead
    of memorizing a token per number.

    Args:
        documents: The corpus documents.
        vocab_size: Target vocabulary size, the end-of-text token included.

    Returns:
        A ``PreTrainedTokenizerFast`` with bos = eos = pad = unk = ``"<|endoftext|>"``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                   pad_token=END_OF_TEXT, unk_token=END_OF_TEXT,
                                   model_max_length=1024, padding_side="left")


def _learning_rate(step: int, recipe: TinyModelRecipe) -> float:
    """Linear warm-up, then cosine decay from the peak to 10% of it."""
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model(recipe: TinyModelRecipe, output_dir: str | Path, *, name: str = "rlfb-tiny",
                progress: bool = True) -> dict[str, Any]:
    """Generates the corpus, trains the tokenizer, pretrains the model and saves all of it.

    Args:
        recipe: What to build.
        output_dir: An existing, empty directory; receives the model, the tokenizer and the marker file
            (written last).
        name: Recorded in the marker file.
        progress: Show a tqdm progress bar on stderr.

    Returns:
        The build record written to ``rlfb_build.json``.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import GPT2Config, GPT2LMHeadModel

    output_dir = Path(output_dir)
    started = time.perf_counter()
    documents = recipe.corpus()
    tokenizer = train_tokenizer([corpus.document_text(document) for document in documents], recipe.vocab_size)
    eos_id = tokenizer.eos_token_id
    # Each document is its own row starting at position 0, exactly like a prompt at sampling time, and
    # ends with end-of-text so that sampling stops by itself.
    encoded = _encode_documents(documents, tokenizer, recipe.n_positions)
    # A batch holds one kind of document: sums are ~10 tokens and reviews ~20 (games ~30), so a mixed batch
    # would pad every sum to review length and spend most of its compute on padding.
    pools = [[ids for ids, document in zip(encoded, documents, strict=True) if _kind(document) == kind]
             for kind in ("sums", "reviews", "games")]

    with torch_threads(recipe.num_threads):
        torch.manual_seed(recipe.seed)
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=recipe.n_positions, n_embd=recipe.n_embd,
                            n_layer=recipe.n_layer, n_head=recipe.n_head, bos_token_id=eos_id,
                            eos_token_id=eos_id, pad_token_id=eos_id, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0)
        model = GPT2LMHeadModel(config)
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=recipe.learning_rate, betas=(0.9, 0.98))
        generator = torch.Generator().manual_seed(recipe.seed)
        model.train()
        bar = tqdm(range(recipe.steps), desc=f"pretraining {name}", unit="step", disable=not progress,
                   file=sys.stderr, mininterval=1.0)
        loss_value = float("nan")
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(step, recipe)
            input_ids, attention_mask = _draw_batch(pools, recipe, generator, eos_id)
            labels = input_ids.masked_fill(attention_mask == 0, -100)  # no loss on padding
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            loss_value = loss.item()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss_value:.3f}")
        bar.close()
        model.eval()

    model.generation_config.pad_token_id = eos_id
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    record = {
        "name": name,
        "recipe": recipe.fields(),
        "recipe_hash": recipe.fingerprint(),
        "build_format_version": BUILD_FORMAT_VERSION,
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": loss_value,
        "build_seconds": round(time.perf_counter() - started, 2),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "weights_sha256": weights_sha256(output_dir),
        "torch_version": torch.__version__,
        # What verify_entry checks cheaply: a truncated or missing file shows as a different size.
        "file_sizes": {file.name: file.stat().st_size for file in sorted(output_dir.iterdir()) if file.is_file()},
    }
    # The marker goes last: its presence is what makes the directory a complete cache entry.
    (output_dir / MARKER_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _kind(document: corpus.Document) -> str:
    if isinstance(document, corpus.Transcript) and document.kind == "game":
        return "games"
    return "sums" if corpus.is_arithmetic(document) else "reviews"


def _encode_documents(documents: list[corpus.Document], tokenizer: Any, n_positions: int) -> list[list[int]]:
    """Token ids per document, end-of-text last; a transcript tokenized part by part as the environment does.

    A transcript's model turns each end with end-of-text (the turn's end at sampling time), and its replies
    are rendered with the environment's plain template (``"\\n{reply}\\n"``).
    """
    from rlfb.envs.conversation import DEFAULT_REPLY_TEMPLATE

    eos_id = tokenizer.eos_token_id
    texts = [document for document in documents if isinstance(document, str)]
    encoded_texts = iter(tokenizer(texts)["input_ids"]) if texts else iter(())
    encoded: list[list[int]] = []
    for document in documents:
        if isinstance(document, str):
            ids = next(encoded_texts)[: n_positions - 1] + [eos_id]
        else:
            ids = []
            for role, text in document.parts():
                if role == "reply":
                    ids += tokenizer(DEFAULT_REPLY_TEMPLATE.format(reply=text))["input_ids"]
                else:
                    ids += tokenizer(text)["input_ids"] + ([eos_id] if role == "turn" else [])
            if len(document.replies) == len(document.turns):  # ends on a reply: the document still ends
                ids.append(eos_id)
            ids = ids[:n_positions]
        encoded.append(ids)
    return encoded


def _draw_batch(pools: list[list[list[int]]], recipe: TinyModelRecipe, generator: torch.Generator,
                pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A right-padded batch of games (with probability ``game_share``), else of sums (with probability
    ``arithmetic_share``) or of review sentences."""
    import torch

    arithmetic, reviews, games = pools
    if games and torch.rand((), generator=generator) < recipe.game_share:
        return _pad_right([games[row] for row in torch.randint(len(games), (recipe.batch_size,),
                                                                generator=generator).tolist()], pad_id)
    use_sums = bool(arithmetic) and (not reviews or torch.rand((), generator=generator) < recipe.arithmetic_share)
    pool = arithmetic if use_sums else reviews
    rows = torch.randint(len(pool), (recipe.batch_size,), generator=generator).tolist()
    return _pad_right([pool[row] for row in rows], pad_id)


def _pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = torch.tensor(row)
        attention_mask[index, : len(row)] = 1
    return input_ids, attention_mask
