"""lora-tui's MLX engine: config, data, model, training, evaluation, generation.

It never imports the UI. The optimized BLAS is preloaded here because it must be in place before the
first `import mlx.core` anywhere in the process.
"""

from engine import blas as _blas

_blas.preload()

__version__ = "0.1.0"
