"""Viewers: one aiortc peer connection each, negotiated over WHEP."""
