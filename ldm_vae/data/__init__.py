"""Stage 1, data: image sources -> {"pixel_values": [3, R, R] in [-1, 1], "label"} items."""
