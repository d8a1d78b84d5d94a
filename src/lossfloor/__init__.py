"""lossfloor: how low a diffusion model's loss can go (arXiv 2506.13763).

Everything inside works in VE coordinates (x_t = x0 + σ·ε) and per-element x0 units.
"""

__version__ = "0.1.0"
