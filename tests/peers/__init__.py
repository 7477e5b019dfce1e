"""Test peers: small, dependency-free re-implementations of outside models (DETR) in their own
layout and call patterns, for testing ``unit_fast``'s patchers against code it did not write."""
