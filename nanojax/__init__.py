"""nanojax: nanochat's LLM pipeline in JAX.

    import nanojax
    m = nanojax.load("base")      # the latest checkpoint of a stage: m.config, m.params, m.tokenizer, m.meta
    nanojax.list_checkpoints()

Both are imported on first use, so `import nanojax` stays light (no JAX until a checkpoint is asked for).
"""
__all__ = ["load", "list_checkpoints"]


def __getattr__(name):
    if name in __all__:
        from nanojax import models
        return getattr(models, name)
    raise AttributeError(f"module 'nanojax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
