"""Loss terms: EWC and the Hessian-eigenvalue-preserving curvature regularizer."""
