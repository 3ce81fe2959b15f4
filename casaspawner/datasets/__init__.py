"""ALMA dataset identifiers, evidence readers and version resolution."""
