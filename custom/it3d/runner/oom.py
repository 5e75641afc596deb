"""Out of GPU memory: one line that says which stage ran out and which settings of that stage to lower.

:func:`oom_message` turns a ``torch.OutOfMemoryError`` raised inside a stage into that line, with the
stage's current values of the keys that set its memory (read from the stage's config), most effective
first. The run stops there; earlier stages' outputs and the stage's last checkpoint stay, so rerunning
the same command with a lowered setting resumes.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

# system type -> (key, what lowering it does); the first keys free the most
ADVICE = {
    "coarse": [
        ("data.heights", "the training render size (e.g. [128])"),
        ("system.renderer.num_samples_per_ray", "ray samples"),
        ("system.renderer.num_importance_samples", "importance samples"),
        ("system.renderer.eval_chunk_size", "rays per evaluation chunk"),
    ],
    "refine": [
        ("system.builder.num_points", "the point count"),
        ("data.heights", "the training render size"),
        ("system.renderer.unet_precision", "fp16 / bf16 for the deferred U-Net"),
        ("system.builder.render_size", "the builder's view size"),
    ],
    "dreambooth": [
        ("data.resolution", "the fine-tuning size"),
        ("system.class_batch_size", "class images per pipeline call"),
        ("system.optimizer.name", "AdamW8bit: 8-bit optimiser states"),
        ("system.gradient_checkpointing", "true: recompute activations"),
        ("system.train_text_encoder", "false: fine-tune the UNet only"),
    ],
}
PHASES = {"train": "training", "test": "rendering the test views", "export": "exporting", "validate": "validating"}


def memory_keys(cfg: Optional[DictConfig], system_type: str) -> List[Tuple[str, Any, str]]:
    """(key, current value, what it does) of the stage's memory settings that its config has."""
    out = []
    for key, what in ADVICE.get(system_type, []):
        value = OmegaConf.select(cfg, key, default=None) if isinstance(cfg, DictConfig) else None
        if value is not None or cfg is None:
            out.append((key, value, what))
    return out


def oom_message(stage: str, system_type: str, cfg: Optional[DictConfig], exc: BaseException,
                precision: Optional[str] = None, phase: str = "train") -> str:
    """The one-line error for ``exc`` (an out-of-memory error) in ``stage``."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    keys = memory_keys(cfg, system_type)
    hints = [f"{k}={_fmt(v)} ({what})" if v is not None else f"{k} ({what})" for k, v, what in keys]
    if precision in ("fp32", "float32") and system_type in ADVICE:  # auto is fp16 on CUDA already
        hints.append("precision=fp16 (or bf16) for the frozen models")
    doing = PHASES.get(phase, phase)
    lead = f"stage '{stage}' ran out of GPU memory while {doing}" if doing else f"stage '{stage}' ran out of GPU memory"
    advice = "; lower one of: " + ", ".join(hints) if hints else ""
    return (f"{lead}{advice}; rerun the same command to resume from the last checkpoint "
            f"(the GPU said: {detail[:200]})")


def _fmt(v: Any) -> str:
    if isinstance(v, (DictConfig,)) or OmegaConf.is_list(v):
        return str(OmegaConf.to_container(v))
    return str(v)


def is_oom(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA, MPS, XPU), or an allocator RuntimeError that says so."""
    import torch

    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
