"""distsft: distributed LoRA/QLoRA supervised fine-tuning.

    import distsft
    out = distsft.train("run.yaml")          # -> transformers.trainer_utils.TrainOutput

`distsft.train` is the submodule `distsft/train.py`, made callable (its `__call__` is its `train()`), so
the API works whether or not something imported the submodule first. Importing `distsft` itself stays
light: torch and transformers load on first use.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "train":
        import importlib

        return importlib.import_module("distsft.train")
    raise AttributeError(f"module 'distsft' has no attribute {name!r}")
