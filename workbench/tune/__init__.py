"""Palettes fitted to what the UNet outputs, not only to its weights.

Two ways below 4 bits per parameter: learned LUTs (each palettized layer keeps its cluster assignment and its LUT
values are learned by distillation from the float UNet) and training-time palettization (the demo model fine-tuned
with its own data while its weights are palettized). Both sit above the analysis (their calibration inputs are the
analysis' trajectories) and the Core ML export (what they learn is exported through the explicit-LUT path).
"""
