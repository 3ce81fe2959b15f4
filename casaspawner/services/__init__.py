"""Hub services for CASA operators: the casa-sessions page, release drains, in-session notices."""
