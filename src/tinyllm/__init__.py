"""tinyllm: learn, train and serve a small GPT on your own machine."""

__version__ = "0.1.0"
