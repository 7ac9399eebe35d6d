"""HydraAI: volunteers train a shared language model with Flower and earn tokens."""

__version__ = "0.1.0"
