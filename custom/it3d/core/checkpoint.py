"""Lightning CheckpointIO that writes checkpoints atomically (temp file + rename)."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = os.fspath(path)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
