"""Tests of vpr.server (a mirror of the package): shared helpers in support.py and live_support.py."""
