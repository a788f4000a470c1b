"""transferbench: how much does pretraining gain over scratch, and where does it stop paying?"""

__version__ = "0.1.0"
