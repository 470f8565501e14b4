"""Peer runners: each peer is a standalone script run in a subprocess by :mod:`benchmarks.peers.common`."""
