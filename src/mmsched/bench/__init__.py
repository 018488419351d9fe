"""Benchmarks that compare strategies and transports on a real pipeline (``mmsched bench``)."""
