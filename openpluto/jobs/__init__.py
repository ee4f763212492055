"""The job core of the slide stages (``tissue``, ``tiles``, ``embed``): one way to find slides, name and
fingerprint their outputs, isolate each slide with a timeout, split a cohort with ``--shard I/N``,
write ``errors.csv`` and exit.

Modules: ``slides`` (extensions, discovery, ids, identity), ``outputs`` (settings fingerprints,
errors.csv, shard parts), ``isolate`` (one process per slide with a timeout), ``shard`` (``--shard``),
``exitcodes`` (0 / 3 / 1 / 130 / 143). Nothing here imports torch or a slide reader.
"""
