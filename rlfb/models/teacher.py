"""Teachers: a frozen causal LM loaded from a model name, a model directory, or a finished rlfb run.

The distillation agent (rlfb/agents/distillation.py) and the ``teacher_logprob`` reward both open their
teacher here. A run directory is opened as ``rlfb eval`` and ``rlfb generate`` open it
(:func:`rlfb.evaluation.load_policy`: its newest checkpoint, ``final/`` once finished, the adapter on its
base model); the adapter is then merged into that private copy of the base weights, so the teacher costs
one plain forward pass. Only weights are read: a run directory never imports code by being a teacher.

Distillation compares next-token distributions token by token, so the teacher must share the student's
tokenizer: :func:`check_same_tokenizer` says so in one line when it does not.
"""

from __future__ import annotations

from typing import Any

from rlfb.errors import ConfigError


def load_teacher(name_or_run: str, device: Any = "auto") -> tuple[Any, Any]:
    """A frozen teacher (eval mode, no gradients) and its tokenizer.

    Args:
        name_or_run: A built-in model name, a causal LM directory or hub id, or an rlfb run directory
            (or one of its checkpoints).
        device: Where the teacher runs.

    Returns:
        (model, tokenizer): a plain causal LM (a run's adapter merged into its base weights).

    Raises:
        ModelNotFoundError: the model cannot be found.
        CheckpointNotFoundError: a run directory without an intact checkpoint.
    """
    from rlfb.evaluation import load_policy

    policy, _ = load_policy(name_or_run, device=str(device))
    # A model name gets an identity adapter (B = 0) from load_policy: merging it changes no weight.
    model = policy.model.merge_and_unload()
    model.requires_grad_(False)
    model.eval()
    return model, policy.tokenizer


def check_same_tokenizer(student: Any, teacher: Any, student_model: Any, teacher_model: Any,
                         teacher_name: str) -> None:
    """Raise ConfigError unless student and teacher share vocabulary and output size.

    Args:
        student: The student's tokenizer (None: compare the models' output sizes only).
        teacher: The teacher's tokenizer (None: likewise).
        student_model: The student causal LM (its output embedding gives the logits' size).
        teacher_model: The teacher causal LM.
        teacher_name: How the config names the teacher, for the message.
    """
    student_size = student_model.get_output_embeddings().weight.shape[0]
    teacher_size = teacher_model.get_output_embeddings().weight.shape[0]
    fix = ("distillation compares next-token distributions token by token, so the teacher must use the student's "
           "tokenizer: pick a teacher trained from the same base model family")
    if student_size != teacher_size:
        raise ConfigError(f"teacher {teacher_name!r} predicts {teacher_size} tokens, the student {student_size}; {fix}")
    if student is None or teacher is None:
        return
    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    if student_vocab != teacher_vocab or student.eos_token_id != teacher.eos_token_id:
        differing = sum(teacher_vocab.get(token) != index for token, index in student_vocab.items())
        raise ConfigError(f"teacher {teacher_name!r} has a different tokenizer from the student's ({differing} of "
                          f"{len(student_vocab)} tokens differ, eos {teacher.eos_token_id} vs "
                          f"{student.eos_token_id}); {fix}")
