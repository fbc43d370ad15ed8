"""The weights pixseek ships (and their cards), found with importlib.resources.

Installed, this folder is ``pixseek.data``: a wheel carries it as package data, so an
installed pixseek needs no checkout and no model hub.
"""
