"""Benchmarks are commands (`homelab-disagg bench ...`): each measures ours and its baseline side
by side in one run, prints a table for people, writes CSV with host and git metadata, and with
--json prints one JSON object as the last line of output."""
