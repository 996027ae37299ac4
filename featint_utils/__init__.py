"""featint: does a sparse autoencoder's error hide non-linear interactions between its own features?

The package behind the notebooks in ``notebooks/``; one concern per module (see DESIGN.md).
"""

__version__ = "0.1.0"
