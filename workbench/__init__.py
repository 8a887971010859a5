"""A workbench for Core ML palettization of Stable Diffusion models.

The modules follow the flow of data: load a pipeline (`pipelines`), find its compressible layers
(`layers`), palettize them (`palettize`), measure (`metrics`, `analysis`), turn the measurements into
mixed-bit recipes (`recipes`, `allocation`), export to Core ML (`coreml`), and show the results
(`plots`, `grids`, `report`). Importing the package has no side effects.
"""

__version__ = "0.1.0"
