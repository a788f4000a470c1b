"""Backbones (timm), their weight sources, fast convolutions, and the frozen-feature cache."""
