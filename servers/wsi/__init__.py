"""Whole-slide image tools: slide access, tissue, tiling, stain, nuclei, features, heatmaps, export."""
