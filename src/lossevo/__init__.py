"""lossevo: reproducible loss-function metalearning (GLO, TaylorGLO, EvoMAL)."""

__version__ = "0.1.0"
