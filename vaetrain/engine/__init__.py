"""The training engine: the LightningModule (``module``), one function per mode (``modes``), the EMA, the LR
schedule, parameter selection, step guards, RNG state, checkpoints and callbacks."""
