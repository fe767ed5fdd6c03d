"""rlfb: reinforcement learning from feedback for language models.

Importing rlfb registers its Gymnasium environments (``rlfb/TextGeneration-v0``, ``rlfb/Completion-v0``).
"""

from __future__ import annotations

__version__ = "0.1.0"
