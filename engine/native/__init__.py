"""lora-tui's own MLX primitives in C++, built on first use for the machine that runs them (build.py)."""
