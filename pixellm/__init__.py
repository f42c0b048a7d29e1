"""PixelLM platform."""
