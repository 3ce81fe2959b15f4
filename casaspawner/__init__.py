"""JupyterHub sessions with the exact CASA build ALMA used on a dataset."""

__version__ = "0.1.0"
