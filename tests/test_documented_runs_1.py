"""Shard 1 of the documented commands' runs (see ``documented.py``): a file of its own so
that another test process takes it."""

from documented import shard_tests

test_command_runs_small, test_server_command_serves_one_request_and_stops_clean = shard_tests(1)
