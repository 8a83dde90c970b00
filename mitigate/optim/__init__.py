"""Optimizer wrappers: gradient projection (A-GEM, OGD, PCGrad), clipping, Low-Rank Circuit Projection."""
