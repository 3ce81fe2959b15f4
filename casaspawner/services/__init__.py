"""Hub services for CASA operators.

They are the casa-sessions page, release drains and in-session notices.
"""
