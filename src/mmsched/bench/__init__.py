"""Benchmarks that compare strategies and transports on a real pipeline (``mmsched bench``)."""

DESIGN_STORE = "inline"
"""The payload store a benchmarked design runs with unless ``--stores`` says otherwise: a
design is named by its strategy (``tokenizer`` sends bytes in its messages), and the preset
``zero-copy`` brings its own ``shm`` store. Not the config's default store, which is ``shm``
for every strategy."""
