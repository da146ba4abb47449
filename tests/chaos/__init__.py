"""Chaos tests: real servers and real worker processes, killed, stalled and restarted."""
