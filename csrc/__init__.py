"""CUDA C++ sources of the fused kernel (package data; compiled by ct3d_fx._build)."""
