"""rsvc: Representational Similarity via interpretable Visual Concepts, as a command-line tool."""

__version__ = "0.1.0"
