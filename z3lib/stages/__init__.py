"""The file-level entry points, one module per workflow rule.

The pattern of cryoDRGN's ``commands/``: each takes paths and settings, reads the files, calls
the array-level algorithms of the library's modules and writes its outputs (atomically). The
workflow's scripts (``workflow/scripts/*.py``) call these and nothing else of the library.

Importing this package imports none of its stages.
"""
