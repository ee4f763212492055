"""The ``openpluto`` command line: one sub-command module per stage, dispatched by ``main``."""
