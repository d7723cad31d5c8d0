"""Chameleon-style early-fusion family: one decoder over text tokens and VQ image codes.

config.py (MmkitChameleonConfig), model.py (MmkitChameleonForCausalLM), load.py (mmkit and
transformers `chameleon` checkpoints, export back), processor.py (documents -> tokens),
task.py (training task "chameleon"). Submodules import torch/transformers; this file does not.
"""

__all__ = ["MmkitChameleonConfig", "MmkitChameleonForCausalLM", "load_model", "export_to_transformers",
           "ChameleonProcessor"]


def __getattr__(name):
    if name == "MmkitChameleonConfig":
        from mmkit.models.chameleon.config import MmkitChameleonConfig

        return MmkitChameleonConfig
    if name == "MmkitChameleonForCausalLM":
        from mmkit.models.chameleon.model import MmkitChameleonForCausalLM

        return MmkitChameleonForCausalLM
    if name in ("load_model", "export_to_transformers"):
        from mmkit.models.chameleon import load

        return getattr(load, name)
    if name == "ChameleonProcessor":
        from mmkit.models.chameleon.processor import ChameleonProcessor

        return ChameleonProcessor
    raise AttributeError(f"module 'mmkit.models.chameleon' has no attribute {name!r}")
