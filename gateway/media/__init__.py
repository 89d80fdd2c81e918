"""Encode-once media: shared encoders and the per-viewer packet tracks they feed."""
