"""The Ray parts of segrl: training on Ray Train (and, later, scoring on Ray Data, sweeps on Ray Tune).

Nothing here starts Ray at import time.
"""
