"""casaspawner: start the exact CASA build ALMA's pipeline used on a dataset, in JupyterHub."""

__version__ = "0.1.0"
