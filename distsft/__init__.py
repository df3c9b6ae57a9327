"""distsft: distributed LoRA/QLoRA supervised fine-tuning."""

__version__ = "0.1.0"
