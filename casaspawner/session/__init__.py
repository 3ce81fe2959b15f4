"""The session pipeline: from a spawn request to a plan, without JupyterHub.

Both spawners run this pipeline. Its modules:

- ``settings`` holds the operator's choices as one frozen value.
- ``config`` checks those choices.
- ``options`` parses what users ask for.
- ``identity`` reads who they are from the login.
- ``readers`` and ``vospace`` open the datasets they name.
- ``prepare`` runs the steps in one pass.
- ``form`` and ``progress`` render what users see before and while a session starts.
"""
