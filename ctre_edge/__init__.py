"""ctre-edge: truly sparse training of highly sparse MLPs (CTRE, SET) on the device that runs them.

Importing the package is cheap: numba is imported only by the modules that train or run kernels.
"""

__version__ = "0.1.0"
