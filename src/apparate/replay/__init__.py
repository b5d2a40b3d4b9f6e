"""Replay: recorded model outputs, arrival traces and batchers, run through a simulated server.

Everything here is pure numpy so the same pieces serve the discrete-event simulator and the live
engine.
"""
