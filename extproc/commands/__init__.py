"""Sub-commands of the ``extproc`` command line, one module per job."""
